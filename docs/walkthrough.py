"""See each stop of docs/walkthrough.md happen, on the built-in `tiny` preset (a 4-block Llama), on a CPU.

    python docs/walkthrough.py data          # one stop
    python docs/walkthrough.py lisa adamw    # several, in the order given

Each function is one stop of the walkthrough and prints what that stop says happens. They call nanolisa's
own functions, never copies of them: tests/test_walkthrough.py runs every stop, so what this prints stays
what the code does.
"""
from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the checkout's nanolisa

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.autograd.graph import saved_tensors_hooks  # noqa: E402

import nanolisa  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny():
    """The built-in tiny preset: (model, tokenizer), random weights, seed 0."""
    torch.manual_seed(0)
    return nanolisa.load_pretrained("tiny")


def saved_bytes(fn) -> int:
    """Bytes autograd keeps for the backward pass while fn() runs: the activation memory of fn. (A tensor
    saved twice counts twice; a parameter saved for backward counts too, though it costs no extra memory.)"""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total


def mb(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


# ---- 1. data ----------------------------------------------------------------------------------------------
def data():
    """A conversation becomes input_ids and labels; the labels mask everything but the assistant's reply."""
    from nanolisa.data import read_dataset, tokenize_dataset
    _, tok = tiny()
    ds = read_dataset("demo:conversation", quiet=True)
    print("record:", ds.instances[0])
    ids, labels = tokenize_dataset(ds, tok, seq_len=128, cache_dir=False).examples[0]
    print("input_ids:", ids)
    print("labels:   ", labels)
    # The tiny tokenizer is byte-level (one token per byte), so the mask can be drawn under the text:
    print("text:    ", repr(tok.decode(ids)))
    print("trained: ", repr("".join(tok.decode([i]) if lab != -100 else "." for i, lab in zip(ids, labels))))


# ---- 2. model ---------------------------------------------------------------------------------------------
def model():
    """One block's forward, module by module, with the shape each one returns."""
    m, _ = tiny()
    for name, sub in m.blocks[0].named_modules():
        sub.register_forward_hook(lambda mod, inp, out, name=name: print(f"blocks.0.{name or '(block)':24s}",
                                                                          tuple(out.shape)))
    ids = torch.randint(0, m.config.vocab_size, (2, 8))  # (B, T)
    print("input_ids", tuple(ids.shape), "-> logits", tuple(m(ids).shape))


def rope():
    """RoPE: the score q.k of two rotated vectors depends only on how far apart their positions are."""
    from nanolisa.rope import apply_rope, rope_cos_sin
    m, _ = tiny()
    torch.manual_seed(1)
    q, k = torch.randn(1, 1, 1, m.config.head_dim), torch.randn(1, 1, 1, m.config.head_dim)  # (B, nh, T, hs)
    for i, j in [(3, 0), (13, 10), (103, 100), (3, 2)]:
        (cq, sq), (ck, sk) = (rope_cos_sin(m.config, torch.tensor([[p]])) for p in (i, j))
        score = (apply_rope(q, cq, sq) * apply_rope(k, ck, sk)).sum().item()
        print(f"query at {i:3d}, key at {j:3d} (distance {i - j}): q.k = {score:+.6f}")


def attention():
    """Which keys each query sees: causal within a row, and within its own document when rows are packed."""
    from nanolisa.attention import attention_mask
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0]])  # one packed row: documents of 3, 2 and 1 tokens
    mask, _ = attention_mask(position_ids, start=0, packed=True)  # (B, 1, T, T)
    print("position_ids", position_ids.tolist()[0], "-> query t sees keys (1):")
    for t, row in enumerate(mask[0, 0].int().tolist()):
        print(f"  t={t}", row)


