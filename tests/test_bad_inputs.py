"""Bad input ends in one line: `error: ...` on stderr, exit status 2, no traceback, and every file it was
given (the model directory, an earlier result in --out) byte for byte as it was.

Tables of bad config.json files (run through train, eval and chat), bad generation_config.json files and
bad train.py flags. Each case runs in-process through `run_cli`, the code path of the scripts; the cases
issue 12 names are also run as a user runs them, as subprocesses of train.py, eval.py and chat.py.
"""
import json
import math
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

import nanolisa
from nanolisa.cli import chat as chat_cli
from nanolisa.cli import eval as eval_cli
from nanolisa.cli import train as train_cli
from nanolisa.cli.common import run_cli
from nanolisa.demo_data import NUM_TRAIN
from nanolisa.runtime import available_memory
from nanolisa.train_config import TrainConfig
from nanolisa.trainer import train
from tests.helpers import one_line_error, run_script

DELETE = object()  # in a config edit: remove the key


def save_small(directory: Path, **config) -> str:
    """A small random model with the tiny preset's tokenizer, saved as a Hugging Face directory."""
    _, tok = nanolisa.load_pretrained("tiny")
    torch.manual_seed(0)
    model = nanolisa.build_model(nanolisa.ModelConfig.from_hf({"vocab_size": tok.vocab_size, **config}))
    model.init_weights()
    nanolisa.save_pretrained(model, tok, str(directory))
    return str(directory)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("models")
    return {
        "llama": save_small(root / "llama", model_type="llama", hidden_size=32, intermediate_size=64,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=256),
        "gpt2": save_small(root / "gpt2", model_type="gpt2", n_embd=32, n_layer=2, n_head=4, n_positions=32),
    }


def edited_copy(src: str, dst: Path, name: str, edit) -> str:
    """A copy of model directory src whose `name` (config.json, ...) is changed by edit: a dict of keys to
    set (DELETE removes one), or anything else to replace the whole file's JSON. Infinity and NaN are
    written as Python's json module reads them."""
    shutil.copytree(src, dst)
    if isinstance(edit, dict):
        d = json.loads((dst / name).read_text()) if (dst / name).exists() else {}
        d.update(edit)
        edit = {k: v for k, v in d.items() if v is not DELETE}
    (dst / name).write_text(json.dumps(edit))
    return str(dst)


def snapshot(directory) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}


