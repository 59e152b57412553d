# flashcli: `make demo` sets everything up and runs the main job; `make test` runs the tests.
VENV   ?= .venv
PY     := $(VENV)/bin/python
GPU    ?=
# GPU=cuda: llama-cpp-python with ggml's CUDA backend (flashcli --gpu); the CPU build is the default
STAMP  := $(VENV)/.flashcli-setup$(if $(GPU),-$(GPU))
MODEL  ?= qwen2.5-coder-1.5b
BUDGET ?= 50%
PROMPT ?= Write a Python function that tells whether a number is prime, with a docstring.
TEST_MODELS := smollm2-135m gemma3-270m qwen2.5-coder-1.5b  # the 1.5B brings its draft, the 0.5B

.PHONY: setup model demo test bench clean

setup: $(STAMP)
$(STAMP): pyproject.toml scripts/setup.sh $(wildcard flashcli/engine/native/*.c)
	GPU=$(GPU) bash scripts/setup.sh
	rm -f $(VENV)/.flashcli-setup*
	touch $@

model: setup
	$(PY) scripts/fetch_model.py $(MODEL)

# fetch (with its draft), convert (once: again where an older or another CPU's file is there),
# then generate at BUDGET of the converted file's size
USABLE := from flashcli.engine.bundles import prepacked_names; from flashcli.decoding.loader import check; import sys; \
	prepacked_names(check(sys.argv[1])[0])
demo: setup
	@src=$$($(PY) scripts/fetch_model.py $(MODEL)) && flash=$${src%.gguf}.flash.gguf && \
	{ $(PY) -c "$(USABLE)" "$$flash" 2>/dev/null || \
	  $(VENV)/bin/flashcli convert "$$src" -o "$$flash" --force >/dev/null; } && \
	$(VENV)/bin/flashcli generate "$$flash" --dram-budget $(BUDGET) --verbose --chat -n 96 -p "$(PROMPT)"

test: setup
	@for m in $(TEST_MODELS); do $(PY) scripts/fetch_model.py -q $$m >/dev/null || exit 1; done
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q tests

bench: setup
	@for m in $(TEST_MODELS); do $(PY) scripts/fetch_model.py -q $$m >/dev/null || exit 1; done
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) -m scripts.bench

clean:
	rm -rf $(VENV) build *.egg-info
