"""Fine-tune a language model with LISA (default), LoRA or full fine-tuning.

  python train.py                      # LISA on the built-in tiny model and demo data (CPU, ~3 min)
  python train.py --model path/to/llama --data alpaca.json --lisa-layers 2 --interval 20 --steps 1000
  python train.py --help               # every flag, explained

The code is in nanolisa/cli/train.py (the flags) and nanolisa/trainer.py (the loop). Run it with the Python
`make demo` set up (.venv/bin/python train.py); after `pip install .` in this checkout (nanolisa is not on
the package index) the same tool is `nanolisa train`.
"""
import os
import signal
import sys

if __name__ == "__main__" and hasattr(signal, "pthread_sigmask"):
    # A SIGTERM waits (pending) until this process has checked its inputs: see nanolisa/signals.py.
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})

try:
    from nanolisa.cli.train import run
except ModuleNotFoundError as e:  # a Python without nanolisa's requirements (not the one `make demo` set up)
    if (e.name or "").partition(".")[0] == "nanolisa":
        raise
    venv = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".venv", "bin", "python")
    print(f"error: {e.name} is not installed for {sys.executable}; run train.py with the Python `make demo` set "
          f"up ({venv} train.py ...), or pip install . into this one", file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    run()
