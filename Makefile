# flashcli: `make demo` sets everything up and runs the main job; `make test` runs the tests.
VENV   ?= .venv
PY     := $(VENV)/bin/python
MODEL  := models/SmolLM2-135M-Instruct.Q4_1.gguf
FLASH  := models/SmolLM2-135M-Instruct.Q4_1.flash.gguf
STAMP  := $(VENV)/.flashcli-setup

.PHONY: setup model demo test bench clean

setup: $(STAMP)
$(STAMP): pyproject.toml scripts/setup.sh
	bash scripts/setup.sh
	touch $@

model: $(MODEL)
$(MODEL):
	bash scripts/fetch_model.sh

$(FLASH): $(MODEL) $(STAMP)
	$(VENV)/bin/flashcli convert $(MODEL) --force

demo: setup model $(FLASH)
	$(VENV)/bin/flashcli generate $(FLASH) --dram-budget 100M --verbose --chat -n 64 \
		-p "Explain in two sentences why a model larger than RAM is slow to run."

test: setup model
	$(PY) -m pytest -q tests

bench: setup model
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) scripts/bench_dense.py
	$(PY) scripts/bench.py

clean:
	rm -rf $(VENV) build *.egg-info
