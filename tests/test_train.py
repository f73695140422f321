"""train.py end to end: the output loads in transformers, a killed run resumes bit-for-bit, bad input fails
with one line and writes nothing."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

import nanolisa
from nanolisa.train_config import TrainConfig
from nanolisa.trainer import lr_at, train
from tests.helpers import ROOT, run_script

QUICK = ["--batch-size", "4", "--seq-len", "64", "--no-plot"]


def run_train(*args, check=True, **kw):
    return run_script("train.py", *args, check=check, **kw)


def test_lisa_run_writes_a_model_transformers_loads(tmp_path):
    out = tmp_path / "out"
    final = train(TrainConfig(out=str(out), steps=12, interval=4, batch_size=4, seq_len=64, eval_every=6,
                              plot=False, quiet=True))
    assert final["step"] == 12 and "eval_loss" in final
    rows = [json.loads(line) for line in open(out / "metrics.jsonl")]
    actives = [tuple(r["active"]) for r in rows if "active" in r]
    assert len(actives) == 12 and all(len(a) == 1 for a in actives)
    assert all(actives[i] == actives[i - i % 4] for i in range(12))  # switches only every --interval steps
    ours = nanolisa.load_model(str(out))
    hf = tf.AutoModelForCausalLM.from_pretrained(out)
    ids = torch.randint(0, ours.config.vocab_size, (1, 16))
    with torch.no_grad():
        assert torch.allclose(ours(ids), hf(ids).logits, atol=1e-4)
    assert tf.AutoTokenizer.from_pretrained(out).encode("1+2=") == nanolisa.load_pretrained(str(out))[1].encode("1+2=")


def test_lisa_changes_only_active_blocks_between_switches(tmp_path):
    """Across one interval the frozen blocks of the saved model equal the preset's initial weights."""
    out = tmp_path / "out"
    train(TrainConfig(out=str(out), steps=3, interval=10, lisa_layers=2, batch_size=4, seq_len=64,
                      eval_every=0, plot=False, quiet=True))
    active = json.loads(open(out / "metrics.jsonl").readline())["active"]
    start, _ = nanolisa.load_pretrained("tiny")
    end = nanolisa.load_model(str(out))
    for i, (b0, b1) in enumerate(zip(start.blocks, end.blocks)):
        same = all(torch.equal(p0, p1) for p0, p1 in zip(b0.parameters(), b1.parameters()))
        assert same == (i not in active), i
    assert not torch.equal(start.model.embed_tokens.weight, end.model.embed_tokens.weight)


def test_kill_and_resume_is_bit_exact(tmp_path):
    """SIGKILL mid-run, then --resume from the last periodic checkpoint: bit-identical to the straight run.
    In fp16, so the loss scaler's state must come back too (fp32 resumes are tested bit-exact after SIGTERM
    and Ctrl-C in tests/test_run_dir.py, and under torchrun in tests/test_distributed.py)."""
    args = ["--steps", "40", "--save-every", "5", "--interval", "3", "--eval-every", "0", "--dtype", "fp16", *QUICK]
    run_train(*args, "--out", str(tmp_path / "straight"))

    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *args, "--out", str(out)],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = out / "checkpoints" / "step-0000010"
    deadline = time.time() + 120
    while not ckpt.exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.005)
    assert proc.poll() is None, "run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (out / "model.safetensors").exists()
    run_train(*args, "--out", str(out), "--resume")
    assert not (out / "checkpoints").exists()  # a finished run removes its resume checkpoints

    a, b = load_file(tmp_path / "straight" / "model.safetensors"), load_file(out / "model.safetensors")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = lambda d: [json.loads(line) for line in open(d / "metrics.jsonl")]  # noqa: E731
    assert [r["loss"] for r in rows(tmp_path / "straight")] == [r["loss"] for r in rows(out)]


@pytest.mark.parametrize("args, message", [
    (["--lisa-layers", "5"], "out of range: the model has 4 blocks"),
    (["--lisa-layers", "-1"], "--lisa-layers must be >= 0"),
    (["--interval", "0"], "--interval must be >= 1"),
    (["--method", "sgd"], "unknown --method 'sgd'"),
    (["--model", "no/such/dir"], "no/such/dir: no such model directory"),
    (["--data", "no/such/file.json"], "no/such/file.json"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, message):
    out = tmp_path / "out"
    p = run_train(*args, "--out", str(out), "--steps", "2", *QUICK, check=False)
    assert p.returncode == 2
    assert message in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert not out.exists()


def test_out_with_another_runs_checkpoint_is_refused(tmp_path):
    out = tmp_path / "out"
    # An unfinished run (stopped by a NaN loss at step 2) leaves its step-1 checkpoint behind.
    run_train("--steps", "4", "--lr", "1e30", "--clip", "0", "--save-every", "1", "--eval-every", "0", *QUICK,
              "--out", str(out), check=False)
    assert (out / "checkpoints" / "step-0000001").is_dir()
    before = sorted(os.listdir(out))
    p = run_train("--steps", "4", *QUICK, "--out", str(out), check=False)
    assert p.returncode == 2 and "pass --resume" in p.stderr
    p = run_train("--steps", "4", "--lr", "0.5", "--clip", "0", "--eval-every", "0", *QUICK, "--out", str(out),
                  "--resume", check=False)
    assert p.returncode == 2 and "different settings (lr" in p.stderr
    assert sorted(os.listdir(out)) == before


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path):
    out = tmp_path / "out"
    p = run_train("--steps", "30", "--lr", "1e30", "--save-every", "1", "--clip", "0", "--eval-every", "0",
                  *QUICK, "--out", str(out), check=False)
    assert p.returncode == 2 and "loss became" in p.stderr and "at step" in p.stderr, p.stderr
    assert not (out / "model.safetensors").exists()
    assert "last good checkpoint is" in p.stderr


def test_schedule_warmup_then_cosine_to_min_lr():
    cfg = TrainConfig(lr=1.0, min_lr=0.1, warmup=10, schedule="cosine")
    lrs = [lr_at(s, 110, cfg) for s in range(110)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)
    assert lrs[10] == pytest.approx(1.0) and lrs[60] == pytest.approx(0.55)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] > 0.1


