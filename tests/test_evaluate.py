"""Evaluation: NLL parity with transformers' loss, padding independence, exact match, choice scoring."""
import json
import math

import pytest
import torch
import transformers

from nanolisa.pretrained import load_model
from nanolisa.errors import UserError
from nanolisa.evaluate import (continuation_example, example_nlls, exact_match, nll, perplexity,
                               read_choice_file, score_choices)
from nanolisa.generate import generate
from nanolisa.loss import IGNORE_INDEX
from nanolisa.tokenizer import load_tokenizer

TOK = load_tokenizer("tiny")
V = TOK.vocab_size


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request, tmp_path_factory):
    torch.manual_seed(0)
    if request.param == "llama":
        cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
        hf = transformers.LlamaForCausalLM(cfg)
    else:
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4,
                                                                  n_positions=128))
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.2)
    hf.eval()
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    return hf, load_model(str(d))


def _examples(n=7, seed=0):
    """Varied lengths; labels -100 on a random-length prompt, as a text2text / conversation example has."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        T = int(torch.randint(3, 40, (1,), generator=g))
        ids = torch.randint(0, V, (T,), generator=g).tolist()
        p = int(torch.randint(0, T - 1, (1,), generator=g))
        out.append((ids, [IGNORE_INDEX] * p + ids[p:]))
    out.append(([5], [5]))  # one token: nothing to predict, contributes 0 tokens
    return out


def test_nll_matches_transformers_loss(pair):
    hf, model = pair
    ex = _examples()
    total, n = nll(model, ex, batch_size=3)
    # transformers on a right-padded batch with an attention mask: .loss is the mean over loss tokens
    T = max(len(x) for x, _ in ex)
    ids = torch.zeros(len(ex), T, dtype=torch.long)
    labels = torch.full((len(ex), T), IGNORE_INDEX)
    mask = torch.zeros(len(ex), T, dtype=torch.long)
    for i, (x, y) in enumerate(ex):
        ids[i, :len(x)], labels[i, :len(y)], mask[i, :len(x)] = torch.tensor(x), torch.tensor(y), 1
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=mask, labels=labels).loss.item()
    assert n == int((labels[:, 1:] != IGNORE_INDEX).sum())
    assert total / n == pytest.approx(ref, rel=1e-5)
    assert perplexity(total, n) == pytest.approx(math.exp(ref), rel=1e-5)


def test_per_example_nll_independent_of_batching(pair):
    hf, model = pair
    ex = _examples(seed=1)
    one = example_nlls(model, ex, batch_size=1)
    many = example_nlls(model, ex, batch_size=8)
    for (a, na), (b, nb), (x, y) in zip(one, many, ex):
        assert na == nb
        assert a == pytest.approx(b, rel=1e-5, abs=1e-6)
        if na:  # and each equals transformers on that example alone
            with torch.no_grad():
                ref = hf(input_ids=torch.tensor([x]), labels=torch.tensor([y])).loss.item()
            assert a / na == pytest.approx(ref, rel=1e-5)


def test_nll_restores_train_mode_and_rejects_bad_batch(pair):
    _, model = pair
    model.train()
    nll(model, _examples(2), batch_size=2)
    assert model.training
    model.eval()
    with pytest.raises(UserError):
        nll(model, _examples(2), batch_size=0)


def test_exact_match_uses_greedy_replies(pair):
    _, model = pair
    prompts = [TOK.encode("abc"), TOK.encode("hello")]
    replies = [TOK.decode(generate(model, p, 5, stop_ids=TOK.stop_token_ids), skip_special_tokens=True)
               for p in prompts]
    targets = ["  " + replies[0] + "\n", replies[1] + "x"]  # first matches after strip, second does not
    correct, preds = exact_match(model, TOK, prompts, targets, max_new_tokens=5)
    assert preds == replies and correct == 1


def lm_eval_loglikelihood(hf, hf_tok, context: str, continuation: str) -> float:
    """The oracle: lm-evaluation-harness's HFLM loglikelihood of one request, step by step as its code does
    it (lm_eval/api/model.py _encode_pair, models/huggingface.py _loglikelihood_tokens), with transformers'
    own tokenizer and model."""
    n = len(context) - len(context.rstrip())
    if n:  # whitespace ending the context belongs to the continuation
        context, continuation = context[:-n], context[-n:] + continuation
    whole = hf_tok(context + continuation)["input_ids"]  # the tokenizer's default special tokens (BOS)
    ctx = hf_tok(context)["input_ids"]
    cont = whole[len(ctx):]
    inp = torch.tensor([(ctx + cont)[:-1]])
    with torch.no_grad():
        logp = hf(input_ids=inp).logits[0].float().log_softmax(-1)
    return sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont))


@pytest.mark.parametrize("prompt,delimiter", [(None, None), ("Q: {{question}} ({{subject}})\nA: ", "")])
def test_choice_scores_are_lm_evals_multiple_choice(pair, tmp_path, prompt, delimiter):
    """acc, acc_norm (by characters) and acc_bytes (by UTF-8 bytes) as lm-eval computes them from its
    loglikelihoods: the default ARC prompt, and a prompt of the user's (other fields of the line, a trailing
    space that moves to the continuation, no delimiter)."""
    import jinja2
    from nanolisa.presets import ASSETS
    hf, model = pair
    hf_tok = transformers.AutoTokenizer.from_pretrained(f"{ASSETS}/tiny")
    path = tmp_path / "mc.jsonl"
    items = [{"question": "2+2?", "choices": ["3", "4", "22"], "answer": 1, "subject": "math"},
             {"question": "colour of sky", "choices": ["blue", "grün", "größer als"], "answer": "A", "subject": "x"},
             {"question": "x", "choices": ["yes", "no", "maybe"], "answer": "maybe", "subject": "y"},
             {"question": "café?", "choices": ["é", "ee", "e"], "answer": 0, "subject": "ü"}]
    path.write_text("\n".join(json.dumps(d, ensure_ascii=False) for d in items) + "\n")
    parsed = read_choice_file(str(path))
    assert [d["answer"] for d in parsed] == [1, 0, 2, 0]
    kw = {} if prompt is None else dict(prompt=prompt, delimiter=delimiter)
    got = score_choices(model, TOK, parsed, batch_size=2, **kw)
    # lm-eval's doc_to_text: a jinja2 Environment with StrictUndefined and keep_trailing_newline
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)
    template = env.from_string(prompt or "Question: {{question}}\nAnswer:")
    hits = {"acc": 0, "acc_norm": 0, "acc_bytes": 0}
    for d in parsed:
        ctx = template.render(**d["fields"])
        lls = [lm_eval_loglikelihood(hf, hf_tok, ctx, (" " if delimiter is None else delimiter) + c)
               for c in d["choices"]]
        for name, length in (("acc", lambda c: 1), ("acc_norm", len), ("acc_bytes", lambda c: len(c.encode()))):
            scores = [ll / length(c) for ll, c in zip(lls, d["choices"])]
            hits[name] += max(range(len(scores)), key=scores.__getitem__) == d["answer"]
    assert got == {**{k: v / 4 for k, v in hits.items()}, "n": 4}


def test_choice_prompt_errors_are_one_line(tmp_path):
    path = tmp_path / "mc.jsonl"
    path.write_text(json.dumps({"question": "q", "choices": ["a", "b"], "answer": 0}) + "\n")
    items = read_choice_file(str(path))
    with pytest.raises(UserError, match="question 1: --choice-prompt cannot be rendered .*'subject' is undefined"):
        score_choices(None, TOK, items, prompt="{{subject}}: {{question}}", path=str(path))
    with pytest.raises(UserError, match="--choice-prompt does not parse"):
        score_choices(None, TOK, items, prompt="{{question", path=str(path))


def test_continuation_example_masks_context():
    ids, labels = continuation_example(TOK, "Q: a\nA:", " b")
    assert ids[0] == TOK.bos_token_id and TOK.decode(ids[1:]) == "Q: a\nA: b"
    assert labels == [IGNORE_INDEX] * (len(ids) - 2) + ids[-2:]


@pytest.mark.parametrize("line", ["not json", '{"question": "q", "choices": ["a"], "answer": 0}',
                                  '{"question": "q", "choices": ["a", "b"], "answer": 5}',
                                  '{"question": "q", "choices": ["a", "b"]}'])
def test_choice_file_errors(tmp_path, line):
    p = tmp_path / "bad.jsonl"
    p.write_text(line + "\n")
    with pytest.raises(UserError):
        read_choice_file(str(p))
    with pytest.raises(UserError):
        read_choice_file(str(tmp_path / "missing.jsonl"))
