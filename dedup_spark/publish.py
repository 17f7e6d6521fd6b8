"""Where a run may write, who may write there, and how its results appear: shared by every job.

- ``check_locations``: the output and the work prefix are never an input or inside one, and no
  input is inside them, compared on real paths (``storage.canonical``: symlinks, ``..``,
  ``file://``, trailing slashes, S3 bucket + key). An output that already holds a published
  result needs ``overwrite``; an output holding files of the job's names that no run of the job
  published is refused rather than overwritten.
- ``Claim``: one run at a time on an output (and on its work prefix when that lies elsewhere).
  A claim file (``_CLAIM.json``: run id, host, pid, start and heartbeat times) is created
  exclusively; a second run refuses with one line naming the holder. A claim is taken over only
  when its holder is dead: on the same host its pid is gone, or its heartbeat (refreshed every
  ``timeout / 10``) is older than ``timeout``; or when asked to (``take_over``). A run checks it
  still holds its claim between stages and before it publishes anything.
- ``publish``: staged files move into the output, then ``_SUCCESS`` lists them. The files about
  to be published (and those of the result they replace) are first recorded in the output
  (``_PUBLISHING.json``), so a publish interrupted at any point is finished or redone by the
  next run, whatever it computed in between, and only files a run of the job published are ever
  deleted.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from dedup_spark import faults, storage

log = logging.getLogger("dedup_spark")

SUCCESS = "_SUCCESS"
CLAIM = "_CLAIM.json"
PUBLISHING = "_PUBLISHING.json"


class OutputError(ValueError):
    """The output location cannot be used as asked."""


def check_locations(inputs: list[str], output: str, work: str, overwrite: bool, entries: tuple[str, ...]) -> None:
    """Refuse overlapping locations and outputs this run must not replace, before any work.

    ``entries``: the top-level names the job publishes (``dedup``, ``report.json``, ...).
    """
    for source in inputs:
        for target, role in ((output, "output"), (work, "work prefix (run.work_dir)")):
            if storage.is_within(target, source):
                raise OutputError(f"{role} {target} is the input {source} or inside it; choose another location")
            if storage.is_within(source, target):
                raise OutputError(f"input {source} is inside the {role} {target}; choose another location")
    if storage.scheme(output) == "file":
        real = storage.canonical(output)[len("file://"):]
        if os.path.exists(real) and not os.path.isdir(real):
            raise OutputError(f"output {output} is a file, not a directory")
    published = _published_files(output)
    if storage.exists(storage.join(output, SUCCESS)) and not overwrite:
        raise OutputError(f"output {output} already holds a published result; pass --overwrite to replace it")
    foreign = [entry for entry in _job_entries(output, entries)
               if any(relative not in published for relative in _files_under(output, entry))]
    if foreign:
        raise OutputError(f"output {output} holds {', '.join(foreign)}, which no run of this job published; "
                          "move it away or choose another output")


def _job_entries(output: str, entries: tuple[str, ...]) -> list[str]:
    present = {uri.rstrip("/").rsplit("/", 1)[-1] for uri in storage.list_entries(output)}
    return [name for name in entries if name in present]


def _files_under(output: str, entry: str) -> list[str]:
    prefix = storage.join(output, entry)
    return [_relative(uri, output) for uri in storage.list_files(prefix)]


def _relative(uri: str, root: str) -> str:
    return uri[len(root.rstrip("/")) + 1:]


def _published_files(output: str) -> set[str]:
    """Files in the output that a run of the job put there: listed by ``_SUCCESS`` or by an
    interrupted publish's ``_PUBLISHING.json``."""
    files: set[str] = set()
    success = storage.join(output, SUCCESS)
    if storage.exists(success):
        files.update(_read_listing(success).get("files", []))
    plan = storage.join(output, PUBLISHING)
    if storage.exists(plan):
        recorded = _read_listing(plan)
        files.update(recorded.get("files", []) + recorded.get("previous", []))
    return files


def _read_listing(uri: str) -> dict[str, Any]:
    try:
        listing = storage.read_json(uri)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise OutputError(f"{uri} is not a listing this job wrote; move it away or choose another output") from None
    return listing if isinstance(listing, dict) else {}


