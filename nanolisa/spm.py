"""A SentencePiece model (`tokenizer.model`) as a `tokenizers` pipeline that encodes exactly as sentencepiece.

Llama 1/2, Mistral v0.1 and their fine-tunes ship a SentencePiece model, and that is how their text was
tokenized in pretraining. nanolisa runs it through the Rust `tokenizers` library, which gives character
offsets (the chat-template loss masks need them) and fast batch encoding, with a pipeline built to give
sentencepiece's own ids; tests/test_tokenizer.py checks it against `sentencepiece` on text with runs of
spaces, tabs, newlines, leading spaces, digits and unicode.

What sentencepiece does to a text, and the pipeline step that does the same:

  1. Normalize with the model's rule (NFKC for `nmt_nfkc`; nothing for `identity`, as Llama's models use):
     the model's precompiled character map, `normalizers.Precompiled`.
  2. `remove_extra_whitespaces`: drop leading and trailing spaces and collapse runs of spaces.
  3. `add_dummy_prefix`: put a space before the text, always, even when the text starts with one (" hi"
     becomes "▁▁hi"). tokenizers' Metaspace pre-tokenizer skips the prefix when the text starts with a
     space, which is where transformers' converted Llama tokenizers part from sentencepiece.
  4. Spaces become "▁", then BPE (merges by the score of the merged piece) or Unigram (Viterbi) splits
     the text into pieces; characters outside the vocabulary fall back to byte pieces (<0xE4>...).

Special tokens written in the text (`<s>`, `</s>`) are split out first and each stretch of text between them
is encoded on its own, as transformers does (sentencepiece itself would spell them out as "<", "s", ">").
The dummy prefix of step 3 then goes before the first stretch only, or with `legacy: true` in
tokenizer_config.json before every stretch (transformers' `legacy` flag, the same as encoding each stretch
with sentencepiece); `add_prefix_space: false` turns it off.

The model's settings are read from the model file itself, a protocol buffer: `read_spec` decodes the few
fields needed (the `protobuf` package is not a dependency).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import sentencepiece as spm
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE, Unigram

from nanolisa.errors import UserError

UNIGRAM, BPE_TYPE = 1, 2  # TrainerSpec.model_type in sentencepiece_model.proto


@dataclass
class Spec:
    """The settings of a SentencePiece model that decide how it encodes (sentencepiece_model.proto)."""
    model_type: int = UNIGRAM  # TrainerSpec field 3
    treat_whitespace_as_suffix: bool = False  # TrainerSpec field 24
    normalization: str = ""  # NormalizerSpec field 1: "identity", "nmt_nfkc", ...
    charsmap: bytes = b""  # NormalizerSpec field 2: the normalization rule, compiled
    add_dummy_prefix: bool = True  # NormalizerSpec field 3
    remove_extra_whitespaces: bool = True  # NormalizerSpec field 4
    escape_whitespaces: bool = True  # NormalizerSpec field 5


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: bytes) -> Iterator[tuple[int, int | bytes]]:
    """(field number, value) of each field of a protobuf message: an int for varints, bytes otherwise."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 2:  # length-delimited: strings, bytes, sub-messages
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire in (1, 5):  # fixed 64 / 32 bits
            n = 8 if wire == 1 else 4
            value, i = buf[i:i + n], i + n
        else:
            raise ValueError(f"protobuf wire type {wire} at byte {i}")
        yield number, value


def read_spec(model_file: bytes) -> Spec:
    """The encoding settings of a serialized ModelProto (fields 2: trainer_spec, 3: normalizer_spec)."""
    spec = Spec()
    for number, value in _fields(model_file):
        if number == 2:
            for n, v in _fields(value):
                if n == 3:
                    spec.model_type = v
                elif n == 24:
                    spec.treat_whitespace_as_suffix = bool(v)
        elif number == 3:
            for n, v in _fields(value):
                if n == 1:
                    spec.normalization = v.decode("utf-8", "replace")
                elif n == 2:
                    spec.charsmap = v
                elif n in (3, 4, 5):
                    setattr(spec, {3: "add_dummy_prefix", 4: "remove_extra_whitespaces",
                                   5: "escape_whitespaces"}[n], bool(v))
    return spec


