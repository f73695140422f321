"""What train.py writes, for every method: the base's tokenizer files (all of them, byte for byte), weights in
the base's dtype, permissions from the umask, and the chat template the model was trained with."""
import json
import os
import shutil
import stat

import pytest
import torch
import transformers as tf
from safetensors import safe_open

import nanolisa
from nanolisa.tokenizer import TOKENIZER_FILES, load_tokenizer
from nanolisa.train_config import TrainConfig
from nanolisa.trainer import train
from tests.helpers import CHATML, CORPUS, train_sentencepiece

QUICK = dict(steps=2, batch_size=4, seq_len=48, eval_every=0, save_every=0, plot=False, quiet=True)


@pytest.fixture(scope="module")
def llama2_base(tmp_path_factory):
    """A Llama 2 style base: tokenizer.model and tokenizer.json, their configs, added_tokens.json,
    generation_config.json and a chat template in chat_template.jinja; weights in bf16."""
    d = tmp_path_factory.mktemp("llama2")
    sp = tmp_path_factory.mktemp("sp")
    train_sentencepiece(sp, CORPUS * 10, vocab_size=420, model_type="bpe", byte_fallback=True,
                        normalization_rule_name="identity", remove_extra_whitespaces=False, split_digits=True,
                        character_coverage=1.0)
    shutil.copy(sp / "tokenizer.model", d / "tokenizer.model")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>",
        "eos_token": "</s>", "unk_token": "<unk>", "legacy": False}, indent=2))
    fast = tf.AutoTokenizer.from_pretrained(str(d))
    fast.backend_tokenizer.save(str(d / "tokenizer.json"))
    (d / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    (d / "added_tokens.json").write_text("{}\n")
    (d / "chat_template.jinja").write_text(CHATML)
    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=len(fast), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)
    tf.AutoModelForCausalLM.from_config(cfg).to(torch.bfloat16).save_pretrained(d)
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}, indent=2))
    return str(d)


def tokenizer_files(d):
    return {f for f in TOKENIZER_FILES if os.path.isfile(os.path.join(d, f))}


def weight_dtypes(path):
    with safe_open(path, "pt") as f:
        return {f.get_slice(k).get_dtype() for k in f.keys()}


@pytest.mark.parametrize("method", ["lisa", "full", "lora"])
def test_every_tokenizer_file_of_the_base_is_in_the_output(llama2_base, tmp_path, method):
    out = tmp_path / "out"
    train(TrainConfig(model=llama2_base, out=str(out), method=method, merge=method == "lora", **QUICK))
    base_files = tokenizer_files(llama2_base)
    assert {"tokenizer.model", "tokenizer.json", "added_tokens.json", "chat_template.jinja"} <= base_files
    for d in [out] + ([out / "merged"] if method == "lora" else []):
        assert tokenizer_files(d) == base_files, d
        for f in base_files - {"generation_config.json"}:  # the model's own generation config is rewritten
            assert (d / f).read_bytes() == open(os.path.join(llama2_base, f), "rb").read(), (d, f)
        assert json.load(open(d / "generation_config.json")) == json.load(open(f"{llama2_base}/generation_config.json"))
        # transformers' slow tokenizer needs tokenizer.model; peft users load the tokenizer from the adapter
        slow = tf.AutoTokenizer.from_pretrained(str(d), use_fast=False)
        assert slow.encode("Hello world") == tf.AutoTokenizer.from_pretrained(llama2_base).encode("Hello world")
        assert load_tokenizer(str(d)).chat_template == CHATML


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_bf16_base_is_saved_in_bf16_unless_told(llama2_base, tmp_path, method):
    out = tmp_path / "out"
    train(TrainConfig(model=llama2_base, out=str(out), method=method, merge=method == "lora", **QUICK))
    model_dir = out / "merged" if method == "lora" else out
    assert weight_dtypes(model_dir / "model.safetensors") == {"BF16"}
    assert json.load(open(model_dir / "config.json"))["torch_dtype"] == "bfloat16"
    if method == "lora":  # the adapter stays fp32, as peft keeps adapters
        assert weight_dtypes(out / "adapter_model.safetensors") == {"F32"}
    again = tmp_path / "fp32"
    train(TrainConfig(model=llama2_base, out=str(again), method=method, merge=method == "lora", save_dtype="fp32",
                      **QUICK))
    assert weight_dtypes((again / "merged" if method == "lora" else again) / "model.safetensors") == {"F32"}
    assert nanolisa.load_model(str(again / "merged" if method == "lora" else again)).lm_head.weight.dtype == \
        torch.float32


@pytest.mark.parametrize("umask", [0o022, 0o077])
@pytest.mark.parametrize("method", ["lisa", "lora"])
def test_output_permissions_follow_the_umask(tmp_path, umask, method):
    """Every directory and file of the output (the merged model's too) gets what the umask gives a new one:
    nothing is left 0700/0600 by temporary files, so a serving container running as another user reads it."""
    out = tmp_path / "out"
    old = os.umask(umask)
    try:
        train(TrainConfig(out=str(out), method=method, merge=method == "lora", **QUICK))
    finally:
        os.umask(old)
    paths = [str(out)] + [os.path.join(r, n) for r, ds, fs in os.walk(out) for n in ds + fs]
    assert any(p.endswith("merged") for p in paths) == (method == "lora")
    for p in paths:
        mode = stat.S_IMODE(os.stat(p).st_mode)
        want = (0o777 if os.path.isdir(p) else 0o666) & ~umask
        assert mode == want, (p, oct(mode), oct(want))


@pytest.mark.parametrize("data,template,kept", [("demo", None, False), ("demo:conversation", None, True),
                                                ("demo", "llama3", True)])
def test_the_result_carries_the_chat_template_it_was_trained_with(tmp_path, data, template, kept):
    """The tiny preset starts from random weights: trained on text2text (the demo) its result has no chat
    template, so chat.py talks to it in completion mode; trained on conversations it keeps ChatML; a
    --template given is the result's template."""
    out = tmp_path / "out"
    train(TrainConfig(out=str(out), data=data, template=template, **QUICK))
    tok = nanolisa.load_pretrained(str(out))[1]
    from nanolisa.templates import PRESETS
    expected = PRESETS[template] if template else nanolisa.load_pretrained("tiny")[1].chat_template
    assert tok.chat_template == (expected if kept else None)
    assert tf.AutoTokenizer.from_pretrained(str(out)).chat_template == tok.chat_template
