"""kernels/ against the PyTorch reference in nanolisa/model.py and nanolisa/loss.py: outputs and gradients.

The Triton kernels run on CPU in Triton's interpreter: TRITON_INTERPRET=1 is set while the kernel modules are
imported (@triton.jit reads it when a kernel is defined) and during this file's tests (nanolisa.kernels reads
it when choosing), and not otherwise, so other tests' subprocesses do not inherit it. Shapes are small: the
interpreter runs every program of a kernel in Python. Low-precision kernels are held to the flash-attention
test rule: their error against an fp32 computation may be at most twice the error of the PyTorch reference run
in the same low precision (plus a small floor).
"""
import copy
import os
import subprocess
import sys

_interpret_before = os.environ.get("TRITON_INTERPRET")
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import nanolisa  # noqa: E402
from nanolisa.adamw import AdamW  # noqa: E402
from nanolisa.config import ModelConfig  # noqa: E402
from nanolisa.kernels import resolve, use_kernels  # noqa: E402
from nanolisa.kernels.linear_cross_entropy import TORCH_ROWS, HeadLoss, linear_cross_entropy  # noqa: E402
from nanolisa.loss import IGNORE_INDEX, next_token_nll  # noqa: E402
from nanolisa.model import AttentionMask, RMSNorm, build_model, sdpa_attention  # noqa: E402
from tests.helpers import run_script  # noqa: E402

triton = pytest.importorskip("triton", reason="the Triton kernel tests need triton (pip install triton)")

from nanolisa.kernels.flash_attention import flash_attention  # noqa: E402
from nanolisa.kernels.rmsnorm import TritonRMSNorm  # noqa: E402
from nanolisa.kernels.triton_linear_cross_entropy import TRITON_ROWS  # noqa: E402

if _interpret_before is None:
    del os.environ["TRITON_INTERPRET"]
else:
    os.environ["TRITON_INTERPRET"] = _interpret_before

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LOW = (torch.float16, torch.bfloat16)


@pytest.fixture(autouse=True)
def triton_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def max_err(a, b) -> float:
    return (a.float() - b.float()).abs().max().item()


def check(got, ref, gold, dtype, tol=1e-5):
    """got (the kernel) and ref (PyTorch) in `dtype`, gold in fp32: equal, or no worse than ref in low precision."""
    if dtype in LOW:
        assert max_err(got, gold) <= 2 * max_err(ref, gold) + 1e-3 * max(1.0, gold.abs().max().item())
    else:
        assert max_err(got, gold) <= tol * max(1.0, gold.abs().max().item())


# ----------------------------------------------------------------------------------------------------------
# Flash attention


