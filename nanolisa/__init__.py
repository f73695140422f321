"""nanolisa: memory-efficient fine-tuning of Llama-family and GPT-2 models with LISA, LoRA or full
fine-tuning, in pure PyTorch.

    import nanolisa
    model, tokenizer = nanolisa.load_pretrained("path/to/hf-model")   # or the built-in preset "tiny"
    logits = model(input_ids)                                          # (B, T, vocab)
    nanolisa.save_pretrained(model, tokenizer, "out/")                 # loads in transformers as-is

Where nanolisa.kernels comes from: the top-level kernels/ folder. It stays outside the package so that a
reader sees the reference model (nanolisa/model.py) and the faster kernels swapped into it as two separate
things. An install maps the folder to `nanolisa.kernels` (pyproject.toml's package-dir). A source checkout
run without installing (`python train.py` in a fresh clone) has no such mapping, so the lines below add the
checkout's root to this package's search path, `__path__`: `import nanolisa.kernels` then finds kernels/
beside nanolisa/ just as `import nanolisa.model` finds nanolisa/model.py. Only in a checkout (pyproject.toml
beside nanolisa/): next to an installed nanolisa, a kernels/ folder is some other package (PyPI has an
unrelated `kernels`). Moving the code into nanolisa/kernels/ was the alternative; these three lines cost
less than moving the entry point the documentation names.
"""
__version__ = "0.1.0"  # the one place it is written: pyproject.toml reads it

import os as _os

_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "pyproject.toml")) and _root not in __path__:
    __path__.append(_root)  # the checkout's kernels/ is nanolisa.kernels (see above)

from nanolisa.pretrained import load_model, load_pretrained, save_pretrained  # noqa: E402
from nanolisa.config import ModelConfig  # noqa: E402
from nanolisa.errors import UserError  # noqa: E402
from nanolisa.model import build_model  # noqa: E402

__all__ = ["__version__", "load_pretrained", "save_pretrained", "load_model", "build_model", "ModelConfig", "UserError"]
