# flashcli: `make demo` sets everything up and runs the main job; `make test` runs the tests.
VENV   ?= .venv
PY     := $(VENV)/bin/python
MODEL  := models/SmolLM2-135M-Instruct.Q4_1.gguf
STAMP  := $(VENV)/.flashcli-setup

.PHONY: setup model demo test bench clean

setup: $(STAMP)
$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

model: $(MODEL)
$(MODEL):
	bash scripts/fetch_model.sh

demo: setup model
	$(VENV)/bin/flashcli generate $(MODEL) --chat -n 64 -p "Explain in two sentences why a model larger than RAM is slow to run."

test: setup model
	$(PY) -m pytest -q tests

bench: setup model
	$(PY) scripts/bench_dense.py

clean:
	rm -rf $(VENV) build *.egg-info
