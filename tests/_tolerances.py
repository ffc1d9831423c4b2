"""The one tolerance table, and a verbose assert that prints where tensors differ.

Rows are (atol, rtol) per dtype for kernel-vs-reference comparisons; model-level parity tolerances are
named entries so every suite states the same numbers.
"""
from __future__ import annotations

import torch

KERNEL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

# Model-level parity against transformers (fp32 on CPU).
PARITY = {
    "logits_rel": 1e-4,        # max |ours - ref| / max |ref|
    "hidden_rel": 1e-4,
    "audio_encoder_rel": 1e-4,
    "log_mel_abs": 1e-4,
    "code2wav_abs": 1e-5,
    "waveform_abs": 1e-4,
    "pixel_values_abs": 1e-5,  # vision preprocessing vs Qwen2VLImageProcessor / Qwen2VLVideoProcessor
    "vision_encoder_rel": 1e-4,
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float | None = None,
                 rtol: float | None = None, name: str = "tensor", max_report: int = 5) -> None:
    """assert_close with the dtype's row by default, printing max/mean error and the first mismatches."""
    if atol is None or rtol is None:
        d_atol, d_rtol = KERNEL.get(expected.dtype, KERNEL[torch.float32])
        atol = d_atol if atol is None else atol
        rtol = d_rtol if rtol is None else rtol
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    a = actual.detach().float().cpu()
    e = expected.detach().float().cpu()
    diff = (a - e).abs()
    bad = diff > atol + rtol * e.abs()
    if bad.any():
        idx = bad.nonzero()[:max_report].tolist()
        rows = ", ".join(f"{tuple(i)}: {a[tuple(i)].item():.6g} vs {e[tuple(i)].item():.6g}" for i in idx)
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements differ (atol={atol}, rtol={rtol}); "
            f"max abs {diff.max().item():.3g}, mean abs {diff.mean().item():.3g}; first: {rows}")


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected| (scale-relative error)."""
    e = expected.detach().double().cpu()
    return ((actual.detach().double().cpu() - e).abs().max() / e.abs().max().clamp_min(1e-30)).item()
