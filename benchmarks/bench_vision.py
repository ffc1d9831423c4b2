"""Vision encoder latency: omni_rt.models.vision_encoder vs transformers' Qwen3OmniMoeVisionEncoder.

Inputs: one 1280×720 image (880 tokens) and 60 s of video at 2 fps (120 frames at 640×360, the processor's video
sizes: 60 temporal grids of 880 patches), random pixel values, the same random weights for both. CPU: the tiny
and small configs' vision towers in fp32; CUDA: the released tower (27 layers, 1152 wide) in bf16, with TFLOP/s
from the matmul FLOPs. extra_info: patches, tokens, ``ref_s`` / ``ours_s`` (medians, timed the same way),
``speedup`` and ``max_rel_diff_vs_ref``.

    pytest benchmarks/bench_vision.py --benchmark-only     # timings + extra_info ratios
    pytest benchmarks/bench_vision.py --benchmark-disable   # smoke run: the image and 10 s of video, one call each
"""
from __future__ import annotations

import statistics
import time

import pytest
import torch

from omni_rt.config import OmniConfig
from omni_rt.loader import assign_parameters
from omni_rt.models.vision_encoder import VisionEncoder
from omni_rt.testing import full_config, random_state_dict, resolve_config
from omni_rt.vision import image_size, video_size

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
PREFIX = "thinker.visual."
CONFIGS = ["full"] if CUDA else ["tiny", "small"]
SMOKE_VIDEO_SECONDS = 10


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _config_dict(name: str) -> dict:
    if name != "full":
        return resolve_config(name)
    cfg = full_config(layers=1)
    cfg["thinker_config"]["vision_config"] = full_config()["thinker_config"]["vision_config"]
    return cfg


_MODELS: dict[str, tuple] = {}


def _models(name: str):
    if name in _MODELS:
        return _MODELS[name]
    cfg_dict = _config_dict(name)
    cfg = OmniConfig.from_dict(cfg_dict).thinker.vision
    with torch.device("meta"):
        ours = VisionEncoder(cfg)
    weights = {n: t for n, t in random_state_dict(cfg_dict, seed=0, dtype=DTYPE, device=DEVICE)
               if n.startswith(PREFIX)}
    assign_parameters(ours, weights.items(), prefix=PREFIX)
    ref = None
    try:
        from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import \
            Qwen3OmniMoeVisionEncoderConfig
        from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeVisionEncoder

        hf_cfg = Qwen3OmniMoeVisionEncoderConfig(**cfg_dict["thinker_config"]["vision_config"])
        hf_cfg._attn_implementation = "sdpa"
        with torch.device(DEVICE):
            ref = Qwen3OmniMoeVisionEncoder(hf_cfg)
        ref = ref.to(dtype=DTYPE).eval()
        ref.load_state_dict({n[len(PREFIX):]: t for n, t in weights.items()}, strict=True)
    except ImportError:
        pass
    _MODELS[name] = (ours.eval(), ref, cfg)
    return _MODELS[name]


def _inputs(kind: str, seconds: int, cfg) -> tuple[torch.Tensor, torch.Tensor]:
    if kind == "image":
        h, w = image_size(720, 1280)
        t = 1
    else:
        h, w = video_size(360, 640)
        t = seconds  # 2 fps, 2 frames per temporal grid
    grid = torch.tensor([[t, h // cfg.patch_size, w // cfg.patch_size]])
    g = torch.Generator().manual_seed(0)
    pv = torch.rand(int(grid.prod()), cfg.patch_dim, generator=g).mul_(2).sub_(1)
    return pv.to(device=DEVICE, dtype=DTYPE), grid


def _flops(cfg, patches: int, frame: int) -> float:
    """Matmul FLOPs of one forward: patch embed, per layer qkv/proj/MLP and attention within frames, mergers."""
    h, i = cfg.hidden_size, cfg.intermediate_size
    per_layer = 2 * patches * (4 * h * h + 2 * h * i) + 4 * patches * frame * h
    merged = patches // 4 * 2 * (cfg.merged_size ** 2 + cfg.merged_size * cfg.out_hidden_size)
    return 2 * patches * cfg.patch_dim * h + cfg.depth * per_layer + (1 + len(cfg.deepstack_visual_indexes)) * merged


def _median_s(fn, reps: int) -> float:
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


@pytest.mark.parametrize("kind, seconds", [("image", 0), ("video", 60)])
@pytest.mark.parametrize("config", CONFIGS)
def test_vision_encoder_latency(benchmark, config, kind, seconds):
    smoke = benchmark.disabled
    if smoke and not CUDA and kind == "video":
        seconds = SMOKE_VIDEO_SECONDS
    ours, ref, cfg = _models(config)
    pv, grid = _inputs(kind, seconds, cfg)

    def run_ours():
        with torch.inference_mode():
            out = ours(pv, grid)[0]
        _sync()
        return out

    def run_ref():
        with torch.inference_mode():
            out = ref(pv, grid_thw=grid).pooler_output
        _sync()
        return out

    out = run_ours()
    reps = 1 if smoke else 3
    info = benchmark.extra_info
    frame = int(grid[0, 1] * grid[0, 2])
    info.update({"config": config, "device": DEVICE, "dtype": str(DTYPE), "medium": kind, "seconds": seconds,
                 "patches": pv.shape[0], "tokens": out.shape[0]})
    if ref is not None:
        expected = run_ref()
        info["max_rel_diff_vs_ref"] = ((out.float() - expected.float()).abs().max()
                                       / expected.float().abs().max()).item()
        info["ref_s"] = _median_s(run_ref, reps)
    info["ours_s"] = _median_s(run_ours, reps)
    if ref is not None:
        info["speedup"] = info["ref_s"] / info["ours_s"]
    if CUDA:
        info["tflops"] = _flops(cfg, pv.shape[0], frame) / info["ours_s"] / 1e12
    benchmark.pedantic(run_ours, rounds=1 if smoke else 3, warmup_rounds=0, iterations=1)