def qkv(B, nh, nkv, T, S, hs, dtype, seed):
    """q, k, v laid out as the model makes them: (B, T, n, hs) memory viewed as (B, n, T, hs)."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, T, nh, hs, generator=g).transpose(1, 2)
    k = torch.randn(B, S, nkv, hs, generator=g).transpose(1, 2)
    v = torch.randn(B, S, nkv, hs, generator=g).transpose(1, 2)
    return q, k, v, torch.randn(B, nh, T, hs, generator=g)


def attention_and_grads(fn, q, k, v, do, mask, dtype):
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    o = fn(q, k, v, mask)
    return (o, *torch.autograd.grad(o, (q, k, v), do.to(dtype)))


def packed_positions(B, lengths_per_row):
    return torch.stack([torch.cat([torch.arange(n) for n in lengths]) for lengths in lengths_per_row])


# (B, nh, nkv, T, S, hs, dtype, packing): ragged lengths (never a multiple of the 16-wide interpreter tiles),
# grouped-query heads, every supported head size, all three dtypes, packed rows, a KV-cache offset.
ATTENTION_CASES = {
    "gqa-hs64": (2, 4, 2, 37, 37, 64, torch.float32, None),
    "mqa-hs80": (1, 3, 1, 29, 29, 80, torch.float32, None),
    "hs96": (1, 2, 2, 21, 21, 96, torch.float32, None),
    "hs128-gqa": (1, 4, 2, 18, 18, 128, torch.float32, None),
    "packed": (2, 2, 1, 40, 40, 64, torch.float32, [[13, 1, 19, 7], [40]]),
    "packed-gqa-hs80": (2, 4, 2, 35, 35, 80, torch.float32, [[5, 30], [17, 17, 1]]),
    "kv-cache": (2, 4, 2, 7, 30, 64, torch.float32, None),
    "decode-one-token": (1, 2, 1, 1, 19, 64, torch.float32, None),
    "fp16": (1, 4, 2, 33, 33, 64, torch.float16, None),
    "bf16": (1, 4, 2, 33, 33, 64, torch.bfloat16, None),
    "bf16-packed": (1, 2, 2, 30, 30, 128, torch.bfloat16, [[11, 19]]),
}


@pytest.mark.parametrize("case", list(ATTENTION_CASES))
def test_flash_attention_matches_sdpa(case):
    B, nh, nkv, T, S, hs, dtype, docs = ATTENTION_CASES[case]
    q, k, v, do = qkv(B, nh, nkv, T, S, hs, dtype, seed=list(ATTENTION_CASES).index(case))
    if docs is not None:
        mask = AttentionMask(packed_positions(B, docs), 0, packed=True)
    else:
        mask = AttentionMask(torch.arange(S - T, S).expand(B, T), S - T, packed=False)
    got = attention_and_grads(flash_attention, q, k, v, do, mask, dtype)
    ref = attention_and_grads(sdpa_attention, q, k, v, do, mask, dtype)
    gold = attention_and_grads(sdpa_attention, q, k, v, do, mask, torch.float32)
    for name, g, r, au in zip(("out", "dq", "dk", "dv"), got, ref, gold):
        assert g.shape == au.shape and g.dtype == dtype, name
        check(g, r, au, dtype, tol=1e-5)


# (B, nh, nkv, T, S, hs, dtype, packing, window, softcap, scale): sliding windows shorter than the row (alone,
# in packed rows, with a KV-cache offset, decoding one token), Gemma 2's soft-capping and query scale, and
# Gemma's head size 256.
WINDOW_CASES = {
    "window": (2, 4, 2, 45, 45, 64, torch.float32, None, 9, None, None),
    "window-packed": (2, 2, 1, 40, 40, 64, torch.float32, [[13, 1, 19, 7], [40]], 6, None, None),
    "window-kv-cache": (1, 4, 2, 7, 40, 64, torch.float32, None, 10, None, None),
    "window-decode": (1, 2, 1, 1, 30, 64, torch.float32, None, 5, None, None),
    "softcap-scale": (1, 4, 2, 33, 33, 64, torch.float32, None, None, 2.0, 0.3),
    "gemma-hs256": (1, 2, 1, 21, 21, 256, torch.float32, None, 8, 3.0, 144 ** -0.5),
    "gemma-hs256-bf16": (1, 2, 1, 21, 21, 256, torch.bfloat16, None, 8, 5.0, 0.1),
}


@pytest.mark.parametrize("case", list(WINDOW_CASES))
def test_flash_attention_windows_and_softcap_match_sdpa(case):
    B, nh, nkv, T, S, hs, dtype, docs, window, softcap, scale = WINDOW_CASES[case]
    q, k, v, do = qkv(B, nh, nkv, T, S, hs, dtype, seed=100 + list(WINDOW_CASES).index(case))
    if docs is not None:
        mask = AttentionMask(packed_positions(B, docs), 0, packed=True, window=window)
    else:
        mask = AttentionMask(torch.arange(S - T, S).expand(B, T), S - T, packed=False, window=window)

    def run(fn, dt):
        q2, k2, v2 = (t.to(dt).requires_grad_() for t in (q, k, v))
        o = fn(q2, k2, v2, mask, scale, softcap)
        return (o, *torch.autograd.grad(o, (q2, k2, v2), do.to(dt)))
    got, ref, gold = run(flash_attention, dtype), run(sdpa_attention, dtype), run(sdpa_attention, torch.float32)
    for name, g, r, au in zip(("out", "dq", "dk", "dv"), got, ref, gold):
        assert g.shape == au.shape and g.dtype == dtype, name
        check(g, r, au, dtype, tol=1e-5)
    # the case is one where the window and the cap matter: without them the output differs
    assert max_err(sdpa_attention(q, k, v, mask.with_window(None), scale, None), gold[0]) > 1e-2


def test_packed_flash_attention_builds_no_dense_mask():
    q, k, v, _ = qkv(1, 2, 2, 24, 24, 64, torch.float32, seed=0)
    mask = AttentionMask(packed_positions(1, [[10, 14]]), 0, packed=True)
    flash_attention(q, k, v, mask)
    assert ("dense", None) not in mask._built  # the (B, 1, T, T) mask was never made
    sdpa_attention(q, k, v, mask)
    assert ("dense", None) in mask._built


def test_unsupported_head_size_falls_back_to_sdpa_with_a_notice(capsys):
    q, k, v, _ = qkv(1, 2, 2, 9, 9, 32, torch.float32, seed=0)
    mask = AttentionMask(torch.arange(9)[None], 0, packed=False)
    assert torch.equal(flash_attention(q, k, v, mask), sdpa_attention(q, k, v, mask))
    assert "head size 32" in capsys.readouterr().err
    flash_attention(q, k, v, mask)
    assert capsys.readouterr().err == ""  # once per process


# ----------------------------------------------------------------------------------------------------------
# RMSNorm


@pytest.mark.parametrize("C,x_dtype,w_dtype", [(48, torch.float32, torch.float32), (64, torch.float32, torch.float32),
                                              (40, torch.bfloat16, torch.float32), (48, torch.bfloat16, torch.bfloat16),
                                              (56, torch.float16, torch.float16)])
def test_triton_rmsnorm_matches_model_rmsnorm(C, x_dtype, w_dtype):
    g = torch.Generator().manual_seed(C)
    x0, dy0 = torch.randn(3, 7, C, generator=g), torch.randn(3, 7, C, generator=g)
    w0 = 1 + torch.randn(C, generator=g) / 2

    def run(cls, x_dtype, w_dtype):
        norm = cls(C, 1e-5).to(w_dtype)
        with torch.no_grad():
            norm.weight.copy_(w0)
        x = x0.to(x_dtype).requires_grad_()
        y = norm(x)
        return (y, *torch.autograd.grad(y, (x, norm.weight), dy0.to(y.dtype)))

    got, ref = run(TritonRMSNorm, x_dtype, w_dtype), run(RMSNorm, x_dtype, w_dtype)
    gold = run(RMSNorm, torch.float32, torch.float32)
    for name, a, r, au in zip(("y", "dx", "dw"), got, ref, gold):
        assert a.dtype == r.dtype, name
        check(a, r, au, x_dtype if x_dtype in LOW else w_dtype)


@pytest.mark.parametrize("C,x_dtype,w_dtype,offset,weight_fp32", [
    (48, torch.float32, torch.float32, 1.0, True),  # Gemma: x (1 + w), multiplied in fp32
    (40, torch.bfloat16, torch.bfloat16, 1.0, True),
    (24, torch.bfloat16, torch.bfloat16, 1.0, True),  # a q/k norm over one head
    (56, torch.float16, torch.float16, 0.0, True),  # OLMo 2: x w, multiplied in fp32
    (64, torch.bfloat16, torch.float32, 0.0, True)])
def test_triton_rmsnorm_matches_gemma_and_olmo2_forms(C, x_dtype, w_dtype, offset, weight_fp32):
    g = torch.Generator().manual_seed(C)
    x0, dy0 = torch.randn(3, 7, C, generator=g), torch.randn(3, 7, C, generator=g)
    w0 = torch.randn(C, generator=g) / 2 + (1 - offset)

    def run(cls, x_dtype, w_dtype):
        norm = cls(C, 1e-6, offset, weight_fp32).to(w_dtype)
        with torch.no_grad():
            norm.weight.copy_(w0)
        x = x0.to(x_dtype).requires_grad_()
        y = norm(x)
        return (y, *torch.autograd.grad(y, (x, norm.weight), dy0.to(y.dtype)))

    got, ref = run(TritonRMSNorm, x_dtype, w_dtype), run(RMSNorm, x_dtype, w_dtype)
    gold = run(RMSNorm, torch.float32, torch.float32)
    assert got[0].dtype == x_dtype  # cast back to x's dtype after the fp32 product
    for name, a, r, au in zip(("y", "dx", "dw"), got, ref, gold):
        assert a.dtype == r.dtype, name
        check(a, r, au, x_dtype if x_dtype in LOW else w_dtype)


# ----------------------------------------------------------------------------------------------------------
# Linear + cross-entropy, chunked: PyTorch and Triton softmax work


def head_case(N=45, C=24, V=67, bias=False, seed=0, uniform=False):
    """hidden, weight, bias, targets, and dL/dloss of each token: random (backward recomputes the logits)
    or the same for all (as a sum or mean of the losses gives: backward scales what forward computed)."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N, C, generator=g)
    weight = torch.randn(V, C, generator=g) / 3
    b = torch.randn(V, generator=g) if bias else None
    targets = torch.randint(0, V, (N,), generator=g)
    targets[torch.randperm(N, generator=g)[:N // 4]] = IGNORE_INDEX  # prompt / padding rows
    grad = torch.full((N,), 0.37) if uniform else torch.randn(N, generator=g)
    return hidden, weight, b, targets, grad


def loss_and_grads(fn, hidden, weight, bias, targets, grad, train_head=True):
    leaves = [hidden.clone().requires_grad_(), weight.clone().requires_grad_(train_head)]
    if bias is not None:
        leaves.append(bias.clone().requires_grad_(train_head))
    loss = fn(*leaves[:2], leaves[2] if bias is not None else None, targets)
    wanted = [t for t in leaves if t.requires_grad]
    return loss, torch.autograd.grad(loss, wanted, grad)


def unfused(hidden, weight, bias, targets):
    return F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, ignore_index=IGNORE_INDEX,
                           reduction="none")


@pytest.mark.parametrize("rows", ["torch", "triton"])
@pytest.mark.parametrize("chunk", [7, 16, 1000])  # 7 and 16 do not divide 45 tokens; 1000 is one chunk
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("uniform", [False, True])
def test_linear_cross_entropy_matches_cross_entropy_on_logits(rows, chunk, bias, uniform):
    rows = TORCH_ROWS if rows == "torch" else TRITON_ROWS
    case = head_case(bias=bias, seed=chunk, uniform=uniform)
    fused = loss_and_grads(lambda h, w, b, t: linear_cross_entropy(h, w, b, t, chunk, rows), *case)
    ref = loss_and_grads(unfused, *case)
    assert max_err(fused[0], ref[0]) <= 1e-5
    assert (fused[0][case[3] == IGNORE_INDEX] == 0).all()
    for g, r in zip(fused[1], ref[1]):
        assert max_err(g, r) <= 1e-5


@pytest.mark.parametrize("rows", ["torch", "triton"])
@pytest.mark.parametrize("uniform", [False, True])
def test_linear_cross_entropy_with_final_logit_softcapping(rows, uniform):
    """Gemma 2's c tanh(z / c) on the logits, inside the chunks: the loss and gradients of the capped
    logits (the recomputing backward too), and a cap small enough to change them."""
    rows = TORCH_ROWS if rows == "torch" else TRITON_ROWS
    case = head_case(bias=True, seed=11, uniform=uniform)
    cap = 2.0

    def capped(h, w, b, t):
        return F.cross_entropy(torch.tanh(F.linear(h, w, b).float() / cap) * cap, t, ignore_index=IGNORE_INDEX,
                               reduction="none")
    fused = loss_and_grads(lambda h, w, b, t: linear_cross_entropy(h, w, b, t, 7, rows, softcap=cap), *case)
    ref = loss_and_grads(capped, *case)
    assert max_err(fused[0], ref[0]) <= 1e-5 and max_err(fused[0], unfused(*case[:4])) > 1e-2
    for g, r in zip(fused[1], ref[1]):
        assert max_err(g, r) <= 1e-5


@pytest.mark.parametrize("rows", ["torch", "triton"])
@pytest.mark.parametrize("uniform", [False, True])
def test_frozen_head_gives_only_the_hidden_gradient(rows, uniform):
    """The head frozen (LoRA, LISA --freeze-head): only dL/dh is made, and it is exact."""
    rows = TORCH_ROWS if rows == "torch" else TRITON_ROWS
    case = head_case(bias=True, seed=3, uniform=uniform)
    fused = loss_and_grads(lambda h, w, b, t: linear_cross_entropy(h, w, b, t, 10, rows), *case, train_head=False)
    ref = loss_and_grads(unfused, *case, train_head=False)
    assert len(fused[1]) == 1 and max_err(fused[0], ref[0]) <= 1e-5 and max_err(fused[1][0], ref[1][0]) <= 1e-5


@pytest.mark.parametrize("rows", ["torch", "triton"])
def test_tied_embedding_gets_both_gradients(rows):
    """One bias-free Parameter as embedding and head: its gradient sums the lookup's and the head's."""
    rows = TORCH_ROWS if rows == "torch" else TRITON_ROWS
    g = torch.Generator().manual_seed(5)
    ids, targets = torch.randint(0, 50, (30,), generator=g), torch.randint(0, 50, (30,), generator=g)
    targets[:6] = IGNORE_INDEX
    mix = torch.randn(16, 16, generator=g)
    grads = []
    for fn in (lambda h, w, t: linear_cross_entropy(h, w, None, t, 8, rows), lambda h, w, t: unfused(h, w, None, t)):
        emb = torch.randn(50, 16, generator=torch.Generator().manual_seed(6)).requires_grad_()
        hidden = torch.tanh(F.embedding(ids, emb) @ mix)  # (N, C): a stand-in for the blocks
        fn(hidden, emb, targets).sum().backward()
        grads.append(emb.grad)
    assert max_err(grads[0], grads[1]) <= 1e-5


@pytest.mark.parametrize("rows", ["torch", "triton"])
def test_linear_cross_entropy_under_bf16_autocast(rows):
    """Under autocast the head matmul runs in bf16 as lm_head does; the loss and gradients follow the
    unfused path no worse than it follows an fp32 computation."""
    rows = TORCH_ROWS if rows == "torch" else TRITON_ROWS
    case = head_case(seed=9)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = loss_and_grads(lambda h, w, b, t: linear_cross_entropy(h, w, b, t, 16, rows), *case)
        ref = loss_and_grads(unfused, *case)
    gold = loss_and_grads(unfused, *case)
    for g, r, au in zip((fused[0], *fused[1]), (ref[0], *ref[1]), (gold[0], *gold[1])):
        assert g.dtype == au.dtype
        check(g, r, au, torch.bfloat16)


@pytest.mark.parametrize("rows", ["torch", "triton"])
def test_a_batch_without_loss_tokens_still_backpropagates(rows):
    rows = TORCH_ROWS if rows == "torch" else TRITON_ROWS
    h, w, b, t, _ = head_case(N=9, seed=4)
    h.requires_grad_()
    loss = linear_cross_entropy(h, w, b, torch.full_like(t, IGNORE_INDEX), 4, rows)
    loss.sum().backward()
    assert torch.equal(loss, torch.zeros(9)) and torch.equal(h.grad, torch.zeros_like(h))


def test_a_second_backward_recomputes():
    """Backward scales the forward's gradients in place, once; backward through a retained graph recomputes."""
    h, w, _, t, _ = head_case(seed=8)
    h.requires_grad_()
    loss = linear_cross_entropy(h, w, None, t, 10).sum()
    first = torch.autograd.grad(loss, h, retain_graph=True)[0]
    second = torch.autograd.grad(loss, h)[0]
    assert torch.allclose(first, second, atol=1e-6) and max_err(first, torch.autograd.grad(
        unfused(h, w, None, t).sum(), h)[0]) <= 1e-5


def test_linear_cross_entropy_without_grad_is_the_same_loss():
    h, w, b, t, _ = head_case(seed=2)
    with torch.no_grad():
        assert max_err(linear_cross_entropy(h, w, b, t, 9), unfused(h, w, b, t)) <= 1e-5


# ----------------------------------------------------------------------------------------------------------
# A whole training step: the model with kernels against the plain model


def tiny(tie=False, gpt2=False) -> ModelConfig:
    if gpt2:
        return ModelConfig.from_hf(dict(model_type="gpt2", vocab_size=97, n_embd=128, n_layer=2, n_head=2,
                                        n_positions=64))
    return ModelConfig.from_hf(dict(model_type="llama", vocab_size=97, hidden_size=128, intermediate_size=160,
                                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                                    tie_word_embeddings=tie))  # head size 64: flash attention takes it


def family(model_type, **extra) -> ModelConfig:
    """A tiny config of one of issue 20's families, with what it does differently turned up: windows shorter
    than the 21-token rows, soft-caps small enough to bend random-init scores and logits."""
    return ModelConfig.from_hf(dict(model_type=model_type, vocab_size=97, hidden_size=128, intermediate_size=160,
                                    num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, **extra))


GEMMA2 = family("gemma2", head_dim=256, sliding_window=6, query_pre_attn_scalar=64, attn_logit_softcapping=0.05,
                final_logit_softcapping=0.3)  # head size 256, as Gemma's


def batch(B=2, T=21, packed=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 97, (B, T), generator=g)
    labels = ids.clone()
    labels[:, :5] = IGNORE_INDEX  # a prompt
    pos = packed_positions(B, [[8, T - 8]] * B) if packed else None
    return ids, labels, pos


def set_up(cfg, method, kernels, seed=0):
    torch.manual_seed(seed)
    model = build_model(cfg)
    model.init_weights()
    if kernels:
        use_kernels(model, kernels)
    if method.startswith("lisa"):
        from nanolisa.lisa import LISA
        LISA(model, 1, 1, train_head=method != "lisa-frozen-head").maybe_switch(0)
    elif method.startswith("lora"):
        from nanolisa.lora import apply_lora, mark_only_lora_trainable
        targets = ["q_proj", "v_proj", "lm_head"] if method == "lora-head" else "all-linear"
        apply_lora(model, r=4, alpha=8, targets=targets)
        for m in model.modules():  # non-zero B, so the adapters matter from the first step
            if hasattr(m, "lora_B"):
                torch.nn.init.normal_(m.lora_B.weight, std=0.1)
        mark_only_lora_trainable(model, modules_to_save=["lm_head"] if method == "lora-save-head" else [])
    return model


def one_step(model, ids, labels, pos):
    # AdamW's first step moves each weight by about lr * g / (|g| + eps), about lr * sign(g): where a gradient
    # is near zero, fp32 rounding differences of 1e-9 can change the move by a good part of lr. So lr is the
    # trainer's default, 5e-5: a wrong sign anywhere still moves a weight by 1e-4, over the 1e-5 tolerance.
    opt = AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-5, weight_decay=0.0)
    loss = next_token_nll(model, ids, labels, pos).sum() / (labels[:, 1:] != IGNORE_INDEX).sum()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    return loss.item(), grads, {n: p.detach().clone() for n, p in model.named_parameters()}