def test_loss_plot_is_drawn(tmp_path):
    pytest.importorskip("matplotlib", reason="the loss plot needs the optional plot extra")
    out = tmp_path / "out"
    train(TrainConfig(out=str(out), steps=4, interval=2, batch_size=4, seq_len=64, eval_every=2, quiet=True))
    assert (out / "loss.png").read_bytes().startswith(b"\x89PNG")


def test_lora_run_writes_a_peft_adapter_and_a_merged_model(tmp_path):
    from nanolisa.lora import load_adapter
    out = tmp_path / "out"
    train(TrainConfig(out=str(out), method="lora", steps=4, batch_size=4, seq_len=64, eval_every=2, merge=True,
                      plot=False, quiet=True))
    assert (out / "adapter_config.json").exists() and (out / "adapter_model.safetensors").exists()
    base, _ = nanolisa.load_pretrained("tiny")
    adapted = load_adapter(base, str(out)).eval()
    merged = nanolisa.load_model(str(out / "merged")).eval()
    ids = torch.randint(0, merged.config.vocab_size, (1, 16))
    with torch.no_grad():
        assert not torch.allclose(adapted(ids), nanolisa.load_pretrained("tiny")[0](ids), atol=1e-4)
        assert torch.allclose(adapted(ids), merged(ids), atol=1e-5)


def test_a_failing_run_leaves_the_earlier_result_in_out_untouched(tmp_path):
    out = tmp_path / "out"
    run_train("--steps", "3", "--eval-every", "0", *QUICK, "--out", str(out))
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}
    assert "metrics.jsonl" in before and "model.safetensors" in before
    p = run_train("--steps", "6", "--lr", "1e30", "--clip", "0", "--save-every", "1", "--eval-every", "0", *QUICK,
                  "--out", str(out), "--overwrite", check=False)
    assert p.returncode == 2 and "loss became" in p.stderr
    assert {f: (out / f).read_bytes() for f in os.listdir(out) if f != "checkpoints"} == before


@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
def test_mixed_precision_keeps_fp32_master_weights(tmp_path, dtype):
    out = tmp_path / "out"
    final = train(TrainConfig(out=str(out), steps=3, batch_size=4, seq_len=64, eval_every=3, dtype=dtype,
                              plot=False, quiet=True))
    assert final["eval_loss"] < final["first_eval_loss"] + 1.0  # finite and sane under autocast
    model = nanolisa.load_model(str(out))
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_compiled_run_trains_like_the_eager_one(tmp_path, monkeypatch):
    """train.py --compile (kernels/compile.py: each block and AdamW's per-tensor step through inductor): the
    same run as eager within float rounding, the frozen blocks untouched, and the optimizer did take the
    compiled path (its graphs are counted)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    import nanolisa.trainer
    from nanolisa.kernels.compile import compile_adamw
    torch._dynamo.reset()
    counters.clear()
    optimizers = []
    monkeypatch.setattr(nanolisa.trainer, "compile_adamw", lambda opt: (optimizers.append(opt), compile_adamw(opt)))
    outs = {}
    for compiled in (False, True):
        outs[compiled] = tmp_path / f"out{int(compiled)}"
        train(TrainConfig(out=str(outs[compiled]), steps=4, interval=10, batch_size=4, seq_len=64, eval_every=0,
                          plot=False, quiet=True, compile=compiled))
    assert len(optimizers) == 1 and optimizers[0].update_tensor is not None  # the compiled run's AdamW
    assert counters["stats"]["unique_graphs"] >= 2  # blocks and the optimizer's step
    eager, compiled = (load_file(outs[c] / "model.safetensors") for c in (False, True))
    start = nanolisa.load_pretrained("tiny")[0].state_dict()  # the preset's weights, as train.py starts
    active = json.loads(open(outs[True] / "metrics.jsonl").readline())["active"]
    for name, w in compiled.items():
        torch.testing.assert_close(w, eager[name], rtol=1e-4, atol=1e-5)
        trained = not name.startswith("model.layers.") or int(name.split(".")[2]) in active
        assert torch.equal(w, start[name]) != trained, name
    torch._dynamo.reset()
