"""``laion``: ``img_emb/img_emb_N.npy`` (rows x d) beside ``metadata/metadata_N.parquet`` (any
columns, the same rows), paired by N: what clip-retrieval writes and LAION published."""

from __future__ import annotations

import re
from collections.abc import Callable

from dedup_spark import storage
from dedup_spark.errors import InputError
from dedup_spark.formats import npy, parquet

_EMBEDDINGS = re.compile(r"(^|/)img_emb/img_emb_([^/]*)\.npy$")


def detects(relatives: list[str]) -> bool:
    return any(relative.startswith("img_emb/") and relative.endswith(".npy") for relative in relatives)


def find_shards(root: str, files: list[str], config, bad_shard: Callable[[str, str, int | None], None],
                relative: Callable[[str, str], str], order: Callable[[str], list]) -> list[dict]:
    embeddings = sorted((f for f in files if _EMBEDDINGS.search(f)), key=order)
    if not embeddings:
        raise InputError(f"{root}: laion format needs img_emb/img_emb_N.npy files")
    present = set(files)
    candidates = []
    for uri in embeddings:
        suffix = _EMBEDDINGS.search(uri).group(2)
        meta_uri = storage.join(root, "metadata", f"metadata_{suffix}.parquet")
        rows = None
        try:
            if meta_uri not in present:
                raise InputError(f"{uri}: no matching metadata file metadata/metadata_{suffix}.parquet")
            shard = npy.candidate(uri, root, relative)
            rows = shard["rows"]
            meta_rows, groups, _, _, columns = storage.retrying(parquet.footer, meta_uri, None,
                                                                config.input.binary_dtype, uri=meta_uri)
            if meta_rows != rows:
                raise InputError(f"{uri} has {rows} rows but its metadata {meta_uri} has {meta_rows}")
        except InputError as error:
            bad_shard(uri, str(error), rows)
            continue
        candidates.append({**shard, "metadata_uri": meta_uri, "relative": [*shard["relative"], relative(meta_uri, root)],
                           "row_groups": groups, "columns": columns})
    return candidates
