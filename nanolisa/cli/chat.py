"""Chat with a model in the terminal: streaming replies, a KV cache, greedy or sampled decoding.
(`nanolisa chat ...` runs the same code as `python chat.py ...`.)

    python chat.py                                   # the built-in tiny model (random weights: gibberish)
    python chat.py --model out                       # the model `python train.py` just fine-tuned
    python chat.py --model path/to/llama --lora out  # a base model plus a LoRA adapter (--method lora);
                                                     # --model out alone finds the base the adapter names
    python chat.py --model out --base path/to/llama  # ... or takes the base given with --base
    python chat.py --model path/to/Llama-3-8B-Instruct --temperature 0.7 --top-p 0.9 --system "Be brief."
    python chat.py --model out --prompt "What is 2+3?"          # one-shot: only the reply goes to stdout
    python chat.py --model path/to/gpt2 --raw --prompt "Once upon a time" --max-new-tokens 50

In the chat, /reset starts a new conversation (the system prompt stays), Ctrl-C interrupts a reply and
/exit (or Ctrl-D) quits. The conversation is written with the model's chat template (or --template NAME)
and each reply stops at EOS or the template's end-of-turn token; a note on stderr says which template it
is. A LoRA adapter directory that holds tokenizer files (train.py writes them) brings its own chat template,
the one it was trained with, not the base model's. Each turn only prefills what is new: the cached keys and
values of the conversation so far are reused (see nanolisa/generate.py). Single process; CPU or one GPU.

A model without a chat template (a base model, or the demo model, trained on text2text data) is talked to
in completion mode, as --raw asks for: each line is fed as-is, on its own (nothing of earlier lines is
kept), and the model continues it (`python chat.py --model out`, then `upper(cat)=` gets `CAT`). Lines can
come from a pipe too (`printf 'upper(cat)=\n' | python chat.py --model out`): one reply per line on stdout,
no prompt.
"""
from __future__ import annotations

import argparse
import sys
import time

import torch

from nanolisa.cli.common import (ArgumentParser, add_model_args, add_runtime_args, describe_template,
                                 load_for_inference, run_cli)
from nanolisa.errors import UserError
from nanolisa.generate import Decoder, Sampling, TextStream, stop_ids_for
from nanolisa.runtime import set_threads
from nanolisa.templates import PRESETS, render_chat, resolve_template, unknown_markers_note
from nanolisa.train_config import MAX_SEED


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p)
    p.add_argument("--template", default=None,
                   help=f"chat template: a preset ({', '.join(PRESETS)}), a .jinja file or a Jinja "
                        "string; default: the model's own chat_template")
    p.add_argument("--system", default=None, help="system prompt at the start of every conversation")
    p.add_argument("--prompt", default=None,
                   help="one-shot mode: reply to this message, print only the reply to stdout, and exit")
    p.add_argument("--raw", action="store_true",
                   help="completion mode: feed each line as-is, on its own, and let the model continue it, "
                        "without the chat template (the default for a model that has none)")
    p.add_argument("--max-new-tokens", type=int, default=256,
                   help="most tokens per reply (default: %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0,
                   help="sampling temperature; 0 = greedy decoding (default); otherwise at least 1e-4")
    p.add_argument("--top-k", type=int, default=0,
                   help="sample from the k most likely tokens; 0 = no limit (default)")
    p.add_argument("--top-p", type=float, default=1.0,
                   help="nucleus sampling: the smallest set of tokens with this much probability; "
                        "1 = no limit (default)")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="divide logits of tokens already in the conversation by this (CTRL); 1 = off (default)")
    p.add_argument("--seed", type=int, default=None,
                   help="random seed for sampling, 0 .. 2**64-1; default: a fresh one")
    p.add_argument("--ignore-eos", action="store_true",
                   help="do not stop at EOS / end-of-turn tokens: always generate --max-new-tokens")
    add_runtime_args(p)
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens {args.max_new_tokens}: must be >= 1")
    if args.seed is not None and not 0 <= args.seed <= MAX_SEED:
        p.error(f"--seed {args.seed}: must be between 0 and 2**64-1")
    for flag in ("prompt", "system"):
        if getattr(args, flag) is not None:
            check_text(getattr(args, flag), f"--{flag}")
    sampling(args)  # a bad value is refused before the model is loaded
    return args


def sampling(args: argparse.Namespace) -> Sampling:
    return Sampling(args.temperature, args.top_k, args.top_p, args.repetition_penalty).check()