def earlier_result(out: Path) -> dict[str, bytes]:
    """An --out that already holds a finished run's files; returns its snapshot."""
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"an earlier run's weights")
    (out / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    return snapshot(out)


def fails_in_one_line(main, argv: list[str], capsys) -> str:
    """Run a tool's main as its script does (through run_cli): exit status 2 and one `error:` line on
    stderr; any other exception (a traceback) escapes and fails the test. Returns the line."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        run_cli(lambda: main(argv))
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


TOOLS = {  # tool -> (main, its arguments besides --model)
    # --overwrite: the earlier result in --out may be replaced by a good run, and must survive a failing one
    "train": (train_cli.main, lambda out: ["--out", str(out), "--steps", "1", "--no-plot", "--quiet", "--overwrite"]),
    "eval": (eval_cli.main, lambda out: ["--data", "demo:test"]),
    "chat": (chat_cli.main, lambda out: ["--prompt", "hi"]),
}


# ----------------------------------------------------------------------------------------------------------
# config.json

LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0, "high_freq_factor": 1.0,
          "original_max_position_embeddings": 8}
BAD_CONFIGS = [  # (id, base model, edit, what the one line says)
    # the cases of issue 12
    ("heads-0", "llama", {"num_attention_heads": 0}, "num_attention_heads must be a positive integer, got 0"),
    ("hidden-str", "llama", {"hidden_size": "128"}, 'hidden_size must be a positive integer, got "128"'),
    ("vocab-neg", "llama", {"vocab_size": -5}, "vocab_size must be a positive integer, got -5"),
    ("list", "llama", [{"model_type": "llama"}], "not a JSON object of settings"),
    ("rope-str", "llama", {"rope_scaling": "linear"}, 'rope_scaling must be an object like {"rope_type"'),
    ("eps-str", "llama", {"rms_norm_eps": "tiny"}, 'rms_norm_eps must be a finite number > 0, got "tiny"'),
    # types: bool is not an int, a float is not a size, strings are not booleans
    ("layers-bool", "llama", {"num_hidden_layers": True}, "num_hidden_layers must be a positive integer, got true"),
    ("mlp-float", "llama", {"intermediate_size": 64.0}, "intermediate_size must be a positive integer, got 64.0"),
    ("tie-str", "llama", {"tie_word_embeddings": "false"}, 'tie_word_embeddings must be true or false, got "false"'),
    ("bias-int", "llama", {"attention_bias": 1}, "attention_bias must be true or false, got 1"),
    ("model-type-list", "llama", {"model_type": ["llama"]}, "unsupported model_type ['llama']"),
    ("dtype-int", "llama", {"dtype": DELETE, "torch_dtype": 16}, "torch_dtype must be a string, got 16"),
    ("missing", "llama", {"hidden_size": DELETE}, "missing key 'hidden_size'"),
    # ranges
    ("eps-0", "llama", {"rms_norm_eps": 0}, "rms_norm_eps must be a finite number > 0, got 0"),
    ("theta-inf", "llama", {"rope_theta": math.inf}, "rope_theta must be a finite number > 0, got Infinity"),
    ("positions-0", "llama", {"max_position_embeddings": 0}, "max_position_embeddings must be a positive integer"),
    ("kv-null-heads-0", "llama", {"num_key_value_heads": None, "num_attention_heads": 0},
     "num_attention_heads must be a positive integer, got 0"),
    # shapes that do not fit together
    ("heads-indivisible", "llama", {"num_attention_heads": 3, "num_key_value_heads": 3},
     "hidden_size (32) must be divisible by num_attention_heads (3), or config.json must give head_dim"),
    ("kv-indivisible", "llama", {"num_key_value_heads": 3},
     "num_attention_heads (4) must be a multiple of num_key_value_heads (3)"),
    ("head-dim-odd", "llama", {"head_dim": 7}, "head size 7 is odd"),
    # rope scaling: a known type with the fields it needs
    ("rope-no-factor", "llama", {"rope_scaling": {"type": "linear"}}, "missing key 'rope_scaling.factor'"),
    ("rope-factor-neg", "llama", {"rope_scaling": {"rope_type": "dynamic", "factor": -2}},
     "rope_scaling.factor must be a finite number > 0, got -2"),
    ("rope-yarn", "llama", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "unsupported rope scaling 'yarn'"),
    ("llama3-order", "llama", {"rope_scaling": LLAMA3},
     "rope_scaling.high_freq_factor (1) must be greater than low_freq_factor (4)"),
    ("llama3-missing", "llama",
     {"rope_scaling": {k: v for k, v in LLAMA3.items() if k != "original_max_position_embeddings"}},
     "missing key 'rope_scaling.original_max_position_embeddings'"),
    ("rope-params-list", "llama", {"rope_parameters": ["linear"]}, "rope_parameters must be an object"),
    # activations
    ("act-unknown", "llama", {"hidden_act": "gelu_old"}, "hidden_act 'gelu_old' is not supported: use one of"),
    ("gpt2-act-unknown", "gpt2", {"activation_function": "bogus"}, "activation_function 'bogus' is not supported"),
    # GPT-2's own names
    ("gpt2-heads", "gpt2", {"n_head": 5}, "n_embd (32) must be divisible by n_head (5)"),
    ("gpt2-layers-0", "gpt2", {"n_layer": 0}, "n_layer must be a positive integer, got 0"),
    ("gpt2-eps-nan", "gpt2", {"layer_norm_epsilon": math.nan}, "layer_norm_epsilon must be a finite number > 0, got NaN"),
    ("gpt2-inner-str", "gpt2", {"n_inner": "big"}, 'n_inner must be a positive integer, got "big"'),
    ("gpt2-layer-scaling", "gpt2", {"scale_attn_by_inverse_layer_idx": True},
     "scale_attn_by_inverse_layer_idx true is not supported"),
]
ISSUE_CASES = ["heads-0", "hidden-str", "vocab-neg", "list", "rope-str", "eps-str"]


def test_the_unedited_copies_load(models, tmp_path):
    """The control: the bad cases below differ from a loadable model only by their edit."""
    for family, src in models.items():
        nanolisa.load_pretrained(edited_copy(src, tmp_path / family, "config.json", {}))


@pytest.mark.parametrize("tool", list(TOOLS))
@pytest.mark.parametrize("case, base, edit, message", BAD_CONFIGS, ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_json_is_one_line_in_every_tool(models, tmp_path, capsys, tool, case, base, edit, message):
    model = edited_copy(models[base], tmp_path / "model", "config.json", edit)
    before = snapshot(model)
    main, args = TOOLS[tool]
    line = fails_in_one_line(main, ["--model", model, *args(tmp_path / "out")], capsys)
    assert line.startswith(f"error: {model}/config.json: ") and message in line, line
    assert snapshot(model) == before
    assert not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------
# generation_config.json: checked when the model is loaded, not when the final save trips over it

BAD_GENERATION_CONFIGS = [
    ("list", [1, 2], "generation_config.json: not a JSON object of generation settings: [1, 2]"),
    ("string", "greedy", 'generation_config.json: not a JSON object of generation settings: "greedy"'),
    ("eos-str", {"eos_token_id": "</s>"}, 'eos_token_id must be a token id or a list of them, got "</s>"'),
    ("eos-list-neg", {"eos_token_id": [2, -1]}, "eos_token_id must be a token id or a list of them, got [2, -1]"),
]


@pytest.mark.parametrize("tool", list(TOOLS))
@pytest.mark.parametrize("case, content, message", BAD_GENERATION_CONFIGS, ids=[c[0] for c in BAD_GENERATION_CONFIGS])
def test_bad_generation_config_is_one_line_at_start(models, tmp_path, capsys, tool, case, content, message):
    model = edited_copy(models["llama"], tmp_path / "model", "generation_config.json", content)
    before = snapshot(model)
    out = tmp_path / "out"
    earlier = earlier_result(out)
    main, args = TOOLS[tool]
    assert message in fails_in_one_line(main, ["--model", model, *args(out)], capsys)
    assert snapshot(model) == before and snapshot(out) == earlier


# ----------------------------------------------------------------------------------------------------------
# train.py's flags

QUICK = ["--batch-size", "4", "--seq-len", "64", "--no-plot", "--quiet"]
BAD_FLAGS = [  # (flags, what the one line says); --steps 2 is added unless --epochs is given
    # non-finite numbers
    (["--lr", "inf"], "--lr must be a finite number, got inf"),
    (["--lr", "nan"], "--lr must be a finite number, got nan"),
    (["--min-lr", "nan"], "--min-lr must be a finite number, got nan"),
    (["--clip", "nan"], "--clip must be a finite number, got nan"),
    (["--clip", "inf"], "--clip must be a finite number, got inf"),
    (["--epochs", "nan"], "--epochs must be a finite number, got nan"),
    (["--epochs", "inf"], "--epochs must be a finite number, got inf"),
    (["--method", "lora", "--lora-alpha", "nan"], "--lora-alpha must be a finite number, got nan"),
    # out of range
    (["--method", "lora", "--lora-dropout", "1.5"], "--lora-dropout must be in [0, 1), got 1.5"),
    (["--method", "lora", "--lora-alpha", "0"], "--lora-alpha must be > 0, got 0.0"),
    (["--weight-decay", "-5"], "--weight-decay must be >= 0, got -5.0"),
    (["--clip", "-1"], "--clip must be >= 0, got -1.0"),
    (["--warmup", "-10"], "--warmup must be >= 0, got -10"),
    (["--eval-every", "-7"], "--eval-every must be N >= 1, 0 (never) or -1 (ten times per run), got -7"),
    (["--save-every", "-2"], "--save-every must be N >= 1, 0 (never) or -1 (ten times per run), got -2"),
    (["--seed", "-1"], "--seed must be in [0, 2**64 - 1], got -1"),
    (["--seed", str(2**64)], f"--seed must be in [0, 2**64 - 1], got {2**64}"),
    (["--threads", "0"], "--threads must be between 1 and"),
    (["--threads", "100000"], f"--threads must be between 1 and {os.cpu_count()} (this machine's CPUs), got 100000"),
    (["--device", "bogus"], "--device 'bogus': not a device"),
    pytest.param(["--device", "cuda"], "--device cuda: CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")),
    pytest.param(["--device", "mps"], "--device mps: MPS (Apple's GPU) is not available",
                 marks=pytest.mark.skipif(torch.backends.mps.is_available(), reason="MPS is available here")),
    (["--device", "meta"], "--device meta: nanolisa computes on cpu, cuda or mps, not meta"),
    # too large to compute with
    (["--lr", "1e300"], "--lr 1e+300 is too large: AdamW's step lr / (1 - beta1) must be a float32 number"),
    (["--grad-accum", "100000000", "--overwrite"],  # (the demo's examples, one per row, in batches of 4)
     "--grad-accum 100000000: one optimizer step would take more micro-batches than one epoch has "
     f"({NUM_TRAIN // 4} of --batch-size 4 per process)"),
    # a flag of several processes in one
    (["--parallel", "fsdp"], "--parallel fsdp needs several processes: start train.py with torchrun"),
    (["--parallel", "ddp"], "--parallel ddp needs several processes: start train.py with torchrun"),
    # nothing to train
    (["--freeze-embeddings", "--freeze-head", "--lisa-layers", "0"], "nothing to train"),
    # a flag that does nothing in this run
    (["--lora-r", "4"], "--lora-r only applies to --method lora, and this run is --method lisa"),
    (["--merge"], "--merge only applies to --method lora"),
    (["--dora"], "--dora only applies to --method lora"),
    (["--lora-alpha", "32"], "--lora-alpha only applies to --method lora"),
    (["--lora-targets", "q_proj"], "--lora-targets only applies to --method lora"),
    (["--method", "full", "--lisa-layers", "2"], "--lisa-layers only applies to --method lisa, and this run is "
                                                 "--method full"),
    (["--method", "lora", "--freeze-head"], "--freeze-head only applies to --method lisa"),
    (["--method", "lora", "--interval", "5"], "--interval only applies to --method lisa"),
    (["--steps", "2", "--epochs", "1"], "give --steps or --epochs, not both"),
    (["--schedule", "constant", "--min-lr", "1e-6"], "--min-lr does nothing with --schedule constant"),
    (["--data", "README.md", "--eval-every", "5"], "--eval-every 5 needs held-out data: pass --eval-data FILE"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS)
def test_bad_train_flag_is_one_line_and_out_survives(tmp_path, capsys, flags, message):
    out = tmp_path / "out"
    earlier = earlier_result(out)
    steps = [] if "--epochs" in flags else ["--steps", "2"]
    line = fails_in_one_line(train_cli.main, [*steps, *flags, *QUICK, "--out", str(out)], capsys)
    assert message in line, line
    assert snapshot(out) == earlier


def test_seq_len_beyond_gpt2_positions_is_one_line(models, tmp_path, capsys):
    """GPT-2's positions are learned: a row longer than n_positions has no embedding (an IndexError)."""
    line = fails_in_one_line(train_cli.main, ["--model", models["gpt2"], "--steps", "1", "--seq-len", "64",
                                              "--out", str(tmp_path / "out"), "--no-plot", "--quiet"], capsys)
    assert "--seq-len 64 is longer than this GPT-2's context (n_positions 32)" in line
    assert not (tmp_path / "out").exists()


def test_epochs_replace_the_presets_step_count(tmp_path):
    assert TrainConfig(epochs=0.001).with_defaults().steps is None
    assert TrainConfig().with_defaults().steps == 3000
    # a quarter of one batch of 4, in epochs of the demo's NUM_TRAIN examples: one step
    final = train(TrainConfig(out=str(tmp_path / "out"), epochs=1 / NUM_TRAIN, batch_size=4, seq_len=64, eval_every=0,
                              plot=False, quiet=True))
    assert final["step"] == 1 and math.isfinite(final["lr"])


def test_method_flags_at_their_defaults_pass():
    """Only a setting that differs from its default counts as given: the other methods' defaults are fine."""
    for method in ("lisa", "lora", "full"):
        TrainConfig(method=method).with_defaults().validate()


# ----------------------------------------------------------------------------------------------------------
# As a user runs them: the scripts as subprocesses (a few at a time: each starts its own Python)

def test_the_issues_cases_as_subprocesses(models, tmp_path):
    """Each config.json case of the issue through one of the scripts in turn (the in-process table above runs
    every case through every tool), and two of its flags."""
    scripts = {"train.py": lambda out: ["--out", str(out), "--steps", "1"],
               "eval.py": lambda out: ["--data", "demo:test"], "chat.py": lambda out: ["--prompt", "hi"]}
    runs = []
    for i, case in enumerate(ISSUE_CASES):
        _, base, edit, message = next(c for c in BAD_CONFIGS if c[0] == case)
        model = edited_copy(models[base], tmp_path / case, "config.json", edit)
        script = list(scripts)[i % 3]
        runs.append(((script, "--model", model, *scripts[script](tmp_path / f"out-{case}")), message))
    runs.append((("train.py", "--steps", "1", "--lr", "inf", "--out", str(tmp_path / "out-lr"), *QUICK),
                 "--lr must be a finite number, got inf"))
    runs.append((("train.py", "--seed", "-1", "--out", str(tmp_path / "out-seed"), *QUICK), "--seed must be in"))
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda r: run_script(*r[0]), runs))
    for (args, message), p in zip(runs, results):
        assert message in one_line_error(p), args
    assert not any(tmp_path.glob("out-*")), "a failed run wrote its --out"


