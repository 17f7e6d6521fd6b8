"""One storage layer for every stage: local paths and any URI pyarrow.fs resolves.

Spark tasks read and write through ``pyarrow.fs`` so that object storage works
without Hadoop connectors. S3 settings come from the standard AWS variables
(``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, ``AWS_REGION`` /
``AWS_DEFAULT_REGION``) and the standard credential chain; nothing here logs or
returns credentials.
"""

from __future__ import annotations

import errno
import functools
import json
import logging
import os
import posixpath
import random
import re
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import pyarrow.fs as pafs

log = logging.getLogger(__name__)
T = TypeVar("T")
# Whole operations (read a small object, list a prefix, read a header) retried on transient
# errors beyond the SDK's per-request retries: a connection dropped mid-body surfaces from the
# SDK as a failure it does not retry. Errors that retrying cannot fix, and refused connections
# (the SDK has retried those already), are raised at once.
OPERATION_ATTEMPTS = 3
_PERMANENT = re.compile(r"Could not connect to server|Could not resolve host|ACCESS_DENIED|InvalidAccessKeyId|"
                        r"SignatureDoesNotMatch|NoSuchBucket|NO_SUCH_BUCKET|"
                        r"RESOURCE_NOT_FOUND|Path does not exist|not found|No such file|Is a directory|"
                        r"Not a directory|Permission denied", re.IGNORECASE)


def retrying(operation: Callable[..., T], *args: Any, uri: str | None = None) -> T:
    """``operation(*args)``, retried with backoff on transient object-store errors."""
    remote = uri is not None and scheme(uri) != "file"
    attempts = min(OPERATION_ATTEMPTS, _attempts())
    for attempt in range(attempts):
        try:
            return operation(*args)
        except OSError as error:
            if not remote or attempt == attempts - 1 or _PERMANENT.search(str(error)):
                raise
            delay = min(5.0, 0.2 * 2**attempt) * (0.5 + random.random())
            log.warning("transient storage error on %s (attempt %d of %d, retrying in %.1f s): %s", uri, attempt + 1,
                        attempts, delay, " ".join(str(error).split())[:200])
            time.sleep(delay)
    raise AssertionError("unreachable")


_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def scheme(uri: str) -> str:
    match = _SCHEME.match(uri)
    return match.group(1).lower() if match else "file"


ENDPOINT_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")
# Attempts per S3 request (the SDK's standard retry strategy, exponential backoff with jitter) and per
# whole operation: storage.s3_attempts, carried to executors in this variable.
ATTEMPTS_VARIABLE = "DEDUP_SPARK_S3_ATTEMPTS"
S3_ATTEMPTS = 8
S3_CONNECT_TIMEOUT = 5.0
S3_REQUEST_TIMEOUT = 60.0
REGION_VARIABLES = ("AWS_REGION", "AWS_DEFAULT_REGION")


def _attempts() -> int:
    return max(1, int(os.environ.get(ATTEMPTS_VARIABLE) or S3_ATTEMPTS))


def configure_s3(endpoint: str | None, region: str | None, attempts: int = S3_ATTEMPTS) -> dict[str, str]:
    """Put configured S3 settings into this process's environment, where every
    filesystem (here and in Python workers started later) finds them; returns
    the variables to pass to remote executors. Credentials are never handled here."""
    exported = {}
    if endpoint:
        os.environ["AWS_ENDPOINT_URL_S3"] = endpoint
    if region:
        os.environ["AWS_REGION"] = region
    os.environ[ATTEMPTS_VARIABLE] = str(attempts)
    for name in ENDPOINT_VARIABLES + REGION_VARIABLES + (ATTEMPTS_VARIABLE,):
        if os.environ.get(name):
            exported[name] = os.environ[name]
    _filesystem.cache_clear()
    return exported


def _s3_credentials() -> dict[str, str]:
    """Credentials from boto3's chain when the environment has none.

    pyarrow's SDK reads the environment, shared files and instance metadata
    itself; boto3 adds what it resolves beyond those (SSO, credential
    processes, assumed roles). Values go straight to the filesystem object.
    """
    if os.environ.get("AWS_ACCESS_KEY_ID"):
        return {}
    try:
        import boto3

        found = boto3.Session().get_credentials()
    except Exception:  # noqa: BLE001 - no boto3 chain: let the SDK try its own
        return {}
    if found is None:
        return {}
    frozen = found.get_frozen_credentials()
    options = {"access_key": frozen.access_key, "secret_key": frozen.secret_key}
    if frozen.token:
        options["session_token"] = frozen.token
    return options


