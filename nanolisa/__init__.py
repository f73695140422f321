"""nanolisa: memory-efficient fine-tuning of Llama-family and GPT-2 models with LISA, LoRA or full
fine-tuning, in pure PyTorch.

    import nanolisa
    model, tokenizer = nanolisa.load_pretrained("path/to/hf-model")   # or the built-in preset "tiny"
    logits = model(input_ids)                                          # (B, T, vocab)
    nanolisa.save_pretrained(model, tokenizer, "out/")                 # loads in transformers as-is
"""
import importlib.util as _importlib_util
import os as _os
import sys as _sys


def _kernels_from_a_source_checkout() -> None:
    """nanolisa.kernels lives in the top-level kernels/ folder, which installs map to nanolisa.kernels
    (pyproject.toml's package-dir; an editable install's finder does the same). Where this nanolisa is the
    folder of a source checkout imported without that mapping -- `python train.py` in a clone that is not
    installed, or installed without -e -- register the checkout's kernels/ under that name. Never for an
    installed nanolisa: its kernels are inside it, and a kernels/ beside it may be PyPI's unrelated one."""
    root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
    init = _os.path.join(root, "kernels", "__init__.py")
    if "nanolisa.kernels" in _sys.modules or not _os.path.isfile(_os.path.join(root, "pyproject.toml")) or \
            not _os.path.isfile(init) or _importlib_util.find_spec("nanolisa.kernels") is not None:
        return
    spec = _importlib_util.spec_from_file_location("nanolisa.kernels", init,
                                                   submodule_search_locations=[_os.path.dirname(init)])
    module = _importlib_util.module_from_spec(spec)
    _sys.modules["nanolisa.kernels"] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module  # as an import of the submodule would bind it


_kernels_from_a_source_checkout()

from nanolisa.pretrained import load_model, load_pretrained, save_pretrained  # noqa: E402
from nanolisa.config import ModelConfig  # noqa: E402
from nanolisa.errors import UserError  # noqa: E402
from nanolisa.model import build_model  # noqa: E402

__all__ = ["load_pretrained", "save_pretrained", "load_model", "build_model", "ModelConfig", "UserError"]
