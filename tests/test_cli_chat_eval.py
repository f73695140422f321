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
    """Each line is continued as plain text, one reply per line on stdout (no prompts), and the session says
    once that it is in completion mode."""
    model, tok = nanolisa.load_pretrained(plain_model_dir)
    assert tok.chat_template is None
    lines = ["upper(cat)=", "abc", "/reset", "upper(cat)="]
    r = _run("chat.py", "--model", plain_model_dir, "--max-new-tokens", "6", "--device", "cpu",
             input="".join(line + "\n" for line in lines))
    assert r.returncode == 0, r.stderr
    expected = [tok.decode(generate(model, tok.encode(x), 6, stop_ids=tok.stop_token_ids), skip_special_tokens=True)
                for x in ("upper(cat)=", "abc", "upper(cat)=")]
    assert r.stdout == "".join(e + "\n" for e in expected)
    assert r.stderr.count("completion mode") == 1 and "Traceback" not in r.stderr


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
    r = _run("eval.py", "--model", model_dir, "--seq-len", "6000")
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
    data = ["--data", _write(tmp_path / "mc.jsonl", {"question": "1+1", "choices": ["2", "3"], "answer": 0})] \
        if metric == "choice" else []
    r = _run("eval.py", "--model", nan_model_dir, "--metric", metric, "--json", *data)
    assert r.returncode == 2 and r.stdout == "" and "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.strip().splitlines()  # the nll metric first says what it read (issue 11's counts line)
    assert lines[-1].startswith("error: ") and "not finite" in lines[-1]
    assert lines[:-1] == ([] if metric == "choice" else [l for l in lines if l.startswith("note: demo:")])


def test_eval_json_is_strict(model_dir, capsys):
    evalcli.main(["--model", model_dir, "--json", "--limit", "4"])
    line = capsys.readouterr().out
    json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def test_eval_writes_no_progress_redraws_into_a_log(model_dir):
    """stderr is not a terminal here (a pipe, as in CI logs or nohup): no tqdm carriage returns."""
    r = _run("eval.py", "--model", model_dir, "--limit", "16", "--batch-size", "4")
    assert r.returncode == 0, r.stderr
    assert "\r" not in r.stderr and r.stdout.startswith("nll ")
