"""chat.py and eval.py end to end: one-shot replies, --json output, and one-line errors for bad input."""
import json
import math
import os

import pytest
import torch

import nanolisa
from nanolisa.cli import chat
from nanolisa.cli import eval as evalcli
from nanolisa.generate import Sampling, generate
from nanolisa.templates import render_chat
from tests.helpers import run_script as _run


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A small saved Llama with the tiny tokenizer, with weights varied enough to say different things."""
    _, tok = nanolisa.load_pretrained("tiny")
    cfg = nanolisa.ModelConfig.from_hf(dict(
        model_type="llama", vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    torch.manual_seed(0)
    model = nanolisa.build_model(cfg)
    model.init_weights(std=0.3)
    d = str(tmp_path_factory.mktemp("m") / "model")
    nanolisa.save_pretrained(model, tok, d)
    return d


def test_one_shot_prints_only_the_reply(model_dir, capsys):
    model, tok = nanolisa.load_pretrained(model_dir)
    msgs = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    ids = tok.encode(render_chat(msgs, tok, add_generation_prompt=True), add_special_tokens=False)
    expected = tok.decode(generate(model, ids, 30, stop_ids=tok.stop_token_ids), skip_special_tokens=True)
    chat.main(["--model", model_dir, "--system", "be brief", "--prompt", "2+2?", "--max-new-tokens", "30",
               "--device", "cpu"])
    out, err = capsys.readouterr()
    assert out == expected + "\n"
    assert "tok/s" in err


def test_raw_mode_and_seeded_sampling(model_dir, capsys):
    model, tok = nanolisa.load_pretrained(model_dir)
    s = Sampling(temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.1)
    expected = tok.decode(generate(model, tok.encode("Once"), 20, s, stop_ids=[], seed=5), skip_special_tokens=True)
    argv = ["--model", model_dir, "--raw", "--prompt", "Once", "--max-new-tokens", "20", "--temperature", "1",
            "--top-k", "50", "--top-p", "0.95", "--repetition-penalty", "1.1", "--seed", "5", "--ignore-eos"]
    chat.main(argv)
    first = capsys.readouterr().out
    chat.main(argv)
    assert capsys.readouterr().out == first == expected + "\n"


def test_interactive_reset_and_exit(model_dir, monkeypatch, capsys):
    lines = iter(["hi", "/reset", "hi", "/exit", "never read"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    chat.main(["--model", model_dir, "--max-new-tokens", "6", "--ignore-eos"])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 2 and out[0] == out[1]  # after /reset the same greedy reply to the same message


def test_interactive_second_turn_sees_the_first(model_dir, monkeypatch, capsys):
    """The second reply is the greedy continuation of the whole conversation (through the reused cache)."""
    model, tok = nanolisa.load_pretrained(model_dir)
    lines = iter(["hi", "and then?"])

    def fake_input(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError
    monkeypatch.setattr("builtins.input", fake_input)
    chat.main(["--model", model_dir, "--max-new-tokens", "8"])
    r1, r2 = capsys.readouterr().out.strip("\n").split("\n")
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": r1},
            {"role": "user", "content": "and then?"}]
    ids = tok.encode(render_chat(msgs, tok, add_generation_prompt=True), add_special_tokens=False)
    assert r2 == tok.decode(generate(model, ids, 8, stop_ids=tok.stop_token_ids), skip_special_tokens=True)


def test_choice_metric_json(model_dir, tmp_path, capsys):
    p = tmp_path / "mc.jsonl"
    p.write_text('{"question": "1+1", "choices": ["2", "3"], "answer": 0}\n'
                 '{"question": "sky", "choices": ["blue", "red", "green"], "answer": "A"}\n')
    evalcli.main(["--model", model_dir, "--metric", "choice", "--data", str(p), "--json"])
    r = json.loads(capsys.readouterr().out)
    assert r["metric"] == "choice" and r["examples"] == 2 and 0 <= r["accuracy"] <= 1


# ---- bad input: one line on stderr, exit 2, no traceback -------------------------------------------------

@pytest.mark.parametrize("script,args", [
    ("chat.py", ["--model", "/no/such/dir", "--prompt", "hi"]),
    ("chat.py", ["--prompt", "hi", "--top-p", "1.5"]),
    ("chat.py", ["--no-such-flag"]),
    ("chat.py", ["--prompt", b"caf\xe9".decode("utf-8", "surrogateescape")]),  # latin-1 bytes in argv
    ("chat.py", ["--system", b"\xff".decode("utf-8", "surrogateescape")]),
    ("eval.py", ["--model", "/no/such/dir"]),
    ("eval.py", ["--metric", "choice", "--data", "/no/such/file.jsonl"]),
    ("eval.py", ["--metric", "bogus"]),
    ("eval.py", ["--batch-size", "0"]),
])
def test_bad_input_is_one_line(script, args):
    r = _run(script, *args)
    assert r.returncode == 2, r.stderr
    assert r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and r.stderr.startswith("error: ")
    assert "Traceback" not in r.stderr


@pytest.fixture(scope="module")
def plain_model_dir(model_dir, tmp_path_factory):
    """model_dir without a chat template (a base model, or the demo model trained on text2text)."""
    import shutil
    from nanolisa.tokenizer import write_chat_template
    d = tmp_path_factory.mktemp("plain") / "model"
    shutil.copytree(model_dir, d)
    write_chat_template(str(d), None)
    return str(d)


def test_template_less_model_chats_in_completion_mode_through_a_pipe(plain_model_dir):
    """Each line is continued as plain text, on its own (nothing of earlier lines is kept, no /reset needed),
    one reply per line on stdout (no prompts), and the session says so once."""
    model, tok = nanolisa.load_pretrained(plain_model_dir)
    assert tok.chat_template is None
    lines = ["upper(cat)=", "abc", "upper(cat)=", "/reset", "upper(cat)="]
    r = _run("chat.py", "--model", plain_model_dir, "--max-new-tokens", "6", "--device", "cpu",
             input="".join(line + "\n" for line in lines))
    assert r.returncode == 0, r.stderr
    expected = [tok.decode(generate(model, tok.encode(x), 6, stop_ids=tok.stop_token_ids), skip_special_tokens=True)
                for x in ("upper(cat)=", "abc", "upper(cat)=", "upper(cat)=")]
    assert r.stdout == "".join(e + "\n" for e in expected)
    assert r.stderr.count("completion mode") == 1 and "Traceback" not in r.stderr
    note = next(x for x in r.stderr.splitlines() if "completion mode" in x)
    assert "on its own, with nothing of earlier lines kept" in note


def test_raw_works_interactively_and_ignores_the_template(model_dir, monkeypatch, capsys):
    model, tok = nanolisa.load_pretrained(model_dir)
    lines = iter(["Once", "/exit"])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    chat.main(["--model", model_dir, "--raw", "--max-new-tokens", "7"])
    out, err = capsys.readouterr()
    assert out == tok.decode(generate(model, tok.encode("Once"), 7, stop_ids=tok.stop_token_ids),
                             skip_special_tokens=True) + "\n"
    assert "completion mode" not in err  # asked for: nothing to explain


def test_a_one_token_reply_reports_no_nan_speed(model_dir, capsys):
    chat.main(["--model", model_dir, "--raw", "--prompt", "x", "--max-new-tokens", "1", "--ignore-eos"])
    err = capsys.readouterr().err
    assert "[1 token;" in err and "nan" not in err


def test_non_utf8_stdin_is_an_error_line_and_the_session_goes_on(plain_model_dir):
    import subprocess
    import sys
    from tests.helpers import ROOT
    r = subprocess.run([sys.executable, os.path.join(ROOT, "chat.py"), "--model", plain_model_dir,
                        "--max-new-tokens", "3", "--ignore-eos"], input=b"caf\xe9\nabc\n", capture_output=True,
                       timeout=300, cwd=ROOT)
    err = r.stderr.decode()
    assert r.returncode == 0 and "Traceback" not in err, err
    assert "error: the message is not valid UTF-8 text (byte 0xe9 at position 3)" in err
    assert len(r.stdout.decode().splitlines()) == 1  # the second line was answered


def test_subprocess_one_shot_stdout_is_only_the_reply(model_dir):
    r = _run("chat.py", "--model", model_dir, "--prompt", "hello", "--max-new-tokens", "5", "--ignore-eos",
             "--device", "cpu")
    assert r.returncode == 0, r.stderr
    model, tok = nanolisa.load_pretrained(model_dir)
    ids = tok.encode(render_chat([{"role": "user", "content": "hello"}], tok, add_generation_prompt=True),
                     add_special_tokens=False)
    assert r.stdout == tok.decode(generate(model, ids, 5), skip_special_tokens=True) + "\n"
    assert "tok/s" in r.stderr


def test_lora_adapter_flag_and_bare_adapter_dir(model_dir, tmp_path, capsys):
    from nanolisa.lora import apply_lora, lora_modules, save_adapter
    model, tok = nanolisa.load_pretrained(model_dir)
    base_ids = generate(model, tok.encode("abc"), 12)
    apply_lora(model, r=4, alpha=8)
    torch.manual_seed(1)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.5)  # B starts at zero: make the adapter do something
    adapter = str(tmp_path / "adapter")
    save_adapter(model, adapter, base_model_name_or_path=model_dir)
    expected = generate(model, tok.encode("abc"), 12)
    assert expected != base_ids  # the adapter changes what the model says
    for argv in (["--model", model_dir, "--lora", adapter], ["--model", adapter]):
        chat.main(argv + ["--raw", "--prompt", "abc", "--max-new-tokens", "12", "--ignore-eos"])
        assert capsys.readouterr().out == tok.decode(expected, skip_special_tokens=True) + "\n"


# ---- eval.py on data files -------------------------------------------------------------------------------

def _write(path, obj):
    path.write_text(json.dumps(obj))
    return str(path)


@pytest.mark.parametrize("kind", ["text_only", "text2text", "conversation"])
def test_eval_nll_json_equals_library_nll(model_dir, tmp_path, capsys, kind):
    from nanolisa.data import read_dataset, tokenize_dataset
    from nanolisa.evaluate import nll
    inst = {"text_only": [{"text": "the cat sat"}, {"text": "on the mat, twice over"}],
            "text2text": [{"input": "1+1=", "output": "2"}, {"input": "upper(ab)=", "output": "AB"}],
            "conversation": [{"system": "s", "messages": [{"role": "user", "content": "hi"},
                                                           {"role": "assistant", "content": "hello!"}]}]}[kind]
    path = _write(tmp_path / "d.json", {"type": kind, "instances": inst})
    evalcli.main(["--model", model_dir, "--data", path, "--json", "--batch-size", "2"])
    r = json.loads(capsys.readouterr().out)
    model, tok = nanolisa.load_pretrained(model_dir)
    examples = tokenize_dataset(read_dataset(path), tok, seq_len=256).examples
    total, n = nll(model, examples, batch_size=1)
    if kind == "text_only":  # every token after the first of each example
        assert n == sum(len(tok.encode(x["text"])) - 1 for x in inst)
    assert r["tokens"] == n and r["nll"] == pytest.approx(total / n, rel=1e-6)
    assert r["ppl"] == pytest.approx(math.exp(total / n), rel=1e-6)
    assert r["records"] == {"read": len(inst), "kept": len(inst), "truncated": 0, "dropped": {}}  # as train.py counts


def test_eval_accuracy_counts_exact_matches(model_dir, tmp_path, capsys):
    """Targets built from the model's own greedy replies: known correct ones, known wrong ones."""
    model, tok = nanolisa.load_pretrained(model_dir)
    inputs = ["ab=", "cd=", "xyz=", "q="]
    replies = [tok.decode(generate(model, tok.encode(x), 8, stop_ids=tok.stop_token_ids), skip_special_tokens=True)
               for x in inputs]
    outputs = [" " + replies[0] + " ", replies[1], replies[2] + "!", "?" + replies[3]]  # 2 right, 2 wrong
    path = _write(tmp_path / "t2t.json", {"type": "text2text", "instances": [
        {"input": i, "output": o} for i, o in zip(inputs, outputs)]})
    evalcli.main(["--model", model_dir, "--data", path, "--metric", "accuracy", "--max-new-tokens", "8", "--json"])
    r = json.loads(capsys.readouterr().out)
    assert (r["correct"], r["examples"], r["accuracy"]) == (2, 4, 0.5)


