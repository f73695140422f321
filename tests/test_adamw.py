"""nanolisa.adamw.AdamW against torch.optim.AdamW, plus the memory rules LISA depends on."""
from __future__ import annotations

import io

import pytest
import torch
import torch.nn as nn

import nanolisa.adamw
from nanolisa.adamw import AdamW


def make_problem(seed: int = 0):
    """A few parameters of different shapes and a fixed random quadratic-ish loss on them."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(7, 5), (5,), (3, 4, 2), (11,), (6, 6)]
    params = [torch.randn(s, generator=g) for s in shapes]
    targets = [torch.randn(s, generator=g) for s in shapes]
    return params, targets


def clone_params(params):
    return [p.detach().clone().requires_grad_(True) for p in params]


def groups(ps):
    # Several param groups with different lr / weight decay (and one with weight decay 0).
    return [
        {"params": ps[0:2], "lr": 1e-2, "weight_decay": 0.1},
        {"params": ps[2:4], "lr": 3e-3, "weight_decay": 0.0},
        {"params": ps[4:], "lr": 5e-2, "weight_decay": 0.01, "betas": (0.8, 0.95)},
    ]


def loss_fn(ps, targets, step: int):
    # Step-dependent loss so gradients keep changing in size and sign.
    return sum(((p - t) ** 2 * (1 + (step % 3)) + (p * t).sin()).sum() for p, t in zip(ps, targets))


def assert_close(a_list, b_list, rtol=1e-6):
    for a, b in zip(a_list, b_list):
        torch.testing.assert_close(a, b, rtol=rtol, atol=1e-7)


def step_both(runs, targets, step: int) -> None:
    """One step of the same loss for each (params, optimizer) pair."""
    for ps, opt in runs:
        opt.zero_grad()
        loss_fn(ps, targets, step).backward()
        opt.step()


def enter_phase(active: set, prev: set, ours_p, ref_p, ref) -> None:
    """Make exactly the params in `active` trainable in both runs; torch's reference starts a re-joining
    param afresh (what nanolisa's AdamW does by itself: a frozen param's state is freed)."""
    for i in range(len(ours_p)):
        for ps in (ours_p, ref_p):
            ps[i].requires_grad_(i in active)
            if i not in active:
                ps[i].grad = None
        if i in active and i not in prev:
            ref.state.pop(ref_p[i], None)


def test_bounded_step_temporaries_change_no_bit(monkeypatch):
    """The update's temporary is made TEMP_ELEMENTS at a time (tensors cut into flat pieces, lists into
    groups): still torch's bits exactly."""
    monkeypatch.setattr("nanolisa.adamw.TEMP_ELEMENTS", 8)  # cuts the (7, 5) and (6, 6) tensors, splits groups
    params, targets = make_problem(seed=3)
    ours_p, ref_p = clone_params(params), clone_params(params)
    ours, ref = AdamW(groups(ours_p), eps=1e-8), torch.optim.AdamW(groups(ref_p), eps=1e-8, foreach=True)
    for step in range(20):
        step_both(((ours_p, ours), (ref_p, ref)), targets, step)
    assert all(torch.equal(a, b) for a, b in zip(ours_p, ref_p))
    from nanolisa.adamw import _slices
    m = [ours.state[p]["exp_avg"] for p in ours_p]
    v = [ours.state[p]["exp_avg_sq"] for p in ours_p]
    groups_seen = list(_slices(ours_p, m, v, [1.0] * 5, [1.0] * 5))
    assert max(sum(t.numel() for t in g[0]) for g in groups_seen) <= 8  # the bound holds ...
    assert sum(t.numel() for g in groups_seen for t in g[0]) == sum(p.numel() for p in ours_p)  # ... all covered


@pytest.mark.parametrize("foreach", [True, False])
def test_parity_with_torch_adamw(foreach):
    params, targets = make_problem()
    ours_p, ref_p = clone_params(params), clone_params(params)
    ours = AdamW(groups(ours_p), eps=1e-8)
    ref = torch.optim.AdamW(groups(ref_p), eps=1e-8, foreach=foreach)
    for step in range(200):
        step_both(((ours_p, ours), (ref_p, ref)), targets, step)
    assert_close(ours_p, ref_p)
    if foreach:  # same ops in the same order: identical bits
        assert all(torch.equal(a, b) for a, b in zip(ours_p, ref_p))
    for a, b in zip(ours_p, ref_p):  # state layout matches torch's
        sa, sb = ours.state[a], ref.state[b]
        assert set(sa) == {"step", "exp_avg", "exp_avg_sq"} and float(sa["step"]) == float(sb["step"]) == 200
        torch.testing.assert_close(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=1e-6, atol=1e-12)