def check_text(text: str, where: str) -> None:
    """Text must be valid UTF-8: bytes that are not arrive (from argv, or a terminal set to another
    encoding) as lone surrogates, which no tokenizer can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(text[e.start])
        what = f"byte 0x{c - 0xDC00:02x}" if 0xDC80 <= c <= 0xDCFF else f"character U+{c:04X}"
        raise UserError(f"{where} is not valid UTF-8 text ({what} at position {e.start})") from None


class Chat:
    """The conversation, the decoder (with its KV cache) and the decoding settings."""

    def __init__(self, model, tokenizer, args: argparse.Namespace, tokenizer_dir: str | None = None):
        self.tokenizer, self.args = tokenizer, args
        self.sampling = sampling(args)
        self.decoder = Decoder(model)
        self.generator = None
        if args.temperature > 0:
            seed = args.seed if args.seed is not None else torch.seed()
            self.generator = torch.Generator(device=model.lm_head.weight.device).manual_seed(seed)
        self.raw = args.raw or (args.template is None and not tokenizer.chat_template)
        self.say_mode(tokenizer_dir or args.model)
        self.stop_ids = [] if args.ignore_eos else stop_ids_for(tokenizer, args.template)
        self.messages: list[dict] = []
        self.reset()

    def say_mode(self, tokenizer_dir: str) -> None:
        """One note on stderr: completion mode (unless --raw asked for it), or the chat template in use."""
        args, tokenizer = self.args, self.tokenizer
        if self.raw:
            if not args.raw:
                print(f"note: {tokenizer_dir} has no chat template: completion mode, each line is continued as "
                      f"plain text, on its own, with nothing of earlier lines kept (--template NAME chats with a "
                      f"template and keeps the conversation)", file=sys.stderr)
            return
        resolve_template(tokenizer, args.template)  # fail now, not at the first message
        print(f"note: chat template: {describe_template(tokenizer, args.template, tokenizer_dir)}", file=sys.stderr)
        markers = unknown_markers_note(tokenizer, args.template)
        if markers:
            print(f"note: {markers}", file=sys.stderr)

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.args.system}] if self.args.system else []

    def prompt_ids(self, user: str) -> list[int]:
        if self.raw:
            return self.tokenizer.encode(user)
        text = render_chat(self.messages + [{"role": "user", "content": user}], self.tokenizer,
                           self.args.template, add_generation_prompt=True)
        # as transformers' apply_chat_template: templates write BOS themselves when the model wants one
        return self.tokenizer.encode(text, add_special_tokens=False)

    def reply(self, user: str, out) -> str:
        """Stream the reply to `out`; report speed on stderr; remember the turn."""
        check_text(user, "the message")
        ids = self.prompt_ids(user)
        stream = TextStream(self.tokenizer)
        t0 = time.perf_counter()
        t_first, n = None, 0
        for tok in self.decoder.stream(ids, self.args.max_new_tokens, self.sampling, self.stop_ids,
                                       self.generator):
            n += 1
            if t_first is None:
                t_first = time.perf_counter()
            out.write(stream.push(tok))
            out.flush()
        out.write(stream.flush() + "\n")
        out.flush()
        t1 = time.perf_counter()
        # decode speed: tokens after the first, over the time after it (the first waits for the prefill);
        # a reply of one token has no such time, and one of none (EOS came first) no first token
        rate = f", {(n - 1) / (t1 - t_first):.1f} tok/s" if n > 1 and t1 > t_first else ""
        when = f"first token after {t_first - t0:.2f}s" if n else f"the reply ended at once, after {t1 - t0:.2f}s"
        print(f"[{n} token{'' if n == 1 else 's'}{rate}; prompt {len(ids)} tokens, {when}]",
              file=sys.stderr, flush=True)
        text = stream.text()
        if not self.raw:  # completion mode has no conversation: each message stands alone
            self.messages += [{"role": "user", "content": user}, {"role": "assistant", "content": text}]
        return text


def interactive(chat: Chat) -> None:
    print("chat: /exit quits" if chat.raw else "chat: /reset starts over, /exit quits", file=sys.stderr)
    if hasattr(sys.stdin, "reconfigure"):  # bytes that are not UTF-8: an error line, not a traceback
        sys.stdin.reconfigure(errors="surrogateescape")
    prompt = "\n>>> " if getattr(sys.stdin, "isatty", lambda: False)() else ""  # a pipe: only replies on stdout
    while True:
        try:
            user = input(prompt)
        except EOFError:
            print(file=sys.stderr)
            return
        cmd = user.strip()
        if not cmd:
            continue
        if cmd == "/exit":
            return
        if cmd == "/reset":
            chat.reset()
            print("(conversation reset)", file=sys.stderr)
            continue
        if cmd.startswith("/") and " " not in cmd:
            print(f"unknown command {cmd}: /reset starts over, /exit quits", file=sys.stderr)
            continue
        try:
            chat.reply(user, sys.stdout)
        except UserError as e:  # e.g. the conversation outgrew the context: say so and keep the session
            print(f"error: {e}", file=sys.stderr)
        except KeyboardInterrupt:  # Ctrl-C stops this reply (it is not kept), not the session
            print("\n(reply interrupted)", file=sys.stderr)


def main(argv=None) -> None:
    args = parse_args(argv)
    set_threads(args.threads)
    model, tokenizer, tokenizer_dir = load_for_inference(args.model, args.lora, args.base, args.dtype, args.device,
                                                         args.kernels)
    chat = Chat(model, tokenizer, args, tokenizer_dir)
    if args.prompt is not None:
        chat.reply(args.prompt, sys.stdout)
    else:
        interactive(chat)


def run() -> None:
    run_cli(main)
