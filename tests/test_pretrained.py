"""Checkpoints: what nanolisa writes loads in transformers with identical logits, and broken ones fail cleanly."""
import json
import os

import pytest
import torch
import transformers as tf
from safetensors.torch import save_file

import nanolisa
from tests.helpers import CONFIGS, randomize


def reference(name, tmp_path, **save_kwargs):
    torch.manual_seed(0)
    hf = tf.AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()
    randomize(hf)
    src = tmp_path / "src"
    hf.save_pretrained(src, **save_kwargs)
    return hf, src


@pytest.mark.parametrize("name", ["llama-gqa", "qwen2-tied", "gpt2", "llama3-rope"])
def test_save_pretrained_loads_in_transformers(name, tmp_path):
    hf, src = reference(name, tmp_path)
    model = nanolisa.load_model(str(src))
    out = tmp_path / "out"
    nanolisa.save_pretrained(model, None, str(out))
    back = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 101, (2, 20))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, back(ids).logits)
    cfg = json.load(open(out / "config.json"))
    assert cfg["architectures"] == [type(hf).__name__]
    assert not any(n.startswith(".tmp") for n in os.listdir(tmp_path))  # no temporary left behind


def test_sharded_checkpoints_load_both_ways(tmp_path):
    hf, src = reference("llama-gqa", tmp_path, max_shard_size="50KB")
    assert (src / "model.safetensors.index.json").exists()
    model = nanolisa.load_model(str(src))
    out = tmp_path / "out"
    nanolisa.save_pretrained(model, None, str(out), max_shard_bytes=40_000)
    index = json.load(open(out / "model.safetensors.index.json"))
    assert len(set(index["weight_map"].values())) > 1
    back = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, 101, (1, 10))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, back(ids).logits)
        assert torch.equal(model(ids), nanolisa.load_model(str(out))(ids))


def test_load_in_bf16_converts_every_tensor(tmp_path):
    _, src = reference("llama-gqa", tmp_path)
    model = nanolisa.load_model(str(src), dtype="bf16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    nanolisa.save_pretrained(model, None, str(tmp_path / "out"))
    assert json.load(open(tmp_path / "out" / "config.json"))["torch_dtype"] == "bfloat16"


def test_pytorch_model_bin_loads_with_weights_only(tmp_path):
    hf, _ = reference("llama-gqa", tmp_path)
    d = tmp_path / "bin"
    d.mkdir()
    hf.config.save_pretrained(d)
    torch.save(hf.state_dict(), d / "pytorch_model.bin")
    ids = torch.randint(0, 101, (1, 8))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, nanolisa.load_model(str(d))(ids), atol=1e-6)


def test_truncated_safetensors_fails_cleanly(tmp_path):
    _, src = reference("llama-gqa", tmp_path)
    f = src / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(nanolisa.UserError, match="model.safetensors"):
        nanolisa.load_model(str(src))


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    _, src = reference("llama-gqa", tmp_path)
    from safetensors.torch import load_file
    sd = load_file(src / "model.safetensors")
    del sd["model.layers.1.mlp.up_proj.weight"]
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(nanolisa.UserError, match="missing 1 tensor.*layers.1.mlp.up_proj.weight"):
        nanolisa.load_model(str(src))
    sd["model.layers.1.mlp.up_proj.weight"] = torch.zeros(96, 64)
    sd["model.layers.9.extra.weight"] = torch.zeros(2)
    save_file(sd, src / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(nanolisa.UserError, match="unexpected 1 tensor.*layers.9.extra"):
        nanolisa.load_model(str(src))


def test_wrong_shape_is_named(tmp_path):
    _, src = reference("llama-gqa", tmp_path)
    cfg = json.load(open(src / "config.json"))
    cfg["intermediate_size"] = 128
    json.dump(cfg, open(src / "config.json", "w"))
    with pytest.raises(nanolisa.UserError, match="mlp.*has shape"):
        nanolisa.load_model(str(src))


def test_missing_config_and_directory(tmp_path):
    with pytest.raises(nanolisa.UserError, match="no config.json"):
        nanolisa.load_model(str(tmp_path))
    with pytest.raises(nanolisa.UserError, match="no such model directory"):
        nanolisa.load_pretrained(str(tmp_path / "nope"))


def test_failed_save_leaves_existing_output_untouched(tmp_path):
    _, src = reference("llama-gqa", tmp_path)
    model = nanolisa.load_model(str(src))
    out = tmp_path / "out"
    nanolisa.save_pretrained(model, None, str(out))
    before = {f: (out / f).read_bytes() for f in os.listdir(out)}

    class BrokenTokenizer:
        def save(self, d):
            raise RuntimeError("disk full")

    with torch.no_grad():
        model.lm_head.weight.add_(1.0)
    with pytest.raises(RuntimeError, match="disk full"):
        nanolisa.save_pretrained(model, BrokenTokenizer(), str(out))
    assert {f: (out / f).read_bytes() for f in os.listdir(out)} == before
    assert not any(n.startswith(".tmp") for n in os.listdir(tmp_path))
