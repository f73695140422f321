"""Tokenizers: load a Hugging Face tokenizer directory and encode/decode exactly as transformers does.

A checkpoint ships its tokenizer in one of two forms:

* `tokenizer.json` - a complete pipeline for the Rust `tokenizers` library (normalizer, pre-tokenizer,
  BPE/Unigram/WordPiece model, post-processor that adds BOS/EOS, decoder). We load it as is.
* `tokenizer.model` - a SentencePiece model (Llama 2, Mistral v0.1, ...) without a tokenizer.json. We build
  a `tokenizers` pipeline that encodes exactly as sentencepiece itself does, leading spaces and runs of
  spaces included (nanolisa/spm.py), so a model is fine-tuned on the ids it was pretrained on, and we get
  character offsets for free, which the chat-template loss masks need (see templates.py). (transformers
  converts such a model its own way, which differs from sentencepiece when a text starts with a space.)

Everything around the vocabulary lives in `tokenizer_config.json` (special tokens, `chat_template`,
`add_bos_token`), `special_tokens_map.json`, `chat_template.jinja` (where transformers 5 writes the
template) and `generation_config.json` (extra end-of-sequence ids for chat models). Special tokens may be
written as plain strings or as `{"content": ...}` dicts; both are accepted.

The built-in "tiny" model uses a byte-level tokenizer made by `build_tiny_tokenizer()` and shipped in
`nanolisa/assets/tiny/`: one token per UTF-8 byte (id = byte value), so any text round-trips exactly, plus
`<s>`, `</s>`, `<pad>` and the ChatML turn markers `<|im_start|>`, `<|im_end|>`.

Saving. A tokenizer loaded from a directory is saved by copying that directory's tokenizer files byte for
byte (TOKENIZER_FILES): transformers' fast and slow tokenizers, vLLM and llama.cpp's converter each read
their own subset of them, and each then loads exactly the tokenizer the base model had.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Any

from tokenizers import AddedToken, decoders, pre_tokenizers, processors
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

from nanolisa.errors import UserError
from nanolisa.files import copy_file, read_json, write_text
from nanolisa.spm import tokenizer_from_sentencepiece

TINY_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "tiny")

# Tokens that chat templates use to close a turn. When one of them appears in a model's chat template it
# is a stop token for generation, in addition to the tokenizer's EOS (e.g. Llama 3's <|eot_id|>).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|eot_id|>", "<|end|>", "<end_of_turn>", "<|EOT|>", "<|endoftext|>",
                      "<|end_of_text|>")

# Every file a tokenizer may be made of (what `save` copies). generation_config.json is the model's, but its
# eos_token_id list is what makes generation stop at end-of-turn tokens, so an adapter directory gets it too.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "chat_template.jinja",
                   "chat_template.json", "generation_config.json")


def _token_str(tok: Any) -> str | None:
    """A special token as written in tokenizer_config.json: a string, or {"content": ...} (AddedToken)."""
    if tok is None:
        return None
    if isinstance(tok, dict):
        return tok.get("content")
    if isinstance(tok, str):
        return tok
    return None


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    data = read_json(path)
    return data if isinstance(data, dict) else {}


def _clean_up_tokenization(text: str) -> str:
    """transformers' `clean_up_tokenization` (used only for non-BPE models that ask for it)."""
    for a, b in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                 (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
        text = text.replace(a, b)
    return text


class Tokenizer:
    """A loaded tokenizer: a `tokenizers.Tokenizer` pipeline plus the special tokens and chat template.

    encode/decode give the same ids and text as `transformers.AutoTokenizer` on the same directory.
    """

    def __init__(self, backend: HFTokenizer, config: dict, *, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None, unk_token: str | None = None,
                 chat_template: str | None = None, extra_eos_ids: list[int] | None = None,
                 sp_model_path: str | None = None, source_dir: str | None = None):
        self.backend = backend
        self.source_dir = source_dir  # the directory loaded from (None: built in memory)
        self.config = config  # the tokenizer_config.json we were loaded from (written back by save())
        self.bos_token, self.eos_token, self.pad_token, self.unk_token = bos_token, eos_token, pad_token, unk_token
        self.chat_template = chat_template
        self.sp_model_path = sp_model_path
        self.bos_token_id = self.token_to_id(bos_token)
        self.eos_token_id = self.token_to_id(eos_token)
        self.pad_token_id = self.token_to_id(pad_token)
        self.unk_token_id = self.token_to_id(unk_token)
        # transformers only honours clean_up_tokenization_spaces for non-BPE models (it corrupts BPE output)
        self._cleanup = bool(config.get("clean_up_tokenization_spaces", False)) and \
            type(backend.model).__name__ != "BPE"
        # Generation stops on EOS, on generation_config's eos ids, and on end-of-turn markers of the template.
        stops = [self.eos_token_id] + list(extra_eos_ids or [])
        for tok in END_OF_TURN_TOKENS:
            if chat_template and tok in chat_template and self.token_to_id(tok) is not None:
                stops.append(self.token_to_id(tok))
        self.stop_token_ids: list[int] = list(dict.fromkeys(i for i in stops if i is not None))

    # ---- basic API -------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (embedding tables must have at least this many rows)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self.backend.id_to_token(i)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        return [e.ids for e in self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)]

    def encode_with_offsets(self, text: str, add_special_tokens: bool = False):
        """(ids, offsets): offsets[i] = (start, end) character span of token i in `text`."""
        enc = self.backend.encode(text, add_special_tokens=add_special_tokens)
        return enc.ids, enc.offsets

    def encode_batch_with_offsets(self, texts: list[str], add_special_tokens: bool = False):
        encs = self.backend.encode_batch(texts, add_special_tokens=add_special_tokens)
        return [(e.ids, e.offsets) for e in encs]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        if hasattr(ids, "tolist"):
            ids = ids.tolist()
        if isinstance(ids, int):
            ids = [ids]
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return _clean_up_tokenization(text) if self._cleanup else text

    @property
    def adds_bos(self) -> bool:
        """Whether encode(..., add_special_tokens=True) puts BOS first (its post-processor adds one)."""
        ids = self.backend.encode("", add_special_tokens=True).ids
        return bool(ids) and self.bos_token_id is not None and ids[0] == self.bos_token_id

    @property
    def adds_eos(self) -> bool:
        ids = self.backend.encode("", add_special_tokens=True).ids
        return bool(ids) and self.eos_token_id is not None and ids[-1] == self.eos_token_id

    def fingerprint(self) -> str:
        """A stable hash of everything that decides token ids (used as a tokenization-cache key)."""
        h = hashlib.sha256(self.backend.to_str().encode("utf-8"))
        h.update(json.dumps([self.bos_token, self.eos_token, self.pad_token, self.chat_template]).encode())
        return h.hexdigest()[:16]

    # ---- saving ----------------------------------------------------------------------------------------
    def save(self, out_dir: str) -> None:
        """Write the tokenizer into out_dir so that nanolisa, transformers, vLLM and llama.cpp load it.

        Loaded from a directory and unchanged since: that directory's tokenizer files, copied byte for byte
        (see TOKENIZER_FILES), with only the chat template rewritten if it was changed here (set it to None
        to drop it). Built in memory, or tokens added since loading: tokenizer.json (+ tokenizer.model when
        loaded from one), tokenizer_config.json and special_tokens_map.json, written from the pipeline."""
        os.makedirs(out_dir, exist_ok=True)
        if self.source_dir is not None and self._same_as_source():
            copy_tokenizer_files(self.source_dir, out_dir)
            if self.chat_template != read_chat_template(out_dir):
                write_chat_template(out_dir, self.chat_template)
            return
        write_text(os.path.join(out_dir, "tokenizer.json"), self.backend.to_str(pretty=True))
        if self.sp_model_path and os.path.abspath(os.path.dirname(self.sp_model_path)) != os.path.abspath(out_dir):
            copy_file(self.sp_model_path, os.path.join(out_dir, "tokenizer.model"))
        specials = {k: v for k, v in (("bos_token", self.bos_token), ("eos_token", self.eos_token),
                                      ("pad_token", self.pad_token), ("unk_token", self.unk_token)) if v is not None}
        config = {k: v for k, v in self.config.items() if k not in ("chat_template",)}
        config.update(specials)
        # tokenizer.json now carries the exact pipeline: the generic class uses it as it is (a model-specific
        # class such as LlamaTokenizer rebuilds parts of it), and flags that would rebuild it are dropped
        config.pop("add_bos_token", None)
        config.pop("add_eos_token", None)
        config.pop("legacy", None)
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        write_text(os.path.join(out_dir, "tokenizer_config.json"), json.dumps(config, indent=2, ensure_ascii=False))
        write_text(os.path.join(out_dir, "special_tokens_map.json"), json.dumps(specials, indent=2, ensure_ascii=False))
        stale = os.path.join(out_dir, "chat_template.jinja")
        if os.path.exists(stale):  # transformers 5 prefers this file; keep it in sync with what we hold
            if self.chat_template is None:
                os.remove(stale)
            else:
                write_text(stale, self.chat_template)

    def _same_as_source(self) -> bool:
        """Whether loading source_dir again gives this pipeline and these special tokens (nothing was added
        or changed in memory since, the chat template aside)."""
        again = load_tokenizer(self.source_dir)
        return again.backend.to_str() == self.backend.to_str() and \
            (again.bos_token, again.eos_token, again.pad_token, again.unk_token) == \
            (self.bos_token, self.eos_token, self.pad_token, self.unk_token)

    def check_fits(self, vocab_size: int, names: tuple[str, ...] = ("bos_token", "eos_token", "unk_token")) -> None:
        """These special tokens must have a row in the model's embedding (vocab_size rows): a
        tokenizer_config.json that names a token missing from the vocabulary gets it added past the end, where
        the model has nothing to embed it with, and the first batch that uses it ends in an IndexError. (The
        pad token matters only to training, which pads with it: the trainer checks it.)"""
        for name in names:
            token = getattr(self, name)
            i = self.token_to_id(token)
            if i is not None and i >= vocab_size:
                where = os.path.join(self.source_dir, "tokenizer_config.json") if self.source_dir else "the tokenizer"
                raise UserError(f"{where}: {name} {token!r} is not in the model's vocabulary (it would be id {i}; the "
                                f"model embeds ids 0..{vocab_size - 1}); name a token the vocabulary has")

    def __repr__(self) -> str:
        return (f"Tokenizer(vocab_size={self.vocab_size}, bos={self.bos_token!r}, eos={self.eos_token!r}, "
                f"pad={self.pad_token!r}, chat_template={'yes' if self.chat_template else 'no'})")


def _set_post_processor(tok: HFTokenizer, bos: str | None, eos: str | None, add_bos: bool, add_eos: bool) -> None:
    """transformers' `update_post_processor`: `<bos> $A <eos>` as the flags ask."""
    add_bos = add_bos and bos is not None and tok.token_to_id(bos) is not None
    add_eos = add_eos and eos is not None and tok.token_to_id(eos) is not None
    single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
    pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
    special = ([(bos, tok.token_to_id(bos))] if add_bos else []) + ([(eos, tok.token_to_id(eos))] if add_eos else [])
    tok.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)


