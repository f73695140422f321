"""Generation: greedy parity with transformers' generate (with and without KV cache), cache reuse across
chat turns, reproducible sampling, and the logits processors against transformers' LogitsProcessors."""
import pytest
import torch
import transformers

from nanolisa.pretrained import load_model
from nanolisa.errors import UserError
from nanolisa.generate import (Decoder, Sampling, TextStream, generate, greedy_batch, next_token,
                               repetition_penalty, top_k_filter, top_p_filter)

V = 96


def _hf_llama():
    cfg = transformers.LlamaConfig(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                   bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM(cfg)


def _hf_gpt2():
    cfg = transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                                  bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return transformers.GPT2LMHeadModel(cfg)


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def pair(request, tmp_path_factory):
    """(hf_model, nanolisa_model): the same random weights, through a saved checkpoint."""
    torch.manual_seed(0)
    hf = _hf_llama() if request.param == "llama" else _hf_gpt2()
    # Larger random weights than the 0.02 default, so greedy output is not one token repeated forever.
    with torch.no_grad():
        for p in hf.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.3)
    hf.eval()
    d = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(d)
    return hf, load_model(str(d))


def _hf_greedy(hf, prompt, n, use_cache, eos):
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False, use_cache=use_cache,
                      eos_token_id=eos, pad_token_id=0, attention_mask=torch.ones(1, len(prompt), dtype=torch.long))
    return out[0, len(prompt):].tolist()


PROMPT = [1, 17, 42, 5, 88, 23, 9]


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_matches_transformers(pair, use_cache):
    hf, model = pair
    ref = _hf_greedy(hf, PROMPT, 24, use_cache, eos=V + 10)  # an eos id that can never appear: run to the limit
    assert len(set(ref)) > 3, "degenerate reference: make the random model more varied"
    assert generate(model, PROMPT, 24, use_cache=use_cache) == ref


def test_greedy_stops_at_eos_like_transformers(pair):
    hf, model = pair
    free = _hf_greedy(hf, PROMPT, 24, True, eos=V + 10)
    eos = free[5]  # a token greedy decoding produces: it must stop the first time it appears
    ref = _hf_greedy(hf, PROMPT, 24, True, eos=eos)
    assert ref[-1] == eos  # transformers keeps the EOS in its output; we stop before yielding it
    assert generate(model, PROMPT, 24, stop_ids=[eos]) == ref[:-1]
    assert generate(model, PROMPT, 24, stop_ids=[eos], use_cache=False) == ref[:-1]


def test_cache_equals_no_cache_sampled(pair):
    _, model = pair
    s = Sampling(temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.3)
    a = generate(model, PROMPT, 20, s, seed=3, use_cache=True)
    b = generate(model, PROMPT, 20, s, seed=3, use_cache=False)
    assert a == b


def test_sampling_reproducible_with_seed(pair):
    _, model = pair
    s = Sampling(temperature=1.5)
    a = generate(model, PROMPT, 20, s, seed=7)
    assert a == generate(model, PROMPT, 20, s, seed=7)
    others = [generate(model, PROMPT, 20, s, seed=k) for k in (8, 9, 10)]
    assert any(o != a for o in others)


def test_sampling_matches_transformers_given_the_same_rng(pair):
    """Same processors in the same order, and one multinomial draw per step from the same RNG stream."""
    hf, model = pair
    s = Sampling(temperature=0.8, top_k=30, top_p=0.85, repetition_penalty=1.2)
    torch.manual_seed(11)
    ref = hf.generate(torch.tensor([PROMPT]), max_new_tokens=16, do_sample=True, temperature=0.8, top_k=30,
                      top_p=0.85, repetition_penalty=1.2, eos_token_id=V + 10, pad_token_id=0,
                      attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long))[0, len(PROMPT):].tolist()
    assert generate(model, PROMPT, 16, s, seed=11) == ref


