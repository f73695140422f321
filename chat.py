"""Chat with a model in the terminal: streaming replies, a KV cache, greedy or sampled decoding.

  python chat.py --model out                        # the model `python train.py` fine-tuned
  python chat.py --model out --prompt "What is 2+3?"   # one-shot: only the reply goes to stdout
  python chat.py --help                             # every flag, explained

The code is in nanolisa/cli/chat.py and nanolisa/generate.py; after `pip install nanolisa` the same tool
is `nanolisa chat`.
"""
from nanolisa.cli.chat import run

if __name__ == "__main__":
    run()