# ----------------------------------------------------------------------------------------------------------
# Tokens the model cannot embed, data that cannot be read, a model that cannot fit (issue 23): checked before
# anything is trained or written. Each case: (id, how to make (model, data) in a directory, message).

def _tokenizer_config(models, d, edit) -> str:
    return edited_copy(models["llama"], d / "model", "tokenizer_config.json", edit)


def _added_token_data(models, d):
    """A tokenizer with one added token past the model's 261-row embedding, and data that uses it."""
    model = _tokenizer_config(models, d, {"added_tokens_decoder": {"261": {"content": "<extra>", "special": True}}})
    (d / "data.jsonl").write_text(json.dumps({"input": "a<extra>b=", "output": "c"}) + "\n")
    return model, str(d / "data.jsonl")


def _fifo(models, d):
    os.mkfifo(d / "data.jsonl")
    return models["llama"], str(d / "data.jsonl")


def _huge_data(models, d):
    """A sparse file (no disk blocks) as large as the memory available: reading it would take 3x that."""
    with open(d / "data.json", "wb") as f:
        f.truncate(available_memory())
    return models["llama"], str(d / "data.json")


def _layers_beyond_memory(models, d):
    """A config.json whose blocks take twice the memory available (counted from the model's own block size)."""
    with torch.device("meta"):
        block = sum(p.numel() for p in nanolisa.load_model(models["llama"], device="meta").blocks[0].parameters())
    layers = 2 * available_memory() // (4 * block)
    return edited_copy(models["llama"], d / "model", "config.json", {"num_hidden_layers": layers}), "demo"


