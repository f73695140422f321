"""LoRA / DoRA: parity with peft in both directions, merging, freezing, the PEFT file format, the merge CLI.

Every parity test builds a tiny random Hugging Face model (transformers), saves it, loads it in nanolisa, and
gives the adapters random non-zero B (and DoRA magnitudes), so a wrong scale, a missing transpose, an
un-detached norm or a misnamed key shows up as different logits or gradients.
"""
import json
import os

import pytest
import torch
import torch.nn as nn

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

import nanolisa  # noqa: E402
from nanolisa.errors import UserError  # noqa: E402
from nanolisa.lora import (LoRALinear, apply_lora, load_adapter, load_lora_state_dict, lora_modules,  # noqa: E402
                           lora_state_dict, mark_only_lora_trainable, merge_lora, save_adapter)
from tests.helpers import run_script  # noqa: E402

ATOL = 1e-5
LLAMA_ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_ALL = ["c_attn", "c_proj", "c_fc"]


def _hf_config(arch: str):
    if arch == "qwen2":  # tied embeddings, as Qwen2 and Llama 3.2 1B/3B have
        return transformers.Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=True)
    if arch == "llama":
        return transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        tie_word_embeddings=False)
    return transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                   bos_token_id=0, eos_token_id=0, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)


@pytest.fixture(scope="module")
def base_dirs(tmp_path_factory):
    """One saved tiny HF model per architecture: {"llama": dir, "gpt2": dir, "qwen2": dir} (the last two tied)."""
    dirs = {}
    for arch in ("llama", "gpt2", "qwen2"):
        torch.manual_seed(0)
        m = transformers.AutoModelForCausalLM.from_config(_hf_config(arch))
        d = str(tmp_path_factory.mktemp(arch))
        m.save_pretrained(d)
        dirs[arch] = d
    return dirs