def _bpe_merges(vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece BPE vocabulary: every way of splitting a piece into two pieces
    that are themselves in the vocabulary, ranked by the merged piece's id (a BPE model's pieces are in merge
    order: sentencepiece merges the adjacent pair whose union has the best score, -id)."""
    merges = []
    for piece, piece_id in vocab.items():
        local = [(piece[:i], piece[i:], piece_id) for i in range(1, len(piece))
                 if piece[:i] in vocab and piece[i:] in vocab]
        local.sort(key=lambda m: (vocab[m[0]], vocab[m[1]]))
        merges.extend(local)
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])))
    return [(a, b) for a, b, _ in merges]


def tokenizer_from_sentencepiece(model_path: str, config: dict) -> HFTokenizer:
    """The pipeline for tokenizer.model (see the module docstring); `config` is tokenizer_config.json."""
    sp = spm.SentencePieceProcessor(model_file=model_path)
    with open(model_path, "rb") as f:
        try:
            spec = read_spec(f.read())
        except (ValueError, IndexError):
            raise UserError(f"{model_path}: not a SentencePiece model (cannot read its settings)") from None
    if spec.treat_whitespace_as_suffix or not spec.escape_whitespaces:
        raise UserError(f"{model_path}: this SentencePiece model puts spaces after words or keeps them "
                        "unescaped, which nanolisa does not reproduce; give the model a tokenizer.json")
    if spec.model_type not in (UNIGRAM, BPE_TYPE):
        raise UserError(f"{model_path}: SentencePiece model type {spec.model_type} (word/char) is not "
                        "supported, only BPE and Unigram")
    n = sp.get_piece_size()
    pieces = [sp.id_to_piece(i) for i in range(n)]
    byte_fallback = any(sp.is_byte(i) for i in range(n))
    unk_id = sp.unk_id() if sp.unk_id() >= 0 else None
    if spec.model_type == UNIGRAM:
        model = Unigram([(p, float(sp.get_score(i))) for i, p in enumerate(pieces)], unk_id=unk_id or 0,
                        byte_fallback=byte_fallback)
    else:
        vocab = {p: i for i, p in enumerate(pieces)}
        model = BPE(vocab=vocab, merges=_bpe_merges(vocab), unk_token=None if unk_id is None else pieces[unk_id],
                    fuse_unk=True, byte_fallback=byte_fallback)
    tok = HFTokenizer(model)

    # Where the dummy prefix goes: tokenizer_config.json's add_prefix_space (if given) else the model's own
    # add_dummy_prefix; before the first stretch of text, or before every stretch with legacy: true.
    add_prefix = config.get("add_prefix_space")
    add_prefix = spec.add_dummy_prefix if add_prefix is None else bool(add_prefix)
    scheme = ("always" if config.get("legacy", False) else "first") if add_prefix else "never"
    steps = [normalizers.Precompiled(spec.charsmap)] if spec.charsmap else []
    if spec.remove_extra_whitespaces:
        steps += [normalizers.Replace(Regex(" {2,}"), " "), normalizers.Replace(Regex(" $"), "")]
        if scheme != "first":  # ("first" keeps one leading space: it is the prefix, see below)
            steps.append(normalizers.Replace(Regex("^ "), ""))
    if scheme == "always":
        steps.append(normalizers.Prepend("▁"))  # unconditionally, unlike Metaspace
    steps.append(normalizers.Replace(" ", "▁"))
    tok.normalizer = normalizers.Sequence(steps)
    if scheme == "first" and spec.remove_extra_whitespaces:
        # A text that started with spaces now starts with one "▁", which is what the prefix would be; else
        # Metaspace prepends it, on the first stretch of text only (the one at offset 0).
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=False)
    elif scheme == "first":
        # Metaspace tells the first stretch of text from the others (its offset is 0), but skips the prefix
        # when the text starts with its replacement character. The text has no " " left (the normalizer
        # made them "▁"), so a Metaspace that prepends " " always prepends on the first stretch; a second
        # one turns that " " into "▁".
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Metaspace(replacement=" ", prepend_scheme="first", split=False),
            pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=False)])
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_prefix:
        steps.append(decoders.Strip(content=" ", left=1))
    tok.decoder = decoders.Sequence(steps)
    # Control pieces (<s>, </s>) and <unk> are special added tokens: matched in the text, never split.
    tok.add_special_tokens([AddedToken(pieces[i], normalized=False, special=True)
                            for i in range(n) if sp.is_control(i) or sp.is_unknown(i)])
    return tok