BAD_FILES = [
    ("bos-content-int", lambda m, d: (_tokenizer_config(m, d, {"bos_token": {"content": 5}}), "demo"),
     'tokenizer_config.json: bos_token must be a token string or {"content": "..."}, got {"content": 5}'),
    ("eos-not-in-vocab", lambda m, d: (_tokenizer_config(m, d, {"eos_token": "<|not-there|>"}), "demo"),
     "tokenizer_config.json: eos_token '<|not-there|>' is not in the model's vocabulary (it would be id 261; the "
     "model embeds ids 0..260)"),
    ("pad-not-in-vocab", lambda m, d: (_tokenizer_config(m, d, {"pad_token": "<|pad-x|>"}), "demo"),
     "tokenizer_config.json: pad_token '<|pad-x|>' is not in the model's vocabulary (it would be id 261"),
    ("added-token-in-data", _added_token_data, "the data has token '<extra>' (id 261), which the model cannot embed"),
    ("fifo-data", _fifo, "data.jsonl: not a regular file (a pipe, a socket or a device)"),
    ("huge-data", _huge_data, "of data takes about"),
    ("layers-beyond-memory", _layers_beyond_memory, "B parameters ("),
]


@pytest.mark.parametrize("case, make, message", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_bad_model_or_data_file_is_one_line_and_nothing_changes(models, tmp_path, capsys, case, make, message):
    model, data = make(models, tmp_path)
    inputs = {p: snapshot(p) for p in (model, data) if os.path.isdir(p)}
    out = tmp_path / "out"
    earlier = earlier_result(out)
    line = fails_in_one_line(train_cli.main, ["--model", model, "--data", data, "--steps", "1", *QUICK, "--out",
                                              str(out), "--overwrite"], capsys)
    assert message in line, line
    assert {p: snapshot(p) for p in inputs} == inputs and snapshot(out) == earlier
    if case == "layers-beyond-memory":  # both numbers: what the model needs, what the machine has
        need, have = re.search(r"([\d.]+) GB in float32, more than the ([\d.]+) GB", line).groups()
        assert float(need) > float(have) > 0


# ----------------------------------------------------------------------------------------------------------
# --log: the rules of --out (issue 23)

def _log_cases(models, tmp_path):
    """(id, --log, extra flags, message) for a --log that must be refused."""
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"text": "abc"}) + "\n")
    other = tmp_path / "other_run"
    other.mkdir()
    (other / "config.json").write_text("{}")
    (tmp_path / "old.jsonl").write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    return [
        ("base-model", f"{models['llama']}/model.safetensors", ["--model", models["llama"]], "inside the base model"),
        ("data", str(data), ["--data", str(data)], f"would overwrite the --data {data}"),
        ("other-file", str(other / "config.json"), ["--overwrite"], "exists and is not a metrics log"),
        ("earlier-log", str(tmp_path / "old.jsonl"), [], "holds another run's metrics; pass --overwrite"),
        ("inside-out", str(tmp_path / "out" / "model.safetensors"), [], "is inside --out"),
        ("directory", str(other), [], "is not a regular file"),
    ]


