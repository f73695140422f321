"""The families of issue 20 (Qwen3, Gemma 2 and 3, Phi-3/4, OLMo 2, SmolLM3) and sliding windows, against
transformers on tiny random configs.

Each config is written as released checkpoints write config.json (rope_theta, rope_scaling,
rope_local_base_freq, sliding_window_pattern, partial_rotary_factor at the top level, no layer_types);
transformers reads it and its save_pretrained writes the transformers 5 form (rope_parameters, layer_types),
so every parity test runs both. The configs are chosen so that what a family does differently matters:
head sizes of their own (not hidden / heads), windows shorter than the 40-token test rows, soft-caps small
enough to bend the scores, longrope past its switch and before it, tied and untied heads.
"""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import transformers as tf
from safetensors.torch import load_file

import nanolisa
from nanolisa.adamw import AdamW
from nanolisa.generate import generate
from nanolisa.kernels import use_kernels
from nanolisa.lisa import LISA
from nanolisa.loss import next_token_nll
from nanolisa.lora import apply_lora, mark_only_lora_trainable, save_adapter
from tests.helpers import ROOT, randomize

V = 101
SMALL = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
             num_key_value_heads=2, pad_token_id=0, bos_token_id=0, eos_token_id=0)
LONGROPE = {"type": "longrope", "short_factor": [1.0, 1.3, 2.0, 4.0], "long_factor": [1.5, 3.0, 6.0, 9.0]}
FAMILIES = {  # config.json as released checkpoints write it
    "qwen3-window-tied": dict(SMALL, model_type="qwen3", head_dim=24, rope_theta=1e6, tie_word_embeddings=True,
                              use_sliding_window=True, sliding_window=5, max_window_layers=1),
    "qwen3": dict(SMALL, model_type="qwen3", head_dim=20, rope_theta=1e6, rope_scaling=None),
    "qwen2-window": dict(SMALL, model_type="qwen2", use_sliding_window=True, sliding_window=6, max_window_layers=2),
    "mistral-window": dict(SMALL, model_type="mistral", sliding_window=5),
    "gemma2": dict(SMALL, model_type="gemma2", head_dim=24, sliding_window=6, query_pre_attn_scalar=20,
                   attn_logit_softcapping=2.0, final_logit_softcapping=3.0, hidden_act="gelu_pytorch_tanh",
                   hidden_activation="gelu_pytorch_tanh"),
    "gemma3": dict(SMALL, model_type="gemma3_text", head_dim=24, sliding_window=5, sliding_window_pattern=2,
                   query_pre_attn_scalar=24, rope_theta=1e4, rope_local_base_freq=100.0,
                   rope_scaling={"rope_type": "linear", "factor": 2.0}, final_logit_softcapping=4.0,
                   tie_word_embeddings=False),
    "gemma3-1b-like": dict(SMALL, model_type="gemma3_text", head_dim=16, sliding_window=4, sliding_window_pattern=3,
                           query_pre_attn_scalar=16, rope_theta=1e6, rope_local_base_freq=1e4, rope_scaling=None,
                           attn_logit_softcapping=None, final_logit_softcapping=None, num_key_value_heads=1),
    "phi3-longrope": dict(SMALL, model_type="phi3", partial_rotary_factor=0.5, original_max_position_embeddings=8,
                          max_position_embeddings=64, rope_scaling=LONGROPE, sliding_window=7),
    "phi3": dict(SMALL, model_type="phi3", num_key_value_heads=4, sliding_window=None, rope_scaling=None),
    "olmo2": dict(SMALL, model_type="olmo2"),
    "smollm3": dict(SMALL, model_type="smollm3", no_rope_layer_interval=2, use_sliding_window=False),
}
WINDOWED = ["qwen3-window-tied", "qwen2-window", "mistral-window", "gemma2", "gemma3", "phi3-longrope"]


def reference(name, tmp_path):
    """(transformers model with random weights, directory with the released config.json, directory that
    transformers' save_pretrained wrote), the two directories holding the same weights."""
    released, saved = tmp_path / f"{name}-released", tmp_path / f"{name}-saved"
    released.mkdir()
    (released / "config.json").write_text(json.dumps(FAMILIES[name]))
    torch.manual_seed(0)
    hf = tf.AutoModelForCausalLM.from_config(tf.AutoConfig.from_pretrained(released)).eval()
    randomize(hf)
    hf.save_pretrained(saved)
    shutil.copy(saved / "model.safetensors", released)
    return hf, released, saved


def max_err(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


# ----------------------------------------------------------------------------------------------------------
# Logits


@pytest.mark.parametrize("name", list(FAMILIES))
def test_logits_match_transformers_in_both_config_styles(name, tmp_path):
    hf, released, saved = reference(name, tmp_path)
    saved_cfg = json.loads((saved / "config.json").read_text())
    assert "rope_parameters" in saved_cfg and "rope_parameters" not in FAMILIES[name]  # the two styles differ
    ids = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(1))
    lengths = (40, 6) if name.startswith("phi3-longrope") else (40,)  # longrope: past its switch and within
    for path in (released, saved):
        ours = nanolisa.load_model(str(path)).eval()
        for T in lengths:
            with torch.no_grad():
                assert max_err(hf(ids[:, :T]).logits, ours(ids[:, :T])) <= 1e-4, (path.name, T)


