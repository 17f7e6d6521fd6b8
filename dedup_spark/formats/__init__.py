"""Input formats: one module per on-disk layout, each with the same small surface.

A format module has ``detects(relatives)`` (does a file listing look like this layout, for
``input.format: auto``) and ``find_shards(root, files, config, bad_shard)`` (the shard candidates,
from headers and footers only: a dict per shard with ``kind``, ``embedding_uri``, ``metadata_uri``,
``relative``, ``rows``, ``dim``, ``dtype``, ``data_offset``, ``row_groups``, ``columns``).
A shard's embedding file is of a *kind*, ``npy`` or ``parquet``; the module of that kind decodes
its rows (``decode``) and rewrites it without some rows (``rewrite``).

To add a format: a module here with those two functions, and its name in ``FORMATS`` (the order
is the order ``auto`` tries them).
"""

from __future__ import annotations

from types import ModuleType

from dedup_spark.formats import laion, npy, parquet

FORMATS: dict[str, ModuleType] = {"laion": laion, "parquet": parquet, "npy": npy}
# Modules of the embedding files' kinds.
KINDS: dict[str, ModuleType] = {"npy": npy, "parquet": parquet}


def detect(relatives: list[str]) -> str | None:
    """The first format whose layout the files match, or None."""
    return next((name for name, module in FORMATS.items() if module.detects(relatives)), None)
