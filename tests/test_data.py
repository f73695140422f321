"""Data pipeline: formats, validation errors, loss masks token by token, cache, batching, sharding, resume."""
import json
import os
from collections import Counter

import pytest
import torch

from nanolisa import demo_data
from nanolisa.data import Batches, read_dataset, tokenize_dataset
from nanolisa.errors import UserError
from nanolisa.tokenizer import load_tokenizer
from tests.helpers import labelled_runs

CONV = {"system": "Be brief.", "messages": [
    {"role": "user", "content": "2+2="}, {"role": "assistant", "content": "4"},
    {"role": "user", "content": "reverse(ab)="}, {"role": "assistant", "content": "ba"}]}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tiny")


def write(tmp_path, name, obj):
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj), encoding="utf-8")
    return str(p)


def targets(tok, ids, labels):
    """Decoded runs of labelled tokens (checks each label equals its input id)."""
    return [tok.decode(run) for run in labelled_runs(ids, labels)]


# ---- formats ---------------------------------------------------------------------------------------------
def test_lmflow_text_only(tmp_path, tok):
    ds = read_dataset(write(tmp_path, "a.json", {"type": "text_only", "instances": [{"text": "hello"}]}))
    assert ds.type == "text_only" and ds.instances == [{"text": "hello"}]
    td = tokenize_dataset(ds, tok, 64, cache_dir=False)
    ids, labels = td.examples[0]
    assert ids == tok.encode("hello") and labels == ids  # tokenizer's own BOS, loss on every token
    assert td.num_tokens_with_loss == len(ids) - 1


def test_lmflow_text2text_loss_on_output_and_eos(tmp_path, tok):
    ds = read_dataset(write(tmp_path, "a.json", {"type": "text2text",
                                                 "instances": [{"input": "12+7=", "output": "19"}]}))
    ids, labels = tokenize_dataset(ds, tok, 64, cache_dir=False).examples[0]
    assert ids == tok.encode("12+7=") + tok.encode("19", add_special_tokens=False) + [tok.eos_token_id]
    assert targets(tok, ids, labels) == ["19</s>"]
    ids2, labels2 = tokenize_dataset(ds, tok, 64, train_on_prompt=True, cache_dir=False).examples[0]
    assert ids2 == ids and labels2 == ids


def test_lmflow_conversation_masks(tmp_path, tok):
    ds = read_dataset(write(tmp_path, "a.json", {"type": "conversation", "instances": [CONV]}))
    assert ds.type == "conversation" and ds.instances[0]["system"] == "Be brief."
    ids, labels = tokenize_dataset(ds, tok, 256, cache_dir=False).examples[0]
    assert targets(tok, ids, labels) == ["4<|im_end|>", "ba<|im_end|>"]
    assert tok.decode(ids).startswith("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n2+2=")
    for name in ("llama3", "mistral"):
        ids, labels = tokenize_dataset(ds, tok, 512, template=name, cache_dir=False).examples[0]
        eot = {"llama3": "<|eot_id|>", "mistral": "</s>"}[name]
        assert targets(tok, ids, labels) == ["4" + eot, "ba" + eot]
    ids, labels = tokenize_dataset(ds, tok, 256, train_on_prompt=True, cache_dir=False).examples[0]
    assert labels == ids


def test_directory_of_lmflow_files(tmp_path, tok):
    d = tmp_path / "d"
    d.mkdir()
    write(d, "1.json", {"type": "text2text", "instances": [{"input": "a", "output": "b"}]})
    write(d, "2.json", {"type": "text2text", "instances": [{"input": "c", "output": "d"}] * 2})
    write(d, "notes.md", "ignored")
    ds = read_dataset(str(d))
    assert ds.type == "text2text" and len(ds) == 3


def test_alpaca_sharegpt_openai_txt(tmp_path, tok):
    alpaca = [{"instruction": "Add", "input": "2 and 2", "output": "4"}, {"instruction": "Hi", "input": "", "output": "Hey"}]
    for name, text in (("al.json", json.dumps(alpaca)), ("al.jsonl", "\n".join(map(json.dumps, alpaca)))):
        ds = read_dataset(write(tmp_path, name, text))
        assert ds.type == "conversation"
        assert ds.instances[0]["messages"] == [{"role": "user", "content": "Add\n2 and 2"},  # LLaMA-Factory's join
                                               {"role": "assistant", "content": "4"}]
        assert ds.instances[1]["messages"][0]["content"] == "Hi"
        ids, labels = tokenize_dataset(ds, tok, 128, cache_dir=False).examples[0]
        assert targets(tok, ids, labels) == ["4<|im_end|>"]
    share = [{"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "q"},
                                {"from": "gpt", "value": "a"}]}]
    ds = read_dataset(write(tmp_path, "sg.json", share))
    assert ds.instances == [{"system": "S", "messages": [{"role": "user", "content": "q"},
                                                         {"role": "assistant", "content": "a"}]}]
    openai = [{"messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "q"},
                            {"role": "assistant", "content": "a"}]}]
    ds2 = read_dataset(write(tmp_path, "oa.jsonl", "\n".join(map(json.dumps, openai)) + "\n\n"))
    assert ds2.instances == ds.instances
    ds3 = read_dataset(write(tmp_path, "t.txt", "first doc\nline two\n\n\nsecond doc\n"))
    assert ds3.type == "text_only" and ds3.instances == [{"text": "first doc\nline two"}, {"text": "second doc"}]