def test_params_leave_and_rejoin_start_fresh():
    """Freezing frees state; on rejoin a param starts at step 0, like torch with its state deleted."""
    params, targets = make_problem(1)
    ours_p, ref_p = clone_params(params), clone_params(params)
    ours = AdamW(groups(ours_p))
    ref = torch.optim.AdamW(groups(ref_p), foreach=True)
    # Schedule of which params are trainable in each phase of 20 steps.
    phases = [{0, 1, 2, 3, 4}, {0, 2}, {1, 2, 4}, {0, 1, 2, 3, 4}, {3}]
    prev: set = set()
    for phase, active in enumerate(phases):
        enter_phase(active, prev, ours_p, ref_p, ref)
        prev = active
        for k in range(20):
            step_both(((ours_p, ours), (ref_p, ref)), targets, phase * 20 + k)
            # state exists exactly for the trainable params
            assert set(ours.state.keys()) == {ours_p[i] for i in active}
        assert_close(ours_p, ref_p)
        for i in active:
            assert float(ours.state[ours_p[i]]["step"]) == float(ref.state[ref_p[i]]["step"])
    assert all(torch.equal(a, b) for a, b in zip(ours_p, ref_p))


def test_state_only_for_trainable_params_and_freed_on_freeze():
    a = torch.randn(4, requires_grad=True)
    b = torch.randn(4, requires_grad=False)
    c = torch.randn(4, requires_grad=True)  # requires_grad but never gets a grad: skipped
    opt = AdamW([a, b, c], lr=0.1)
    (a * 2).sum().backward()
    c_before = c.detach().clone()
    opt.step()
    assert set(opt.state.keys()) == {a}
    assert c.grad is None and torch.equal(c.detach(), c_before)  # weight decay not applied to a skipped param
    a.requires_grad_(False)
    opt.step()  # frees a's state even though a still holds a (stale) grad
    assert len(opt.state) == 0
    a.requires_grad_(True)
    (a * 2).sum().backward()
    opt.step()
    assert float(opt.state[a]["step"]) == 1.0  # fresh state after re-joining
    opt.release([a])
    assert len(opt.state) == 0


def test_grad_none_param_skipped_and_unchanged():
    p = torch.randn(3, 3, requires_grad=True)
    q = torch.randn(3, requires_grad=True)
    opt = AdamW([p, q], lr=1.0, weight_decay=0.5)
    before = p.detach().clone()
    q.sum().backward()
    opt.step()
    assert p.grad is None and torch.equal(p.detach(), before) and p not in opt.state


def test_state_dict_round_trip_resumes_bit_exact():
    params, targets = make_problem(2)
    full_p, half_p = clone_params(params), clone_params(params)
    full = AdamW(groups(full_p))
    for step in range(100):
        full.zero_grad()
        loss_fn(full_p, targets, step).backward()
        full.step()

    first = AdamW(groups(half_p))
    for step in range(50):
        first.zero_grad()
        loss_fn(half_p, targets, step).backward()
        first.step()
    buf = io.BytesIO()  # through bytes, as a checkpoint would
    torch.save({"params": [p.detach() for p in half_p], "opt": first.state_dict()}, buf)
    buf.seek(0)
    ckpt = torch.load(buf, weights_only=True)
    resumed_p = clone_params(ckpt["params"])
    resumed = AdamW(groups(resumed_p))
    resumed.load_state_dict(ckpt["opt"])
    for step in range(50, 100):
        resumed.zero_grad()
        loss_fn(resumed_p, targets, step).backward()
        resumed.step()
    assert all(torch.equal(a, b) for a, b in zip(full_p, resumed_p))
    for a, b in zip(full_p, resumed_p):
        assert torch.equal(full.state[a]["exp_avg"], resumed.state[b]["exp_avg"])
        assert torch.equal(full.state[a]["exp_avg_sq"], resumed.state[b]["exp_avg_sq"])


def test_slice_size_by_device_changes_no_bit(monkeypatch):
    """CUDA's larger slices (adamw.TEMP_ELEMENTS_BY_DEVICE) give the bits of CPU's 16 MB ones: the same steps
    on a tensor larger than the CPU slice (cut into 2 pieces there, whole with CUDA's size) and small ones."""
    from nanolisa.adamw import TEMP_ELEMENTS, _slices, temp_elements
    assert temp_elements(torch.device("cuda")) > temp_elements(torch.device("cpu")) == TEMP_ELEMENTS
    torch.manual_seed(0)
    start = [torch.randn(TEMP_ELEMENTS + 5), torch.randn(7, 5), torch.randn(3)]
    results = []
    for cpu_slice in (TEMP_ELEMENTS, temp_elements(torch.device("cuda"))):
        monkeypatch.setitem(nanolisa.adamw.TEMP_ELEMENTS_BY_DEVICE, "cpu", cpu_slice)
        ps = [nn.Parameter(t.clone()) for t in start]
        opt = AdamW(ps, lr=1e-2, weight_decay=0.1)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            for p in ps:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step()
        m = [opt.state[p]["exp_avg"] for p in ps]
        pieces = len(list(_slices(ps, m, m, [1.0] * 3, [1.0] * 3, temp_elements(torch.device("cpu")))))
        results.append((ps, pieces))
    (a, pieces_a), (b, pieces_b) = results
    assert (pieces_a, pieces_b) == (2, 1)  # 2**22 elements, then its last 5 with the small ones; all in one
    assert all(not torch.equal(p, t) for p, t in zip(a, start))  # it moved ...
    assert all(torch.equal(x, y) for x, y in zip(a, b))  # ... by the same bits