def test_accuracy_prompts_are_the_training_prefix(tiny):
    """The prompt eval.py generates from is exactly the loss-free prefix training conditions the answer on."""
    from nanolisa.data import read_dataset, tokenize_dataset
    _, tok = tiny
    for data in ("demo:test", "demo:text2text:test"):
        ds = read_dataset(data)
        ds.instances = ds.instances[:20]
        prompts, targets = evalcli.accuracy_pairs(ds, tok, None)
        examples = tokenize_dataset(ds, tok, seq_len=4096, cache_dir=False).examples
        for p, t, (ids, labels) in zip(prompts, targets, examples):
            first = next(i for i, y in enumerate(labels) if y != -100)
            assert list(ids[:first]) == p
            answer = [i for i, y in zip(ids[first:], labels[first:]) if y != -100]  # the reply and its end token
            assert tok.decode(answer, skip_special_tokens=True) == t


@pytest.mark.parametrize("case", ["malformed", "missing", "accuracy_on_text_only"])
def test_eval_bad_data_is_one_line(model_dir, tmp_path, case):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    args = {"malformed": ["--data", str(bad)], "missing": ["--data", str(tmp_path / "missing.json")],
            "accuracy_on_text_only": ["--metric", "accuracy", "--data", _write(
                tmp_path / "t.json", {"type": "text_only", "instances": [{"text": "abc"}]})]}[case]
    r = _run("eval.py", "--model", model_dir, *args)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr


