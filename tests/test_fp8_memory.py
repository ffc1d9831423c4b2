"""Weight memory at the released shapes, summed from the actual parameter dtypes and sizes of a meta-device
model built as a load on sm_90 builds it (FP8 codes + fp32 scale grids for the thinker/talker decoder
projections, bf16 elsewhere): the whole pipeline ≤ 38 GB with FP8, and the KV plan on a 48 GB GPU then holds
8 concurrent 4k-token requests. Also Runtime.memory() on the tiny checkpoint."""
from __future__ import annotations

import math

import pytest
import torch

import omni_rt
from omni_rt.config import OmniConfig
from omni_rt.layout import checkpoint_layout
from omni_rt.models.omni import build_meta_model
from omni_rt.runtime import plan_kv_tokens

RELEASED = "/work/shared/configs/qwen3-omni-30b-a3b-instruct.json"
GB = 1e9


@pytest.fixture(scope="module")
def cfg():
    import os

    from omni_rt.testing.configs import released_config

    return OmniConfig.from_file(RELEASED) if os.path.isfile(RELEASED) else OmniConfig.from_dict(released_config())


def _param_bytes(model) -> dict[torch.dtype, int]:
    out: dict[torch.dtype, int] = {}
    for p in model.parameters():
        out[p.dtype] = out.get(p.dtype, 0) + p.numel() * p.element_size()
    return out


def _vision_bytes(cfg, model) -> int:
    """The vision tower in bf16 when this build does not hold it yet (so the bound covers the whole pipeline)."""
    if any(n.startswith("thinker.visual.") for n, _ in model.named_parameters()):
        return 0
    return sum(math.prod(s) * 2 for n, s in checkpoint_layout(cfg).items() if n.startswith("thinker.visual."))


def test_released_weights_fit_38gb_with_fp8(cfg):
    bf16 = build_meta_model(cfg, torch.bfloat16)
    fp8 = build_meta_model(cfg, torch.bfloat16, fp8=True)
    by_dtype = _param_bytes(fp8)
    assert set(by_dtype) == {torch.bfloat16, torch.float8_e4m3fn, torch.float32}
    fp8_total = sum(by_dtype.values()) + _vision_bytes(cfg, fp8)
    bf16_total = sum(_param_bytes(bf16).values()) + _vision_bytes(cfg, bf16)
    assert fp8_total <= 38 * GB, f"{fp8_total / GB:.2f} GB"
    assert bf16_total > 69 * GB                  # the bf16 pipeline needs an 80 GB GPU
    # every expert, attention and dense-MLP matrix of both decoders is FP8; the scales cost < 0.1 %
    assert by_dtype[torch.float32] < 0.001 * by_dtype[torch.float8_e4m3fn]
    mem_bf16, mem_fp8 = bf16.weight_memory(), fp8.weight_memory()
    assert mem_fp8["thinker"] <= 0.52 * mem_bf16["thinker"] and mem_fp8["talker"] <= 0.52 * mem_bf16["talker"]
    for part in ("audio_tower", "vision", "code_predictor", "code2wav"):
        assert mem_fp8[part] == mem_bf16[part]
    buffers = sum(b.numel() * b.element_size() for b in fp8.buffers())
    assert mem_fp8["total"] == sum(by_dtype.values()) + buffers


def test_kv_plan_on_48gb_uses_the_memory_fp8_saves(cfg):
    fp8 = build_meta_model(cfg, torch.bfloat16, fp8=True)
    weights = fp8.weight_memory()["total"] + _vision_bytes(cfg, fp8)
    free = 48 * GB - weights - 1.5 * GB          # CUDA context, allocator slack, graph pools
    tokens = plan_kv_tokens(cfg, int(free), torch.bfloat16, True, 0.9, 16)
    assert tokens >= 8 * 4096, tokens
    bf16_weights = build_meta_model(cfg, torch.bfloat16).weight_memory()["total"]
    assert bf16_weights > 48 * GB                # without FP8 there is no KV plan on this GPU at all


def test_runtime_memory_reports_components(tiny_checkpoint):
    with omni_rt.Runtime(tiny_checkpoint, device="cpu", max_batch_size=1, kv_cache_tokens=64) as rt:
        mem = rt.memory()
        params = sum(p.numel() * p.element_size() for p in rt.model.parameters())
    assert set(mem) == {"thinker", "audio_tower", "vision", "talker", "code_predictor", "code2wav", "total"}
    assert all(v > 0 for v in mem.values())
    assert mem["total"] == sum(v for k, v in mem.items() if k != "total")
    assert params <= mem["total"]                  # buffers (rotary tables, conv caches) counted too
