"""The picture of a run: training and held-out loss over steps, and beneath it a strip showing which
transformer blocks LISA had active at each step. matplotlib is an optional extra (`pip install
nanolisa[plot]`); without it the plot is skipped with a notice."""
from __future__ import annotations

import sys

import numpy as np

from nanolisa.files import atomic_file


def plot_run(rows: list[dict], lisa_history: list[tuple[int, list[int]]], n_blocks: int, total_steps: int,
             path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed, so no loss plot was drawn (pip install matplotlib)",
              file=sys.stderr)
        return False

    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    strip = bool(lisa_history)
    fig, axes = plt.subplots(2 if strip else 1, 1, figsize=(8, 6 if strip else 4), sharex=True,
                             gridspec_kw={"height_ratios": [3, 1]} if strip else None, squeeze=False)
    ax = axes[0, 0]
    if train:
        ax.plot(*zip(*train), lw=0.8, alpha=0.8, label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", ms=3, label="held-out loss")
    ax.set_ylabel("loss (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    if strip:
        # active[b, s] = 1 when block b was trainable during step s (switches hold until the next one).
        active = np.zeros((n_blocks, total_steps))
        bounds = [s for s, _ in lisa_history[1:]] + [total_steps]
        for (start, blocks), end in zip(lisa_history, bounds):
            active[blocks, start:end] = 1
        sx = axes[1, 0]
        sx.imshow(active, aspect="auto", interpolation="nearest", cmap="Greens", origin="lower",
                  extent=(0.5, total_steps + 0.5, -0.5, n_blocks - 0.5))
        sx.set_ylabel("active block")
        sx.set_xlabel("step")
    else:
        ax.set_xlabel("step")
    fig.tight_layout()
    with atomic_file(path, "wb") as f:
        fig.savefig(f, dpi=110, format="png")
    plt.close(fig)
    return True
