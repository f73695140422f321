"""Tokenizer parity: nanolisa.tokenizer must give the ids and text transformers.AutoTokenizer gives, and for a
bare SentencePiece model (tokenizer.model, no tokenizer.json) the ids sentencepiece itself gives.

The tokenizers checked: a BPE tokenizer.json trained here with `tokenizers`, SentencePiece models trained
here (a Llama-2 style BPE tokenizer.model, one with whitespace-only pieces as code models have, and a
Unigram one with NFKC normalization and extra-whitespace removal), and the tiny tokenizer shipped in
nanolisa/assets/tiny. All built offline in well under a second each.
"""
import json
import os

import pytest

from nanolisa.errors import UserError
from nanolisa.tokenizer import TINY_DIR, TOKENIZER_FILES, build_tiny_tokenizer, load_tokenizer
from tests.helpers import CHATML, CORPUS, train_sentencepiece

transformers = pytest.importorskip("transformers")

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


# Text where sentencepiece and a converted tokenizer can part: runs of spaces, leading spaces, tabs,
# newlines, digits (split one by one), characters outside the vocabulary (byte fallback), NFKC-foldable
# characters, combining marks, a literal "▁" (sentencepiece's own space symbol).
ADVERSARIAL = [
    "Hello world", " Hello  world ", "  lead", " lead", "    ", " ", "\t", "\n", "a  b", "a   b     c", "x\t\ty",
    "\tx", "\n\nx", "line\n\nnext", "trail  ", "12345 678", " 42", "  007", "héllo 世界 🙂", "e\u0301 ﬁ ① ｆ",
    "\u3000x \u3000", "a ▁ b", "▁▁x", "", "def  f():\n    return  1\n", "  \n  \t  ", "The quick brown fox.",
]


def fuzz_texts(n=400, seed=0):
    import random
    rng = random.Random(seed)
    alphabet = [" ", " ", " ", "\t", "\n", "a", "The", "fox", "1", "23", "é", "世", "🙂", "▁", "ﬁ", "\u3000"]
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12))) for _ in range(n)]


@pytest.fixture(scope="module", params=["llama-bpe", "whitespace-bpe", "nfkc-unigram"])
def sp_models(request, sp_dir, tmp_path_factory):
    """Bare SentencePiece models (no tokenizer.json, no tokenizer_config.json unless Llama's)."""
    if request.param == "llama-bpe":
        return sp_dir
    d = tmp_path_factory.mktemp(request.param)
    code = [" " * (i % 9) + "def  fox(the):\treturn  1" + " " * (i % 3) for i in range(60)]
    if request.param == "whitespace-bpe":  # runs of spaces become pieces ("▁▁", "▁▁▁▁", ...), as in code models
        return train_sentencepiece(d, CORPUS * 10 + code, vocab_size=380, model_type="bpe", byte_fallback=True,
                                   normalization_rule_name="identity", remove_extra_whitespaces=False,
                                   allow_whitespace_only_pieces=True, split_digits=True, character_coverage=1.0)
    return train_sentencepiece(d, CORPUS * 10 + code + ["ﬁne ① ｆｕｌｌ"] * 5, vocab_size=340, model_type="unigram",
                               byte_fallback=True, character_coverage=0.9995)  # nmt_nfkc, remove_extra_whitespaces


@pytest.mark.parametrize("legacy", [False, True])
def test_sentencepiece_model_encodes_as_sentencepiece(sp_models, legacy, tmp_path):
    """A bare tokenizer.model gives sentencepiece's own ids and text, leading spaces and runs of spaces
    included (transformers' conversion drops the space a leading space gets in front of it)."""
    import shutil

    spm = pytest.importorskip("sentencepiece")
    shutil.copy(os.path.join(sp_models, "tokenizer.model"), tmp_path / "tokenizer.model")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"legacy": legacy, "add_bos_token": True}))
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    ours = load_tokenizer(str(tmp_path))
    assert ours.sp_model_path is not None
    for text in ADVERSARIAL + fuzz_texts():
        ids = ours.encode(text, add_special_tokens=False)
        assert ids == sp.encode(text), (text, [sp.id_to_piece(i) for i in ids], sp.encode(text, out_type=str))
        assert ours.encode(text) == [sp.bos_id()] + ids
        assert ours.decode(ids) == sp.decode(ids), text
    # after a special token the prefix space goes only with legacy: true (transformers' `legacy` flag)
    after = ours.encode("</s>fox", add_special_tokens=False)
    assert after[0] == ours.eos_token_id and (after[1:] == sp.encode("fox")) is legacy


def test_sentencepiece_model_matches_transformers_but_for_leading_spaces(sp_dir):
    """transformers converts a bare tokenizer.model to the same ids, except that a text starting with a space
    loses the prefix space sentencepiece puts before it."""
    ours, ref = _check_parity(sp_dir, [s for s in SAMPLES if not s.startswith(" ")])
    assert ours.encode("Hello")[0] == 1  # Llama-style: BOS prepended because add_bos_token is true
    assert ours.encode(" Hello") != ref.encode(" Hello")


