"""Chat with a model in the terminal: streaming replies, a KV cache, greedy or sampled decoding.

  python chat.py --model out                        # the model `python train.py` fine-tuned
  python chat.py --model out --prompt "What is 2+3?"   # one-shot: only the reply goes to stdout
  python chat.py --help                             # every flag, explained

The code is in nanolisa/cli/chat.py and nanolisa/generate.py. Run it with the Python `make demo` set up
(.venv/bin/python chat.py); after `pip install .` in this checkout (nanolisa is not on the package index)
the same tool is `nanolisa chat`.
"""
import os
import sys

try:
    from nanolisa.cli.chat import run
except ModuleNotFoundError as e:  # a Python without nanolisa's requirements (not the one `make demo` set up)
    if (e.name or "").partition(".")[0] == "nanolisa":
        raise
    venv = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".venv", "bin", "python")
    print(f"error: {e.name} is not installed for {sys.executable}; run chat.py with the Python `make demo` set "
          f"up ({venv} chat.py ...), or pip install . into this one", file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    run()
