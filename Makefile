# dedup-spark: `make demo` and `make test` work in a fresh clone (they install first).
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_ROWS ?= 100000
DEMO_DIM ?= 512
DEMO_DIR := data/demo
BENCH_ROWS ?= 200000

.PHONY: install demo test lint bench clean zip docker-demo docs

$(STAMP): setup.cfg pyproject.toml scripts/find_java.sh
	@scripts/find_java.sh >/dev/null
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

install: $(STAMP)

# Generates a 100,000-row, 512-d CLIP-like sample (once) and runs the job on it in local mode.
demo: install
	@export JAVA_HOME=$$(scripts/find_java.sh) && \
	if [ ! -f $(DEMO_DIR)/sample_ground_truth.json ]; then \
	  $(PY) jobs/make_sample.py $(DEMO_DIR)/sample --rows $(DEMO_ROWS) --dim $(DEMO_DIM); fi && \
	$(PY) jobs/dedup.py --input $(DEMO_DIR)/sample --output $(DEMO_DIR)/output --overwrite

test: install
	@export JAVA_HOME=$$(scripts/find_java.sh) && $(PY) -m pytest -q

# The library as one zip for `spark-submit --py-files dist/dedup_spark.zip` on clusters
# whose executors do not have the package installed.
zip: install
	@mkdir -p dist && rm -f dist/dedup_spark.zip
	@$(PY) -c "import zipfile, pathlib; z = zipfile.ZipFile('dist/dedup_spark.zip', 'w', zipfile.ZIP_DEFLATED); [z.write(p) for p in sorted(pathlib.Path('dedup_spark').rglob('*.py'))]; z.close()"
	@echo dist/dedup_spark.zip

# MinIO + Spark master + worker + the demo job, in containers (needs a Docker engine).
docker-demo:
	docker compose -f docker/compose.yaml up --build --abort-on-container-exit --exit-code-from job

# A benchmark, not a test: BENCH_ROWS (default 200000) rows of d=768 against exhaustive faiss and MLlib LSH.
bench: install
	@export JAVA_HOME=$$(scripts/find_java.sh) && $(PY) bench/run.py --rows $(BENCH_ROWS) $(BENCH_ARGS)

lint: install
	$(VENV)/bin/ruff check .

# docs/configuration.md, generated from conf/default.yaml (tests/test_docs.py fails when it is stale).
docs: install
	$(PY) scripts/config_reference.py

clean:
	rm -rf $(VENV) data build *.egg-info
