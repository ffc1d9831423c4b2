"""Causal conv1d benchmarks (Code2Wav's convolutions).

CUDA: the released Code2Wav convs (hidden 1024, decoder_dim 1536, upsample 8/5/4/3 after 2x2), bf16, at the
time length of one streaming frame (F=1: 4 / 32 / 160 / 640 / 1920 samples per stage) and of a 25-frame
chunk (F=25). Implementations, each timed the same way (synchronize inside the timed call):
  * ``triton``           the public op (fused snake + carried state + conv, one launch), weight as stored
                         by nn.Conv1d (out, in, width)-contiguous;
  * ``triton_prepared``  same, weight in ``prepare_weight``'s (width, out, in) storage (coalesced tiles);
  * ``torch``            what transformers does per chunk: SnakeBeta in torch, cat(state, x), F.conv1d;
  * ``conv1d_only``      F.conv1d on an already padded/activated input (cuDNN alone, no snake/state).
extra_info: GB/s of the bytes the op must move (x, state in/out, weight, bias, y) and TFLOP/s.

CPU: Triton only runs in the interpreter (not a timing), so small shapes compare the public op's CPU path
(the reference) with the unfused torch baseline.

    pytest benchmarks/bench_causal_conv1d.py --benchmark-only
    pytest benchmarks/bench_causal_conv1d.py --benchmark-disable      # smoke run
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _kernel_bench import report_bandwidth, synced
from omni_rt.kernels.causal_conv1d import causal_conv1d, causal_conv1d_ref, prepare_weight, snake_beta_ref

CUDA = torch.cuda.is_available()

# name -> (in_ch, out_ch, width, dilation, groups, snake, samples per frame)
CONVS_CUDA = {
    "in_1024_1536_k7": (1024, 1536, 7, 1, 1, False, 4),
    "dw_1024_k7": (1024, 1024, 7, 1, 1024, False, 2),
    "res_768_k7_d9": (768, 768, 7, 9, 1, True, 32),
    "res_768_k1": (768, 768, 1, 1, 1, True, 32),
    "res_384_k7_d3": (384, 384, 7, 3, 1, True, 160),
    "res_192_k7_d1": (192, 192, 7, 1, 1, True, 640),
    "res_96_k7_d9": (96, 96, 7, 9, 1, True, 1920),
    "res_96_k1": (96, 96, 1, 1, 1, True, 1920),
    "out_96_1_k7": (96, 1, 7, 1, 1, True, 1920),
}
CONVS_CPU = {
    "res_32_k7_d3": (32, 32, 7, 3, 1, True, 16),
    "dw_32_k7": (32, 32, 7, 1, 32, False, 16),
    "out_32_1_k7": (32, 1, 7, 1, 1, True, 16),
}
FRAMES = [1, 25] if CUDA else [2]
IMPLS = ["triton", "triton_prepared", "torch", "conv1d_only"] if CUDA else ["ref", "torch"]


def _setup(conv, frames, device, dtype):
    c_in, c_out, width, dilation, groups, snake, per_frame = conv
    g = torch.Generator(device=device).manual_seed(0)
    length = per_frame * frames
    w = (torch.randn(c_out, c_in // groups, width, device=device, generator=g)
         / (c_in // groups * width) ** 0.5).to(dtype)
    bias = torch.randn(c_out, device=device, generator=g).to(dtype)
    x = torch.randn(1, c_in, length, device=device, generator=g).to(dtype)
    state = torch.randn(1, c_in, (width - 1) * dilation, device=device, generator=g).to(dtype)
    sn = {}
    if snake:
        sn = dict(snake_alpha=0.5 * torch.randn(c_in, device=device, generator=g),
                  snake_beta=0.5 * torch.randn(c_in, device=device, generator=g))
    return dict(x=x, weight=w, bias=bias, dilation=dilation, groups=groups, state=state, **sn)


def _torch_unfused(x, weight, bias, dilation, groups, state, snake_alpha=None, snake_beta=None):
    """transformers' per-chunk work: SnakeBeta (its formula, in x's dtype), prepend the state, F.conv1d."""
    if snake_alpha is not None:
        a = torch.exp(snake_alpha)[None, :, None].to(x.dtype)
        b = torch.exp(snake_beta)[None, :, None].to(x.dtype)
        x = x + (1.0 / (b + 1e-9)) * torch.sin(x * a) ** 2
    xs = torch.cat([state, x], -1)
    return F.conv1d(xs, weight, bias, dilation=dilation, groups=groups), xs[..., xs.shape[-1] - state.shape[-1]:]


def _bytes_flops(a):
    x, w, st = a["x"], a["weight"], a["state"]
    c_out = w.shape[0]
    e = x.element_size()
    nbytes = (x.numel() + 2 * st.numel() + w.numel() + c_out + x.shape[0] * c_out * x.shape[2]) * e
    flops = 2 * x.shape[0] * c_out * w.shape[1] * w.shape[2] * x.shape[2]
    return nbytes, flops


@pytest.mark.parametrize("frames", FRAMES)
@pytest.mark.parametrize("name", list(CONVS_CUDA if CUDA else CONVS_CPU))
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_causal_conv1d(benchmark, impl, name, frames):
    device = "cuda" if CUDA else "cpu"
    dtype = torch.bfloat16 if CUDA else torch.float32
    a = _setup((CONVS_CUDA if CUDA else CONVS_CPU)[name], frames, device, dtype)
    y_ref, st_ref = causal_conv1d_ref(return_state=True, **a)
    if impl in ("triton", "triton_prepared", "ref"):
        b = dict(a, weight=prepare_weight(a["weight"])) if impl == "triton_prepared" else a
        fn = (lambda: causal_conv1d(return_state=True, **b)) if impl != "ref" else (
            lambda: causal_conv1d_ref(return_state=True, **b))
    elif impl == "torch":
        fn = lambda: _torch_unfused(**a)  # noqa: E731
    else:
        xs = torch.cat([a["state"], snake_beta_ref(a["x"], a["snake_alpha"], a["snake_beta"])
                        if "snake_alpha" in a else a["x"]], -1)
        fn = lambda: (F.conv1d(xs, a["weight"], a["bias"], dilation=a["dilation"], groups=a["groups"]),  # noqa
                      None)
    y, _ = fn()
    tol = 3e-2 if dtype == torch.bfloat16 else 1e-4
    scale = y_ref.float().abs().max().item()
    assert (y.float() - y_ref.float()).abs().max().item() <= tol * max(scale, 1.0), f"{impl} disagrees"
    benchmark.group = f"causal_conv1d-{name}-F{frames}"
    benchmark(synced(fn))
    nbytes, flops = _bytes_flops(a)
    report_bandwidth(benchmark, nbytes, flops, length=a["x"].shape[2], MB_moved=nbytes / 1e6)