@pytest.mark.parametrize("name", ["gemma2", "gemma3", "olmo2", "phi3-longrope"])
def test_bf16_logits_follow_transformers_roundings(name, tmp_path):
    """In bf16 the families round differently (Gemma's sqrt(C) and (1 + w) in fp32, OLMo 2's fp32 RoPE):
    our bf16 logits stay much closer to transformers' bf16 logits than either is to fp32."""
    hf, _, saved = reference(name, tmp_path)
    hf16 = tf.AutoModelForCausalLM.from_pretrained(saved, dtype=torch.bfloat16).eval()
    ours = nanolisa.load_model(str(saved), dtype="bf16").eval()
    ids = torch.randint(0, V, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want, got, gold = hf16(ids).logits, ours(ids), hf(ids).logits
    assert got.dtype == torch.bfloat16
    assert max_err(got, want) <= 0.1 * max_err(want, gold)


def test_windowed_attention_differs_from_full_attention(tmp_path):
    """The control for the window tests: the same weights without the window give other logits."""
    _, released, _ = reference("mistral-window", tmp_path)
    ours = nanolisa.load_model(str(released)).eval()
    ids = torch.randint(0, V, (1, 30))
    with torch.no_grad():
        windowed = ours(ids)
        ours.config.sliding_window = None
        assert max_err(windowed[:, :5], ours(ids)[:, :5]) == 0  # within the window: the same
        assert max_err(windowed, ours(ids)) > 1e-2


# ----------------------------------------------------------------------------------------------------------
# Save, decode


@pytest.mark.parametrize("name", ["qwen3-window-tied", "gemma2", "gemma3", "phi3-longrope", "olmo2", "smollm3"])
def test_save_round_trip_loads_unchanged_in_transformers(name, tmp_path):
    hf, released, _ = reference(name, tmp_path)
    out = tmp_path / "out"
    nanolisa.save_pretrained(nanolisa.load_model(str(released)), None, str(out))
    back = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(0, V, (2, 20))
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, back(ids).logits)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == [type(hf).__name__]
    assert {k: cfg[k] for k in FAMILIES[name]} == FAMILIES[name]  # the released keys, as they were


@pytest.mark.parametrize("name", WINDOWED + ["smollm3"])
def test_greedy_kv_cache_decoding_past_the_window_equals_generate(name, tmp_path):
    """Prompt of 4, then 16 tokens: past every window (and, for phi3-longrope, past its switch at 8, where
    the cached keys are computed again)."""
    hf, released, _ = reference(name, tmp_path)
    ours = nanolisa.load_model(str(released)).eval()
    prompt = [3, 17, 42, 9]
    want = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, 4, dtype=torch.long),
                       max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)[0, 4:].tolist()
    assert len(want) == 16
    assert generate(ours, prompt, 16) == want
    assert generate(ours, prompt, 16, use_cache=False) == want


# ----------------------------------------------------------------------------------------------------------
# LISA and LoRA


def loss(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, V, (2, 24), generator=g)
    return next_token_nll(model, ids, ids).sum() / (2 * 23)


