"""One storage layer for every stage: local paths and any URI pyarrow.fs resolves.

Spark tasks read and write through ``pyarrow.fs`` so that object storage works
without Hadoop connectors. S3 settings come from the standard AWS variables
(``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_REGION`` /
``AWS_DEFAULT_REGION``) and the standard credential chain; nothing here logs or
returns credentials.
"""

from __future__ import annotations

import functools
import json
import os
import re
from typing import Any

import pyarrow.fs as pafs

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def scheme(uri: str) -> str:
    match = _SCHEME.match(uri)
    return match.group(1).lower() if match else "file"


@functools.lru_cache(maxsize=16)
def _filesystem(kind: str, endpoint: str | None, region: str | None) -> pafs.FileSystem:
    if kind == "s3":
        options: dict[str, Any] = {}
        if endpoint:
            options["endpoint_override"] = endpoint
            if endpoint.startswith("http://"):
                options["scheme"] = "http"
        if region:
            options["region"] = region
        return pafs.S3FileSystem(**options)
    return pafs.LocalFileSystem()


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it for a URI or local path."""
    kind = scheme(uri)
    if kind == "file":
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return _filesystem("file", None, None), os.path.abspath(path)
    if kind in ("s3", "s3a"):
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return _filesystem("s3", endpoint, region), uri.split("://", 1)[1].rstrip("/")
    filesystem, path = pafs.FileSystem.from_uri(uri)
    return filesystem, path


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', whatever the scheme."""
    joined = base.rstrip("/")
    for part in parts:
        joined += "/" + part.strip("/")
    return joined


def canonical(uri: str) -> str:
    """A comparable form of a URI: scheme plus normalised path."""
    kind = scheme(uri)
    _, path = resolve(uri)
    return f"{kind}://{path.rstrip('/')}"


def is_within(inner: str, outer: str) -> bool:
    """True when ``inner`` equals ``outer`` or lies under it."""
    inner_c, outer_c = canonical(inner), canonical(outer)
    return inner_c == outer_c or inner_c.startswith(outer_c + "/")


def exists(uri: str) -> bool:
    filesystem, path = resolve(uri)
    return filesystem.get_file_info(path).type != pafs.FileType.NotFound


def list_files(uri: str, recursive: bool = True) -> list[str]:
    """Every file under a prefix, as URIs in the same scheme, sorted."""
    filesystem, path = resolve(uri)
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type == pafs.FileType.File:
        return [uri]
    selector = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
    found = [entry.path for entry in filesystem.get_file_info(selector) if entry.type == pafs.FileType.File]
    prefix = path.rstrip("/")
    return sorted(join(uri, entry[len(prefix):]) for entry in found)


def read_bytes(uri: str) -> bytes:
    filesystem, path = resolve(uri)
    with filesystem.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(uri: str, payload: bytes) -> None:
    filesystem, path = resolve(uri)
    parent = path.rsplit("/", 1)[0]
    filesystem.create_dir(parent, recursive=True)
    with filesystem.open_output_stream(path) as stream:
        stream.write(payload)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, payload: Any) -> None:
    write_bytes(uri, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())


def delete_tree(uri: str) -> None:
    filesystem, path = resolve(uri)
    info = filesystem.get_file_info(path)
    if info.type == pafs.FileType.Directory:
        filesystem.delete_dir(path)
    elif info.type == pafs.FileType.File:
        filesystem.delete_file(path)


def open_output(uri: str):
    """A writable stream; parent directories are created as needed."""
    filesystem, path = resolve(uri)
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    return filesystem.open_output_stream(path)


def open_input(uri: str):
    """A random-access file."""
    filesystem, path = resolve(uri)
    return filesystem.open_input_file(path)