# ---- 3. loss ----------------------------------------------------------------------------------------------
def loss():
    """The labels shift one to the left; the loss is a sum per row, divided by the step's token count."""
    from nanolisa.loss import count_loss_tokens, next_token_nll, shift_labels
    m, _ = tiny()
    labels = torch.tensor([[-100, -100, 5, 6, 7]])
    print("labels", labels.tolist(), "-> targets", shift_labels(labels).tolist(),
          "; loss-bearing tokens:", count_loss_tokens(labels))
    ids = torch.randint(0, m.config.vocab_size, (4, 64))
    nll = next_token_nll(m, ids, ids)  # (B,): each row's summed NLL over its 63 targets
    print("per-row NLL sums", [round(x, 2) for x in nll.tolist()])
    print(f"mean NLL {nll.sum().item() / count_loss_tokens(ids):.3f}; a random model's is about "
          f"ln V = ln {m.config.vocab_size} = {torch.log(torch.tensor(float(m.config.vocab_size))):.3f}")


# ---- 4. lisa ----------------------------------------------------------------------------------------------
def state_bytes(opt) -> int:
    return sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if t.dim())


def lisa():
    """LISA with gamma = 1, a new block every 2 steps: what holds gradients and AdamW state, then full's.

    Six steps of the tiny model (three switches): at each, the active block, the bytes of the gradients and
    the tensors and bytes of AdamW's state; then the same for full fine-tuning, every parameter trained."""
    from nanolisa.adamw import AdamW
    from nanolisa.lisa import LISA
    from nanolisa.loss import next_token_nll
    m, _ = tiny()
    ids = torch.randint(0, m.config.vocab_size, (2, 32))
    sampler, opt = LISA(m, n_layers=1, interval=2, seed=0), AdamW(m.parameters(), lr=1e-3)
    for step in range(6):
        switched = sampler.maybe_switch(step, opt)
        next_token_nll(m, ids, ids).sum().backward()
        grads = sum(p.grad.numel() * 4 for p in m.parameters() if p.grad is not None)
        opt.step()
        print(f"step {step}: active blocks {sampler.active}{' (switched)' if switched else '           '} "
              f"gradients {mb(grads)}, AdamW state for {len(opt.state)} tensors, {mb(state_bytes(opt))}")
        opt.zero_grad(set_to_none=True)
    full = AdamW(m.parameters(), lr=1e-3)
    for p in m.parameters():
        p.requires_grad_(True)
    next_token_nll(m, ids, ids).sum().backward()
    grads = sum(p.grad.numel() * 4 for p in m.parameters())
    full.step()
    print(f"full fine-tuning: gradients {mb(grads)}, AdamW state for {len(full.state)} tensors, "
          f"{mb(state_bytes(full))}")


# ---- 5. adamw ---------------------------------------------------------------------------------------------
def adamw():
    """nanolisa's AdamW against torch.optim.AdamW: the same weights after 20 steps."""
    from nanolisa.adamw import AdamW
    torch.manual_seed(0)
    a = torch.nn.Parameter(torch.randn(64, 64))
    b, start = torch.nn.Parameter(a.detach().clone()), a.detach().clone()
    ours, theirs = AdamW([a], lr=1e-2, weight_decay=0.1), torch.optim.AdamW([b], lr=1e-2, weight_decay=0.1)
    for _ in range(20):
        g = torch.randn(64, 64)
        a.grad, b.grad = g.clone(), g.clone()
        ours.step()
        theirs.step()
    print(f"after 20 steps the weights moved by up to {(a - start).abs().max().item():.3f}; "
          f"max |ours - torch's| = {(a - b).abs().max().item():.1e}")
    print(f"state per parameter: {sorted(ours.state[a])}, torch's: {sorted(theirs.state[b])}")


# ---- 6. lora ----------------------------------------------------------------------------------------------
def lora():
    """LoRA r=8 on every Linear of the blocks: few trainable parameters, and at B = 0 the model is unchanged."""
    from nanolisa.lora import apply_lora, lora_modules, mark_only_lora_trainable
    m, _ = tiny()
    ids = torch.randint(0, m.config.vocab_size, (1, 16))
    before = m(ids)
    apply_lora(m, r=8, alpha=16)
    mark_only_lora_trainable(m)
    trainable = sum(p.numel() for p in m.parameters() if p.requires_grad)
    total = sum(p.numel() for p in m.parameters())
    name, first = next(iter(lora_modules(m).items()))
    print(f"{len(lora_modules(m))} LoRALinear modules; {name}: weight {tuple(first.weight.shape)}, "
          f"lora_A {tuple(first.lora_A.weight.shape)}, lora_B {tuple(first.lora_B.weight.shape)}")
    print(f"trainable {trainable} of {total} parameters ({100 * trainable / total:.1f}%)")
    print(f"max |logits after - before| at initialisation: {(m(ids) - before).abs().max().item():.1e}")


