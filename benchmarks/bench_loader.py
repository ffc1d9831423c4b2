"""Checkpoint load: wall time, GB/s of checkpoint read, and peak RSS growth — as stored, and with block-FP8
quantization at load (``quantization="fp8"``: FP8 kept on sm_89+, quantized then dequantized elsewhere).

The synthetic checkpoint is ``full-1layer`` (the released widths, one layer per stack: ~3 GB in bf16) unless
OMNI_RT_LOADER_BENCH_CONFIG names another (`make test` uses "tiny" for its smoke run).
"""
import os
import resource
import time

import pytest
import torch

from omni_rt.models.omni import load_model
from omni_rt.testing import make_checkpoint

CONFIG = os.environ.get("OMNI_RT_LOADER_BENCH_CONFIG", "full-1layer")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("loader_bench")
    return make_checkpoint(path, CONFIG, seed=0, dtype=torch.bfloat16, max_shard_bytes=1 << 30)


def _checkpoint_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors"))


def _peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.mark.benchmark(group="loader")
@pytest.mark.parametrize("quant", [None, "fp8"])
def test_load_checkpoint(benchmark, checkpoint, device, quant):
    size = _checkpoint_bytes(checkpoint)
    rss_before = _peak_rss_bytes()
    times = []

    def load():
        start = time.perf_counter()
        model = load_model(checkpoint, torch.bfloat16, device, quantization=quant)
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        return model

    model = benchmark.pedantic(load, rounds=3, iterations=1, warmup_rounds=0)
    n_params = sum(p.numel() for p in model.parameters())
    best = min(times)
    benchmark.extra_info.update({
        "config": CONFIG, "checkpoint_gb": size / 1e9, "params": n_params,
        "read_gb_per_s": size / 1e9 / best, "peak_rss_growth_gb": (_peak_rss_bytes() - rss_before) / 1e9,
        "device": device, "quantization": quant, "weight_gb": model.weight_memory()["total"] / 1e9,
    })
    # The model must not be materialised twice: on CPU, peak RSS growth stays near one copy of the weights
    # (the safetensors files are memory-mapped; their pages count towards RSS while they are read).
    if device == "cpu" and size > 1e8:
        assert _peak_rss_bytes() - rss_before < 2.6 * size
