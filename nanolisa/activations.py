"""The MLP activations, by the names config.json gives them: Llama's `hidden_act`, GPT-2's `activation_function`.

Both families look the name up in transformers' ACT2FN, so a checkpoint may name any of its parameter-free
activations; each entry here is the same function as transformers' (tests/test_activations.py checks the
logits of both families for every name). An unknown name is refused when config.json is read (config.py),
never replaced by a default: a model run with another activation than it was trained with is silently
wrong. Not supported: ACT2FN's `prelu` and `xielu`, which carry learned parameters of their own.

This is its own module, not part of model.py, because config.py checks names against it and model.py
imports config.py.
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable

import torch
import torch.nn.functional as F

Tensor = torch.Tensor


def gelu_tanh(x: Tensor) -> Tensor:
    """GPT-2's GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) (Hendrycks & Gimpel 2016, eq. 2).
    transformers' gelu_new, gelu_fast, gelu_accurate and gelu_pytorch_tanh are this formula, written out or
    (gelu_fast) with sqrt(2/pi) rounded to 10 digits: all agree to float32 rounding, so one fused kernel serves."""
    return F.gelu(x, approximate="tanh")


def quick_gelu(x: Tensor) -> Tensor:
    """x sigmoid(1.702 x), the cruder GELU approximation CLIP was trained with."""
    return x * torch.sigmoid(1.702 * x)


def gelu_10(x: Tensor) -> Tensor:
    """Exact GELU clipped to [-10, 10] (for quantisation)."""
    return torch.clip(F.gelu(x), -10.0, 10.0)


def relu2(x: Tensor) -> Tensor:
    """Squared ReLU (Primer, arXiv 2109.08668)."""
    return torch.square(F.relu(x))


def laplace(x: Tensor, mu: float = 0.707107, sigma: float = 0.282095) -> Tensor:
    """MEGA's Laplace activation (arXiv 2209.10655), with transformers' constants."""
    return 0.5 * (1.0 + torch.erf((x - mu).div(sigma * math.sqrt(2.0))))


def sqrt_softplus(x: Tensor) -> Tensor:
    return F.softplus(x).sqrt()


def identity(x: Tensor) -> Tensor:
    return x


ACTIVATIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,  # Llama, Mistral, Qwen2: x sigmoid(x), in the SwiGLU gate
    "swish": F.silu,
    "gelu": F.gelu,  # exact: x Phi(x), with the erf
    "gelu_python": F.gelu,
    "gelu_new": gelu_tanh,  # GPT-2
    "gelu_fast": gelu_tanh,
    "gelu_accurate": gelu_tanh,
    "gelu_pytorch_tanh": gelu_tanh,
    "gelu_python_tanh": gelu_tanh,
    "gelu_10": gelu_10,
    "quick_gelu": quick_gelu,
    "relu": F.relu,
    "relu2": relu2,
    "relu6": F.relu6,
    "leaky_relu": partial(F.leaky_relu, negative_slope=0.01),  # nn.LeakyReLU's default slope
    "hardswish": F.hardswish,
    "mish": F.mish,
    "laplace": laplace,
    "sqrtsoftplus": sqrt_softplus,
    "sigmoid": torch.sigmoid,
    "tanh": torch.tanh,
    "linear": identity,
}
