"""The MLP activation config.json names is the one the model runs: for every name in nanolisa/activations.py,
a tiny Llama (`hidden_act`) and a tiny GPT-2 (`activation_function`) give transformers' logits; the default
activation in its place would not; unknown names are refused when config.json is read."""
import json

import pytest
import torch
import transformers as tf
from transformers.activations import ACT2CLS

import nanolisa
from nanolisa.activations import ACTIVATIONS
from nanolisa.config import ModelConfig
from nanolisa.train_config import TrainConfig
from nanolisa.trainer import train
from tests.helpers import SMALL, randomize

FAMILIES = {  # family -> (transformers config with activation `act`, the family's default activation)
    "llama": (lambda act: tf.LlamaConfig(**SMALL, hidden_act=act), "silu"),
    "gpt2": (lambda act: tf.GPT2Config(vocab_size=101, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                       activation_function=act), "gelu_new"),
}


def test_every_parameter_free_activation_of_transformers_is_supported():
    """A name transformers runs and nanolisa refuses is a checkpoint nanolisa cannot fine-tune: list the gap."""
    with_parameters = {"prelu", "xielu"}  # learned parameters of their own, outside the checkpoint's MLP
    assert set(ACT2CLS) - with_parameters <= set(ACTIVATIONS)


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_logits_match_transformers_for_every_activation(family, act, tmp_path):
    if act not in ACT2CLS:
        pytest.skip(f"this transformers has no {act}")
    make_config, default = FAMILIES[family]
    torch.manual_seed(0)
    hf = tf.AutoModelForCausalLM.from_config(make_config(act)).eval()
    randomize(hf)
    hf.save_pretrained(tmp_path)
    ours = nanolisa.load_model(str(tmp_path)).eval()
    assert ours.config.hidden_act == act
    ids = torch.randint(0, 101, (2, 24))
    with torch.no_grad():
        want, got = hf(ids).logits, ours(ids)
    assert (want - got).abs().max().item() <= 1e-4
    if ACTIVATIONS[act] is not ACTIVATIONS[default]:  # the test can fail: the old hard-coded default would
        for block in ours.blocks:
            setattr(block.mlp, "act_fn" if family == "llama" else "act", ACTIVATIONS[default])
        with torch.no_grad():
            assert (want - ours(ids)).abs().max().item() > 1e-3


def test_a_fine_tuned_gelu_llama_is_saved_as_gelu_and_matches_transformers(tmp_path):
    _, tok = nanolisa.load_pretrained("tiny")
    cfg = ModelConfig.from_hf(dict(model_type="llama", vocab_size=tok.vocab_size, hidden_size=32,
                                   intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, hidden_act="gelu"))
    torch.manual_seed(0)
    model = nanolisa.build_model(cfg)
    model.init_weights()
    nanolisa.save_pretrained(model, tok, str(tmp_path / "base"))
    out = tmp_path / "out"
    train(TrainConfig(model=str(tmp_path / "base"), out=str(out), method="full", steps=2, batch_size=4, seq_len=64,
                      eval_every=0, plot=False, quiet=True))
    assert json.loads((out / "config.json").read_text())["hidden_act"] == "gelu"
    hf = tf.AutoModelForCausalLM.from_pretrained(out).eval()
    ours = nanolisa.load_model(str(out)).eval()
    ids = torch.randint(0, cfg.vocab_size, (1, 16))
    with torch.no_grad():
        assert torch.allclose(ours(ids), hf(ids).logits, atol=1e-4)


@pytest.mark.parametrize("config, message", [
    ({**SMALL, "model_type": "llama", "hidden_act": "swiglu"}, "hidden_act 'swiglu' is not supported: use one of silu"),
    ({**SMALL, "model_type": "qwen2", "hidden_act": "prelu"}, "hidden_act 'prelu' is not supported"),
    ({**SMALL, "model_type": "mistral", "hidden_act": 3}, "hidden_act must be a string, got 3"),
    ({"model_type": "gpt2", "activation_function": "gelu_old"}, "activation_function 'gelu_old' is not supported"),
])
def test_unknown_activation_is_refused(config, message):
    with pytest.raises(nanolisa.UserError, match=message):
        ModelConfig.from_hf(config)
