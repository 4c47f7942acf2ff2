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

.PHONY: install test demo bench lint format clean

install: $(STAMP)

# Re-runs only when the dependency pins change; `pip install` itself is a no-op when nothing changed.
$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -c constraints.txt -e '.[dev]'
	touch $(STAMP)

test: install
	$(BIN)/python -m pytest -q

demo: install
	$(BIN)/shopguide ingest --catalog $(CATALOG) --data-dir $(DEMO_DIR) $(if $(DEMO_LIMIT),--limit $(DEMO_LIMIT))
	$(BIN)/shopguide search "red women's handbag" --k 5 --data-dir $(DEMO_DIR)
	$(BIN)/shopguide search "black men's formal shoes" --k 5 --max-price 80 --in-stock --data-dir $(DEMO_DIR)
	$(BIN)/shopguide search "blue denim jeans" --mode image --k 5 --data-dir $(DEMO_DIR)
	$(BIN)/shopguide similar $$($(BIN)/python -c "import csv,sys; r=csv.DictReader(open('$(CATALOG)/products.csv')); print(next(r)['id'])") --k 5 --data-dir $(DEMO_DIR)

SEQ_BENCH_MODEL := data/bench-seq/beauty

bench: install
	$(BIN)/python tests/bench/bench_ingest.py --catalog $(CATALOG)
	$(BIN)/python tests/bench/bench_index.py --catalog $(CATALOG)
	test -f $(SEQ_BENCH_MODEL)/sequence_model.pt || $(BIN)/shopguide train sequences \
	  --dataset $(DATASETS)/amazon-sequences/Beauty.txt \
	  --attributes $(DATASETS)/amazon-sequences/Beauty_item2attributes.json --out $(SEQ_BENCH_MODEL)
	$(BIN)/python tests/bench/bench_sequences.py --model $(SEQ_BENCH_MODEL)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