def test_eval_refuses_a_seq_len_past_the_context(model_dir, tmp_path):
    r = _run("eval.py", "--model", model_dir, "--seq-len", "6000", "--data", "demo:test")
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    assert r.stderr.strip().splitlines() == [
        "error: --seq-len 6000 is longer than the model's context of 256 positions (max_position_embeddings); "
        "use --seq-len 256 or less"]
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"question": "x" * 300, "choices": ["a", "b"], "answer": 0}) + "\n")
    r = _run("eval.py", "--model", model_dir, "--metric", "choice", "--data", str(long))
    assert r.returncode == 2 and "longer than the model's context of 256" in r.stderr, r.stderr


@pytest.fixture(scope="module")
def nan_model_dir(model_dir, tmp_path_factory):
    model, tok = nanolisa.load_pretrained(model_dir)
    with torch.no_grad():
        model.lm_head.weight[5].fill_(float("nan"))
    d = str(tmp_path_factory.mktemp("nan") / "model")
    nanolisa.save_pretrained(model, tok, d)
    return d


@pytest.mark.parametrize("metric", ["nll", "choice"])
def test_eval_never_prints_nan(nan_model_dir, tmp_path, metric):
    """A non-finite score is an error (exit 2, one line), not `NaN` in the JSON with exit 0."""
    data = _write(tmp_path / "mc.jsonl", {"question": "1+1", "choices": ["2", "3"], "answer": 0}) \
        if metric == "choice" else "demo:test"
    r = _run("eval.py", "--model", nan_model_dir, "--metric", metric, "--json", "--data", data)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()  # first what it read (issue 11's counts line) or how it scores
    assert lines[-1].startswith("error: ") and "not finite" in lines[-1]
    assert len(lines) == 2 and lines[0].startswith("note: ")