STEP_CASES = {
    "full": (tiny(), "full", False),
    "lisa": (tiny(), "lisa", False),
    "lisa-frozen-head": (tiny(), "lisa-frozen-head", False),
    "lisa-tied": (tiny(tie=True), "lisa", False),
    "lora": (tiny(), "lora", False),
    "lora-on-lm_head": (tiny(), "lora-head", False),
    "lora-save-head": (tiny(), "lora-save-head", False),
    "full-packed": (tiny(), "full", True),
    "gpt2": (tiny(gpt2=True), "full", False),
    "gemma2-lisa-packed": (GEMMA2, "lisa", True),
    "gemma3-lora": (family("gemma3_text", head_dim=64, sliding_window=5, sliding_window_pattern=2,
                           final_logit_softcapping=0.3), "lora", False),
    "phi3-full": (family("phi3", partial_rotary_factor=0.5, sliding_window=7), "full", False),
    "qwen3-lisa": (family("qwen3", head_dim=64, use_sliding_window=True, sliding_window=5, max_window_layers=1,
                          tie_word_embeddings=True), "lisa", False),
    "olmo2-full": (family("olmo2"), "full", False),
}


@pytest.mark.parametrize("case", list(STEP_CASES))
def test_training_step_with_fused_loss_equals_unfused_step(case):
    cfg, method, packed = STEP_CASES[case]
    ids, labels, pos = batch(packed=packed)
    ref = one_step(set_up(cfg, method, None), ids, labels, pos)  # the plain model: full logits, head_nll
    model = set_up(cfg, method, "torch")
    assert isinstance(model.head_loss, HeadLoss)
    got = one_step(model, ids, labels, pos)
    assert abs(got[0] - ref[0]) <= 1e-5
    assert got[1].keys() == ref[1].keys()
    for n in ref[1]:
        assert max_err(got[1][n], ref[1][n]) <= 1e-5, n
    for n in ref[2]:
        assert max_err(got[2][n], ref[2][n]) <= 1e-5, n


