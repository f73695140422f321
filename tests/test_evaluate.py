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


def test_choice_scores_match_transformers_loglik(pair, tmp_path):
    hf, model = pair
    path = tmp_path / "mc.jsonl"
    items = [{"question": "2+2?", "choices": ["3", "4", "22"], "answer": 1},
             {"question": "colour of sky", "choices": ["blue", "green"], "answer": "A"},
             {"question": "x", "choices": ["yes", "no", "maybe"], "answer": "maybe"}]
    path.write_text("\n".join(json.dumps(d) for d in items) + "\n")
    parsed = read_choice_file(str(path))
    assert [d["answer"] for d in parsed] == [1, 0, 2]
    got = score_choices(model, TOK, parsed, batch_size=2)
    # oracle: sum of transformers' log-probs of the choice tokens after the question prompt
    acc = acc_norm = 0
    for d in parsed:
        lps = []
        for c in d["choices"]:
            ctx = [TOK.bos_token_id] + TOK.encode(f"Question: {d['question']}\nAnswer:", add_special_tokens=False)
            cont = TOK.encode(" " + c, add_special_tokens=False)  # bytes: no merges across the boundary
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = hf(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
            lps.append(sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)))
        acc += max(range(len(lps)), key=lps.__getitem__) == d["answer"]
        norm = [lp / (len(c) + 1) for lp, c in zip(lps, d["choices"])]
        acc_norm += max(range(len(lps)), key=norm.__getitem__) == d["answer"]
    assert got == {"acc": acc / 3, "acc_norm": acc_norm / 3, "n": 3}


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
