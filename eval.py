"""Evaluate a model: NLL per token and perplexity, exact-match accuracy, or multiple-choice accuracy.

  python eval.py --model out                        # NLL / perplexity on the demo's held-out split
  python eval.py --model out --metric accuracy      # greedy replies vs the held-out answers
  python eval.py --help                             # every flag, explained

The code is in nanolisa/cli/eval.py and nanolisa/evaluate.py; after `pip install nanolisa` the same tool
is `nanolisa eval`.
"""
from nanolisa.cli.eval import run

if __name__ == "__main__":
    run()