def test_truncation_is_counted_not_fatal(tmp_path, tok):
    inst = [{"input": "x" * 50, "output": "y" * 50}, {"input": "a", "output": "b"}, {"input": "z" * 80, "output": "w"}]
    ds = read_dataset(write(tmp_path, "a.json", {"type": "text2text", "instances": inst}))
    td = tokenize_dataset(ds, tok, 60, cache_dir=False)
    assert td.num_truncated == 1 and td.num_dropped == 1  # the third has no output left after truncation
    assert all(len(i) <= 60 for i, _ in td.examples) and len(td.examples) == 2
    assert td.summary() == (f"{ds.source}: 3 records read, 2 kept (1 truncated to --seq-len 60), 1 dropped "
                            "(1 with no loss-bearing token within --seq-len 60)")


# ---- bad input -------------------------------------------------------------------------------------------
BAD = [
    ("bad.json", "{not json", r"bad\.json: malformed JSON"),
    ("t.json", {"instances": []}, r"t\.json: missing \"type\""),
    ("t.json", {"type": "chat", "instances": []}, "unknown type 'chat'"),
    ("t.json", {"type": "text_only"}, "missing \"instances\""),
    ("t.json", {"type": "text_only", "instances": []}, "dataset is empty"),
    ("t.json", {"type": "text_only", "instances": [{"text": "a"}, {"txt": "b"}]}, r"instance 1: missing field 'text'"),
    ("t.json", {"type": "text2text", "instances": [{"input": "a", "output": 3}]}, "instance 0: field 'output' must be a string"),
    ("t.json", {"type": "conversation", "instances": [{"messages": [{"role": "bot", "content": "x"}]}]},
     r"instance 0: messages\[0\]: unknown role 'bot'"),
    ("t.json", {"type": "conversation", "instances": [CONV, {"messages": [
        {"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}]},
     r"instance 1: messages\[1\]: role 'user' \(user\) where 'assistant' was expected"),
    ("t.json", {"type": "conversation", "instances": [{"messages": [{"role": "user", "content": "a"}]}]},
     "ends with role 'user'"),
    ("t.jsonl", '{"messages": []}\n{oops\n', r"t\.jsonl: line 2: malformed JSON"),
    ("s.json", [{"conversations": [{"from": "robot", "value": "x"}]}], "unknown role 'robot'"),
    ("t.txt", "\n\n  \n", "dataset is empty"),
]


@pytest.mark.parametrize("name,content,msg", BAD)
def test_bad_input_is_one_line_user_error(tmp_path, name, content, msg):
    path = write(tmp_path, name, content)
    with pytest.raises(UserError, match=msg) as e:
        read_dataset(path)
    assert "\n" not in str(e.value) and name in str(e.value)


def test_bad_paths_and_mixed_directory(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        read_dataset(str(tmp_path / "missing.json"))
    d = tmp_path / "mixed"
    d.mkdir()
    write(d, "a.json", {"type": "text_only", "instances": [{"text": "a"}]})
    write(d, "b.json", {"type": "text2text", "instances": [{"input": "a", "output": "b"}]})
    with pytest.raises(UserError, match="a directory must hold one type"):
        read_dataset(str(d))


# ---- cache -----------------------------------------------------------------------------------------------
def test_tokenization_cache_hit_and_invalidation(tmp_path, tok, monkeypatch):
    path = write(tmp_path, "a.json", {"type": "conversation", "instances": [CONV] * 3})
    cache = str(tmp_path / "cache")
    first = tokenize_dataset(read_dataset(path), tok, 128, cache_dir=cache)
    assert len(os.listdir(cache)) == 1
    import nanolisa.data as data_mod
    monkeypatch.setattr(data_mod, "_tokenize", lambda *a, **k: pytest.fail("cache was not used"))
    second = tokenize_dataset(read_dataset(path), tok, 128, cache_dir=cache)
    assert second.examples == first.examples and second.num_tokens_with_loss == first.num_tokens_with_loss
    monkeypatch.undo()
    tokenize_dataset(read_dataset(path), tok, 64, cache_dir=cache)  # other settings -> other entry
    write(tmp_path, "a.json", {"type": "conversation", "instances": [CONV] * 4})  # other contents -> other entry
    assert len(tokenize_dataset(read_dataset(path), tok, 128, cache_dir=cache).examples) == 4
    assert len([f for f in os.listdir(cache) if f.endswith(".npz")]) == 3


# ---- batching --------------------------------------------------------------------------------------------
def make_data(tok, n=23):
    inst = [{"input": f"{i}+{i}=", "output": str(2 * i) * (1 + i % 3)} for i in range(n)]
    ds = read_dataset("demo")
    ds.instances, ds.fingerprint = inst, ""
    return tokenize_dataset(ds, tok, 32, cache_dir=False)


def test_padding_is_ignored_and_batch_is_longest(tok):
    data = make_data(tok)
    b = Batches(data, 4, shuffle=False, pad_id=tok.pad_token_id)
    batch = next(b.epoch(0))
    lens = [len(data.examples[i][0]) for i in range(4)]
    assert batch["input_ids"].shape == (4, max(lens)) and batch["position_ids"] is None
    for r, n in enumerate(lens):
        assert batch["input_ids"][r, :n].tolist() == data.examples[r][0]
        assert (batch["input_ids"][r, n:] == tok.pad_token_id).all() and (batch["labels"][r, n:] == -100).all()
    assert len(b) == 6 and sum(1 for _ in b.epoch(0)) == 6


def test_packing_rows_and_position_ids(tok):
    data = make_data(tok)
    b = Batches(data, 2, pack=True, seed=3)
    seen = []
    for batch in b.epoch(0):
        assert batch["input_ids"].shape[1] == data.seq_len
        for r in range(batch["input_ids"].shape[0]):
            ids, labels, pos = (batch[k][r].tolist() for k in ("input_ids", "labels", "position_ids"))
            starts = [t for t, p in enumerate(pos) if p == 0] + [len(pos)]
            for a, z in zip(starts[:-1], starts[1:]):  # every document is one whole example, positions 0..n-1
                assert pos[a:z] == list(range(z - a))
                doc = (ids[a:z], labels[a:z])
                assert doc[1][0] == -100  # a document's first token is never a target when packed
                if any(l != -100 for l in doc[1]):
                    seen.append([e[0] for e in data.examples].index(doc[0]))
                    assert doc[1][1:] == data.examples[seen[-1]][1][1:]
    assert sorted(seen) == list(range(len(data.examples)))  # one epoch = every example exactly once


def test_packed_rows_train_exactly_the_targets_of_unpacked_rows(tok):
    """The same documents, packed into rows or one per row: the same loss-bearing targets, and (the model
    keeping documents apart) the same summed NLL. Before the fix, each packed document's last token was
    also trained to predict the next document's first token, which it cannot see."""
    import nanolisa
    from nanolisa.loss import count_loss_tokens, next_token_nll
    ds = read_dataset("demo")  # text_only: every token takes a loss, the first of each document included
    ds.type, ds.fingerprint = "text_only", ""
    ds.instances = [{"text": f"{i} plus {i} is {2 * i}" + "!" * (i % 4)} for i in range(12)]
    data = tokenize_dataset(ds, tok, 48, cache_dir=False)
    model, _ = nanolisa.load_pretrained("tiny")
    packed = list(Batches(data, 3, pack=True, shuffle=False, pad_id=tok.pad_token_id).epoch(0))
    plain = list(Batches(data, 3, pack=False, shuffle=False, pad_id=tok.pad_token_id).epoch(0))
    count = lambda bs: sum(count_loss_tokens(b["labels"]) for b in bs)  # noqa: E731
    assert count(packed) == count(plain) > 0
    with torch.no_grad():
        nll = lambda bs: sum(float(next_token_nll(model, b["input_ids"], b["labels"],  # noqa: E731
                                                  b["position_ids"]).sum()) for b in bs)
        assert abs(nll(packed) - nll(plain)) <= 1e-4 * nll(plain)


def test_seeded_shuffle_differs_per_epoch_and_not_global_rng(tok):
    data = make_data(tok)
    first = lambda b, e: [x["input_ids"][:, 1:4].tolist() for x in b.epoch(e)]  # noqa: E731
    torch.manual_seed(0)
    a = first(Batches(data, 4, seed=7), 0)
    torch.manual_seed(99)
    assert first(Batches(data, 4, seed=7), 0) == a
    assert first(Batches(data, 4, seed=7), 1) != a and first(Batches(data, 4, seed=8), 0) != a


@pytest.mark.parametrize("pack", [False, True])
def test_sharding_disjoint_and_equal(tok, pack):
    data = make_data(tok)
    per_rank = []
    for rank in range(3):
        b = Batches(data, 2, seed=1, rank=rank, world_size=3, pack=pack)
        rows = [r for batch in b.epoch(0) for r in batch["input_ids"].tolist()]
        per_rank.append((len(b), sum(1 for _ in b.epoch(0)), rows))
    assert len({(n, m) for n, m, _ in per_rank}) == 1 and per_rank[0][0] == per_rank[0][1]
    sets = [{tuple(r) for r in rows} for _, _, rows in per_rank]
    assert not (sets[0] & sets[1]) and not (sets[1] & sets[2]) and not (sets[0] & sets[2])


@pytest.mark.parametrize("pack", [False, True])
def test_ranks_together_see_the_global_batches_of_one_rank(tok, pack):
    """Batch k of 3 ranks with batch size 2 holds the rows of batch k of 1 rank with batch size 6; the
    examples that do not divide by 3 are kept, the ranks evened out with loss-free padding rows."""
    data = make_data(tok, n=23)

    def real_rows(batch):  # (tokens, labels) of the rows that hold an example, without the padding tail
        rows = []
        for ids, labels in zip(batch["input_ids"].tolist(), batch["labels"].tolist()):
            while ids and ids[-1] == tok.pad_token_id and labels[-1] == -100:
                ids, labels = ids[:-1], labels[:-1]
            if any(x != -100 for x in labels):
                rows.append((tuple(ids), tuple(labels)))
        return sorted(rows)

    pad = tok.pad_token_id
    one = [real_rows(b) for b in Batches(data, 6, seed=1, pack=pack, pad_id=pad).epoch(0)]
    ranks = [list(Batches(data, 2, seed=1, rank=r, world_size=3, pack=pack, pad_id=pad).epoch(0)) for r in range(3)]
    assert len({len(r) for r in ranks}) == 1 and len(ranks[0]) == len(one)
    for k in range(len(one)):
        assert sorted(sum((real_rows(r[k]) for r in ranks), [])) == one[k]
    if not pack:
        assert sum(len(b) for b in one) == 23  # every example, none dropped


def test_resume_continues_exact_order(tok):
    data = make_data(tok)
    ref = Batches(data, 4, seed=5)
    it = iter(ref)
    full = [next(it)["input_ids"].tolist() for _ in range(15)]  # crosses two epoch boundaries
    a = Batches(data, 4, seed=5)
    it = iter(a)
    for _ in range(8):
        next(it)
    state = json.loads(json.dumps(a.state_dict()))  # must survive JSON (checkpoints are JSON)
    b = Batches(data, 4, seed=5)
    b.load_state_dict(state)
    it = iter(b)
    assert [next(it)["input_ids"].tolist() for _ in range(7)] == full[8:]
    with pytest.raises(UserError, match="cannot resume"):
        Batches(data, 4, seed=6).load_state_dict(state)


# ---- demo data -------------------------------------------------------------------------------------------
def test_demo_splits_are_deterministic_disjoint_and_determined(tmp_path, tok):
    train, test = demo_data.demo_pairs("train"), demo_data.demo_pairs("test")
    assert len(train) == demo_data.NUM_TRAIN == 20000 and len(test) == demo_data.NUM_TEST == 200
    assert not ({p for p, _ in train} & {p for p, _ in test})
    kinds = Counter(p.split("(")[0] if "(" in p else "add" for p, _ in train)
    assert set(kinds) == set(demo_data.TASKS) and min(kinds.values()) > 0.2 * len(train)  # each about 1/4
    assert demo_data.demo_pairs("test") == test
    for p, a in train[:300]:  # the answer follows from the prompt
        op, arg = p[:-1].split("(")[0], p[p.find("(") + 1:-2] if "(" in p else None
        expect = {"reverse": lambda s: s[::-1], "upper": str.upper, "first": lambda s: s[0],
                  "last": lambda s: s[-1]}
        assert a == (expect[op](arg) if arg is not None else str(eval(p[:-1])))
    assert read_dataset("demo:test").type == "text2text"
    ds = read_dataset("demo:conversation:test")
    assert ds.type == "conversation" and len(ds) == 200
    ids, labels = tokenize_dataset(ds, tok, 64, cache_dir=False).examples[0]
    assert targets(tok, ids, labels) == [test[0][1] + "<|im_end|>"]
    paths = demo_data.write_demo(str(tmp_path / "demo"))
    assert len(paths) == 4
    for p in paths:
        d = read_dataset(p)
        assert len(d) in (20000, 200) and d.type in ("conversation", "text2text")
    with pytest.raises(UserError, match="unknown demo option"):
        read_dataset("demo:valid")