@pytest.mark.parametrize("case", ["lisa-tied", "full-packed", "gpt2", "gemma2-lisa-packed", "phi3-full",
                                  "qwen3-lisa"])
def test_training_step_with_triton_kernels_equals_plain_step(case):
    cfg, method, packed = STEP_CASES[case]
    ids, labels, pos = batch(packed=packed)
    ref = one_step(set_up(cfg, method, None), ids, labels, pos)
    model = set_up(cfg, method, "triton")
    assert all(b.self_attn.attn_fn is flash_attention if hasattr(b, "self_attn") else b.attn.attn_fn is flash_attention
               for b in model.blocks)
    got = one_step(model, ids, labels, pos)
    assert abs(got[0] - ref[0]) <= 1e-5
    for n in ref[1]:
        assert max_err(got[1][n], ref[1][n]) <= 2e-5, n
    for n in ref[2]:
        assert max_err(got[2][n], ref[2][n]) <= 2e-5, n


def test_kv_cache_decoding_with_triton_kernels_matches_plain_forward():
    """Prefill then one token at a time (queries offset into the cached keys), as chat.py decodes."""
    plain, fast = set_up(tiny(), "full", None).eval(), set_up(tiny(), "full", "triton").eval()
    ids = batch(B=1, T=12)[0]
    with torch.no_grad():
        want = plain(ids)
        cache = fast.new_kv_cache(1, 16)
        steps = [fast(ids[:, :7], kv_cache=cache)] + [fast(ids[:, t:t + 1], kv_cache=cache) for t in range(7, 12)]
    assert max_err(torch.cat(steps, dim=1), want) <= 1e-4


