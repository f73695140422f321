"""Model parity: nanolisa's logits against transformers' on tiny random configs of every supported family."""
import pytest
import torch
import transformers as tf

import nanolisa
from nanolisa.config import ModelConfig
from nanolisa.model import build_model

SMALL = dict(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2)
CONFIGS = {
    "llama-gqa": lambda: tf.LlamaConfig(**SMALL),
    "llama-bias": lambda: tf.LlamaConfig(**SMALL, attention_bias=True, mlp_bias=True),
    "llama3-rope": lambda: tf.LlamaConfig(**SMALL, max_position_embeddings=64, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8}),
    "llama-linear-rope": lambda: tf.LlamaConfig(**SMALL, rope_scaling={"type": "linear", "factor": 2.0}),
    "llama-dynamic-rope": lambda: tf.LlamaConfig(**SMALL, max_position_embeddings=16,
                                                 rope_scaling={"type": "dynamic", "factor": 2.0}),
    "mistral": lambda: tf.MistralConfig(**{**SMALL, "num_key_value_heads": 1}),
    "qwen2-tied": lambda: tf.Qwen2Config(**SMALL, tie_word_embeddings=True),
    "gpt2": lambda: tf.GPT2Config(vocab_size=101, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                  bos_token_id=0, eos_token_id=0),
}


def randomize(model: torch.nn.Module) -> None:
    """Non-trivial weights everywhere (norm weights and biases too), so every parameter is exercised."""
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2 + (1.0 if p.dim() == 1 and torch.all(p == 1) else 0.0))


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