def test_eval_json_is_strict(model_dir, capsys):
    evalcli.main(["--model", model_dir, "--json", "--limit", "4", "--data", "demo:test"])
    line = capsys.readouterr().out
    json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def test_eval_writes_no_progress_redraws_into_a_log(model_dir):
    """stderr is not a terminal here (a pipe, as in CI logs or nohup): no tqdm carriage returns."""
    r = _run("eval.py", "--model", model_dir, "--limit", "16", "--batch-size", "4", "--data", "demo:test")
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and r.stdout.startswith("nll ")


# ---- issue 25: adapters bring their template and find their base; eval.py's default data ------------------

def _adapter(model_dir, out, template=None, base=None, seed=1):
    """A LoRA adapter on model_dir (B not zero, so it changes what the model says) whose tokenizer files carry
    `template` as their chat template, as train.py writes them; base: what adapter_config.json records."""
    from nanolisa.lora import apply_lora, lora_modules, save_adapter
    model, tok = nanolisa.load_pretrained(model_dir)
    apply_lora(model, r=4, alpha=8)
    torch.manual_seed(seed)
    with torch.no_grad():
        for m in lora_modules(model).values():
            m.lora_B.weight.normal_(0, 0.5)
    tok.chat_template = template
    save_adapter(model, str(out), base_model_name_or_path=base or model_dir, tokenizer=tok)
    return model, tok


