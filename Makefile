# Two entry points, both work on a fresh machine:
#   make demo   create .venv, install nanolisa, fine-tune the built-in tiny model on the demo data with LISA
#               into out/ (--overwrite: a second make demo redoes the demo there), then measure its held-out
#               exact-match accuracy
#   make test   create .venv, install nanolisa with the test oracles and triton (its kernels are tested in
#               Triton's CPU interpreter), run the test suite
# torch==2.13.0 is installed first: it is a CPU wheel, and installing it before the package keeps pip
# from pulling a multi-GB CUDA build. Set TORCH=torch (or another spec) to choose your own build.
PY ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test venv

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

venv: $(BIN)/python
	$(BIN)/pip install -q $(TORCH)

demo: venv
	$(BIN)/pip install -q -e ".[plot]"
	$(BIN)/python train.py --overwrite
	$(BIN)/python eval.py --model out --metric accuracy

test: venv
	$(BIN)/pip install -q -e ".[test,plot,kernels]"
	$(BIN)/python -m pytest tests
