#!/usr/bin/env bash
# The compose file's one-shot job: generate a sample, upload it to MinIO, deduplicate it on the cluster.
set -euo pipefail
rows=${DEMO_ROWS:-100000}
python3 /app/jobs/make_sample.py /tmp/sample --rows "$rows" --dim 512
python3 /app/docker/upload.py /tmp/sample s3://dedup/sample
spark-submit --master "${SPARK_MASTER:-local[*]}" /app/jobs/dedup.py \
  --input s3://dedup/sample --output s3://dedup/output --overwrite