def test_an_adapter_chats_with_the_template_it_was_trained_with(model_dir, tmp_path, capsys):
    """The base has ChatML; the adapter was trained with zephyr (or, as the demo LoRA, with none): chat.py
    and eval.py use the adapter's, and say which."""
    from nanolisa.data import read_dataset, tokenize_dataset
    from nanolisa.evaluate import nll
    from nanolisa.templates import PRESETS
    adapter = tmp_path / "zephyr"
    model, tok = _adapter(model_dir, adapter, template=PRESETS["zephyr"])
    msgs = [{"role": "user", "content": "hi"}]
    ids = tok.encode(render_chat(msgs, tok, add_generation_prompt=True), add_special_tokens=False)
    base_tok = nanolisa.load_pretrained(model_dir)[1]
    assert ids != base_tok.encode(render_chat(msgs, base_tok, add_generation_prompt=True), add_special_tokens=False)
    expected = tok.decode(generate(model, ids, 8, stop_ids=tok.stop_token_ids), skip_special_tokens=True)
    chat.main(["--model", str(adapter), "--prompt", "hi", "--max-new-tokens", "8"])
    out, err = capsys.readouterr()
    assert out == expected + "\n" and f"note: chat template: {adapter}'s own (the zephyr preset)" in err
    # eval.py scores conversations through the same template
    data = _write(tmp_path / "c.json", {"type": "conversation", "instances": [{"messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}]})
    evalcli.main(["--model", str(adapter), "--data", data, "--json"])
    out, err = capsys.readouterr()
    total, n = nll(model, tokenize_dataset(read_dataset(data), tok, seq_len=256).examples)
    assert json.loads(out)["nll"] == pytest.approx(total / n, rel=1e-5) and "(the zephyr preset)" in err
    # an adapter trained without a template (the demo LoRA) is talked to in completion mode
    plain = tmp_path / "plain"
    model, tok = _adapter(model_dir, plain, template=None)
    expected = tok.decode(generate(model, tok.encode("upper(cat)="), 6, stop_ids=tok.stop_token_ids),
                          skip_special_tokens=True)
    chat.main(["--model", str(plain), "--prompt", "upper(cat)=", "--max-new-tokens", "6"])
    out, err = capsys.readouterr()
    assert out == expected + "\n" and f"note: {plain} has no chat template: completion mode" in err


def test_an_adapter_finds_its_base_from_any_directory(model_dir, tmp_path, monkeypatch, capsys):
    """A relative base is recorded absolute; a base that is gone is one line naming adapter_config.json, and
    --base overrides what it names."""
    import shutil
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir(), elsewhere.mkdir()
    shutil.copytree(model_dir, work / "base")
    monkeypatch.chdir(work)
    model, tok = _adapter("base", work / "adapter", base="base")
    assert json.loads((work / "adapter" / "adapter_config.json").read_text())["base_model_name_or_path"] == \
        str(work / "base")
    expected = tok.decode(generate(model, tok.encode("abc"), 10), skip_special_tokens=True) + "\n"
    argv = ["--raw", "--prompt", "abc", "--max-new-tokens", "10", "--ignore-eos"]
    monkeypatch.chdir(elsewhere)
    chat.main(["--model", str(work / "adapter"), *argv])
    out, err = capsys.readouterr()
    assert out == expected and f"is a LoRA adapter on {work / 'base'} (base_model_name_or_path in" in err
    (work / "base").rename(work / "moved")
    line = fails_in_one_line(chat.main, ["--model", str(work / "adapter"), *argv], capsys)
    assert f"{work / 'adapter' / 'adapter_config.json'} names (base_model_name_or_path)" in line and "--base" in line
    chat.main(["--model", str(work / "adapter"), "--base", str(work / "moved"), *argv])
    assert capsys.readouterr().out == expected
    fails_in_one_line(chat.main, ["--model", str(work / "moved"), "--base", str(work / "moved"), *argv], capsys)


def test_eval_defaults_to_the_held_out_split_of_the_training_data(tmp_path, capsys):
    """After --data demo:conversation, eval.py scores demo:conversation:test, as --data would; a model without
    the record, or trained without held-out data, is refused rather than guessed at."""
    from nanolisa.train_config import TrainConfig
    from nanolisa.trainer import train
    out = tmp_path / "out"
    train(TrainConfig(out=str(out), data="demo:conversation", steps=2, batch_size=4, seq_len=64, eval_every=0,
                      save_every=0, plot=False, quiet=True))
    record = json.loads((out / "training_args.json").read_text())
    assert record["held_out_data"] == "demo:conversation:test" and record["data"] == "demo:conversation"
    evalcli.main(["--model", str(out), "--json", "--limit", "8"])
    default = capsys.readouterr()
    evalcli.main(["--model", str(out), "--json", "--limit", "8", "--data", "demo:conversation:test"])
    a, b = json.loads(default.out), json.loads(capsys.readouterr().out)
    assert a["data"] == "demo:conversation:test" and {**a, "seconds": 0} == {**b, "seconds": 0}
    assert "note: evaluating on demo:conversation:test, the held-out data" in default.err
    (out / "training_args.json").unlink()
    assert "has no training_args.json" in fails_in_one_line(evalcli.main, ["--model", str(out)], capsys)
    own = _write(tmp_path / "own.json", {"type": "text2text", "instances": [{"input": "a", "output": "b"}] * 8})
    out2 = tmp_path / "out2"
    train(TrainConfig(out=str(out2), data=own, steps=1, batch_size=4, seq_len=64, eval_every=0, save_every=0,
                      plot=False, quiet=True))
    line = fails_in_one_line(evalcli.main, ["--model", str(out2)], capsys)
    assert f"was trained on {own} without held-out data" in line
    with pytest.raises(SystemExit):
        evalcli.parse_args(["--help"])
    help_text = capsys.readouterr().out
    assert "demo:conversation:test" in help_text and "demo:test" in help_text
    from nanolisa.cli import train as traincli
    with pytest.raises(SystemExit):
        traincli.parse_args(["--help"])
    train_help = " ".join(capsys.readouterr().out.split())
    assert "'demo:conversation'" in train_help and "'demo:conversation:test'" in train_help


# ---- issue 25: completion mode, zero-token replies, the llama3 template on a tokenizer without its tokens --

def test_a_reply_of_no_tokens_reports_no_first_token(model_dir, monkeypatch, capsys):
    from nanolisa.generate import Decoder
    monkeypatch.setattr(Decoder, "stream", lambda self, *a, **k: iter(()))  # EOS came first
    chat.main(["--model", model_dir, "--raw", "--prompt", "x"])
    out, err = capsys.readouterr()
    report = err.strip().splitlines()[-1]
    assert out == "\n" and report.startswith("[0 tokens; prompt ") and "the reply ended at once" in report
    assert "first token" not in report


def test_a_template_whose_tokens_the_tokenizer_lacks_is_said_in_one_line(model_dir, tmp_path, capsys):
    """The tiny byte-level tokenizer has no <|eot_id|>: --template llama3 writes it as plain bytes."""
    from nanolisa.train_config import TrainConfig
    from nanolisa.trainer import train
    chat.main(["--model", model_dir, "--template", "llama3", "--prompt", "hi", "--max-new-tokens", "2"])
    notes = [x for x in capsys.readouterr().err.splitlines() if "<|eot_id|>" in x]
    assert len(notes) == 1 and notes[0].startswith("note: the llama3 template writes") and "plain text" in notes[0]
    train(TrainConfig(model=model_dir, out=str(tmp_path / "o"), data="demo:conversation", template="llama3", steps=1,
                      batch_size=2, seq_len=256, eval_every=0, save_every=0, plot=False))
    notes = [x for x in capsys.readouterr().err.splitlines() if "<|eot_id|>" in x]
    assert len(notes) == 1 and notes[0].startswith("note: the llama3 template writes")
    chat.main(["--model", model_dir, "--template", "chatml", "--prompt", "hi", "--max-new-tokens", "2"])
    assert "plain text" not in capsys.readouterr().err  # the tokenizer has ChatML's tokens


def test_inference_help_says_nothing_of_training(capsys):
    for tool in (chat, evalcli):
        with pytest.raises(SystemExit):
            tool.parse_args(["--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "training loss" not in text and "kernels/" not in text and "--version" in text


# ---- issue 23: chat.py and eval.py's remaining tracebacks and silent wrongs ----------------------------------

def fails_in_one_line(main, argv, capsys) -> str:
    """A tool's main run as its script runs it (run_cli): exit 2, nothing on stdout, one `error:` line."""
    from nanolisa.cli.common import run_cli
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main(argv))
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert e.value.code == 2 and out == "" and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.mark.parametrize("args", [["--temperature", "nan"], ["--temperature", "1e-300"], ["--temperature", "inf"],
                                  ["--temperature", "1", "--seed", str(2**70)], ["--seed", "-1"],
                                  ["--repetition-penalty", "nan"]])
def test_bad_sampling_flags_are_one_line(args, capsys):
    line = fails_in_one_line(chat.main, ["--prompt", "hi", "--max-new-tokens", "2", *args], capsys)
    assert line.startswith(f"error: {args[-2]} {args[-1]}: ")


def test_a_closed_output_pipe_is_one_line(plain_model_dir):
    """`chat.py ... | head -1`: the reader is gone before the replies are written."""
    import subprocess
    import sys
    from tests.helpers import ROOT
    p = subprocess.Popen([sys.executable, os.path.join(ROOT, "chat.py"), "--model", plain_model_dir,
                          "--max-new-tokens", "4", "--ignore-eos"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, cwd=ROOT)
    p.stdout.close()
    _, err = p.communicate(b"abc\n" * 50, timeout=300)
    err = err.decode()
    assert p.returncode == 2 and "Traceback" not in err and "Exception ignored" not in err, err
    assert err.strip().splitlines()[-1] == \
        "error: the output was closed before everything was written (a pipe reader that exited?)"


def test_a_model_with_non_finite_outputs_is_said_by_chat_and_eval_accuracy(nan_model_dir, tmp_path, capsys):
    """Greedy decoding from NaN logits is token 0 every time: a NUL byte in the tiny vocabulary. Neither a
    stream of them nor an accuracy of 0.0 with exit 0: one line saying the outputs are not finite."""
    nan_everywhere = tmp_path / "nan"
    model, tok = nanolisa.load_pretrained(nan_model_dir)
    with torch.no_grad():
        model.lm_head.weight.fill_(float("nan"))
    nanolisa.save_pretrained(model, tok, str(nan_everywhere))
    for d in (nan_model_dir, str(nan_everywhere)):  # one NaN row poisons the softmax; a whole NaN head, argmax
        line = fails_in_one_line(chat.main, ["--model", d, "--raw", "--prompt", "abc", "--max-new-tokens", "5"],
                                 capsys)
        assert "the model's outputs are not finite" in line
        line = fails_in_one_line(evalcli.main, ["--model", d, "--metric", "accuracy", "--data", "demo:test",
                                                "--limit", "4"], capsys)
        assert "the model's outputs are not finite" in line
