"""Shared fixtures and markers.

Markers: `cuda` tests run only where CUDA is available; `multiprocess` tests launch several processes
(torchrun) and are the slow part of the suite: `pytest -m "not multiprocess"` skips them.
"""
import pytest
import torch

import nanolisa


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "multiprocess: launches several processes (torchrun)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny():
    """The built-in tiny preset (model, tokenizer): random weights from a fixed seed."""
    return nanolisa.load_pretrained("tiny")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Keep the tokenization cache of every test in its own directory, never in the user's home."""
    monkeypatch.setenv("NANOLISA_CACHE_DIR", str(tmp_path / "cache"))
