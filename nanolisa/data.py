"""Data: read a dataset, tokenize it with loss masks, and serve shuffled, sharded, resumable batches.

Formats (auto-detected; `--data` is a file, a directory, or "demo" / "demo:test"):

* LMFlow JSON `{"type": ..., "instances": [...]}`, or a directory of such *.json files all of one type:
  - text_only   `{"text"}`: tokenized as the tokenizer does by default (with its BOS if its post-processor
    adds one); loss on every token.
  - text2text   `{"input", "output"}`: input and output are tokenized separately and concatenated with no
    separator (as LMFlow does), and the tokenizer's EOS is appended to the output so the model learns to
    stop; loss on the output (and that EOS) only.
  - conversation `{"system"?, "tools"?, "messages": [{"role": "user"|"assistant", "content"}, ...]}`:
    rendered with the chat template (templates.py); loss on assistant turns and their end-of-turn token,
    never on system/user text; `train_on_prompt` trains on everything.
* Alpaca records (instruction / input / output, optional system) in .json or .jsonl. They become
  *conversations*: user = instruction, plus "\\n\\n" + input when there is one; assistant = output. So they
  are written in the model's own chat format, the format chat.py talks to it in.
* ShareGPT records (`conversations`: [{"from": "human"|"gpt"|"system", "value"}]) and OpenAI-style records
  (`messages`: [{"role", "content"}]) in .json or .jsonl -> conversation.
* Plain .txt: one text_only document per blank-line-separated block.

Bad input fails before training with one line naming the file, the instance and the problem (UserError).
Examples longer than `seq_len` are truncated and counted, not fatal.

Labels are aligned with input_ids (IGNORE_INDEX = no loss); the loss shifts them by one (nanolisa/loss.py).
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass

import numpy as np
import torch

from nanolisa import demo_data
from nanolisa.errors import UserError
from nanolisa.files import atomic_file
from nanolisa.loss import IGNORE_INDEX
from nanolisa.templates import assistant_spans, labels_from_spans, resolve_template

TYPES = ("text_only", "text2text", "conversation")
CACHE_VERSION = 1
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bard": "assistant", "bing": "assistant", "model": "assistant",
                  "system": "system"}


@dataclass
class Dataset:
    type: str                  # "text_only" | "text2text" | "conversation"
    instances: list[dict]      # normalized LMFlow instances
    source: str                # where it came from (path or demo name), for messages
    fingerprint: str = ""      # hash of the file contents (tokenization-cache key)

    def __len__(self) -> int:
        return len(self.instances)


# ---- reading and validating ----------------------------------------------------------------------------
def _check_str(inst: dict, key: str, where: str, optional: bool = False) -> None:
    if key not in inst:
        if optional:
            return
        raise UserError(f"{where}: missing field {key!r}")
    if not isinstance(inst[key], str):
        raise UserError(f"{where}: field {key!r} must be a string, got {type(inst[key]).__name__}")


def _normalize_conversation(inst: dict, where: str) -> dict:
    """Check an LMFlow conversation instance; move a leading system message into "system"."""
    msgs = inst.get("messages")
    if not isinstance(msgs, list):
        raise UserError(f"{where}: missing field 'messages' (a list of {{role, content}})")
    system = inst.get("system")
    if system is not None and not isinstance(system, str):
        raise UserError(f"{where}: field 'system' must be a string")
    out = []
    for j, m in enumerate(msgs):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise UserError(f"{where}: message {j} must be an object with 'role' and 'content'")
        if not isinstance(m["content"], str):
            raise UserError(f"{where}: message {j}: 'content' must be a string")
        role = m["role"]
        if role == "system" and j == 0 and system is None:
            system = m["content"]
            continue
        if role not in ("user", "assistant"):
            raise UserError(f"{where}: message {j}: unknown role {role!r} (expected 'user' or 'assistant')")
        want = "user" if len(out) % 2 == 0 else "assistant"
        if role != want:
            raise UserError(f"{where}: message {j}: conversation must alternate user/assistant starting with "
                            f"user, got {role!r} where {want!r} was expected")
        out.append({"role": role, "content": m["content"]})
    if not out:
        raise UserError(f"{where}: conversation has no messages")
    if out[-1]["role"] != "assistant":
        raise UserError(f"{where}: conversation ends with a user message; the last message must be the "
                        "assistant's reply")
    res = {"messages": out}
    if system is not None:
        res["system"] = system
    if inst.get("tools") is not None:
        if not isinstance(inst["tools"], list):
            raise UserError(f"{where}: field 'tools' must be a list")
        res["tools"] = inst["tools"]
    return res


def _normalize_instance(typ: str, inst, where: str) -> dict:
    if not isinstance(inst, dict):
        raise UserError(f"{where}: instance must be a JSON object, got {type(inst).__name__}")
    if typ == "text_only":
        _check_str(inst, "text", where)
        return {"text": inst["text"]}
    if typ == "text2text":
        _check_str(inst, "input", where)
        _check_str(inst, "output", where)
        return {"input": inst["input"], "output": inst["output"]}
    return _normalize_conversation(inst, where)


def _record_to_instance(rec, where: str) -> tuple[str, dict]:
    """One Alpaca / ShareGPT / OpenAI / LMFlow-shaped record -> (type, normalized instance)."""
    if not isinstance(rec, dict):
        raise UserError(f"{where}: record must be a JSON object, got {type(rec).__name__}")
    if "conversations" in rec:  # ShareGPT
        conv = rec["conversations"]
        if not isinstance(conv, list):
            raise UserError(f"{where}: 'conversations' must be a list")
        msgs = []
        for j, m in enumerate(conv):
            if not isinstance(m, dict) or "from" not in m or "value" not in m:
                raise UserError(f"{where}: conversations[{j}] must be an object with 'from' and 'value'")
            role = SHAREGPT_ROLES.get(m["from"])
            if role is None:
                raise UserError(f"{where}: conversations[{j}]: unknown role {m['from']!r} "
                                "(expected human, gpt or system)")
            msgs.append({"role": role, "content": m["value"]})
        inst = {"messages": msgs}
        if isinstance(rec.get("system"), str):
            inst["system"] = rec["system"]
        if rec.get("tools") is not None:
            inst["tools"] = rec["tools"]
        return "conversation", _normalize_conversation(inst, where)
    if "messages" in rec:  # OpenAI-style (and LMFlow conversation instances)
        return "conversation", _normalize_conversation(rec, where)
    if "instruction" in rec:  # Alpaca
        _check_str(rec, "instruction", where)
        _check_str(rec, "output", where)
        _check_str(rec, "input", where, optional=True)
        user = rec["instruction"] + (("\n\n" + rec["input"]) if rec.get("input") else "")
        inst = {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": rec["output"]}]}
        if rec.get("system"):
            _check_str(rec, "system", where)
            inst["system"] = rec["system"]
        return "conversation", inst
    if "input" in rec or "output" in rec:
        return "text2text", _normalize_instance("text2text", rec, where)
    if "text" in rec:
        return "text_only", _normalize_instance("text_only", rec, where)
    raise UserError(f"{where}: unrecognized record with keys {sorted(rec)[:6]}; expected Alpaca "
                    "(instruction/output), ShareGPT (conversations), OpenAI (messages), {text} or {input, output}")


def _records(records: list, path: str, label: str) -> tuple[str, list[dict]]:
    typ, out = None, []
    for i, rec in enumerate(records):
        where = f"{path}: {label} {i}"
        t, inst = _record_to_instance(rec, where)
        if typ is None:
            typ = t
        elif t != typ:
            raise UserError(f"{where}: record is {t} but earlier records are {typ}; use one format per file")
        out.append(inst)
    return typ, out


def _read_lmflow(data: dict, path: str) -> tuple[str, list[dict]]:
    if "type" not in data:
        raise UserError(f"{path}: missing \"type\" (one of {', '.join(TYPES)})")
    typ = data["type"]
    if typ not in TYPES:
        raise UserError(f"{path}: unknown type {typ!r} (expected one of {', '.join(TYPES)})")
    if "instances" not in data:
        raise UserError(f"{path}: missing \"instances\"")
    if not isinstance(data["instances"], list):
        raise UserError(f"{path}: \"instances\" must be a list")
    return typ, [_normalize_instance(typ, inst, f"{path}: instance {i}") for i, inst in enumerate(data["instances"])]


def _read_file(path: str) -> tuple[str, list[dict]]:
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    ext = os.path.splitext(path)[1].lower()
    if ext == ".txt":
        blocks = [b.strip("\n") for b in text.replace("\r\n", "\n").split("\n\n")]
        return "text_only", [{"text": b} for b in blocks if b.strip()]
    if ext == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((n, json.loads(line)))
            except json.JSONDecodeError as e:
                raise UserError(f"{path}: line {n}: malformed JSON ({e.msg} at column {e.colno})") from None
        typ, out = None, []
        for n, rec in records:
            t, inst = _record_to_instance(rec, f"{path}: line {n}")
            if typ is not None and t != typ:
                raise UserError(f"{path}: line {n}: record is {t} but earlier records are {typ}")
            typ = t
            out.append(inst)
        return typ or "text_only", out
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if isinstance(data, dict):
        if "type" in data or "instances" in data:
            return _read_lmflow(data, path)
        t, inst = _record_to_instance(data, f"{path}: record 0")
        return t, [inst]
    if isinstance(data, list):
        typ, out = _records(data, path, "record")
        return typ or "text_only", out
    raise UserError(f"{path}: expected a JSON object with \"type\" and \"instances\", or a list of records")


def _hash_files(paths: list[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(os.path.basename(p).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()[:20]


def read_dataset(path: str) -> Dataset:
    """Read and validate a dataset (file, directory of LMFlow *.json, "demo", "demo:test" (text2text), or
    "demo:conversation[:test]"). Raises UserError naming the file and instance on bad input."""
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
        files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".json"))
        if not files:
            raise UserError(f"{path}: directory has no *.json files")
        typ, instances = None, []
        for f in files:
            with open(f, encoding="utf-8") as fh:
                try:
                    data = json.load(fh)
                except json.JSONDecodeError as e:
                    raise UserError(f"{f}: malformed JSON ({e.msg} at line {e.lineno}, column {e.colno})") from None
            if not isinstance(data, dict):
                raise UserError(f"{f}: expected an LMFlow JSON object with \"type\" and \"instances\"")
            t, inst = _read_lmflow(data, f)
            if typ is not None and t != typ:
                raise UserError(f"{f}: type {t!r} differs from {typ!r} of the other files in {path}; "
                                "a directory must hold one type")
            typ = t
            instances += inst
        fingerprint = _hash_files(files)
    else:
        typ, instances = _read_file(path)
        fingerprint = _hash_files([path])
    if not instances:
        raise UserError(f"{path}: dataset is empty (no instances)")
    return Dataset(typ, instances, path, fingerprint)


# ---- tokenization ----------------------------------------------------------------------------------------
@dataclass
class TokenizedData:
    examples: list[tuple[list[int], list[int]]]  # (input_ids, labels), labels IGNORE_INDEX where no loss
    seq_len: int
    num_truncated: int = 0         # examples cut to seq_len
    num_dropped: int = 0           # examples left with no loss-bearing token (e.g. prompt alone > seq_len)
    num_tokens_with_loss: int = 0  # label tokens the loss sees (labels[1:] != IGNORE_INDEX, as the shifted loss)
    source: str = ""

    def __len__(self) -> int:
        return len(self.examples)


def _tokenize(ds: Dataset, tokenizer, template, train_on_prompt: bool) -> list[tuple[list[int], list[int]]]:
    if ds.type == "text_only":
        ids = tokenizer.encode_batch([x["text"] for x in ds.instances], add_special_tokens=True)
        return [(i, list(i)) for i in ids]
    if ds.type == "text2text":
        eos = tokenizer.eos_token_id
        ins = tokenizer.encode_batch([x["input"] for x in ds.instances], add_special_tokens=True)
        outs = tokenizer.encode_batch([x["output"] for x in ds.instances], add_special_tokens=False)
        drop_eos = tokenizer.adds_eos  # an input must not end in EOS: the output follows it
        res = []
        for a, b in zip(ins, outs):
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
    for (ids, offsets), s in zip(tokenizer.encode_batch_with_offsets(texts, add_special_tokens=False), spans):
        res.append((ids, list(ids) if train_on_prompt else labels_from_spans(ids, offsets, s)))
    return res


def default_cache_dir() -> str:
    return os.environ.get("NANOLISA_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "nanolisa")


def tokenize_dataset(ds: Dataset, tokenizer, seq_len: int, template: str | None = None,
                     train_on_prompt: bool = False, cache_dir: str | None | bool = None) -> TokenizedData:
    """Tokenize every instance to (input_ids, labels), truncated to seq_len. Results are cached on disk
    (cache_dir, default ~/.cache/nanolisa/tokenized; False disables) keyed by the data's content hash, the
    tokenizer, the template and the settings, so a second run on the same file starts at once."""
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
            except (OSError, ValueError, KeyError):
                pass  # a damaged cache file is simply rebuilt
    raw = _tokenize(ds, tokenizer, template, train_on_prompt)
    examples, truncated, dropped, num_loss = [], 0, 0, 0
    for ids, labels in raw:
        if len(ids) > seq_len:
            ids, labels = ids[:seq_len], labels[:seq_len]
            truncated += 1
        n_loss = len(labels) - 1 - labels[1:].count(IGNORE_INDEX)  # targets the shifted loss will see
        if n_loss == 0:
            dropped += 1
            continue
        examples.append((ids, labels))
        num_loss += n_loss
    if not examples:
        raise UserError(f"{ds.source}: no example has a token to train on after truncation to --seq-len {seq_len}")
    data = TokenizedData(examples, seq_len, truncated, dropped, num_loss, ds.source)
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
    meta = np.array([data.num_truncated, data.num_dropped, data.num_tokens_with_loss], dtype=np.int64)
    with atomic_file(path, "wb") as f:
        np.savez(f, lengths=lengths, ids=ids, labels=labels, meta=meta)


def _load_cache(path: str, seq_len: int, source: str) -> TokenizedData:
    with np.load(path, allow_pickle=False) as z:
        lengths, ids, labels, meta = z["lengths"], z["ids"].tolist(), z["labels"].tolist(), z["meta"].tolist()
    bounds = np.concatenate([[0], np.cumsum(lengths)]).tolist()
    examples = [(ids[a:b], labels[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
    return TokenizedData(examples, seq_len, meta[0], meta[1], meta[2], source)


# ---- batching ------------------------------------------------------------------------------------------
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
      straddles two rows); position_ids restart at 0 at each example so the model keeps documents apart.
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
                    labels[r, t:t + len(a)] = torch.tensor(b)
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
