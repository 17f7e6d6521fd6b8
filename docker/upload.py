"""Upload a local directory to s3://bucket/prefix (creating the bucket), for the compose demo.

    python3 docker/upload.py LOCAL_DIR s3://bucket/prefix
"""

from __future__ import annotations

import sys
from pathlib import Path

import boto3


def main(local_dir: str, target: str) -> int:
    bucket, _, prefix = target.removeprefix("s3://").partition("/")
    client = boto3.client("s3")
    if bucket not in {b["Name"] for b in client.list_buckets().get("Buckets", [])}:
        client.create_bucket(Bucket=bucket)
    root = Path(local_dir)
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        client.upload_file(str(path), bucket, f"{prefix}/{path.relative_to(root)}".lstrip("/"))
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))