def read_chat_template(path: str, config: dict | None = None) -> str | None:
    """The chat template of a tokenizer directory: chat_template.jinja (where transformers 5 writes it), else
    tokenizer_config.json's chat_template (a string, or named templates of which "default" is used)."""
    jinja_path = os.path.join(path, "chat_template.jinja")
    if os.path.exists(jinja_path):
        with open(jinja_path, encoding="utf-8") as f:
            return f.read()
    if config is None:
        config = _read_json(os.path.join(path, "tokenizer_config.json"))
    ct = config.get("chat_template")
    if isinstance(ct, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {d.get("name"): d.get("template") for d in ct if isinstance(d, dict)}
        ct = named.get("default") or next(iter(named.values()), None)
    return ct if isinstance(ct, str) else None


def write_chat_template(out_dir: str, template: str | None) -> None:
    """Make `template` the chat template of the tokenizer files in out_dir (None: remove it): written into
    tokenizer_config.json, which every version of transformers reads, and every other copy removed."""
    for name in ("chat_template.jinja", "chat_template.json"):
        if os.path.exists(os.path.join(out_dir, name)):
            os.remove(os.path.join(out_dir, name))
    path = os.path.join(out_dir, "tokenizer_config.json")
    if template is None and not os.path.exists(path):
        return
    config = _read_json(path)
    config.pop("chat_template", None)
    if template is not None:
        config["chat_template"] = template
    write_text(path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")


def copy_tokenizer_files(src: str, out_dir: str) -> list[str]:
    """Copy every tokenizer file of src (TOKENIZER_FILES) into out_dir, byte for byte; returns their names."""
    names = [n for n in TOKENIZER_FILES if os.path.isfile(os.path.join(src, n))]
    if os.path.abspath(src) != os.path.abspath(out_dir):
        for name in names:
            copy_file(os.path.join(src, name), os.path.join(out_dir, name))
    return names


def load_tokenizer(path: str) -> Tokenizer:
    """Load the tokenizer in directory `path` (tokenizer.json or tokenizer.model + configs), or "tiny"."""
    if path == "tiny":
        path = TINY_DIR
    if not os.path.isdir(path):
        raise UserError(f"{path}: tokenizer directory does not exist")
    tj, tm = os.path.join(path, "tokenizer.json"), os.path.join(path, "tokenizer.model")
    if not os.path.exists(tj) and not os.path.exists(tm):
        raise UserError(f"{path}: no tokenizer.json or tokenizer.model found; copy the tokenizer files of the "
                        f"base model into this directory")
    config = _read_json(os.path.join(path, "tokenizer_config.json"))
    smap = _read_json(os.path.join(path, "special_tokens_map.json"))
    gen = _read_json(os.path.join(path, "generation_config.json"))

    sp_path = None
    if os.path.exists(tj):
        try:
            backend = HFTokenizer.from_file(tj)
        except Exception as e:
            raise UserError(f"{tj}: cannot parse tokenizer.json ({str(e).splitlines()[0][:200]})") from None
    else:
        sp_path = tm
        try:
            backend = tokenizer_from_sentencepiece(tm, config)
        except (OSError, RuntimeError) as e:
            raise UserError(f"{tm}: cannot load SentencePiece model ({str(e).splitlines()[0][:200]})") from None

    # Tokens listed in added_tokens_decoder are added to the backend with their flags (as transformers does).
    for _, t in sorted(((int(k), v) for k, v in (config.get("added_tokens_decoder") or {}).items())):
        if isinstance(t, dict) and t.get("content") and backend.token_to_id(t["content"]) is None:
            at = AddedToken(t["content"], single_word=t.get("single_word", False), lstrip=t.get("lstrip", False),
                            rstrip=t.get("rstrip", False), normalized=t.get("normalized", not t.get("special", False)),
                            special=t.get("special", False))
            (backend.add_special_tokens if t.get("special") else backend.add_tokens)([at])

    def special(name: str) -> str | None:
        for file, source in (("tokenizer_config.json", config), ("special_tokens_map.json", smap)):
            value = source.get(name)
            tok = _token_str(value)
            if value is not None and not isinstance(tok, str):
                raise UserError(f"{os.path.join(path, file)}: {name} must be a token string or "
                                f"{{\"content\": \"...\"}}, got {json.dumps(value)[:80]}")
            if tok is not None:
                return tok
        return None

    bos, eos, pad, unk = special("bos_token"), special("eos_token"), special("pad_token"), special("unk_token")
    if sp_path is not None:  # LlamaTokenizer's defaults
        bos, eos, unk = bos or "<s>", eos or "</s>", unk or "<unk>"
    # Named special tokens that are missing from the vocabulary get added as special tokens, as transformers does.
    extra = [_token_str(t) for t in (config.get("additional_special_tokens") or config.get("extra_special_tokens") or [])]
    for t in [bos, eos, pad, unk] + extra:
        if t is not None and backend.token_to_id(t) is None:
            backend.add_special_tokens([AddedToken(t, special=True, normalized=False)])

    # transformers rebuilds the post-processor when add_bos_token/add_eos_token are given explicitly or the
    # pipeline has none; otherwise tokenizer.json's own post-processor decides what encode() adds.
    if "add_bos_token" in config or "add_eos_token" in config or backend.post_processor is None:
        _set_post_processor(backend, bos, eos, bool(config.get("add_bos_token", False)),
                            bool(config.get("add_eos_token", False)))

    chat_template = read_chat_template(path, config)

    gen_eos = gen.get("eos_token_id")
    extra_eos = gen_eos if isinstance(gen_eos, list) else ([gen_eos] if isinstance(gen_eos, int) else [])
    return Tokenizer(backend, config, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk,
                     chat_template=chat_template, extra_eos_ids=extra_eos, sp_model_path=sp_path,
                     source_dir=path)


# ---- the built-in tiny model's tokenizer ----------------------------------------------------------------
TINY_SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]

# ChatML, as Qwen2 writes it (without Qwen's default system prompt).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what the ByteLevel pre-tokenizer uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def build_tiny_tokenizer() -> HFTokenizer:
    """The tiny model's tokenizer: one token per UTF-8 byte, token id = byte value (so 'a' is 97), then
    <s>=256, </s>=257, <pad>=258, <|im_start|>=259, <|im_end|>=260. Deterministic: no training involved.
    A byte vocabulary keeps the demo tasks (digits, letters) one symbol per token, which a tiny model learns
    fast, and any text at all round-trips exactly."""
    b2u = _bytes_to_unicode()
    vocab = {b2u[b]: b for b in range(256)}
    tok = HFTokenizer(BPE(vocab=vocab, merges=[]))
    # use_regex=False: no GPT-2 word splitting; add_prefix_space=False: text is encoded exactly as given.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in TINY_SPECIAL_TOKENS])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return tok


def write_tiny_tokenizer(out_dir: str = TINY_DIR) -> None:
    """(Re)generate nanolisa/assets/tiny/: `python -c "from nanolisa.tokenizer import write_tiny_tokenizer as w; w()"`."""
    tok = Tokenizer(build_tiny_tokenizer(), {"tokenizer_class": "PreTrainedTokenizerFast",
                                             "model_max_length": 2048, "clean_up_tokenization_spaces": False},
                    bos_token="<s>", eos_token="</s>", pad_token="<pad>", chat_template=CHATML_TEMPLATE)
    tok.save(out_dir)