def test_decoder_reuses_cached_prefix(pair):
    """A second turn whose prompt extends the first conversation gives what a fresh decoder gives."""
    _, model = pair
    dec = Decoder(model)
    reply = list(dec.stream(PROMPT, 6))
    turn2 = PROMPT + reply + [3, 44, 61]
    cached_before = len(dec.cached)
    assert dec.cached == (PROMPT + reply)[:cached_before]
    a = list(dec.stream(turn2, 8))
    assert a == generate(model, turn2, 8)
    # a prompt that diverges early (after /reset, or an edited history) must not reuse stale positions
    b = list(dec.stream([1, 60, 61, 62], 8))
    assert b == generate(model, [1, 60, 61, 62], 8)


def test_cache_grows(pair):
    _, model = pair
    dec = Decoder(model)
    list(dec.stream(PROMPT, 2))  # a small cache
    long_prompt = PROMPT + list(range(10, 50))
    assert list(dec.stream(long_prompt, 10)) == generate(model, long_prompt, 10, use_cache=False)


def test_context_limit(pair):
    _, model = pair
    with pytest.raises(UserError):
        generate(model, [5] * 128, 4)
    assert len(generate(model, [5] * 120, 50, stop_ids=[])) == 8  # capped at the context of 128


def test_greedy_batch_rows_equal_single_generation(pair):
    _, model = pair
    g = torch.Generator().manual_seed(4)
    prompts = torch.randint(3, V, (5, 9), generator=g).tolist()
    single = [generate(model, p, 16) for p in prompts]
    stop = single[0][4]  # stops row 0 early (and any row that produces it), the others run on
    expected = [generate(model, p, 16, stop_ids=[stop]) for p in prompts]
    assert greedy_batch(model, prompts, 16, stop_ids=[stop]) == expected
    assert greedy_batch(model, prompts, 16) == single
    with pytest.raises(ValueError):
        greedy_batch(model, [[1, 2], [1, 2, 3]], 4)


# ---- logits processors vs transformers -------------------------------------------------------------------

def _scores():
    g = torch.Generator().manual_seed(0)
    return torch.randn(3, 50, generator=g) * 3, torch.randint(0, 50, (3, 12), generator=g)


@pytest.mark.parametrize("penalty", [1.3, 0.7])
def test_repetition_penalty_vs_transformers(penalty):
    scores, ids = _scores()
    ref = transformers.RepetitionPenaltyLogitsProcessor(penalty)(ids, scores.clone())
    torch.testing.assert_close(repetition_penalty(scores, ids, penalty), ref, rtol=0, atol=0)


@pytest.mark.parametrize("k", [1, 5, 49, 50, 80])
def test_top_k_vs_transformers(k):
    scores, ids = _scores()
    ref = transformers.TopKLogitsWarper(k)(ids, scores.clone())
    torch.testing.assert_close(top_k_filter(scores, k), ref, rtol=0, atol=0)


@pytest.mark.parametrize("p", [0.01, 0.3, 0.9, 0.999])
def test_top_p_vs_transformers(p):
    scores, ids = _scores()
    ref = transformers.TopPLogitsWarper(p)(ids, scores.clone())
    torch.testing.assert_close(top_p_filter(scores, p), ref, rtol=0, atol=0)


def test_greedy_next_token_is_argmax_after_penalty():
    scores, ids = _scores()
    s = Sampling(repetition_penalty=1.5)
    expected = transformers.RepetitionPenaltyLogitsProcessor(1.5)(ids, scores.clone()).argmax(-1)
    assert torch.equal(next_token(scores, ids, s), expected)


def test_sampling_flag_checks():
    for bad in (Sampling(temperature=-1), Sampling(top_p=0), Sampling(top_p=1.5), Sampling(top_k=-2),
                Sampling(repetition_penalty=0)):
        with pytest.raises(UserError):
            bad.check()


def test_text_stream_holds_back_partial_utf8():
    class ByteTok:  # ids are bytes
        def decode(self, ids, skip_special_tokens=False):
            return bytes(ids).decode("utf-8", errors="replace")
    ts = TextStream(ByteTok())
    pieces = [ts.push(b) for b in "aé€b".encode()]
    assert "".join(pieces) + ts.flush() == "aé€b"
    assert "\ufffd" not in "".join(pieces)
