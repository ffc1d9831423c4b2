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

import pytest
import torch

from _model_bench import CONFIGS, CUDA, DEVICE, DTYPE, paired_towers, record_same_run, sync, tower_config
from omni_rt.config import OmniConfig
from omni_rt.models.vision_encoder import VisionEncoder
from omni_rt.vision import image_size, video_size

PREFIX = "thinker.visual."
SMOKE_VIDEO_SECONDS = 10

_MODELS: dict[str, tuple] = {}


def _models(name: str):
    """(ours, transformers' visual tower or None, our vision config) on DEVICE in DTYPE, same weights, cached."""
    if name not in _MODELS:
        cfg_dict = tower_config(name, "vision_config")
        cfg = OmniConfig.from_dict(cfg_dict).thinker.vision
        with torch.device("meta"):
            ours = VisionEncoder(cfg)

        def build_ref():
            from transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe import \
                Qwen3OmniMoeVisionEncoderConfig
            from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import Qwen3OmniMoeVisionEncoder

            hf_cfg = Qwen3OmniMoeVisionEncoderConfig(**cfg_dict["thinker_config"]["vision_config"])
            hf_cfg._attn_implementation = "sdpa"
            return Qwen3OmniMoeVisionEncoder(hf_cfg)

        _MODELS[name] = paired_towers(cfg_dict, PREFIX, ours, build_ref) + (cfg,)
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
        sync()
        return out

    def run_ref():
        with torch.inference_mode():
            out = ref(pv, grid_thw=grid).pooler_output
        sync()
        return out

    out = run_ours()
    reps = 1 if smoke else 3
    info = benchmark.extra_info
    frame = int(grid[0, 1] * grid[0, 2])
    info.update({"config": config, "device": DEVICE, "dtype": str(DTYPE), "medium": kind, "seconds": seconds,
                 "patches": pv.shape[0], "tokens": out.shape[0]})
    record_same_run(info, out, run_ours, run_ref if ref is not None else None, reps)
    if CUDA:
        info["tflops"] = _flops(cfg, pv.shape[0], frame) / info["ours_s"] / 1e12
    benchmark.pedantic(run_ours, rounds=1 if smoke else 3, warmup_rounds=0, iterations=1)
