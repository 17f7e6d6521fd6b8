"""Errors a user can act on: each message names what is wrong and where, in one line."""

from __future__ import annotations


class InputError(ValueError):
    """The input cannot be read as the requested format; the message says why."""
