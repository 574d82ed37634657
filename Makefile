# The two commands of the README: `make demo` (install, train, caption, attend) and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
RUN ?= runs/demo
ENCODER ?= vit

.PHONY: demo test install install-dev lint bench real-set clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first and pinned to the wheels on this machine's disk, so pip never downloads a CUDA build.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(BIN)/pip install -q -e '.[dev,serve]'
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

demo: install
	$(BIN)/pip install -q -e '.[serve]'
	$(BIN)/captioner train --encoder $(ENCODER) --out $(RUN)
	$(BIN)/captioner data synth --out outputs/samples --n 4 --split test
	$(BIN)/captioner caption outputs/samples/images --model $(RUN)
	$(BIN)/captioner attend outputs/samples/images/test_000000.png --model $(RUN) --out outputs/attend
	@echo "Model: $(RUN)   sample images: outputs/samples/images   attention overlays: outputs/attend"
	@echo "See it in a browser: $(BIN)/captioner serve --model $(RUN)   (then open http://127.0.0.1:8000/)"

test: install-dev
	$(BIN)/ruff check captioner tests benchmarks
	$(BIN)/python -m pytest

lint: install-dev
	$(BIN)/ruff check captioner tests benchmarks

bench: install
	$(BIN)/pip install -q -e '.[bench]'
	$(BIN)/python benchmarks/run_all.py

# A real captioned image set (Debian's public-domain clip art for train/val, Tux Paint's stamps for test):
# downloads packages, so never part of `make test`. benchmarks/build_real_set.py says what it builds.
real-set: install
	apt-get install -y --no-install-recommends openclipart-svg tuxpaint-stamps-default librsvg2-bin
	$(BIN)/python benchmarks/build_real_set.py --out /tmp/real_set

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