def hf_model(path: str):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def ids(seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def randomise(model: nn.Module, seed: int = 0) -> None:
    """Non-zero adapters: B ~ N(0, 0.1), DoRA magnitudes perturbed by 10% (as training would)."""
    g = torch.Generator().manual_seed(seed)
    for m in lora_modules(model).values():
        m.lora_B.weight.copy_(0.1 * torch.randn(m.lora_B.weight.shape, generator=g))
        if m.lora_magnitude_vector is not None:
            m.lora_magnitude_vector.mul_(1 + 0.1 * torch.randn(m.lora_magnitude_vector.shape, generator=g))


@torch.no_grad()
def randomise_peft(pm, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for name, p in sorted(pm.named_parameters()):
        if "lora_B" in name:
            p.copy_(0.1 * torch.randn(p.shape, generator=g))
        elif "lora_magnitude_vector" in name:
            p.mul_(1 + 0.1 * torch.randn(p.shape, generator=g))
        elif "modules_to_save" in name:
            p.add_(0.1 * torch.randn(p.shape, generator=g))


@torch.no_grad()
def perturb_modules(model: nn.Module, names, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for n, m in model.named_modules():
        if n.rpartition(".")[2] in names:
            for p in m.parameters():
                p.add_(0.1 * torch.randn(p.shape, generator=g))


# (arch, targets, dora, rslora, modules_to_save): LoRA and DoRA on both architectures (DoRA on GPT-2's Conv1D
# is supported by peft 0.21: its DoraLinearLayer transposes the weight with fan_in_fan_out).
CASES = [
    ("llama", "all-linear", False, False, ["embed_tokens", "lm_head"]),
    ("llama", ["q_proj", "v_proj", "down_proj"], True, True, []),
    ("gpt2", GPT2_ALL, False, True, []),
    ("gpt2", "all-linear", True, False, []),
]
CASE_IDS = ["llama-lora-mts", "llama-dora-rslora", "gpt2-lora-rslora", "gpt2-dora"]


@pytest.mark.parametrize("arch,targets,dora,rslora,mts", CASES, ids=CASE_IDS)
def test_nanolisa_adapter_loads_in_peft(base_dirs, tmp_path, arch, targets, dora, rslora, mts):
    torch.manual_seed(0)
    model = nanolisa.load_model(base_dirs[arch]).eval()
    x = ids()
    with torch.no_grad():
        base_logits = model(x)
    names = apply_lora(model, r=4, alpha=8, targets=targets, dora=dora, rslora=rslora)
    assert names and all(isinstance(model.get_submodule(n), LoRALinear) for n in names)
    randomise(model)
    mark_only_lora_trainable(model, modules_to_save=mts)
    perturb_modules(model, mts)
    out = str(tmp_path / "adapter")
    save_adapter(model, out, base_model_name_or_path=base_dirs[arch])
    with torch.no_grad():
        ours = model(x)
    assert (ours - base_logits).abs().max() > 1e-3  # the adapter changes the model, so the test can fail

    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert cfg["fan_in_fan_out"] is (arch == "gpt2") and cfg["use_dora"] is dora and cfg["use_rslora"] is rslora
    pm = peft.PeftModel.from_pretrained(hf_model(base_dirs[arch]), out).eval()
    with torch.no_grad():
        theirs = pm(x).logits
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


@pytest.mark.parametrize("arch,targets,dora,rslora,mts", CASES, ids=CASE_IDS)
def test_peft_adapter_loads_in_nanolisa(base_dirs, tmp_path, arch, targets, dora, rslora, mts):
    torch.manual_seed(0)
    lcfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, use_dora=dora, use_rslora=rslora,
                           modules_to_save=mts or None)
    pm = peft.get_peft_model(hf_model(base_dirs[arch]), lcfg).eval()
    randomise_peft(pm)
    out = str(tmp_path / "peft_adapter")
    pm.save_pretrained(out)

    model = load_adapter(nanolisa.load_model(base_dirs[arch]).eval(), out)
    mark_only_lora_trainable(model, modules_to_save=mts)
    x = ids()
    ours, theirs = model(x), pm(x).logits
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)

    # Gradients agree too: the adapters see the same loss surface (DoRA's norm detached as in peft).
    (ours ** 2).mean().backward()
    (theirs ** 2).mean().backward()
    peft_grads = {n.replace("base_model.model.", "").replace(".default", ""): p.grad
                  for n, p in pm.named_parameters() if p.requires_grad}
    for name, m in lora_modules(model).items():
        pairs = [(m.lora_A.weight, "lora_A.weight"), (m.lora_B.weight, "lora_B.weight")]
        if dora:
            pairs.append((m.lora_magnitude_vector, "lora_magnitude_vector.weight"))
        for p, leaf in pairs:
            torch.testing.assert_close(p.grad, peft_grads[f"{name}.{leaf}"], atol=1e-6, rtol=1e-4)

    # Our file for the same setup has exactly peft's tensor names and shapes.
    ours_dir = str(tmp_path / "ours")
    save_adapter(model, ours_dir, base_model_name_or_path=base_dirs[arch])
    from safetensors import safe_open
    with safe_open(os.path.join(out, "adapter_model.safetensors"), "pt") as a, \
            safe_open(os.path.join(ours_dir, "adapter_model.safetensors"), "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
        for k in a.keys():
            assert a.get_slice(k).get_shape() == b.get_slice(k).get_shape(), k


@pytest.mark.parametrize("arch,dora", [("llama", False), ("llama", True), ("gpt2", True)])
def test_merge_and_unmerge(base_dirs, arch, dora):
    torch.manual_seed(0)
    model = nanolisa.load_model(base_dirs[arch]).eval()
    apply_lora(model, r=4, alpha=8, targets="all-linear", dora=dora)
    randomise(model)
    before = {n: m.weight.detach().clone() for n, m in lora_modules(model).items()}
    x = ids()
    with torch.no_grad():
        adapter_logits = model(x)
        for m in lora_modules(model).values():
            m.merge()
        torch.testing.assert_close(model(x), adapter_logits, atol=ATOL, rtol=0)
        for n, m in lora_modules(model).items():
            assert not torch.equal(m.weight, before[n])  # really merged
            m.unmerge()
            torch.testing.assert_close(m.weight, before[n], atol=1e-6, rtol=0)
        torch.testing.assert_close(model(x), adapter_logits, atol=ATOL, rtol=0)
        merge_lora(model)
        assert not lora_modules(model)
        assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith(("proj", "c_attn", "c_fc")))
        assert set(model.state_dict()) == set(nanolisa.load_model(base_dirs[arch]).state_dict())
        torch.testing.assert_close(model(x), adapter_logits, atol=ATOL, rtol=0)


def test_only_adapters_trainable(base_dirs):
    model = nanolisa.load_model(base_dirs["llama"])
    names = apply_lora(model, r=4, alpha=8, targets=["q_proj", "v_proj"], dora=True)
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    trainable = mark_only_lora_trainable(model)
    expected = {f"{n}.{leaf}" for n in names for leaf in ("lora_A.weight", "lora_B.weight", "lora_magnitude_vector")}
    assert set(trainable) == expected
    trainable = mark_only_lora_trainable(model, modules_to_save=["lm_head"])
    assert set(trainable) == expected | {"lm_head.weight"}
    randomise(model)
    model(ids()).sum().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == (n in expected | {"lm_head.weight"}), n
    assert set(lora_state_dict(model)) == expected | {"lm_head.weight"}
    with pytest.raises(UserError, match="matches no module"):
        mark_only_lora_trainable(model, modules_to_save=["no_such_module"])


def test_rslora_scale_and_forward():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    for rslora, scale in ((False, 16 / 4), (True, 16 / 2)):
        m = LoRALinear(base, r=4, alpha=16, rslora=rslora)
        assert m.scaling == scale
        nn.init.normal_(m.lora_B.weight)
        x = torch.randn(3, 12)
        manual = x @ base.weight.T + base.bias + scale * (x @ m.lora_A.weight.T @ m.lora_B.weight.T)
        torch.testing.assert_close(m(x), manual)
    assert m.weight is base.weight and set(m.state_dict()) == {"weight", "bias", "lora_A.weight", "lora_B.weight"}


def test_wrapper_prefixes_do_not_leak(base_dirs, tmp_path):
    """A DDP-style wrapper (`module.`) changes neither the wrapped names nor the saved keys."""
    class Wrapper(nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

    plain = nanolisa.load_model(base_dirs["gpt2"])
    wrapped = Wrapper(nanolisa.load_model(base_dirs["gpt2"]))
    names = ["transformer.h.0.attn.c_attn", "transformer.h.1.attn.c_attn"]
    torch.manual_seed(0)
    assert apply_lora(plain, targets=["c_attn"]) == names
    torch.manual_seed(0)
    assert apply_lora(wrapped, targets=["c_attn"]) == names  # no "module." prefix
    randomise(plain), randomise(wrapped)
    save_adapter(plain, str(tmp_path / "a"), "base")
    save_adapter(wrapped, str(tmp_path / "b"), "base")
    for f in ("adapter_model.safetensors", "adapter_config.json"):
        assert open(tmp_path / "a" / f, "rb").read() == open(tmp_path / "b" / f, "rb").read()
    # lora_state_dict -> load_lora_state_dict round trip (the trainer's checkpoints)
    sd = {k: v.clone() for k, v in lora_state_dict(wrapped).items()}
    randomise(wrapped, seed=5)
    load_lora_state_dict(wrapped, sd)
    assert all(torch.equal(lora_state_dict(wrapped)[k], v) for k, v in sd.items())
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp")]  # atomic save left no temp dir


def test_load_adapter_errors(base_dirs, tmp_path):
    model = nanolisa.load_model(base_dirs["llama"])
    with pytest.raises(UserError, match="no such adapter directory"):
        load_adapter(model, str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="adapter_config.json"):
        load_adapter(model, str(tmp_path / "empty"))
    # A GPT-2 adapter on a Llama model: its targets are not there.
    gpt2 = nanolisa.load_model(base_dirs["gpt2"])
    apply_lora(gpt2, targets=GPT2_ALL)
    save_adapter(gpt2, str(tmp_path / "gpt2"), base_dirs["gpt2"])
    with pytest.raises(UserError, match="different architecture"):
        load_adapter(nanolisa.load_model(base_dirs["llama"]), str(tmp_path / "gpt2"))
    # A Llama adapter with another hidden size: the shapes do not fit.
    cfg = _hf_config("llama")
    cfg.hidden_size, cfg.intermediate_size = 48, 96
    other = str(tmp_path / "llama48")
    transformers.LlamaForCausalLM(cfg).save_pretrained(other)
    m48 = nanolisa.load_model(other)
    apply_lora(m48, targets=["q_proj"])
    save_adapter(m48, str(tmp_path / "a48"), other)
    with pytest.raises(UserError, match="has shape"):
        load_adapter(nanolisa.load_model(base_dirs["llama"]), str(tmp_path / "a48"))


def _run_cli(*args):
    return run_script("-m", "nanolisa", "merge", *args)


def test_merge_cli_end_to_end(base_dirs, tmp_path):
    torch.manual_seed(0)
    model = nanolisa.load_model(base_dirs["llama"]).eval()
    apply_lora(model, r=4, alpha=8, targets="all-linear", dora=True)
    randomise(model)
    adapter, out = str(tmp_path / "adapter"), str(tmp_path / "merged")
    save_adapter(model, adapter, base_model_name_or_path=base_dirs["llama"])
    r = _run_cli("--lora", adapter, "--out", out)  # base model taken from adapter_config.json
    assert r.returncode == 0, r.stderr
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(hf_model(out)(x).logits, model(x), atol=ATOL, rtol=0)

    r = _run_cli("--model", base_dirs["llama"], "--lora", str(tmp_path / "nope"), "--out", str(tmp_path / "o2"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().count("\n") == 0 and "nope" in r.stderr and r.stderr.startswith("error:")
    assert not os.path.exists(tmp_path / "o2")


def test_adapter_carries_the_tokenizer_and_merge_uses_it(tmp_path, capsys):
    """An adapter written with its tokenizer holds the base's tokenizer files (its chat template as changed);
    the merge CLI writes the adapter's tokenizer into the merged model."""
    from nanolisa.cli import merge
    from nanolisa.tokenizer import TINY_DIR, TOKENIZER_FILES, load_tokenizer
    model, tok = nanolisa.load_pretrained("tiny")
    apply_lora(model, r=2, alpha=4, targets=["q_proj"])
    tok.chat_template = None  # as train.py leaves it for the demo (text2text) model
    adapter, out = str(tmp_path / "adapter"), str(tmp_path / "merged")
    save_adapter(model, adapter, base_model_name_or_path="tiny", tokenizer=tok)
    shipped = sorted(f for f in os.listdir(TINY_DIR) if f in TOKENIZER_FILES)
    assert sorted(f for f in os.listdir(adapter) if f in TOKENIZER_FILES) == shipped
    assert load_tokenizer(adapter).chat_template is None
    assert transformers.AutoTokenizer.from_pretrained(adapter).encode("1+2=") == tok.encode("1+2=")
    merge.main(["--lora", adapter, "--out", out])
    assert load_tokenizer(out).chat_template is None and load_tokenizer(out).encode("ab") == tok.encode("ab")


def test_merge_cli_help_and_wrong_architecture(base_dirs, tmp_path, capsys):
    from nanolisa.cli import merge as cli
    with pytest.raises(SystemExit) as e:
        cli.parse_args(["--help"])
    assert e.value.code == 0
    help_text = capsys.readouterr().out
    for flag in ("--model", "--lora", "--out", "--dtype"):
        assert flag in help_text
    assert "nanolisa merge" in cli.__doc__
    gpt2 = nanolisa.load_model(base_dirs["gpt2"])
    apply_lora(gpt2, targets="all-linear")
    save_adapter(gpt2, str(tmp_path / "gpt2"), base_dirs["gpt2"])
    with pytest.raises(UserError, match="different architecture"):
        cli.main(["--model", base_dirs["llama"], "--lora", str(tmp_path / "gpt2"), "--out", str(tmp_path / "o")])


@pytest.mark.parametrize("dora", [False, True])
def test_dropout_training_mode_matches_peft(base_dirs, tmp_path, dora):
    """In training mode with lora_dropout, the same dropout masks (same seed) give the same logits as peft:
    for DoRA that includes peft's choice of rescaling the dropped-out input's base output."""
    torch.manual_seed(0)
    model = nanolisa.load_model(base_dirs["llama"])
    apply_lora(model, r=4, alpha=8, dropout=0.3, targets=["q_proj", "down_proj"], dora=dora)
    randomise(model)
    out = str(tmp_path / "adapter")
    save_adapter(model, out, base_dirs["llama"])
    pm = peft.PeftModel.from_pretrained(hf_model(base_dirs["llama"]), out, is_trainable=True).train()
    model.train()
    x = ids()
    torch.manual_seed(123)
    ours = model(x)
    torch.manual_seed(123)
    theirs = pm(x).logits
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    torch.manual_seed(7)
    assert (model(x) - ours).abs().max() > 1e-4  # dropout is really active


def test_half_precision_base(base_dirs):
    """A bf16 model takes bf16 adapters by default, or fp32 adapters on request; merging keeps bf16."""
    model = nanolisa.load_model(base_dirs["llama"], dtype=torch.bfloat16)
    apply_lora(model, targets=["q_proj"], dora=True, dtype=torch.float32)
    m = model.get_submodule("model.layers.0.self_attn.q_proj")
    assert m.weight.dtype == torch.bfloat16 and m.lora_A.weight.dtype == torch.float32
    randomise(model)
    with torch.no_grad():
        assert model(ids()).dtype == torch.bfloat16
        # The merge is done in fp32 and rounded once: DoRA's m / ||W + sBA|| * (W + sBA), by hand.
        w = m.weight.float() + m.scaling * m.lora_B.weight @ m.lora_A.weight
        expected = (m.lora_magnitude_vector / w.norm(dim=1))[:, None] * w
        merge_lora(model)
        merged = model.get_submodule("model.layers.0.self_attn.q_proj").weight
        assert merged.dtype == torch.bfloat16
        torch.testing.assert_close(merged.float(), expected, atol=0, rtol=2 ** -8)


# ---- tied embeddings (Qwen2, Llama 3.2 1B, GPT-2) with modules_to_save ----------------------------------

EMBED = {"qwen2": "embed_tokens", "gpt2": "wte", "llama": "embed_tokens"}
TIED_CASES = [(arch, mts) for arch in ("qwen2", "gpt2", "llama")
              for mts in ([], ["EMB"], ["lm_head"], ["EMB", "lm_head"])]


def _mts(arch, mts):
    return [EMBED[arch] if m == "EMB" else m for m in mts]


@pytest.mark.parametrize("arch,mts", TIED_CASES, ids=[f"{a}-{'+'.join(m) or 'none'}" for a, m in TIED_CASES])
def test_tied_embeddings_nanolisa_adapter_in_peft(base_dirs, tmp_path, arch, mts):
    """nanolisa trains the one weight a tied embedding and head share: the adapter tells peft so (both copies,
    ensure_weight_tying), and peft's logits equal nanolisa's."""
    mts = _mts(arch, mts)
    model = nanolisa.load_model(base_dirs[arch]).eval()
    apply_lora(model, r=4, alpha=8, targets="all-linear")
    randomise(model)
    mark_only_lora_trainable(model, modules_to_save=mts)
    perturb_modules(model, mts)
    out = str(tmp_path / "adapter")
    save_adapter(model, out, base_model_name_or_path=base_dirs[arch])
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert cfg["ensure_weight_tying"] is (arch != "llama" and bool(mts))
    pm = peft.PeftModel.from_pretrained(hf_model(base_dirs[arch]), out).eval()
    x = ids()
    with torch.no_grad():
        torch.testing.assert_close(model(x), pm(x).logits, atol=ATOL, rtol=0)
    # and back: nanolisa reads its own adapter to the same model (still tied)
    again = load_adapter(nanolisa.load_model(base_dirs[arch]).eval(), out)
    assert again.config.tie_word_embeddings == (arch != "llama")
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), atol=ATOL, rtol=0)


@pytest.mark.parametrize("tying", [False, True])
@pytest.mark.parametrize("arch,mts", TIED_CASES, ids=[f"{a}-{'+'.join(m) or 'none'}" for a, m in TIED_CASES])
def test_tied_embeddings_peft_adapter_in_nanolisa_and_merged(base_dirs, tmp_path, arch, mts, tying):
    """peft's adapters for a tied base, with and without ensure_weight_tying, load to peft's logits; merged,
    they are a checkpoint transformers loads to the same logits (untied where peft untied the copies)."""
    import warnings
    mts = _mts(arch, mts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        pm = peft.get_peft_model(hf_model(base_dirs[arch]), peft.LoraConfig(
            r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=mts or None,
            ensure_weight_tying=tying)).eval()
    randomise_peft(pm)
    out = str(tmp_path / "peft_adapter")
    pm.save_pretrained(out)
    model = load_adapter(nanolisa.load_model(base_dirs[arch]).eval(), out)
    x = ids()
    with torch.no_grad():
        theirs = pm(x).logits
        torch.testing.assert_close(model(x), theirs, atol=ATOL, rtol=0)
    merged = str(tmp_path / "merged")
    nanolisa.save_pretrained(merge_lora(model), None, merged)
    with torch.no_grad():
        torch.testing.assert_close(hf_model(merged)(x).logits, theirs, atol=ATOL, rtol=0)