@functools.lru_cache(maxsize=16)
def _filesystem(kind: str, endpoint: str | None, region: str | None, attempts: int = S3_ATTEMPTS) -> pafs.FileSystem:
    if kind == "s3":
        options: dict[str, Any] = {}
        if endpoint:
            options["endpoint_override"] = endpoint
            if endpoint.startswith("http://"):
                options["scheme"] = "http"
        if region:
            options["region"] = region
        options.update(_s3_credentials())
        # Transient errors (5xx, throttling, dropped connections) are retried by the SDK with
        # exponential backoff, request by request; a request that still fails fails its task,
        # which Spark retries as a whole.
        return pafs.S3FileSystem(retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts),
                                 connect_timeout=S3_CONNECT_TIMEOUT, request_timeout=S3_REQUEST_TIMEOUT, **options)
    return pafs.LocalFileSystem()


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and the path inside it for a URI or local path."""
    kind = scheme(uri)
    if kind == "file":
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return _filesystem("file", None, None), os.path.abspath(path)
    if kind in ("s3", "s3a"):
        endpoint = next((os.environ[v] for v in ENDPOINT_VARIABLES if os.environ.get(v)), None)
        region = next((os.environ[v] for v in REGION_VARIABLES if os.environ.get(v)), None)
        return _filesystem("s3", endpoint, region, _attempts()), uri.split("://", 1)[1].rstrip("/")
    filesystem, path = pafs.FileSystem.from_uri(uri)
    return filesystem, path


def join(base: str, *parts: str) -> str:
    """Join URI parts with '/', whatever the scheme."""
    joined = base.rstrip("/")
    for part in parts:
        joined += "/" + part.strip("/")
    return joined


def absolute(uri: str) -> str:
    """``uri`` with a relative local path made absolute (against this process's working directory);
    other URIs as they are."""
    if scheme(uri) != "file" or uri.startswith("file://"):
        return uri
    return os.path.abspath(uri)


def canonical(uri: str) -> str:
    """A comparable form of a location: scheme plus its real path. Local paths have symlinks,
    ``..`` and ``file://`` resolved (``os.path.realpath``, for the part that exists); object-store
    URIs are bucket plus normalised key (``s3a://`` is ``s3://``); trailing slashes never count."""
    kind = scheme(uri)
    if kind == "file":
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        return "file://" + os.path.realpath(path).rstrip("/")
    if kind in ("s3", "s3a"):
        bucket, _, key = uri.split("://", 1)[1].partition("/")
        key = posixpath.normpath("/" + key).lstrip("/")
        return f"s3://{bucket}/{key}".rstrip("/")
    _, path = resolve(uri)
    return f"{kind}://{posixpath.normpath('/' + path).rstrip('/')}"


def is_within(inner: str, outer: str) -> bool:
    """True when ``inner`` is ``outer`` or lies under it, once both are ``canonical``."""
    inner_c, outer_c = canonical(inner), canonical(outer)
    return inner_c == outer_c or inner_c.startswith(outer_c + "/")


def exists(uri: str) -> bool:
    filesystem, path = resolve(uri)
    return retrying(filesystem.get_file_info, path, uri=uri).type != pafs.FileType.NotFound


def file_infos(uri: str, recursive: bool = True) -> list[tuple[str, int, int]]:
    """(URI, size, modification time in ns) of every file under a prefix, sorted."""
    filesystem, path = resolve(uri)
    info = retrying(filesystem.get_file_info, path, uri=uri)
    if info.type == pafs.FileType.NotFound:
        return []
    if info.type == pafs.FileType.File:
        return [(uri, info.size, info.mtime_ns or 0)]
    selector = pafs.FileSelector(path, recursive=recursive, allow_not_found=True)
    prefix = path.rstrip("/")
    found = [(join(uri, entry.path[len(prefix):]), entry.size, entry.mtime_ns or 0)
             for entry in retrying(filesystem.get_file_info, selector, uri=uri) if entry.type == pafs.FileType.File]
    return sorted(found)


def list_files(uri: str, recursive: bool = True) -> list[str]:
    """Every file under a prefix, as URIs in the same scheme, sorted."""
    return [entry[0] for entry in file_infos(uri, recursive)]


def read_bytes(uri: str) -> bytes:
    filesystem, path = resolve(uri)

    def read() -> bytes:
        with filesystem.open_input_stream(path) as stream:
            return stream.read()

    return retrying(read, uri=uri)


def write_bytes(uri: str, payload: bytes) -> None:
    """``payload`` as the file ``uri``, replaced whole: a reader sees the old bytes or the new ones,
    never a truncated file (an S3 PUT is atomic; a local file is written beside it and renamed)."""
    filesystem, path = resolve(uri)

    def write() -> None:
        filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
        local = isinstance(filesystem, pafs.LocalFileSystem)
        target = f"{path}.{uuid.uuid4().hex[:8]}.tmp" if local else path
        with filesystem.open_output_stream(target) as stream:
            stream.write(payload)
        if local:
            os.replace(target, path)

    retrying(write, uri=uri)


def read_json(uri: str) -> Any:
    return json.loads(read_bytes(uri))


def write_json(uri: str, payload: Any) -> None:
    write_bytes(uri, json.dumps(payload, indent=2, sort_keys=True, default=str).encode())


def write_npy(uri: str, array: Any) -> None:
    import io

    import numpy as np

    buffer = io.BytesIO()
    np.save(buffer, array)
    write_bytes(uri, buffer.getvalue())


def read_npy(uri: str) -> Any:
    import io

    import numpy as np

    return np.load(io.BytesIO(read_bytes(uri)))


def delete_tree(uri: str) -> None:
    filesystem, path = resolve(uri)

    def delete() -> None:
        info = filesystem.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            filesystem.delete_dir(path)
        elif info.type == pafs.FileType.File:
            filesystem.delete_file(path)

    retrying(delete, uri=uri)


def list_entries(uri: str) -> list[str]:
    """The files and directories directly under a prefix."""
    filesystem, path = resolve(uri)
    selector = pafs.FileSelector(path, recursive=False, allow_not_found=True)
    return sorted(join(uri, info.base_name) for info in retrying(filesystem.get_file_info, selector, uri=uri))


def move(source: str, target: str) -> None:
    """Move one file: a rename on one local filesystem, else copy and delete (object stores,
    another filesystem or another scheme)."""
    filesystem, source_path = resolve(source)
    target_filesystem, target_path = resolve(target)
    if target_filesystem is not filesystem:
        copy(source, target)
        retrying(filesystem.delete_file, source_path, uri=source)
        return

    def move_once() -> None:
        if filesystem.get_file_info(source_path).type == pafs.FileType.NotFound and \
                filesystem.get_file_info(target_path).type == pafs.FileType.File:
            return  # an earlier attempt moved it and failed only in answering
        filesystem.create_dir(target_path.rsplit("/", 1)[0], recursive=True)
        try:
            filesystem.move(source_path, target_path)
        except OSError as error:
            if not _cross_device(error):
                raise
            filesystem.copy_file(source_path, target_path)
            filesystem.delete_file(source_path)

    retrying(move_once, uri=source)


def _cross_device(error: OSError) -> bool:
    """A rename refused because source and target are on different local filesystems (EXDEV)."""
    return error.errno == errno.EXDEV or "Invalid cross-device link" in str(error)


def copy(source: str, target: str) -> None:
    """Copy one file (server-side within one object store; streamed between filesystems)."""
    filesystem, source_path = resolve(source)
    target_filesystem, target_path = resolve(target)

    def copy_once() -> None:
        target_filesystem.create_dir(target_path.rsplit("/", 1)[0], recursive=True)
        if target_filesystem is filesystem:
            filesystem.copy_file(source_path, target_path)
            return
        with filesystem.open_input_stream(source_path) as reader, \
                target_filesystem.open_output_stream(target_path) as writer:
            while chunk := reader.read(16 << 20):
                writer.write(chunk)

    retrying(copy_once, uri=source)


def create_exclusive(uri: str, payload: bytes) -> bool:
    """Write a small object only if nothing is at ``uri``: True when this call created it.

    Atomic on local disks (``O_CREAT | O_EXCL``) and on S3 stores that honour a conditional
    PUT (``If-None-Match: *``, AWS S3 and recent MinIO); elsewhere a check then a write, so two
    callers within the same moment may both succeed (``Claim`` then settles it on its next check).
    """
    kind = scheme(uri)
    if kind == "file":
        _, path = resolve(uri)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            handle = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(handle, "wb") as stream:
            stream.write(payload)
        return True
    if kind in ("s3", "s3a"):
        return _s3_put_if_absent(uri, payload)
    if exists(uri):
        return False
    write_bytes(uri, payload)
    return True


def _s3_put_if_absent(uri: str, payload: bytes) -> bool:
    import boto3
    from botocore.exceptions import ClientError

    bucket, _, key = uri.split("://", 1)[1].partition("/")
    endpoint = next((os.environ[v] for v in ENDPOINT_VARIABLES if os.environ.get(v)), None)
    region = next((os.environ[v] for v in REGION_VARIABLES if os.environ.get(v)), None)
    client = boto3.client("s3", endpoint_url=endpoint, region_name=region)
    try:
        client.put_object(Bucket=bucket, Key=key, Body=payload, IfNoneMatch="*")
    except ClientError as error:
        if error.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict", "412"):
            return False
        raise OSError(f"cannot create {uri}: {error}") from None
    return True


def open_output(uri: str):
    """A writable stream; parent directories are created as needed."""
    filesystem, path = resolve(uri)
    filesystem.create_dir(path.rsplit("/", 1)[0], recursive=True)
    return filesystem.open_output_stream(path)


def open_input(uri: str):
    """A random-access file."""
    filesystem, path = resolve(uri)
    return filesystem.open_input_file(path)
