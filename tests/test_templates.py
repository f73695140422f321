"""Chat templates and loss masks.

For every preset (and a custom Jinja template) a 3-turn conversation with a system prompt is tokenized, and
the labelled tokens are decoded run by run: each run must be exactly one assistant reply followed by the
end-of-turn marker its model family writes (and nothing of the system/user text or the assistant header).
Rendering is checked against transformers' apply_chat_template, and the masks against transformers'
own `{% generation %}` assistant masks.
"""
import json
import os

import pytest

from nanolisa.errors import UserError
from nanolisa.templates import PRESETS, render_chat, tokenize_chat
from nanolisa.tokenizer import TINY_DIR, load_tokenizer

transformers = pytest.importorskip("transformers")

SYSTEM = "You are terse."
TURNS = [("What is 12+7?", "19"),
         ("Reverse: abc. Say assistant or user!", "cba, said the assistant."),
         ("Unicode? 世界", "Oui: ünï 🙂\nsecond line")]


def conversation(system=True):
    msgs = [{"role": "system", "content": SYSTEM}] if system else []
    for u, a in TURNS:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    return msgs


# What each family writes after an assistant reply to close the turn (the tiny tokenizer's EOS is </s>).
END_OF_TURN = {"llama2": " </s>", "llama3": "<|eot_id|>", "chatml": "<|im_end|>", "qwen2": "<|im_end|>",
               "phi3": "<|end|>", "gemma": "<end_of_turn>", "zephyr": "</s>", "deepseek": "</s>",
               "yi1_5": "<|im_end|>", "internlm2": "<|im_end|>", "mistral": "</s>", "empty": ""}
# Turn markers made single special tokens in the "with_specials" tokenizer (as in the real models).
MARKERS = ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<|end|>", "<|user|>", "<|assistant|>",
           "<|system|>", "<start_of_turn>", "<end_of_turn>"]


def labelled_runs(ids, labels):
    """Runs of consecutive labelled token ids (checks each label equals its input id)."""
    runs, cur = [], []
    for i, l in zip(ids, labels):
        if l != -100:
            assert l == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return runs


@pytest.fixture(params=["bytes", "with_specials"])
def tok(request):
    t = load_tokenizer(TINY_DIR)
    if request.param == "with_specials":
        from tokenizers import AddedToken
        t.backend.add_special_tokens([AddedToken(m, special=True, normalized=False) for m in MARKERS])
    return t


def test_every_family_has_a_preset():
    assert set(PRESETS) == set(END_OF_TURN)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_masks_exactly_assistant_replies_and_end_of_turn(name, tok):
    msgs = conversation()
    ids, labels = tokenize_chat(msgs, tok, template=name)
    assert len(ids) == len(labels)
    runs = labelled_runs(ids, labels)
    expected = [a + END_OF_TURN[name] for _, a in TURNS]
    assert [tok.decode(r) for r in runs] == expected
    # every unlabelled token is prompt: decoding them gives back the rest of the text, no reply inside
    text = render_chat(msgs, tok, template=name)
    assert tok.decode(ids) == text
    assert ids == tok.encode(text, add_special_tokens=False)
    # train_on_prompt: everything is a target
    ids2, labels2 = tokenize_chat(msgs, tok, template=name, train_on_prompt=True)
    assert ids2 == ids and labels2 == ids


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_render_matches_transformers_apply_chat_template(name, tmp_path):
    src = PRESETS[name]
    cfg = json.load(open(os.path.join(TINY_DIR, "tokenizer_config.json")))
    cfg["chat_template"] = src
    for f in ("tokenizer.json", "special_tokens_map.json"):
        (tmp_path / f).write_text(open(os.path.join(TINY_DIR, f)).read())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    ours, ref = load_tokenizer(str(tmp_path)), transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    msgs = conversation()
    for gen in (False, True):
        prompt = msgs[:-1] if gen else msgs
        assert render_chat(prompt, ours, add_generation_prompt=gen) == \
            ref.apply_chat_template(prompt, tokenize=False, add_generation_prompt=gen)
    assert tokenize_chat(msgs, ours)[0] == ref.encode(ref.apply_chat_template(msgs, tokenize=False),
                                                       add_special_tokens=False)


# A custom template that marks the assistant's target with {% generation %}: transformers then computes
# its own assistant mask, an independent oracle for ours.
CUSTOM = ("{{ bos_token }}{% for m in messages %}"
          "{% if m['role'] == 'assistant' %}{{ '### Assistant:\n' }}{% generation %}{{ m['content'] | trim + eos_token }}{% endgeneration %}{{ '\n\n' }}"
          "{% else %}{{ '### ' + m['role'] | capitalize + ':\n' + m['content'] | trim + '\n\n' }}{% endif %}"
          "{% endfor %}{% if add_generation_prompt %}{{ '### Assistant:\n' }}{% endif %}")


def test_custom_template_mask_matches_transformers_generation_mask(tok, tmp_path):
    tok.save(str(tmp_path))
    ref = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    msgs = conversation()
    ids, labels = tokenize_chat(msgs, tok, template=CUSTOM)
    out = ref.apply_chat_template(msgs, chat_template=CUSTOM, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    assert out["input_ids"] == ids
    assert out["assistant_masks"] == [int(l != -100) for l in labels]
    assert [tok.decode(r) for r in labelled_runs(ids, labels)] == [a + "</s>" for _, a in TURNS]


def test_model_own_template_is_the_default(tok):
    msgs = conversation()
    assert tokenize_chat(msgs, tok) == tokenize_chat(msgs, tok, template="chatml")
    runs = labelled_runs(*tokenize_chat(msgs, tok))
    assert [tok.decode(r) for r in runs] == [a + "<|im_end|>" for _, a in TURNS]


def test_stripped_content_and_sentencepiece_offsets(tmp_path):
    """llama2 strips contents; a SentencePiece tokenizer's "▁" tokens carry the space before a reply."""
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"{u} {a} [INST] [/INST] <<SYS>>" for u, a in TURNS * 20))
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=330, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, character_coverage=1.0, minloglevel=2)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "add_bos_token": True, "legacy": False}))
    tok = load_tokenizer(str(tmp_path))
    msgs = conversation()
    msgs[2]["content"] = "  " + msgs[2]["content"] + " \n"
    ids, labels = tokenize_chat(msgs, tok, template="llama2")
    runs = labelled_runs(ids, labels)
    assert [tok.decode(r).strip() for r in runs] == [a.strip() + " </s>" for _, a in TURNS]
    assert sum(i == tok.bos_token_id for i in ids) == 3 and all(l != tok.bos_token_id for l in labels)


def test_errors_are_user_errors(tok):
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(UserError, match="alternate"):
        tokenize_chat(bad, tok, template="llama2")
    with pytest.raises(UserError, match="unknown chat template"):
        tokenize_chat(conversation(), tok, template="nope")
    with pytest.raises(UserError, match="does not parse"):
        render_chat(conversation(), tok, template="{% for %}")
    with pytest.raises(UserError, match="Boom"):
        render_chat(conversation(), tok, template="{{ raise_exception('Boom') }}")


def test_sandbox_blocks_python_internals(tok):
    with pytest.raises(UserError, match="unsafe"):
        render_chat(conversation(), tok, template="{{ messages.__class__.__mro__[1].__subclasses__() }}")