def test_evaluation_nll_with_kernels_equals_plain_nll():
    from nanolisa.evaluate import nll
    examples = [([1, 5, 9, 12, 3], [-100, -100, 9, 12, 3]), ([4, 4, 8], [-100, 4, 8]), ([7] * 9, [7] * 9)]
    plain = set_up(tiny(), "full", None)
    fused = set_up(tiny(), "full", "torch")
    (a, n_a), (b, n_b) = nll(plain, examples, batch_size=2), nll(fused, examples, batch_size=2)
    assert n_a == n_b == 13 and abs(a - b) <= 1e-4


# ----------------------------------------------------------------------------------------------------------
# Selection


def test_kernel_selection_and_switching_back():
    model = set_up(tiny(), "full", None)
    assert resolve("auto", torch.device("cpu")) == "torch"
    assert use_kernels(model, "triton") == "triton"  # TRITON_INTERPRET=1 here
    assert {type(m) for m in model.modules() if isinstance(m, RMSNorm)} == {TritonRMSNorm}
    assert all(b.self_attn.attn_fn is flash_attention for b in model.blocks)
    weights = {id(p) for p in model.parameters()}
    assert model.state_dict().keys() == set_up(tiny(), "full", None).state_dict().keys()  # checkpoints unchanged
    assert use_kernels(model, "torch") == "torch"
    assert {type(m) for m in model.modules() if isinstance(m, RMSNorm)} == {RMSNorm}
    assert all(b.self_attn.attn_fn is sdpa_attention for b in model.blocks)
    assert {id(p) for p in model.parameters()} == weights  # the same Parameters throughout
    ids, labels, _ = batch()
    with torch.no_grad():
        logits, targets = model(ids)[:, :-1], labels[:, 1:]  # the full logits, each predicting the next token
        ref = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none").sum(1)
        assert torch.allclose(next_token_nll(model, ids, labels), ref, atol=1e-5)


