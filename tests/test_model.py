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
    with pytest.raises(nanolisa.UserError, match="unsupported model_type 'bert'.*llama, mistral, qwen2, gpt2"):
        ModelConfig.from_hf({"model_type": "bert"})


def test_transformers5_rope_parameters_are_read():
    cfg = ModelConfig.from_hf({**SMALL, "model_type": "llama",
                               "rope_parameters": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1234.0}})
    assert cfg.rope_theta == 1234.0 and cfg.rope_scaling == {"rope_type": "linear", "factor": 4.0}
