"""Tokenizer parity: nanolisa.tokenizer must give the ids and text transformers.AutoTokenizer gives.

Three tokenizers are checked: a BPE tokenizer.json trained here with `tokenizers`, a SentencePiece BPE
model trained here (Llama-2 style tokenizer.model, converted the way transformers 5 converts it), and the
tiny tokenizer shipped in nanolisa/assets/tiny. All built offline in well under a second each.
"""
import json
import os

import pytest

from nanolisa.errors import UserError
from nanolisa.tokenizer import TINY_DIR, build_tiny_tokenizer, load_tokenizer

transformers = pytest.importorskip("transformers")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! How are you doing today?",
    "Large language models are trained on lots of text.",
    "Fine-tuning adapts a model to a task with a few examples.",
    "Numbers like 12 + 7 = 19 and 100 - 1 = 99 appear too.",
    "Reverse the string abc to get cba. Ünïcödé: 世界, emoji 🙂.",
]

SAMPLES = [
    "Hello world",
    " Hello  world ",
    "The lazy dog jumps over 12 foxes.\n\nNew paragraph\ttab",
    "héllo 世界 🙂 x",
    "<s>[INST] hi [/INST] ok </s><s>[INST] more",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "",
    "zzzz qqqq unseen-words!!",
]

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def bpe_dir(tmp_path_factory):
    """A byte-level BPE tokenizer.json trained on CORPUS, with a `<s> $A </s>` post-processor."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    d = tmp_path_factory.mktemp("bpe")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS * 5, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> $B </s>",
        special_tokens=[("<s>", tok.token_to_id("<s>")), ("</s>", tok.token_to_id("</s>"))])
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": {"__type": "AddedToken", "content": "<s>", "special": True},
        "eos_token": "</s>", "pad_token": "<pad>", "chat_template": CHATML}))
    return str(d)


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory):
    """A Llama-2 style SentencePiece BPE model (byte fallback, identity normalisation) + tokenizer_config."""
    spm = pytest.importorskip("sentencepiece")
    d = tmp_path_factory.mktemp("sp")
    corpus = d / "corpus.txt"
    corpus.write_text("\n".join(CORPUS * 10))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(d / "tokenizer"), vocab_size=420, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        split_digits=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2)
    os.remove(d / "tokenizer.vocab")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "add_eos_token": False,
        "bos_token": {"__type": "AddedToken", "content": "<s>"}, "eos_token": "</s>", "unk_token": "<unk>",
        "legacy": False}))
    return str(d)


def _check_parity(path, samples=SAMPLES):
    ours = load_tokenizer(path)
    ref = transformers.AutoTokenizer.from_pretrained(path)
    for s in samples:
        for special in (True, False):
            ids = ours.encode(s, add_special_tokens=special)
            assert ids == ref.encode(s, add_special_tokens=special), (path, s, special)
            for skip in (False, True):
                assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(ids, skip_special_tokens=skip), (s, skip)
    assert ours.bos_token_id == ref.bos_token_id
    assert ours.eos_token_id == ref.eos_token_id
    assert ours.pad_token_id == ref.pad_token_id
    assert ours.vocab_size == len(ref)
    return ours, ref


def test_bpe_tokenizer_json_matches_transformers(bpe_dir):
    ours, ref = _check_parity(bpe_dir)
    assert ours.encode("hi")[0] == ours.bos_token_id and ours.encode("hi")[-1] == ours.eos_token_id
    assert ours.chat_template == ref.chat_template
    assert ours.token_to_id("<|im_end|>") in ours.stop_token_ids


def test_sentencepiece_model_matches_transformers(sp_dir):
    ours, ref = _check_parity(sp_dir)
    assert ours.encode("Hello")[0] == 1  # Llama-style: BOS prepended because add_bos_token is true
    assert ours.sp_model_path is not None


def test_sentencepiece_add_eos_flag(sp_dir, tmp_path):
    """add_eos_token=true must append EOS, as transformers' update_post_processor does."""
    import shutil
    shutil.copy(os.path.join(sp_dir, "tokenizer.model"), tmp_path / "tokenizer.model")
    cfg = json.load(open(os.path.join(sp_dir, "tokenizer_config.json")))
    cfg.update(add_bos_token=False, add_eos_token=True)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours, _ = _check_parity(str(tmp_path), SAMPLES[:3])
    assert ours.encode("Hello")[-1] == ours.eos_token_id and ours.encode("Hello")[0] != ours.bos_token_id


def test_tiny_tokenizer_matches_transformers_and_round_trips():
    ours, ref = _check_parity(TINY_DIR)
    assert 256 < ours.vocab_size <= 512
    for s in ["abc 123 = 19", "ünï 世界 🙂 \t\n  x", "reverse: abc"]:
        ids = ours.encode(s, add_special_tokens=False)
        assert ours.decode(ids) == s
        assert ids == list(s.encode("utf-8"))  # one token per byte, id = byte value
    assert ours.encode("a") == [ours.bos_token_id, ord("a")]
    assert ours.token_to_id("<|im_end|>") in ours.stop_token_ids and ours.eos_token_id in ours.stop_token_ids
    assert ours.pad_token_id is not None
    # the shipped files are exactly what build_tiny_tokenizer() produces
    shipped = json.load(open(os.path.join(TINY_DIR, "tokenizer.json")))
    assert shipped == json.loads(build_tiny_tokenizer().to_str())
    m = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    assert "<|im_start|>assistant\nyo<|im_end|>" in ref.apply_chat_template(m, tokenize=False)


@pytest.mark.parametrize("which", ["bpe", "sp", "tiny"])
def test_save_then_autotokenizer_loads_same_ids(which, bpe_dir, sp_dir, tmp_path):
    src = {"bpe": bpe_dir, "sp": sp_dir, "tiny": TINY_DIR}[which]
    ours = load_tokenizer(src)
    out = tmp_path / "saved"
    ours.save(str(out))
    assert (out / "tokenizer.json").exists() and (out / "special_tokens_map.json").exists()
    if which == "sp":
        assert (out / "tokenizer.model").exists()
    ref = transformers.AutoTokenizer.from_pretrained(str(out))
    again = load_tokenizer(str(out))
    for s in SAMPLES:
        assert ref.encode(s) == ours.encode(s) == again.encode(s), s
    assert again.chat_template == ours.chat_template
    assert ref.chat_template == ours.chat_template


def test_chat_template_from_jinja_file_and_generation_config(bpe_dir, tmp_path):
    import shutil
    for f in os.listdir(bpe_dir):
        shutil.copy(os.path.join(bpe_dir, f), tmp_path / f)
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}")
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 4]}))
    tok = load_tokenizer(str(tmp_path))
    assert tok.chat_template == "{{ messages[0]['content'] }}"
    assert 4 in tok.stop_token_ids and 2 in tok.stop_token_ids


def test_missing_tokenizer_files_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=str(tmp_path)):
        load_tokenizer(str(tmp_path))
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer(str(tmp_path / "nope"))