def test_kernel_selection_errors_are_one_line(monkeypatch):
    model = set_up(tiny(), "full", None)
    with pytest.raises(nanolisa.UserError, match="unknown --kernels 'cuda'.*auto, triton, torch"):
        use_kernels(model, "cuda")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(nanolisa.UserError, match="needs a CUDA GPU.*TRITON_INTERPRET=1.*--kernels torch"):
        use_kernels(model, "triton")
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    with pytest.raises(nanolisa.UserError, match="triton is not installed"):
        use_kernels(model, "triton")


def test_a_kernel_that_fails_its_self_check_is_left_out_with_a_notice(monkeypatch, capsys):
    """The self-check use_kernels runs on a GPU, run here for real in the interpreter: a kernel that does
    not match its reference (forced: the loss check's bound set to 0) is replaced by PyTorch's, with one
    notice; the kernels that pass stay."""
    import nanolisa.kernels as kernels
    from nanolisa.kernels import check
    from nanolisa.kernels.linear_cross_entropy import TORCH_ROWS
    monkeypatch.setattr(kernels, "SELF_CHECK", True)
    monkeypatch.setattr(kernels, "_checked", {})
    monkeypatch.setitem(check.TOLERANCE, torch.float32, 0.0)  # nothing can pass: every kernel fails
    model = set_up(tiny(), "full", None)
    assert use_kernels(model, "triton") == "triton"
    assert all(b.self_attn.attn_fn is sdpa_attention for b in model.blocks)
    assert {type(m) for m in model.modules() if isinstance(m, RMSNorm)} == {RMSNorm}
    assert model.head_loss.rows is TORCH_ROWS
    notes = [line for line in capsys.readouterr().err.splitlines() if "self-check" in line]
    assert len(notes) == 3 and all(n.startswith("note: the Triton ") for n in notes), notes
    monkeypatch.setitem(check.TOLERANCE, torch.float32, 1e-4)  # the real bound: all pass and are used
    monkeypatch.setattr(kernels, "_checked", {})
    assert use_kernels(model, "triton") == "triton"
    assert all(b.self_attn.attn_fn is flash_attention for b in model.blocks)