LOG_CASES = ["base-model", "data", "other-file", "earlier-log", "inside-out", "directory"]


@pytest.mark.parametrize("case", LOG_CASES)
def test_bad_log_is_one_line_and_nothing_changes(models, tmp_path, capsys, case):
    _, log, flags, message = next(c for c in _log_cases(models, tmp_path) if c[0] == case)
    before = snapshot(tmp_path)
    line = fails_in_one_line(train_cli.main, ["--steps", "1", *QUICK, "--out", str(tmp_path / "out"), "--log", log,
                                              *flags], capsys)
    assert message in line, line
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


def test_an_earlier_log_is_replaced_with_overwrite(tmp_path):
    log = tmp_path / "old.jsonl"
    log.write_text(json.dumps({"step": 1, "loss": 2.0}) + "\n")
    train(TrainConfig(out=str(tmp_path / "out"), log=str(log), overwrite=True, steps=2, batch_size=4, seq_len=48,
                      eval_every=0, plot=False, quiet=True))
    assert [json.loads(line)["step"] for line in open(log)] == [1, 2]


def test_two_runs_never_share_a_log(tmp_path, capsys):
    """The run holds a lock on its --log: a second run with the same --log (another --out) is refused."""
    import fcntl
    log = tmp_path / "shared.jsonl"
    log.write_text("")
    with open(log) as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a running run holds it
        line = fails_in_one_line(train_cli.main, ["--steps", "1", *QUICK, "--out", str(tmp_path / "out"),
                                                  "--log", str(log)], capsys)
    assert f"--log {log} is in use by another run" in line
    assert log.read_text() == "" and not (tmp_path / "out").exists()


