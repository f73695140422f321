"""Data: read a dataset, tokenize it with loss masks, and serve shuffled, sharded, resumable batches.

Formats (auto-detected; `--data` is a file, a directory, or "demo" / "demo:test"; formats.py reads them):

* LMFlow JSON `{"type": ..., "instances": [...]}`, or a directory of such *.json files all of one type:
  - text_only   `{"text"}`: tokenized as the tokenizer does by default (with its BOS if its post-processor
    adds one); loss on every token.
  - text2text   `{"input", "output"}`: input and output are tokenized separately and concatenated with no
    separator (as LMFlow does), and the tokenizer's EOS is appended to the output so the model learns to
    stop; loss on the output (and that EOS) only.
  - conversation `{"system"?, "tools"?, "messages": [{"role", "content"}, ...]}`: rendered with the chat
    template (templates.py); loss on assistant turns and tool calls (LMFlow's `function` role) with their
    end-of-turn token, never on system/user text or tool results (`observation`); `train_on_prompt`
    trains on everything. `tools` (tool descriptions) are written by the template.
* Alpaca records (instruction, input?, output, system?, history?) in .json or .jsonl. They become
  *conversations*: user = instruction + "\\n" + input (LLaMA-Factory's join), assistant = output, after the
  `history` rounds, which are trained too (as LLaMA-Factory trains them). So they are written in the
  model's own chat format, the format chat.py talks to it in.
* ShareGPT records (`conversations`: [{"from": "human"|"gpt"|"system"|"function_call"|"observation",
  "value"}], `tools` a JSON string: LLaMA-Factory's tool-call format) and OpenAI-style records (`messages`:
  [{"role", "content"}], assistant `tool_calls`, role `tool`; content a string or a list of text parts)
  in .json or .jsonl -> conversation.
* `{"text"}` records -> text_only and `{"input", "output"}` records -> text2text, in .json or .jsonl.
* Plain .txt: one text_only document per blank-line-separated block (a note says how many were read; for
  one document per line, write a .jsonl of {"text": ...} records).

Bad input fails before training with one line naming the file, the record and the field (UserError):
also media (images/videos/audios), preference data (chosen/rejected) and KTO labels, which nanolisa does
not train. Fields nanolisa does not use are named in a note, never dropped silently. Examples longer than
`seq_len` are truncated; examples left with nothing to train on are dropped; `TokenizedData.summary()` is
one line with how many records were read, kept, truncated and dropped, and why.

Tokenization is bounded by what seq_len can use: a token spans at most as many characters as the longest
vocabulary entry, so a text is cut to (seq_len + 64) such spans before it is tokenized, and a 50 MB line
costs no more than a seq_len one (if the cut text gives too few tokens, e.g. a normalizer deleted
characters, the whole text is tokenized).

Labels are aligned with input_ids (IGNORE_INDEX = no loss); the loss shifts them by one (nanolisa/loss.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
from dataclasses import dataclass, field

import numpy as np
import torch

from nanolisa import demo_data
from nanolisa.errors import UserError
from nanolisa.files import atomic_file
from nanolisa.formats import TYPES, read_file, read_lmflow_dir  # noqa: F401 (TYPES: re-exported)
from nanolisa.loss import IGNORE_INDEX
from nanolisa.templates import assistant_spans, labels_from_spans, resolve_template

CACHE_VERSION = 2
DROP_REASONS = {"empty": "empty, nothing to train on",
                "truncated": "with no loss-bearing token within --seq-len"}


@dataclass
class Dataset:
    type: str                  # "text_only" | "text2text" | "conversation"
    instances: list[dict]      # normalized LMFlow instances
    source: str                # where it came from (path or demo name), for messages
    fingerprint: str = ""      # hash of the file contents (tokenization-cache key)
    notes: list[str] = field(default_factory=list)  # what the reader said (unused fields, .txt rule), printed

    def __len__(self) -> int:
        return len(self.instances)


def _hash_files(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(os.path.basename(p).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:20]


def read_dataset(path: str, quiet: bool = False) -> Dataset:
    """Read and validate a dataset (file, directory of LMFlow *.json, "demo", "demo:test" (text2text), or
    "demo:conversation[:test]"). Raises UserError naming the file and record on bad input. Notes (fields
    not used, how a .txt was split) are printed to stderr as `note: ...` unless quiet, and kept in .notes."""
    if path == "demo" or path.startswith("demo:"):
        opts = path.split(":")[1:]
        bad = [o for o in opts if o not in ("train", "test", "conversation", "text2text")]
        if bad:
            raise UserError(f"{path}: unknown demo option {bad[0]!r}; use demo, demo:test or "
                            f"demo:conversation[:test]")
        split = "test" if "test" in opts else "train"
        fmt = "conversation" if "conversation" in opts else "text2text"
        return Dataset(fmt, demo_data.demo_instances(split, fmt), f"demo:{fmt}:{split}",
                       f"demo-v{demo_data.DEMO_VERSION}-{fmt}-{split}")
    if not os.path.exists(path):
        raise UserError(f"{path}: no such file or directory")
    if os.path.isdir(path):
        typ, instances, notes, files = read_lmflow_dir(path)
        fingerprint = _hash_files(files)
    else:
        typ, instances, notes = read_file(path)
        fingerprint = _hash_files([path])
    if not instances:
        raise UserError(f"{path}: dataset is empty (no instances)")
    if not quiet:
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
    return Dataset(typ, instances, path, fingerprint, notes)


# ---- tokenization ----------------------------------------------------------------------------------------
@dataclass
class TokenizedData:
    examples: list[tuple[list[int], list[int]]]  # (input_ids, labels), labels IGNORE_INDEX where no loss
    seq_len: int
    num_truncated: int = 0         # kept examples that were cut to seq_len
    dropped: dict[str, int] = field(default_factory=dict)  # reason (DROP_REASONS) -> records dropped
    num_tokens_with_loss: int = 0  # label tokens the loss sees (labels[1:] != IGNORE_INDEX, as the shifted loss)
    source: str = ""
    num_read: int = 0              # records read (kept + dropped)

    def __len__(self) -> int:
        return len(self.examples)

    @property
    def num_dropped(self) -> int:
        return sum(self.dropped.values())

    def counts(self) -> dict:
        """read / kept / truncated / dropped (by reason), for JSON reports."""
        return {"read": self.num_read, "kept": len(self.examples), "truncated": self.num_truncated,
                "dropped": {r: n for r, n in self.dropped.items() if n}}

    def summary(self) -> str:
        """One line: records read, kept, truncated and dropped, and why."""
        why = "; ".join(f"{n} {DROP_REASONS[r].replace('--seq-len', f'--seq-len {self.seq_len}')}"
                        for r, n in self.dropped.items() if n)
        records = "record" if self.num_read == 1 else "records"
        return (f"{self.source}: {self.num_read} {records} read, {len(self.examples)} kept ({self.num_truncated} "
                f"truncated to --seq-len {self.seq_len}), {self.num_dropped} dropped" + (f" ({why})" if why else ""))


def _max_token_chars(tokenizer) -> int:
    """The most characters one token can stand for: the longest vocabulary entry (byte-level entries spell
    one byte per character, so they over- rather than under-count)."""
    return max(1, max((len(t) for t in tokenizer.backend.get_vocab(with_added_tokens=True)), default=1))


def _encode_bounded(tokenizer, texts: list[str], span: int, limit: int, with_offsets: bool, add_special_tokens: bool):
    """encode_batch(texts) where only the first seq_len tokens matter: each text is cut to `limit` characters
    first (at least limit // span tokens, `span` the most characters of one token); a cut text that gives
    fewer tokens than that (a normalizer deleting characters) is tokenized whole instead."""
    cut = [t[:limit] for t in texts]
    enc = (tokenizer.encode_batch_with_offsets(cut, add_special_tokens=add_special_tokens) if with_offsets
           else [(ids, None) for ids in tokenizer.encode_batch(cut, add_special_tokens=add_special_tokens)])
    min_tokens = limit // span
    for i, t in enumerate(texts):
        if len(t) > limit and len(enc[i][0]) < min_tokens:
            enc[i] = (tokenizer.encode_with_offsets(t, add_special_tokens=add_special_tokens) if with_offsets
                      else (tokenizer.encode(t, add_special_tokens=add_special_tokens), None))
    return enc


def _tokenize(ds: Dataset, tokenizer, template, train_on_prompt: bool, seq_len: int
              ) -> list[tuple[list[int], list[int]]]:
    """(input_ids, labels) per instance; at least the first seq_len + 1 tokens of each are exact."""
    span = _max_token_chars(tokenizer)
    limit = (seq_len + 64) * span
    if ds.type == "text_only":
        enc = _encode_bounded(tokenizer, [x["text"] for x in ds.instances], span, limit, False, True)
        return [(i, list(i)) for i, _ in enc]
    if ds.type == "text2text":
        eos = tokenizer.eos_token_id
        ins = _encode_bounded(tokenizer, [x["input"] for x in ds.instances], span, limit, False, True)
        outs = _encode_bounded(tokenizer, [x["output"] for x in ds.instances], span, limit, False, False)
        drop_eos = tokenizer.adds_eos  # an input must not end in EOS: the output follows it
        res = []
        for (a, _), (b, _) in zip(ins, outs):
            if drop_eos and a and a[-1] == eos:
                a = a[:-1]
            b = b + ([eos] if eos is not None else [])
            res.append((a + b, (list(a) if train_on_prompt else [IGNORE_INDEX] * len(a)) + b))
        return res
    texts, spans = [], []
    for i, x in enumerate(ds.instances):
        msgs = ([{"role": "system", "content": x["system"]}] if "system" in x else []) + x["messages"]
        try:
            t, s = assistant_spans(msgs, tokenizer, template, x.get("tools"))
        except UserError as e:
            raise UserError(f"{ds.source}: instance {i}: {e}") from None
        texts.append(t)
        spans.append(s)
    res = []
    for (ids, offsets), s in zip(_encode_bounded(tokenizer, texts, span, limit, True, False), spans):
        res.append((ids, list(ids) if train_on_prompt else labels_from_spans(ids, offsets, s)))
    return res


def default_cache_dir() -> str:
    return os.environ.get("NANOLISA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanolisa")


def tokenize_dataset(ds: Dataset, tokenizer, seq_len: int, template: str | None = None,
                     train_on_prompt: bool = False, cache_dir: str | None | bool = None,
                     vocab_size: int | None = None) -> TokenizedData:
    """Tokenize every instance to (input_ids, labels), truncated to seq_len; drop those left with no
    loss-bearing token, counting why. Results are cached on disk (cache_dir, default
    ~/.cache/nanolisa/tokenized; False disables) keyed by the data's content hash, the tokenizer, the
    template and the settings, so a second run on the same file starts at once. With vocab_size (the model's
    embedding rows), a token id the model cannot embed is one line now, not an IndexError at the batch
    that draws it."""
    data = _tokenize_dataset(ds, tokenizer, seq_len, template, train_on_prompt, cache_dir)
    if vocab_size is not None:
        check_ids(data, tokenizer, vocab_size)
    return data


def check_ids(data: TokenizedData, tokenizer, vocab_size: int) -> None:
    """Every token id of the data below vocab_size (a tokenizer can have added tokens past the embedding)."""
    if not data.examples or max(max(ids) for ids, _ in data.examples) < vocab_size:
        return
    i = next(i for i in max((ids for ids, _ in data.examples), key=max) if i >= vocab_size)
    raise UserError(f"{data.source}: the data has token {tokenizer.id_to_token(i)!r} (id {i}), which the model "
                    f"cannot embed (its vocabulary has ids 0..{vocab_size - 1}): the tokenizer adds tokens past the "
                    f"model's embedding; remove them from the tokenizer files or from the data")


def _tokenize_dataset(ds: Dataset, tokenizer, seq_len: int, template: str | None, train_on_prompt: bool,
                      cache_dir: str | None | bool) -> TokenizedData:
    if seq_len < 2:
        raise UserError(f"--seq-len must be at least 2, got {seq_len}")
    if ds.type == "conversation":
        template_src = resolve_template(tokenizer, template)[1]  # fail early if there is no template
    else:
        template_src = None
    path = None
    if cache_dir is not False and ds.fingerprint:
        key = hashlib.sha256(json.dumps([CACHE_VERSION, ds.fingerprint, ds.type, tokenizer.fingerprint(), seq_len,
                                         template_src, bool(train_on_prompt)]).encode()).hexdigest()[:24]
        path = os.path.join(cache_dir or os.path.join(default_cache_dir(), "tokenized"), f"{key}.npz")
        if os.path.exists(path):
            try:
                return _load_cache(path, seq_len, ds.source)
            except (OSError, ValueError, KeyError, IndexError):
                pass  # a damaged cache file is simply rebuilt
    raw = _tokenize(ds, tokenizer, template, train_on_prompt, seq_len)
    examples, truncated, num_loss = [], 0, 0
    dropped = dict.fromkeys(DROP_REASONS, 0)
    for ids, labels in raw:
        cut = len(ids) > seq_len
        if cut:
            ids, labels = ids[:seq_len], labels[:seq_len]
        n_loss = len(labels) - 1 - labels[1:].count(IGNORE_INDEX)  # targets the shifted loss will see
        if n_loss <= 0:
            dropped["truncated" if cut else "empty"] += 1
            continue
        truncated += cut
        examples.append((ids, labels))
        num_loss += n_loss
    data = TokenizedData(examples, seq_len, truncated, dropped, num_loss, ds.source, len(raw))
    if not examples:
        raise UserError(f"{data.summary()}; nothing left to train on")
    if path is not None:
        try:
            _save_cache(path, data)
        except OSError:
            pass  # a read-only cache directory only costs time
    return data


def _save_cache(path: str, data: TokenizedData) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lengths = np.array([len(i) for i, _ in data.examples], dtype=np.int64)
    ids = np.fromiter((t for i, _ in data.examples for t in i), dtype=np.int64, count=int(lengths.sum()))
    labels = np.fromiter((t for _, l in data.examples for t in l), dtype=np.int64, count=int(lengths.sum()))
    meta = np.array([data.num_read, data.num_truncated, data.num_tokens_with_loss]
                    + [data.dropped.get(r, 0) for r in DROP_REASONS], dtype=np.int64)
    with atomic_file(path, "wb") as f:
        np.savez(f, lengths=lengths, ids=ids, labels=labels, meta=meta)


def _load_cache(path: str, seq_len: int, source: str) -> TokenizedData:
    with np.load(path, allow_pickle=False) as z:
        lengths, ids, labels, meta = z["lengths"], z["ids"].tolist(), z["labels"].tolist(), z["meta"].tolist()
    bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    examples = [(ids[a:b], labels[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    dropped = dict(zip(DROP_REASONS, meta[3:3 + len(DROP_REASONS)]))
    return TokenizedData(examples, seq_len, meta[1], dropped, meta[2], source, meta[0])


# ---- batching ------------------------------------------------------------------------------------------
def rank_share(examples: list, rank: int, world_size: int) -> list:
    """Rank `rank`'s share of a list of examples for evaluation: every world_size-th one, evened out with
    empty examples (one token, no loss) so that every rank has as many and runs as many forward passes
    (FSDP2 needs every rank in each of them)."""
    mine = examples[rank::world_size]
    return mine + [([0], [IGNORE_INDEX])] * (-(-len(examples) // world_size) - len(mine))



class Batches:
    """Shuffled, sharded, resumable batches over a TokenizedData.

    * Each epoch e is shuffled with its own generator seeded by (seed, e), never the global RNG, so every
      rank computes the same order and a resumed run replays it exactly.
    * Data-parallel sharding: rank r of W takes rows r, r+W, r+2W, ... of the epoch's order (or, when
      packing, of its packed rows). So global batch k of W ranks with batch size B holds exactly the rows
      of batch k of one rank with batch size W*B, and the run trains on the same data either way. When the
      rows do not divide by W, the last ones are filled up with empty rows (all padding, no loss): no
      example is dropped, and every rank has the same number of batches.
    * Without packing a batch is as long as its longest example; padding gets label IGNORE_INDEX, position_ids None.
    * With packing, examples are laid end to end into rows of exactly seq_len tokens (an example never
      straddles two rows); position_ids restart at 0 at each example so the model keeps documents apart,
      and no document's first token is a target (nothing before it in its row is of the same document).
    * `iter(batches)` runs forever, epoch after epoch, from the saved position; `epoch(e)` is one pass.
    """

    def __init__(self, data: TokenizedData, batch_size: int, seed: int = 0, shuffle: bool = True,
                 pack: bool = False, rank: int = 0, world_size: int = 1, pad_id: int = 0, drop_last: bool = False):
        if batch_size < 1:
            raise UserError(f"--batch-size must be at least 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} out of range for world_size {world_size}")
        self.data, self.batch_size, self.seed, self.shuffle, self.pack = data, batch_size, seed, shuffle, pack
        self.rank, self.world_size, self.pad_id, self.drop_last = rank, world_size, pad_id, drop_last
        self._epoch, self._batch = 0, 0   # resume position: next batch to yield
        self._plan_cache: tuple[int, list] | None = None
        if len(self) == 0:
            raise UserError(f"{data.source}: {len(data.examples)} examples make no full batch of {batch_size} "
                            f"on each of {world_size} rank(s); lower --batch-size or add data")

    def _order(self, epoch: int) -> list[int]:
        n = len(self.data.examples)
        if not self.shuffle:
            return list(range(n))
        return np.random.default_rng([self.seed, epoch]).permutation(n).tolist()

    def _rows(self, epoch: int) -> list[list[int]]:
        """This rank's rows: each row is a list of example indices (one example each unless packing)."""
        order = self._order(epoch)
        if self.pack:
            rows, cur, used = [], [], 0
            for i in order:
                n = len(self.data.examples[i][0])
                if cur and used + n > self.data.seq_len:
                    rows.append(cur)
                    cur, used = [], 0
                cur.append(i)
                used += n
            if cur:
                rows.append(cur)
        else:
            rows = [[i] for i in order]
        rows += [[] for _ in range(-len(rows) % self.world_size)]  # empty rows: padding only, no loss
        return rows[self.rank::self.world_size]

    def _plan(self, epoch: int) -> list[list[list[int]]]:
        if self._plan_cache is None or self._plan_cache[0] != epoch:
            rows = self._rows(epoch)
            batches = [rows[k:k + self.batch_size] for k in range(0, len(rows), self.batch_size)]
            if self.drop_last and batches and len(batches[-1]) < self.batch_size:
                batches.pop()
            self._plan_cache = (epoch, batches)
        return self._plan_cache[1]

    def __len__(self) -> int:
        """Batches per epoch on this rank (the same on every rank)."""
        if not self.pack:
            rows = -(-len(self.data.examples) // self.world_size)
        else:
            rows = len(self._rows(0))  # packing: the count can vary slightly between epochs; epoch 0's
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    def _collate(self, batch_rows: list[list[int]]) -> dict:
        ex = self.data.examples
        if self.pack:
            T = self.data.seq_len
            ids = torch.full((len(batch_rows), T), self.pad_id, dtype=torch.long)
            labels = torch.full((len(batch_rows), T), IGNORE_INDEX, dtype=torch.long)
            pos = torch.zeros((len(batch_rows), T), dtype=torch.long)
            for r, row in enumerate(batch_rows):
                t = 0
                for i in row:
                    a, b = ex[i]
                    ids[r, t:t + len(a)] = torch.tensor(a)
                    # No label on a document's first token: the token before it is the end of another
                    # document, which cannot see it (attention stays within a document). So packed rows
                    # train exactly the targets unpacked rows do (whose first token is never a target).
                    labels[r, t + 1:t + len(a)] = torch.tensor(b[1:])
                    pos[r, t:t + len(a)] = torch.arange(len(a))  # each document starts at position 0
                    t += len(a)
                pos[r, t:] = torch.arange(T - t)  # the padding tail is its own (loss-free) document
            return {"input_ids": ids, "labels": labels, "position_ids": pos}
        T = max([len(ex[row[0]][0]) for row in batch_rows if row] or [1])
        ids = torch.full((len(batch_rows), T), self.pad_id, dtype=torch.long)   # (B, T)
        labels = torch.full((len(batch_rows), T), IGNORE_INDEX, dtype=torch.long)
        for r, row in enumerate(batch_rows):
            if not row:
                continue  # an empty row that evens out the ranks
            a, b = ex[row[0]]
            ids[r, :len(a)] = torch.tensor(a)
            labels[r, :len(b)] = torch.tensor(b)
        return {"input_ids": ids, "labels": labels, "position_ids": None}

    def epoch(self, e: int = 0):
        """One pass over epoch e's batches, from the start (does not touch the resume position)."""
        for rows in self._plan(e):
            yield self._collate(rows)

    def __iter__(self):
        while True:
            plan = self._plan(self._epoch)
            while self._batch < len(plan):
                rows = plan[self._batch]
                self._batch += 1  # count it as consumed before handing it out: a checkpoint taken now resumes after it
                yield self._collate(rows)
            self._epoch, self._batch = self._epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self._epoch, "batch": self._batch, "seed": self.seed,
                "num_examples": len(self.data.examples), "world_size": self.world_size}

    def load_state_dict(self, state: dict) -> None:
        if state.get("num_examples") != len(self.data.examples) or state.get("seed") != self.seed:
            raise UserError(f"cannot resume: the checkpoint's data position was saved for "
                            f"{state.get('num_examples')} examples with seed {state.get('seed')}, but this run "
                            f"has {len(self.data.examples)} with seed {self.seed}; use the same --data and --seed")
        self._epoch, self._batch = int(state["epoch"]), int(state["batch"])