def test_the_kernel_self_check_command_prints_a_line_per_kernel():
    p = run_script("-m", "nanolisa.kernels.check", "--dtype", "fp32", "--head-size", "64",
                   env={**os.environ, "TRITON_INTERPRET": "1"})
    assert p.returncode == 0, p.stderr
    lines = p.stdout.splitlines()
    assert [line.split()[:3] for line in lines[1:4]] == [["pass", "fp32", "attention"], ["pass", "fp32", "rmsnorm"],
                                                        ["pass", "fp32", "loss"]], p.stdout
    assert lines[-1] == "all kernels pass"


def test_train_py_kernels_triton_without_a_gpu_is_one_line_and_writes_nothing(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, os.path.join(ROOT, "train.py"), "--kernels", "triton", "--out", str(out),
                        "--steps", "1", "--no-plot", "--device", "cpu"], capture_output=True, text=True, env=env,
                       cwd=ROOT)
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("error: --kernels triton needs a CUDA GPU") and not out.exists()


def test_a_source_checkout_without_an_install_finds_nanolisa_kernels():
    """`python train.py` in a clone that pip did not install with -e: no package-dir mapping is active, and
    nanolisa/__init__.py points nanolisa.kernels at the checkout's kernels/ folder. (-S: no .pth files, so
    no editable-install finder; site-packages is added by hand for torch.)"""
    site = next(p for p in sys.path if p.endswith("site-packages"))
    code = (f"import sys; sys.path.append({site!r}); import nanolisa.kernels.linear_cross_entropy as m; "
            f"import nanolisa; print(m.__file__, nanolisa.__file__, nanolisa.kernels.__file__)")
    p = subprocess.run([sys.executable, "-S", "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    want = ["kernels/linear_cross_entropy.py", "nanolisa/__init__.py", "kernels/__init__.py"]
    assert p.stdout.split() == [os.path.join(ROOT, *w.split("/")) for w in want]


def test_a_second_derivative_through_the_fused_loss_is_a_clear_error():
    """The custom autograd Functions' backward is marked once_differentiable: create_graph=True names the
    problem instead of failing somewhere inside. (torch attaches that error only where the incoming gradient
    itself requires grad, as in a gradient penalty weighted by a learned scale.)"""
    h = torch.randn(6, 8, requires_grad=True)
    w = torch.randn(11, 8, requires_grad=True)
    loss = linear_cross_entropy(h, w, None, torch.randint(0, 11, (6,)))  # (6,)
    scale = torch.ones(6, requires_grad=True)
    (gh,) = torch.autograd.grad(loss, h, grad_outputs=scale, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        gh.sum().backward()


def test_chunk_by_arithmetic_intensity_on_a_gpu_with_the_cap_where_memory_is_short():
    """On CUDA the fused loss takes 1024-token chunks (compute-bound head matmuls) when their buffers are a small
    part of the free memory, else the ~64 MB cap; the CPU keeps the cap. The chunk changes no result (the
    loss is checked at chunks of 7 to all tokens above), so a CPU test of the sizes is what is left."""
    from nanolisa.kernels.linear_cross_entropy import GPU_CHUNK_TOKENS, default_chunk
    assert default_chunk(128256) == 130 and default_chunk(32000) == 524
    assert default_chunk(128256, "cuda") == GPU_CHUNK_TOKENS == 1024
    assert default_chunk(128256, "cuda", free_bytes=80 * 2**30) == 1024
    assert default_chunk(128256, "cuda", free_bytes=2 * 2**30) == 130  # short: the cap
    assert default_chunk(320, "cuda") == default_chunk(320)  # small vocabularies: the cap is larger already


def test_weight_gradient_accumulates_in_fp32_from_low_precision_chunks():
    """add_outer_: dW += dz^T h summed in fp32, whatever the chunk's dtype (the CPU takes the fallback; CUDA's
    one-GEMM path is checked against it on first use, and by bench/gpu_check.py)."""
    from nanolisa.kernels.linear_cross_entropy import add_outer_
    torch.manual_seed(0)
    dw = torch.randn(300, 40)
    dz, h = torch.randn(50, 300).bfloat16(), torch.randn(50, 40).bfloat16()
    want = dw + dz.t().float() @ h.float()
    add_outer_(dw, dz, h)
    assert dw.dtype == torch.float32
    torch.testing.assert_close(dw, want, rtol=2e-2, atol=2e-2)
    dz32, h32, dw32 = dz.float(), h.float(), torch.zeros(300, 40)
    add_outer_(dw32, dz32, h32)
    assert torch.equal(dw32, torch.zeros(300, 40).addmm_(dz32.t(), h32))


def test_compiled_blocks_compile_a_bounded_number_of_times_across_lisa_switches():
    """--compile: LISA's switches flip requires_grad; the blocks' graphs are compiled once per trainable state,
    not once per switch (torch._dynamo's counters over 12 switches; the eager backend: the count is dynamo's)."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from nanolisa.activation_memory import lean
    from nanolisa.kernels.compile import compile_blocks
    from nanolisa.lisa import LISA
    from nanolisa.loss import next_token_nll
    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    model = build_model(ModelConfig.from_hf(dict(model_type="llama", vocab_size=97, hidden_size=32,
                                                 num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
                                                 intermediate_size=48, max_position_embeddings=64)))
    model.init_weights()
    plain = copy.deepcopy(model)
    lean(model, min_width=0)  # every lean path, GatedAct included, under torch.compile
    compile_blocks(model, backend="eager")
    assert list(model.state_dict()) == list(plain.state_dict())  # no _orig_mod. in the keys
    lisa = LISA(model, n_layers=1, interval=1, seed=0)
    seen = set()
    for step in range(12):
        lisa.maybe_switch(step)
        seen.update(lisa.active)
        ids = torch.randint(0, 97, (2, 20))
        next_token_nll(model, ids, ids).mean().backward()
        model.zero_grad(set_to_none=True)
    assert len(seen) >= 4  # switches did happen, to several blocks
    assert 2 <= counters["stats"]["unique_graphs"] <= 4, dict(counters["stats"])
    torch._dynamo.reset()
