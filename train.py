"""Fine-tune a language model with LISA (default), LoRA or full fine-tuning.

  python train.py                      # LISA on the built-in tiny model and demo data (CPU, ~2 min)
  python train.py --model path/to/llama --data alpaca.json --lisa-layers 2 --interval 20 --steps 1000
  python train.py --help               # every flag, explained

The code is in nanolisa/cli/train.py (the flags) and nanolisa/trainer.py (the loop); after
`pip install nanolisa` the same tool is `nanolisa train`.
"""
from nanolisa.cli.train import run

if __name__ == "__main__":
    run()
