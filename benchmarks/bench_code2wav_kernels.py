"""Benchmarks of the Code2Wav streaming-step kernels: ``window_attention`` (rotary + sliding-window attention +
the new KV window, one launch per pre-transformer layer) and ``trans_conv1d`` (snake + pre-start mask +
transposed conv + tail + bias, one launch per upsampler).

CUDA: released shapes in bf16 at one streaming frame (F=1) and a 25-frame chunk; ``triton`` is the public op,
``ref`` its PyTorch reference (the ops the model ran before). extra_info: GB/s of the bytes the op must move and
the HBM floor (3.35 TB/s on an H100) in µs. CPU: the interpreter is no timing, so small shapes time the reference.

    pytest benchmarks/bench_code2wav_kernels.py --benchmark-only
"""
from __future__ import annotations

import pytest
import torch

from _kernel_bench import CUDA, report_bandwidth, synced
from omni_rt.kernels.trans_conv1d import prepare_weight, trans_conv1d, trans_conv1d_ref
from omni_rt.kernels.window_attention import window_attention, window_attention_ref

DEV = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
FRAMES = [1, 25] if CUDA else [1]
IMPLS = ["triton", "ref"] if CUDA else ["ref"]


@pytest.mark.parametrize("frames", FRAMES)
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_window_attention(benchmark, impl, frames):
    B, H, KV, D, W = (1, 16, 16, 64, 72) if CUDA else (1, 4, 4, 16, 8)
    n = frames
    g = torch.Generator(device=DEV).manual_seed(0)
    qkv = torch.randn(B, n, (H + 2 * KV) * D, device=DEV, generator=g).to(DTYPE)
    q, k, v = qkv[..., :H * D].view(B, n, H, D), qkv[..., H * D:(H + KV) * D].view(B, n, KV, D), \
        qkv[..., (H + KV) * D:].view(B, n, KV, D)
    pk = torch.randn(B, KV, W - 1, D, device=DEV, generator=g).to(DTYPE)
    pv = torch.randn(B, KV, W - 1, D, device=DEV, generator=g).to(DTYPE)
    pos = torch.full((B,), 500, dtype=torch.int64, device=DEV)
    ang = (pos[:, None] + torch.arange(n, device=DEV))[..., None].float() * torch.rand(D, device=DEV, generator=g)
    cos, sin = ang.cos().to(DTYPE), ang.sin().to(DTYPE)
    nk, nv = torch.empty_like(pk), torch.empty_like(pv)
    args = (q, k, v, cos, sin, pk, pv, pos, W, D ** -0.5)
    fn = (lambda: window_attention(*args, new_k=nk, new_v=nv)) if impl == "triton" else (
        lambda: window_attention_ref(*args))
    o, _, _ = fn()
    o_ref, _, _ = window_attention_ref(*args)
    assert (o.float() - o_ref.float()).abs().max().item() <= 3e-2
    benchmark.group = f"window_attention-F{frames}"
    benchmark(synced(fn))
    report_bandwidth(benchmark, (qkv.numel() + 4 * pk.numel() + 2 * cos.numel() + B * n * H * D) * qkv.element_size())


# name -> (in, out, K, stride, input samples per frame, snake)
TCONVS = ({"up_1024_s2": (1024, 1024, 2, 2, 2, False), "dec_1536_768_s8": (1536, 768, 16, 8, 4, True),
           "dec_768_384_s5": (768, 384, 10, 5, 32, True), "dec_384_192_s4": (384, 192, 8, 4, 160, True),
           "dec_192_96_s3": (192, 96, 6, 3, 640, True)} if CUDA else {"dec_24_12_s3": (24, 12, 6, 3, 8, True)})


@pytest.mark.parametrize("frames", FRAMES)
@pytest.mark.parametrize("name", list(TCONVS))
@pytest.mark.parametrize("impl", IMPLS)
def test_bench_trans_conv1d(benchmark, impl, name, frames):
    c_in, c_out, k, s, per_frame, snake = TCONVS[name]
    g = torch.Generator(device=DEV).manual_seed(0)
    w = (torch.randn(c_in, c_out, k, device=DEV, generator=g) / (2 * c_in) ** 0.5).to(DTYPE)
    a = dict(bias=torch.randn(c_out, device=DEV, generator=g).to(DTYPE), stride=s,
             tail=torch.randn(1, c_out, k - s, device=DEV, generator=g).to(DTYPE),
             pre_start=(torch.full((1,), 500, dtype=torch.int64, device=DEV), 3, 1))
    if snake:
        a.update(snake_alpha=0.5 * torch.randn(c_in, device=DEV, generator=g),
                 snake_beta=0.5 * torch.randn(c_in, device=DEV, generator=g))
    x = torch.randn(1, c_in, per_frame * frames, device=DEV, generator=g).to(DTYPE)
    wp = prepare_weight(w) if impl == "triton" else w
    fn = (lambda: trans_conv1d(x, wp, **a)) if impl == "triton" else (lambda: trans_conv1d_ref(x, w, **a))
    y, _ = fn()
    y_ref, _ = trans_conv1d_ref(x.float(), w.float(), **{kk: (v.float() if torch.is_tensor(v) and v.is_floating_point()
                                                               else v) for kk, v in a.items()})
    assert (y.float() - y_ref).abs().max().item() <= 5e-2 * max(y_ref.abs().max().item(), 1.0)
    benchmark.group = f"trans_conv1d-{name}-F{frames}"
    benchmark(synced(fn))
    report_bandwidth(benchmark, (x.numel() + w.numel() + c_out + y.numel() + 2 * a["tail"].numel()) * x.element_size())