# ---- 8. parallel ------------------------------------------------------------------------------------------
def parallel():
    """What one of 8 FSDP2 ranks holds and reads of Llama-2-7B: its rows of every tensor (no weights loaded)."""
    from nanolisa.config import read_config
    from nanolisa.model import build_model
    from nanolisa.parallel import World
    from nanolisa.sharded_load import rows_of
    with torch.device("meta"):  # shapes only
        m = build_model(read_config(os.path.join(ROOT, "tests", "data", "llama-2-7b")))
    world = 8
    for name in ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.0.mlp.down_proj.weight", "model.layers.0.input_layernorm.weight"]:
        p = m.get_parameter(name)
        rows = [rows_of(p, World(rank=r, world_size=world)) for r in range(world)]
        print(f"{name} {tuple(p.shape)}: rank 0 rows {rows[0]}, rank 7 rows {rows[7]}; "
              f"each rank holds and reads 1/{world}: {mb(p.numel() * 4 / world)} of {mb(p.numel() * 4)} in fp32")
    total = sum(p.numel() for p in m.parameters())
    print(f"all {total / 1e9:.2f}B parameters: {total * 4 / world / 2**30:.2f} GiB of fp32 weights per rank "
          f"(of {total * 4 / 2**30:.2f} GiB), and so for its gradients and AdamW's m and v")


# ---- 9. kernels -------------------------------------------------------------------------------------------
def kernels():
    """What the fused loss and flash attention save: the bytes autograd keeps for backward, plain vs fused."""
    from nanolisa.kernels.linear_cross_entropy import HeadLoss
    from nanolisa.loss import head_nll
    torch.manual_seed(0)
    T, C, V = 1024, 64, 32000  # a Llama-2 vocabulary
    hidden = torch.randn(1, T, C, requires_grad=True)
    head = torch.nn.Linear(C, V, bias=False)
    targets = torch.randint(0, V, (1, T))
    plain = saved_bytes(lambda: head_nll(hidden, head, targets))
    fused = saved_bytes(lambda: HeadLoss()(hidden, head, targets))
    print(f"LM head + loss, {T} tokens, V={V}: plain keeps {mb(plain)} (the logits and their log-softmax), "
          f"fused {mb(fused)} (the hidden states and the head's weight, a parameter: no logits)")
    nh, hs = 8, 64
    q, k, v = (torch.randn(1, nh, T, hs, requires_grad=True) for _ in range(3))

    def naive():  # softmax(q k^T / sqrt(hs)) v, the (T, T) scores in full
        causal = torch.ones(T, T, dtype=torch.bool).tril()
        return F.softmax((q @ k.transpose(-1, -2) / hs**0.5).masked_fill(~causal, float("-inf")), dim=-1) @ v

    flash = saved_bytes(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
    print(f"attention, {nh} heads x {T} tokens: naive keeps {mb(saved_bytes(naive))} (the T x T scores), "
          f"SDPA's flash path {mb(flash)} (q, k, v, the output and one number per row)")


STOPS = {f.__name__: f for f in (data, model, rope, attention, loss, lisa, adamw, lora, parallel, kernels)}

if __name__ == "__main__":
    unknown = [s for s in sys.argv[1:] if s not in STOPS]
    if not sys.argv[1:] or unknown:
        sys.exit(f"usage: python docs/walkthrough.py STOP ...; stops: {', '.join(STOPS)}")
    for stop in sys.argv[1:]:
        print(f"== {stop}: {STOPS[stop].__doc__.splitlines()[0]}")
        STOPS[stop]()
