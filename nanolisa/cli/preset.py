"""Write a built-in preset model to a directory, as an ordinary Hugging Face model.

    nanolisa preset tiny --out tiny-base           # (python -m nanolisa preset ... in a source checkout)

The preset `tiny` exists only inside nanolisa: its fixed random weights and its byte-level tokenizer. Written
out, it is a directory that transformers, peft and lm-evaluation-harness load like any other, which is what a
LoRA adapter trained on `--model tiny` needs there (its adapter_config.json names the base "tiny", which only
nanolisa knows):

    lm_eval --model hf --model_args pretrained=tiny-base,peft=out --tasks ...
    nanolisa chat --model out --base tiny-base     # the same base, from the directory

The weights are those `--model tiny` starts from on every machine (presets.py draws them from a fixed seed).
"""
from __future__ import annotations

import argparse
import os

from nanolisa.cli.common import ArgumentParser, run_cli
from nanolisa.errors import UserError
from nanolisa.presets import PRESETS, load_preset
from nanolisa.pretrained import save_pretrained


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=list(PRESETS), help="the preset to write")
    p.add_argument("--out", required=True,
                   help="directory to write it to: new or empty (nothing of yours is overwritten)")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        raise UserError(f"--out {args.out} exists and is not an empty directory; choose a new one")
    model, tokenizer = load_preset(args.name)
    save_pretrained(model, tokenizer, args.out)
    print(f"wrote the {args.name} preset to {os.path.abspath(args.out)}: a Hugging Face model directory "
          f"(fp32 weights, tokenizer, config.json)")


def run() -> None:
    run_cli(main)