def test_per_tensor_step_run_eagerly_gives_torch_bits():
    """update_tensor_, the function --compile compiles, run without compiling: the same operations in the same
    order as the foreach path, so torch.optim.AdamW's bits exactly (several groups, weight decay, a tensor
    larger than the step's slices)."""
    from nanolisa.adamw import update_tensor_
    params, targets = make_problem(4)
    params.append(torch.randn(4097 * 33))
    targets.append(torch.randn(4097 * 33))
    ours_p, ref_p = clone_params(params), clone_params(params)
    ours, ref = AdamW(groups(ours_p)), torch.optim.AdamW(groups(ref_p), foreach=True)
    ours.update_tensor = update_tensor_
    for step in range(30):
        step_both(((ours_p, ours), (ref_p, ref)), targets, step)
    assert all(torch.equal(a, b) for a, b in zip(ours_p, ref_p))
    assert all(not torch.equal(a, p) for a, p in zip(ours_p, params))


def test_compiled_per_tensor_step_matches_torch_adamw_and_compiles_once():
    """--compile's AdamW (kernels/compile.py compile_adamw): each tensor's step is update_tensor_ compiled by
    inductor into one pass. Against torch.optim.AdamW over LISA-like phases (parameters leave and re-join,
    several groups, weight decay): within float rounding, not bit-identical (another order of operations).
    A bounded number of graphs, all made in the first steps; and a tensor stepped in two pieces at an odd offset (an FSDP2
    shard) takes the same bits as the whole one."""
    import torch._dynamo
    from torch._dynamo.utils import counters
    from nanolisa.kernels.compile import compile_adamw
    torch._dynamo.reset()
    counters.clear()
    params, targets = make_problem(1)
    params.append(torch.randn(4097 * 33))  # one tensor long enough for the vectorised loop and its tail
    targets.append(torch.randn(4097 * 33))
    ours_p, ref_p = clone_params(params), clone_params(params)
    ours = AdamW(groups(ours_p))
    compile_adamw(ours)
    ref = torch.optim.AdamW(groups(ref_p), foreach=True)
    phases = [{0, 1, 2, 3, 4, 5}, {0, 2, 5}, {1, 2, 4}, {0, 1, 2, 3, 4, 5}]
    prev: set = set()
    for phase, active in enumerate(phases):
        enter_phase(active, prev, ours_p, ref_p, ref)
        prev = active
        for k in range(15):
            step_both(((ours_p, ours), (ref_p, ref)), targets, phase * 15 + k)
        if phase == 0:
            graphs = counters["stats"]["unique_graphs"]
    for a, b in zip(ours_p, ref_p):  # rounding, which 60 steps of a loss with sin() in it can grow, but
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-4)  # far below one step (lr up to 5e-2)
    assert any(not torch.equal(a, b) for a, b in zip(ours_p, ref_p))  # the compiled path did run
    moved = [(a - p).abs().max().item() for a, p in zip(ours_p, params)]
    assert min(moved) > 1e-3, moved
    # Compiled in the first steps only: one graph per (betas, size range) here (sizes 5 to 135201, two betas;
    # inductor guards on small sizes), none later however many steps and re-joins follow.
    assert counters["stats"]["unique_graphs"] == graphs <= 4, dict(counters["stats"])

    p, g = torch.randn(4097 * 33), torch.randn(4097 * 33)
    whole, pieces = p.clone(), [p[:77].clone(), p[77:].clone()]
    for ps, gs in (([whole], [g]), (pieces, [g[:77], g[77:]])):
        sc = torch.tensor([1 - 1e-2 * 0.1, -1e-2 / (1 - 0.9), (1 - 0.999) ** 0.5])
        for x, gx in zip(ps, gs):
            ours.update_tensor(x, gx, torch.zeros_like(x), torch.zeros_like(x), sc, 0.9, 0.999, 1e-8)
    assert torch.equal(whole, torch.cat(pieces))
    torch._dynamo.reset()