# ----------------------------------------------------------------------------------------------------------
# Quieter wrongs (issue 23): allowed, but said; valid JSON

def _strict_json(line: str):
    return json.loads(line, parse_constant=lambda c: pytest.fail(f"not JSON: {c}"))


def test_clip_0_writes_valid_json(tmp_path, capsys):
    out = tmp_path / "out"
    train_cli.main(["--steps", "2", "--clip", "0", "--eval-every", "0", *QUICK, "--out", str(out)])
    rows = [_strict_json(line) for line in open(out / "metrics.jsonl")]
    assert [r["step"] for r in rows] == [1, 2] and not any("grad_norm" in r for r in rows)
    assert _strict_json(capsys.readouterr().out)["step"] == 2  # the summary on stdout too
    train_cli.main(["--steps", "2", "--eval-every", "0", *QUICK, "--out", str(tmp_path / "clipped")])  # the control
    assert all("grad_norm" in _strict_json(line) for line in open(tmp_path / "clipped" / "metrics.jsonl"))


def test_a_folder_named_like_a_preset_is_used_and_said(models, tmp_path, monkeypatch, capsys):
    shutil.copytree(models["llama"], tmp_path / "tiny")
    monkeypatch.chdir(tmp_path)
    train_cli.main(["--steps", "1", *[f for f in QUICK if f != "--quiet"], "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert f"note: --model tiny is the directory {tmp_path / 'tiny'}, not the built-in preset" in err
    assert nanolisa.load_model(str(tmp_path / "out")).config.hidden_size == 32  # the folder's model, not the preset's


def test_seq_len_past_the_context_is_said_once(tmp_path, capsys):
    """RoPE extends past max_position_embeddings (GPT-2's learned positions do not: refused above)."""
    train_cli.main(["--steps", "1", "--batch-size", "4", "--seq-len", "2048", "--no-plot", "--eval-every", "0",
                    "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert err.count("--seq-len 2048 is longer than the model's context (max_position_embeddings 1024)") == 1


@pytest.mark.parametrize("tool", ["eval", "chat"])
@pytest.mark.parametrize("case", ["bos-content-int", "eos-not-in-vocab"])
def test_bad_special_tokens_are_one_line_in_chat_and_eval_too(models, tmp_path, capsys, tool, case):
    _, make, message = next(c for c in BAD_FILES if c[0] == case)
    model, _ = make(models, tmp_path)
    main, args = TOOLS[tool]
    assert message in fails_in_one_line(main, ["--model", model, *args(tmp_path / "out")], capsys)
