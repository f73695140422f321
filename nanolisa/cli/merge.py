"""Merge a LoRA/DoRA adapter into its base model and write a full Hugging Face checkpoint.

The counterpart of LMFlow's scripts/run_merge_lora.sh: the result loads in transformers (or vLLM,
llama.cpp's converter) with no peft and no adapter.

    nanolisa merge --model path/to/base --lora out/adapter --out out/merged
    nanolisa merge --lora out/adapter --out out/merged          # base from adapter_config.json
    python -m nanolisa merge --model tiny --lora out/adapter --out out/merged --dtype bf16

The adapter may have been written by nanolisa or by peft (adapter_config.json + adapter_model.safetensors).
The merge is done in fp32 and the weights written in the base checkpoint's dtype unless --dtype says otherwise.
The tokenizer files are the adapter directory's when it has them (train.py and peft write them there), else
the base model's, copied as they are.
"""
from __future__ import annotations

import argparse
import os

from nanolisa.cli.common import ArgumentParser, run_cli
from nanolisa.config import DTYPES
from nanolisa.errors import UserError
from nanolisa.lora import load_adapter, merge_lora, read_adapter_config
from nanolisa.pretrained import load_model, load_pretrained, save_pretrained
from nanolisa.tokenizer import load_tokenizer


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None,
                   help="base model: a Hugging Face directory or a preset name ('tiny'); "
                        "default: base_model_name_or_path from the adapter's adapter_config.json")
    p.add_argument("--lora", required=True,
                   help="adapter directory (adapter_config.json + adapter_model.safetensors, from nanolisa or peft)")
    p.add_argument("--out", required=True, help="output directory for the merged checkpoint (and tokenizer)")
    p.add_argument("--dtype", default=None, choices=list(DTYPES),
                   help="dtype of the written weights; default: the base checkpoint's own dtype")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    config = read_adapter_config(args.lora)
    base = args.model or config.get("base_model_name_or_path")
    if not base:
        raise UserError(f"{args.lora}: adapter_config.json names no base model; pass --model")
    if os.path.abspath(args.out) == os.path.abspath(base):
        raise UserError("--out is the base model directory; write the merged model somewhere else")
    has_tokenizer = any(os.path.exists(os.path.join(base, f)) for f in ("tokenizer.json", "tokenizer.model"))
    if os.path.isdir(base) and not has_tokenizer:  # weights only: merge them, write no tokenizer
        model, tokenizer = load_model(base), None
        print(f"note: {base} has no tokenizer files; the merged checkpoint will have none either")
    else:
        model, tokenizer = load_pretrained(base)
    if any(os.path.exists(os.path.join(args.lora, f)) for f in ("tokenizer.json", "tokenizer.model")):
        tokenizer = load_tokenizer(args.lora)  # the adapter's own tokenizer files (train.py writes them) win
    dtype = args.dtype or model.lm_head.weight.dtype
    load_adapter(model, args.lora)
    merge_lora(model)
    save_pretrained(model, tokenizer, args.out, dtype=dtype)
    print(f"merged {args.lora} into {base} -> {args.out}")


def run() -> None:
    run_cli(main)