@dataclass
class Claim:
    """An exclusive claim on one or more locations for one run (see the module docstring).

    ``timeout``: seconds without a heartbeat after which a holder on another host counts as dead.
    """

    locations: list[str]
    timeout: float = 600.0
    take_over: bool = False
    run_id: str = field(default_factory=lambda: uuid.uuid4().hex[:16])
    started: str = ""
    _held: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _lost: str | None = None

    def __enter__(self) -> Claim:
        self.acquire()
        return self

    def __exit__(self, *_: object) -> None:
        self.release()

    def acquire(self) -> None:
        self.started = _now()
        for location in self.locations:
            uri = storage.join(location, CLAIM)
            if not storage.create_exclusive(uri, self._payload()):
                self._take_over_or_refuse(location, uri)
            self._held.append(uri)
        self.verify()
        interval = max(1.0, self.timeout / 10)
        threading.Thread(target=self._heartbeat, args=(interval,), name="dedup-claim", daemon=True).start()

    def _take_over_or_refuse(self, location: str, uri: str) -> None:
        holder = _read_claim(uri)
        dead = _holder_dead(holder, self.timeout)
        if not (dead or self.take_over):
            raise OutputError(f"{location} is in use by run {holder.get('run_id', '?')} on host "
                              f"{holder.get('host', '?')} (pid {holder.get('pid', '?')}, started "
                              f"{holder.get('started', '?')}, last seen {holder.get('heartbeat', '?')}); if that run "
                              f"is dead, rerun after {self.timeout:g} s without its heartbeat or pass --take-over")
        log.warning("taking over the claim on %s from run %s (%s)", location, holder.get("run_id", "?"),
                    dead or "--take-over")
        storage.write_bytes(uri, self._payload())

    def verify(self) -> None:
        """Raise OutputError unless every claim is still this run's."""
        if self._lost:
            raise OutputError(self._lost)
        for uri in self._held:
            holder = _read_claim(uri)
            if holder.get("run_id") != self.run_id:
                self._lost = (f"run {self.run_id} lost its claim on {uri.rsplit('/', 1)[0]} to run "
                              f"{holder.get('run_id', '?')} on host {holder.get('host', '?')}; stopping, "
                              "nothing was published by this run")
                raise OutputError(self._lost)

    def release(self) -> None:
        self._stop.set()
        for uri in self._held:
            try:
                if _read_claim(uri).get("run_id") == self.run_id:
                    storage.delete_tree(uri)
            except OSError:  # a release must not hide the run's own error
                log.warning("could not remove the claim %s", uri, exc_info=True)
        self._held = []

    def _heartbeat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                self.verify()
                for uri in self._held:
                    storage.write_bytes(uri, self._payload())
            except OutputError as error:
                log.error("%s", error)
                return
            except OSError:
                log.warning("claim heartbeat failed; retrying in %.0f s", interval, exc_info=True)

    def _payload(self) -> bytes:
        return json.dumps({"run_id": self.run_id, "host": socket.gethostname(), "pid": os.getpid(),
                           "started": self.started, "heartbeat": _now(),
                           "heartbeat_unix": time.time()}).encode()


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _read_claim(uri: str, attempts: int = 5) -> dict[str, Any]:
    """The claim's content. A read that meets the holder's heartbeat rewriting it can come back torn
    (a local file truncated before it is written; an S3 object whose size changed between the
    reader's HEAD and its GET), so an unreadable claim is read again before it counts as one."""
    for attempt in range(attempts):
        try:
            payload = storage.read_json(uri)
        except FileNotFoundError:
            return {}
        except (json.JSONDecodeError, UnicodeDecodeError):
            if attempt + 1 < attempts:
                time.sleep(0.2 * (attempt + 1))
            continue
        return payload if isinstance(payload, dict) else {}
    return {"run_id": "unreadable claim"}


def _holder_dead(holder: dict[str, Any], timeout: float) -> str | None:
    """Why the claim's holder is known to be gone, or None while it may still run."""
    if not holder:
        return "its claim vanished"
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return f"process {holder['pid']} on this host has ended"
        except PermissionError:
            pass  # alive, under another user
    age = time.time() - float(holder.get("heartbeat_unix") or 0.0)
    if age > timeout:
        return f"no heartbeat for {age:.0f} s"
    return None


def publish(output: str, staged: str, run_key: str, claim: Claim | None, keep_staged: bool = False) -> list[str]:
    """Move every file under ``staged`` into ``output`` and write ``_SUCCESS`` listing them.

    ``run_key``: identifies what was staged (the last stage's key). A ``_PUBLISHING.json`` left
    by an interrupted publish of the same key is finished (files already moved are found in the
    output); one of another key is undone first: the files it lists were put there by the job.
    ``keep_staged``: copy instead of move, so the staging area stays whole (``run.keep_work``).
    """
    if claim is not None:
        claim.verify()
    plan_uri = storage.join(output, PUBLISHING)
    files = [_relative(uri, staged) for uri in storage.list_files(staged)]
    previous = sorted(_published_files(output))
    if storage.exists(plan_uri):
        plan = _read_listing(plan_uri)
        if plan.get("run") == run_key:
            files = plan["files"]
            previous = plan.get("previous", [])
    storage.write_json(plan_uri, {"run": run_key, "files": files, "previous": previous})
    # An earlier result stops being published before anything of the new one appears.
    storage.delete_tree(storage.join(output, SUCCESS))
    keep = set(files)
    for relative in previous:
        if relative not in keep:
            storage.delete_tree(storage.join(output, relative))
    _remove_empty_directories(output, {relative.split("/", 1)[0] for relative in previous if "/" in relative})
    for count, relative in enumerate(files, start=1):
        source, target = storage.join(staged, relative), storage.join(output, relative)
        if storage.exists(source):
            (storage.copy if keep_staged else storage.move)(source, target)
        elif not storage.exists(target):
            raise OutputError(f"cannot publish {relative}: missing from the staging area and the output")
        faults.published_file(count)
    if claim is not None:
        claim.verify()
    storage.write_json(storage.join(output, SUCCESS), {"files": sorted(files)})
    storage.delete_tree(plan_uri)
    return files


def _remove_empty_directories(output: str, tops: set[str]) -> None:
    """Local directories of the job's that deleting the previous result left empty (object
    stores have no directories)."""
    if storage.scheme(output) != "file":
        return
    for top in tops:
        root = storage.canonical(storage.join(output, top))[len("file://"):]
        for directory, _, names in sorted(os.walk(root), key=lambda entry: -len(entry[0])):
            if not names and not os.listdir(directory):
                os.rmdir(directory)

