"""Test setup shared by every suite.

TRITON_INTERPRET must be set before anything imports triton, so this runs first: on a machine without a
CUDA device every Triton kernel the tests launch runs in Triton's CPU interpreter.
"""
import os


def _cuda_available() -> bool:
    # torch import is cheap relative to the suite; triton has not been imported yet at this point.
    try:
        import torch

        return torch.cuda.is_available()
    except Exception:
        return False


if not _cuda_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU (run `make gpu-check` on a GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield
