"""Evaluate a model: NLL per token and perplexity, exact-match accuracy, or multiple-choice accuracy.

  python eval.py --model out                        # NLL / perplexity on the held-out data it trained with
  python eval.py --model out --metric accuracy      # greedy replies vs the held-out answers
  python eval.py --help                             # every flag, explained

The code is in nanolisa/cli/eval.py and nanolisa/evaluate.py. Run it with the Python `make demo` set up
(.venv/bin/python eval.py); after `pip install .` in this checkout (nanolisa is not on the package index)
the same tool is `nanolisa eval`.
"""
import os
import sys

try:
    from nanolisa.cli.eval import run
except ModuleNotFoundError as e:  # a Python without nanolisa's requirements (not the one `make demo` set up)
    if (e.name or "").partition(".")[0] == "nanolisa":
        raise
    venv = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".venv", "bin", "python")
    print(f"error: {e.name} is not installed for {sys.executable}; run eval.py with the Python `make demo` set "
          f"up ({venv} eval.py ...), or pip install . into this one", file=sys.stderr)
    sys.exit(2)

if __name__ == "__main__":
    run()
