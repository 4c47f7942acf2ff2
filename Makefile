# shopguide: `make demo` and `make test` are the quick start; every target installs what it needs.
PY ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DATASETS ?= ../shared/datasets
CATALOG ?= $(DATASETS)/fashion-catalog
DEMO_DIR ?= data/demo
# Products the demo ingests (about 2 minutes on 2 cores); `make demo DEMO_LIMIT=` ingests the whole catalog.
DEMO_LIMIT ?= 2000
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: install chromium test demo clean-demo loop bench lint format clean

install: $(STAMP) chromium

# Debian's Chromium for the storefront browser test (Playwright drives it; nothing is downloaded by
# Playwright itself). Installed with apt when missing and we are root; otherwise the test says why.
chromium:
	@command -v chromium >/dev/null || test "$$(id -u)" != 0 || apt-get install -y -q chromium \
	  || (apt-get update -q && apt-get install -y -q chromium)

# Re-runs only when the dependency pins change; `pip install` itself is a no-op when nothing changed.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

# Simulated shoppers the demo's user encoder is trained on (`shopguide simulate sessions`).
DEMO_SHOPPERS ?= 1000
DEMO_DAYS ?= 14
DEMO_PORT ?= 8000

# Ingest, simulate shoppers, train the GRU user encoder on them, load their events, serve (Ctrl-C stops).
# Steps whose output exists are skipped; `make clean-demo` starts over (e.g. after changing DEMO_LIMIT).
demo: install
	$(BIN)/shopguide ingest --catalog $(CATALOG) --data-dir $(DEMO_DIR) $(if $(DEMO_LIMIT),--limit $(DEMO_LIMIT))
	test -f $(DEMO_DIR)/events/simulated.jsonl || $(BIN)/shopguide simulate sessions --catalog $(CATALOG) \
	  $(if $(DEMO_LIMIT),--limit $(DEMO_LIMIT)) --shoppers $(DEMO_SHOPPERS) --days $(DEMO_DAYS) \
	  --out $(DEMO_DIR)/events/simulated.jsonl
	test -f $(DEMO_DIR)/models/sequence/sequence_model.pt || $(BIN)/shopguide train sequences \
	  --dataset $(DEMO_DIR)/events/simulated.jsonl --out $(DEMO_DIR)/models/sequence
	$(BIN)/shopguide events import $(DEMO_DIR)/events/simulated.jsonl --data-dir $(DEMO_DIR)
	$(BIN)/shopguide serve --data-dir $(DEMO_DIR) --port $(DEMO_PORT)

clean-demo:
	rm -rf $(DEMO_DIR)

# The closed-loop simulator (`shopguide simulate loop`): 300 simulated shoppers use the HTTP API for 7
# days under each strategy (popularity, none, incremental, full, hybrid), on copies of the demo's index
# (ingested first if needed). CTR, CVR, coverage, Gini and training seconds per day and strategy go to
# the table printed, $(LOOP_OUT) and a PNG beside it. About 5 minutes on 2 cores (plus the ingest).
LOOP_OUT ?= results/simulate_loop.json
loop: install
	$(BIN)/shopguide ingest --catalog $(CATALOG) --data-dir $(DEMO_DIR) $(if $(DEMO_LIMIT),--limit $(DEMO_LIMIT))
	$(BIN)/shopguide simulate loop --data-dir $(DEMO_DIR) --out $(LOOP_OUT)

SEQ_BENCH_MODEL := data/bench-seq/beauty

BENCH_DIR := data/bench

bench: install
	$(BIN)/python tests/bench/bench_ingest.py --catalog $(CATALOG)
	$(BIN)/python tests/bench/bench_index.py --catalog $(CATALOG)
	$(BIN)/python tests/bench/bench_quantization.py --source $(BENCH_DIR)/index
	test -f $(SEQ_BENCH_MODEL)/sequence_model.pt || $(BIN)/shopguide train sequences \
	  --dataset $(DATASETS)/amazon-sequences/Beauty.txt \
	  --attributes $(DATASETS)/amazon-sequences/Beauty_item2attributes.json --out $(SEQ_BENCH_MODEL)
	$(BIN)/python tests/bench/bench_sequences.py --model $(SEQ_BENCH_MODEL)
	test -f $(BENCH_DIR)/events/simulated.jsonl || $(BIN)/shopguide simulate sessions --catalog $(CATALOG) \
	  --out $(BENCH_DIR)/events/simulated.jsonl
	test -f $(BENCH_DIR)/models/sequence/sequence_model.pt || $(BIN)/shopguide train sequences \
	  --dataset $(BENCH_DIR)/events/simulated.jsonl --out $(BENCH_DIR)/models/sequence --no-progress
	$(BIN)/python tests/bench/bench_serve.py --data-dir $(BENCH_DIR)
	$(BIN)/python tests/bench/bench_event_effect.py --data-dir $(BENCH_DIR)
	$(BIN)/python tests/bench/bench_reembed.py --catalog $(CATALOG)

# Overload soak and replica kills on the full catalog (tests/soak/soak_serve.py; about 5 minutes on
# 2 cores, most of it fixed-length phases): builds data/bench as `make bench` does when it is missing,
# then writes bench-results/soak.json. Not part of `make test` (tests/test_resilience.py is).
.PHONY: soak
soak: install
	test -f $(BENCH_DIR)/ingest.json || $(BIN)/shopguide ingest --catalog $(CATALOG) --data-dir $(BENCH_DIR)
	test -f $(BENCH_DIR)/events/simulated.jsonl || $(BIN)/shopguide simulate sessions --catalog $(CATALOG) \
	  --out $(BENCH_DIR)/events/simulated.jsonl
	test -f $(BENCH_DIR)/models/sequence/sequence_model.pt || $(BIN)/shopguide train sequences \
	  --dataset $(BENCH_DIR)/events/simulated.jsonl --out $(BENCH_DIR)/models/sequence --no-progress
	$(BIN)/python tests/soak/soak_serve.py --data-dir $(BENCH_DIR)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
