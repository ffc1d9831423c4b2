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


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> str:
    """The tiny synthetic checkpoint (fp32, seed 0), written once per session."""
    from omni_rt.testing import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("tiny_ckpt"), "tiny", seed=0, dtype=torch.float32)


@pytest.fixture(scope="session")
def tiny_config(tiny_checkpoint):
    from omni_rt.config import OmniConfig

    return OmniConfig.from_file(tiny_checkpoint)


@pytest.fixture(scope="session")
def tiny_weights(tiny_checkpoint, tiny_config):
    """{omni_rt parameter name: fp32 CPU tensor} of the tiny checkpoint."""
    from omni_rt.loader import load_state_dict

    return load_state_dict(tiny_checkpoint, torch.float32, "cpu", tiny_config)[1]


@pytest.fixture(scope="session")
def hf_tiny(tiny_checkpoint):
    """transformers' Qwen3OmniMoeForConditionalGeneration on the tiny checkpoint, fp32, eval mode (the oracle)."""
    transformers = pytest.importorskip("transformers")
    model = transformers.Qwen3OmniMoeForConditionalGeneration.from_pretrained(
        tiny_checkpoint, dtype=torch.float32)
    return model.eval()
