"""Model parity: nanolisa's logits against transformers' on tiny random configs of every supported family."""
import pytest
import torch
import transformers as tf

import nanolisa
from nanolisa.config import ModelConfig
from nanolisa.model import build_model
from tests.helpers import CONFIGS, SMALL, randomize

def hf_and_ours(name, tmp_path):
    torch.manual_seed(0)
    hf = tf.AutoModelForCausalLM.from_config(CONFIGS[name]()).eval()
    randomize(hf)
    hf.save_pretrained(tmp_path)
    return hf, nanolisa.load_model(str(tmp_path)).eval()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_logits_match_transformers(name, tmp_path):
    hf, ours = hf_and_ours(name, tmp_path)
    ids = torch.randint(0, 101, (2, 40))  # 40 > the scaled-rope configs' context: the scaling is exercised
    with torch.no_grad():
        want, got = hf(ids).logits, ours(ids)
    assert got.shape == (2, 40, 101)
    assert (want - got).abs().max().item() <= 1e-4


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
def test_kv_cache_decoding_matches_full_forward(name, tmp_path):
    _, model = hf_and_ours(name, tmp_path)
    ids = torch.randint(0, 101, (1, 12))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_kv_cache(1, 16)
        parts = [model(ids[:, :7], kv_cache=cache)] + [model(ids[:, t:t + 1], kv_cache=cache) for t in range(7, 12)]
    assert cache.pos == 12
    assert torch.allclose(full, torch.cat(parts, dim=1), atol=1e-5)


@pytest.mark.parametrize("name", ["llama-gqa", "gpt2"])
def test_packed_rows_do_not_attend_across_documents(name, tmp_path):
    """Two documents packed in one row give the same logits as each run on its own."""
    _, model = hf_and_ours(name, tmp_path)
    a, b = torch.randint(0, 101, (1, 9)), torch.randint(0, 101, (1, 6))
    pos = torch.cat([torch.arange(9), torch.arange(6)])[None]
    with torch.no_grad():
        packed = model(torch.cat([a, b], dim=1), position_ids=pos)
        sep = torch.cat([model(a), model(b)], dim=1)
    assert torch.allclose(packed, sep, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    cfg = ModelConfig.from_hf({**SMALL, "model_type": "llama"})
    torch.manual_seed(0)
    model = build_model(cfg)
    model.init_weights()
    ids = torch.randint(0, 101, (2, 16))
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.gradient_checkpointing = ckpt
        model(ids).float().logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for g0, g1 in zip(*grads):
        assert torch.allclose(g0, g1, atol=1e-6)


def test_unsupported_model_type_is_one_clear_error():
    with pytest.raises(nanolisa.UserError, match="unsupported model_type .bert.: nanolisa supports llama, mistral, qwen2, qwen3, gemma2, gemma3_text, phi3, olmo2, smollm3, gpt2"):
        ModelConfig.from_hf({"model_type": "bert"})


def test_transformers5_rope_parameters_are_read():
    cfg = ModelConfig.from_hf({**SMALL, "model_type": "llama",
                               "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1234.0}})
    assert cfg.rope_theta == 1234.0 and cfg.rope_scaling == {"rope_type": "linear", "factor": 4.0}


@pytest.mark.parametrize("window", [None, 4])
@pytest.mark.parametrize("native_gqa", [True, False])
def test_packed_gqa_attention_equals_each_document_alone(window, native_gqa, monkeypatch):
    """Packed rows of grouped-query attention give each document's own attention, on both PyTorch paths:
    SDPA's native GQA with the mask (CPU) and k/v expanded to every head (what CUDA takes with a mask)."""
    import nanolisa.attention as attention
    monkeypatch.setattr(attention, "_native_gqa", lambda q, mask: native_gqa)
    g = torch.Generator().manual_seed(0)
    lengths = [7, 1, 12, 5]
    T = sum(lengths)
    q, k, v = torch.randn(2, 6, T, 16, generator=g), torch.randn(2, 2, T, 16, generator=g), \
        torch.randn(2, 2, T, 16, generator=g)
    pos = torch.cat([torch.arange(n) for n in lengths])[None].expand(2, T)
    packed = attention.sdpa_attention(q, k, v, attention.AttentionMask(pos, 0, True, window))
    alone, at = [], 0
    for n in lengths:
        doc = slice(at, at + n)
        mask = attention.AttentionMask(torch.arange(n)[None].expand(2, n), 0, False, window)
        alone.append(attention.sdpa_attention(q[:, :, doc], k[:, :, doc], v[:, :, doc], mask))
        at += n
    assert torch.allclose(packed, torch.cat(alone, dim=2), atol=1e-6)


def test_forward_never_waits_for_the_device():
    """No host sync in a forward pass (issue 17): on the meta device any `int(t)` / `.item()` of a tensor
    raises, so a whole forward there -- plain, packed, and KV-cache decoding -- proves there is none, for
    dynamic NTK and longrope (the RoPE kinds that need the sequence length) and every family's choices."""
    from tests.test_families import FAMILIES
    configs = [dict(SMALL, model_type="llama", max_position_embeddings=16,
                    rope_scaling={"type": "dynamic", "factor": 2.0})] + list(FAMILIES.values())
    for d in configs:
        with torch.device("meta"):
            model = build_model(ModelConfig.from_hf(d))
            ids, pos = torch.zeros(2, 40, dtype=torch.long), torch.zeros(2, 40, dtype=torch.long)
        assert model(ids).shape == (2, 40, 101) and model(ids, position_ids=pos).is_meta
        cache = model.new_kv_cache(2, 41)
        model(ids, kv_cache=cache)
        assert model(ids[:, :1], kv_cache=cache).shape == (2, 1, 101)
    with pytest.raises(RuntimeError, match="meta"):  # the control: what the old RoPE code did
        int(torch.zeros(3, device="meta").max())