@pytest.mark.parametrize("name", ["qwen3-window-tied", "gemma2", "gemma3", "phi3-longrope", "olmo2", "smollm3"])
def test_lisa_step_trains_the_sampled_block_embedding_and_head(name, tmp_path):
    _, released, _ = reference(name, tmp_path)
    model = nanolisa.load_model(str(released)).train()
    use_kernels(model, "torch")  # the fused loss (with Gemma 2's soft-cap) the trainer uses
    lisa = LISA(model, n_layers=1, interval=1, seed=4)
    opt = AdamW(model.parameters(), lr=1e-2)
    lisa.maybe_switch(0, opt)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss(model).backward()
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    active = f"model.layers.{lisa.active[0]}."
    assert changed == {n for n in before if n.startswith((active, "model.embed_tokens", "model.norm", "lm_head"))}
    tied = model.config.tie_word_embeddings
    assert ("lm_head.weight" in before) != tied  # a tied head is the embedding: one Parameter, trained once
    assert len(opt.state) == sum(1 for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("name", ["qwen3-window-tied", "gemma2", "gemma3", "phi3-longrope", "olmo2", "smollm3"])
@pytest.mark.parametrize("dora", [False, True])
def test_lora_step_adapter_loads_in_peft_exactly(name, dora, tmp_path):
    peft = pytest.importorskip("peft")
    hf, released, _ = reference(name, tmp_path)
    model = nanolisa.load_model(str(released)).train()
    names = apply_lora(model, r=4, alpha=8, dora=dora)
    mark_only_lora_trainable(model)
    leaves = {n.rpartition(".")[2] for n in names}
    assert leaves == ({"qkv_proj", "o_proj", "gate_up_proj", "down_proj"} if name.startswith("phi3") else
                      {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"})
    opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2)
    for step in range(2):
        loss(model, step).backward()
        opt.step()
        opt.zero_grad()
    out = tmp_path / "adapter"
    save_adapter(model.eval(), str(out), base_model_name_or_path=str(released))
    assert sorted(json.loads((out / "adapter_config.json").read_text())["target_modules"]) == sorted(leaves)
    pm = peft.PeftModel.from_pretrained(hf, str(out)).eval()
    ids = torch.randint(0, V, (2, 30))
    with torch.no_grad():
        ours, theirs = model(ids), pm(ids).logits
        assert max_err(ours, theirs) <= 1e-4
        with pm.disable_adapter():
            assert max_err(ours, pm(ids).logits) > 1e-3  # the adapter was trained: it changes the logits


# ----------------------------------------------------------------------------------------------------------
# What is not supported


def test_multimodal_gemma3_is_refused_in_one_line_and_readmes_way_out_works(tmp_path):
    """Gemma 3 4B+ (Gemma3ForConditionalGeneration) is refused; README's recipe saves its language model as
    a gemma3_text checkpoint that nanolisa loads, with the logits of the full model on text."""
    text = dict(FAMILIES["gemma3-1b-like"], tie_word_embeddings=True)
    vision = dict(model_type="siglip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, image_size=28, patch_size=14)
    cfg = tf.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4, image_token_index=V - 1,
                          boi_token_index=V - 2, eoi_token_index=V - 3)
    torch.manual_seed(0)
    full = tf.Gemma3ForConditionalGeneration(cfg).eval()
    randomize(full)
    full.save_pretrained(tmp_path / "mm")
    with pytest.raises(nanolisa.UserError, match=r"config.json: model_type 'gemma3' is not supported: .*vision "
                                                 r"tower.*gemma3_text.*README"):
        nanolisa.load_model(str(tmp_path / "mm"))
    # README.md's recipe, as written there
    mm = tf.Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "mm")
    lm = tf.Gemma3ForCausalLM(mm.config.text_config)
    lm.model, lm.lm_head = mm.model.language_model, mm.lm_head
    lm.save_pretrained(tmp_path / "text")
    ours = nanolisa.load_model(str(tmp_path / "text")).eval()
    ids = torch.randint(0, V - 3, (1, 20))
    with torch.no_grad():
        assert max_err(full(input_ids=ids).logits, ours(ids)) <= 1e-4


def test_a_mixture_of_experts_is_one_line_naming_the_supported_list():
    with pytest.raises(nanolisa.UserError, match=r"^unsupported model_type 'qwen3_moe': nanolisa supports llama, "
                                                 r"mistral, qwen2, qwen3, gemma2, gemma3_text, phi3, olmo2, smollm3, "
                                                 r"gpt2$"):
        nanolisa.ModelConfig.from_hf(dict(FAMILIES["qwen3"], model_type="qwen3_moe"))


# ----------------------------------------------------------------------------------------------------------
# Several processes: FSDP2 and DDP wrap any family the same way (one unit per block)


@pytest.fixture(scope="module")
def family_checkpoints(tmp_path_factory):
    """Gemma 2 (sandwich norms, soft-caps, windows, tied head) and Phi-3 (fused projections, longrope)
    checkpoints with the tiny tokenizer, random weights: what train.py --model takes."""
    _, tok = nanolisa.load_pretrained("tiny")
    dirs = {}
    for name in ("gemma2", "phi3-longrope"):
        d = dict(FAMILIES[name], vocab_size=tok.vocab_size, max_position_embeddings=64)
        torch.manual_seed(0)
        model = nanolisa.build_model(nanolisa.ModelConfig.from_hf(d))
        model.init_weights()
        dirs[name] = tmp_path_factory.mktemp(name) / "base"
        nanolisa.save_pretrained(model, tok, str(dirs[name]))
    return dirs


def train(base, out, *args, nproc=1):
    quick = ["--model", str(base), "--out", str(out), "--seq-len", "48", "--eval-every", "0", "--no-plot",
             "--quiet", "--lr", "1e-3", "--warmup", "0", "--threads", "1", "--steps", "3", "--interval", "2",
             "--grad-accum", "2", *args]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    p = subprocess.run([sys.executable, *launcher, os.path.join(ROOT, "train.py"), *quick], capture_output=True,
                       text=True, cwd=ROOT, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 0, p.stderr[-3000:]
    return load_file(str(out / "model.safetensors"))


@pytest.mark.multiprocess
@pytest.mark.parametrize("name,parallel", [("gemma2", "fsdp"), ("phi3-longrope", "ddp")])
def test_two_ranks_train_a_family_like_one_rank(family_checkpoints, name, parallel, tmp_path):
    base = family_checkpoints[name]
    one = train(base, tmp_path / "one", "--batch-size", "4")
    two = train(base, tmp_path / "two", "--batch-size", "2", "--parallel", parallel, nproc=2)
    start = load_file(str(base / "model.safetensors"))
    assert one.keys() == two.keys() == start.keys()
    assert max(max_err(one[k], two[k]) for k in one) <= 1e-5
    assert max(max_err(one[k], start[k]) for k in one) > 1e-4  # it trained