def test_sentencepiece_add_eos_flag(sp_dir, tmp_path):
    """add_eos_token=true must append EOS, as transformers' update_post_processor does."""
    import shutil
    shutil.copy(os.path.join(sp_dir, "tokenizer.model"), tmp_path / "tokenizer.model")
    cfg = json.load(open(os.path.join(sp_dir, "tokenizer_config.json")))
    cfg.update(add_bos_token=False, add_eos_token=True)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours, _ = _check_parity(str(tmp_path), [SAMPLES[0], SAMPLES[2]])  # (no leading space: see above)
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


@pytest.fixture
def llama2_dir(sp_dir, tmp_path):
    """A Llama 2 / Mistral style directory: tokenizer.model AND tokenizer.json (what transformers made of it),
    plus every other file such a checkpoint may carry."""
    import shutil
    d = tmp_path / "llama2"
    d.mkdir()
    shutil.copy(os.path.join(sp_dir, "tokenizer.model"), d / "tokenizer.model")
    cfg = json.load(open(os.path.join(sp_dir, "tokenizer_config.json")))
    transformers.AutoTokenizer.from_pretrained(sp_dir).backend_tokenizer.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "tokenizer_class": "LlamaTokenizerFast"}, indent=1))
    (d / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>"}))
    (d / "added_tokens.json").write_text("{}")
    (d / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    (d / "chat_template.jinja").write_text(CHATML)
    return str(d)


@pytest.mark.parametrize("which", ["bpe", "sp", "llama2", "tiny"])
def test_save_copies_every_tokenizer_file(which, bpe_dir, sp_dir, llama2_dir, tmp_path):
    """A loaded tokenizer saves as its directory's files, byte for byte: every tool (transformers fast and
    slow, llama.cpp's converter) loads the output exactly as it loads the base."""
    src = {"bpe": bpe_dir, "sp": sp_dir, "llama2": llama2_dir, "tiny": TINY_DIR}[which]
    ours = load_tokenizer(src)
    out = tmp_path / "saved"
    ours.save(str(out))
    files = [f for f in TOKENIZER_FILES if os.path.exists(os.path.join(src, f))]
    assert sorted(os.listdir(out)) == sorted(files)
    for f in files:
        assert (out / f).read_bytes() == open(os.path.join(src, f), "rb").read(), f
    again, ref, ref_src = load_tokenizer(str(out)), transformers.AutoTokenizer.from_pretrained(str(out)), \
        transformers.AutoTokenizer.from_pretrained(src)
    for s in SAMPLES:
        assert ours.encode(s) == again.encode(s) and ref.encode(s) == ref_src.encode(s), s
    assert again.chat_template == ours.chat_template == ref.chat_template
    if which in ("sp", "llama2"):  # the slow (sentencepiece) tokenizer needs tokenizer.model: it is there
        slow = transformers.AutoTokenizer.from_pretrained(str(out), use_fast=False)
        assert slow.encode("Hello world") == ref_src.encode("Hello world")


@pytest.mark.parametrize("which", ["bpe", "sp", "tiny"])
def test_a_changed_chat_template_is_written(which, bpe_dir, sp_dir, tmp_path):
    src = {"bpe": bpe_dir, "sp": sp_dir, "tiny": TINY_DIR}[which]
    ours = load_tokenizer(src)
    for template in ("{{ messages[0]['content'] }}", None):
        ours.chat_template = template
        out = tmp_path / str(template is None)
        ours.save(str(out))
        assert load_tokenizer(str(out)).chat_template == template
        assert transformers.AutoTokenizer.from_pretrained(str(out)).chat_template == template
        assert (out / "tokenizer.json").exists() == (which != "sp")  # still the copied files


@pytest.mark.parametrize("which", ["bpe", "sp", "tiny"])
def test_a_tokenizer_changed_in_memory_is_saved_as_it_is(which, bpe_dir, sp_dir, tmp_path):
    """Tokens added after loading: the pipeline itself is written (tokenizer.json), and transformers loads
    it to the same ids (for a SentencePiece model that is nanolisa's exact-sentencepiece pipeline)."""
    from tokenizers import AddedToken
    src = {"bpe": bpe_dir, "sp": sp_dir, "tiny": TINY_DIR}[which]
    ours = load_tokenizer(src)
    ours.backend.add_special_tokens([AddedToken("<|extra|>", special=True, normalized=False)])
    out = tmp_path / "saved"
    ours.save(str(out))
    assert (out / "tokenizer.json").exists() and (out / "special_tokens_map.json").exists()
    assert (out / "tokenizer.model").exists() == (which == "sp")
    ref = transformers.AutoTokenizer.from_pretrained(str(out))
    again = load_tokenizer(str(out))
    for s in SAMPLES + ["a<|extra|> b"]:
        assert ref.encode(s) == ours.encode(s) == again.encode(s), s
    assert again.chat_template == ours.chat_template == ref.chat_template


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
