# Two entry points, both work on a fresh machine:
#   make demo   create .venv, install nanolisa and its requirements into it, fine-tune the built-in tiny model on
#               the demo data with LISA into out/ (--overwrite: a second make demo redoes the demo there),
#               measure its held-out exact-match accuracy, and print the commands to try next
#   make test   create .venv, install nanolisa (editable) with the test oracles and triton (its kernels are
#               tested in Triton's CPU interpreter), run the test suite
#
# torch is installed first, so that installing nanolisa finds it already satisfied:
#   * on a machine without an NVIDIA GPU (no nvidia-smi), the CPU build from PyTorch's CPU index
#     (TORCH_INDEX), when that index is reachable: torch alone, about 190 MB;
#   * otherwise from pip's default index (PyPI): on Linux x86-64 that is the CUDA build, torch plus some 18
#     nvidia-* / cuda packages, about 5.5 GB in all; on macOS and Windows the only build there is.
# TORCH_INDEX= (empty) always takes pip's default; TORCH=... another version or build (e.g. TORCH=torch).
PY ?= python3
TORCH ?= torch==2.13.0
TORCH_INDEX ?= $(if $(shell command -v nvidia-smi 2>/dev/null),,https://download.pytorch.org/whl/cpu)
VENV := .venv
BIN := $(VENV)/bin

.PHONY: demo test venv

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

venv: $(BIN)/python
	@if [ -n "$(TORCH_INDEX)" ] && $(BIN)/python -c "import urllib.request as u; \
			u.urlopen('$(TORCH_INDEX)/torch/', timeout=10)" 2>/dev/null; then \
		echo "$(TORCH): the CPU build (no NVIDIA GPU here), from $(TORCH_INDEX)"; \
		$(BIN)/pip install -q "$(TORCH)" --index-url $(TORCH_INDEX); \
	else \
		echo "$(TORCH): from pip's default index$(if $(TORCH_INDEX), ($(TORCH_INDEX) is not reachable))"; \
		$(BIN)/pip install -q "$(TORCH)"; \
	fi

# Not an editable install: train.py, chat.py and eval.py run this checkout's code whatever is installed, and
# setuptools' editable install of this layout prints a warning box (make test installs it editable).
demo: venv
	$(BIN)/pip install -q ".[plot]"
	$(BIN)/python train.py --overwrite
	$(BIN)/python eval.py --model out --metric accuracy
	@echo
	@echo "Next (README.md, 'After make demo'), with the Python this made:"
	@echo '  .venv/bin/python chat.py --model out --prompt "upper(cat)="'
	@echo '  .venv/bin/python chat.py --model out'
	@echo '  .venv/bin/python eval.py --model out'
	@echo '  .venv/bin/python train.py --data demo:conversation --out out-chat'
	@echo '  .venv/bin/python eval.py --model out-chat --metric accuracy'
	@echo '  .venv/bin/torchrun --standalone --nproc_per_node 2 train.py --out out-2procs'

# Two workers (pytest-xdist), each taking whole test files (so a file's fixtures are built once): the suite
# is CPU-bound but leaves a core idle much of the time (subprocess start-up, torchrun rendezvous, file I/O).
test: venv
	$(BIN)/pip install -q -e ".[test,plot,kernels]"
	$(BIN)/python -m pytest tests -n 2 --dist loadfile --durations 25
