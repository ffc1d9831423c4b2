"""Block-window attention (AuT encoder) benchmarks.

CUDA: the released audio tower, bf16, 20 heads x 64, windows of 104 tokens (13 tokens per second of audio):
30 s of audio = 390 tokens (3 full windows + 78), 5 min = 3900 tokens (37 full windows + 52).
``impl="triton"`` times ``block_window_attention`` (one launch for every window, its host sync for the longest
window included); ``impl="sdpa_padded"`` is the baseline: ``F.scaled_dot_product_attention`` on the same
windows already padded into a (num_windows, heads, 104, 64) batch with a key-padding mask, i.e. without the
pad/unpad copies. extra_info reports useful TFLOP/s (4 * heads * head_dim * sum(window^2) flops / time, no
padding counted); the triton case also times the baseline in the same run (``sdpa_us``, ``speedup_vs_sdpa``).

CPU: Triton only runs under the interpreter (meaningless as a timing), so a tiny shape smoke-tests the
forced-Triton path against the reference and times it once.
"""
from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F

from _kernel_bench import median_us, timed
from omni_rt.kernels import force_triton
from omni_rt.kernels.block_window_attention import block_window_attention, block_window_attention_ref

CUDA = torch.cuda.is_available()
HEADS, HEAD_DIM, WINDOW, TOKENS_PER_S = 20, 64, 104, 13
# name: audio seconds
GPU_CASES = {"audio_30s": 30, "audio_5min": 300}
CPU_CASES = {"tiny_2win": None}
CASES = GPU_CASES if CUDA else CPU_CASES
REPS = 20  # launches per timed call on the GPU, so the host sync is amortised


def _window_lengths(case: str) -> list[int]:
    if not CUDA:
        return [13, 7]
    tokens = GPU_CASES[case] * TOKENS_PER_S
    lengths = [WINDOW] * (tokens // WINDOW)
    if tokens % WINDOW:
        lengths.append(tokens % WINDOW)
    return lengths


def _setup(lengths: list[int], heads: int, head_dim: int, device: str, dtype: torch.dtype):
    g = torch.Generator(device="cpu").manual_seed(0)
    tokens = sum(lengths)
    # q, k, v as views of a fused qkv projection output, the way the encoder produces them.
    qkv = torch.randn(tokens, 3, heads, head_dim, generator=g).to(device, dtype)
    q, k, v = qkv.unbind(1)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    # Baseline inputs: (num_windows, heads, max_len, head_dim), zero padded; mask True where a key exists.
    max_len = max(lengths)
    padded = torch.zeros(3, len(lengths), heads, max_len, head_dim, device=device, dtype=dtype)
    mask = torch.zeros(len(lengths), 1, 1, max_len, dtype=torch.bool, device=device)
    for i, (s, n) in enumerate(zip(cu[:-1].tolist(), lengths)):
        padded[:, i, :, :n] = qkv[s:s + n].permute(1, 2, 0, 3)
        mask[i, ..., :n] = True
    return (q, k, v, cu), (padded[0], padded[1], padded[2], mask)


@pytest.mark.benchmark(group="block_window_attention")
@pytest.mark.parametrize("impl", ["triton", "sdpa_padded"])
@pytest.mark.parametrize("case", list(CASES))
def test_block_window_attention(benchmark, case, impl):
    lengths = _window_lengths(case)
    heads, head_dim = (HEADS, HEAD_DIM) if CUDA else (2, 16)
    device, dtype = ("cuda", torch.bfloat16) if CUDA else ("cpu", torch.float32)
    (q, k, v, cu), (qp, kp, vp, mask) = _setup(lengths, heads, head_dim, device, dtype)

    def triton_fn():
        with force_triton():
            return block_window_attention(q, k, v, cu)

    def sdpa_fn():
        return F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask)

    # Both paths give the reference answer before anything is timed.
    expected = block_window_attention_ref(q, k, v, cu)
    torch.testing.assert_close(triton_fn().float(), expected.float(), atol=2e-2, rtol=2e-2)
    unpadded = torch.cat([sdpa_fn()[i, :, :n].transpose(0, 1) for i, n in enumerate(lengths)])
    torch.testing.assert_close(unpadded.float(), expected.float(), atol=2e-2, rtol=2e-2)

    reps, rounds = (REPS, 30) if CUDA else (1, 1)
    fn = triton_fn if impl == "triton" else sdpa_fn
    flops = 4 * heads * head_dim * sum(n * n for n in lengths)
    us = median_us(fn, reps, rounds)
    benchmark.extra_info.update({"case": case, "impl": impl, "tokens": sum(lengths), "windows": len(lengths),
                                 "median_us": us, "TFLOP_per_s": flops / (us * 1e-6) / 1e12})
    if impl == "triton":
        sdpa_us = median_us(sdpa_fn, reps, rounds)
        benchmark.extra_info.update({"sdpa_us": sdpa_us, "speedup_vs_sdpa": sdpa_us / us})
    benchmark.pedantic(timed(fn, reps), rounds=20 if CUDA else 1, warmup_rounds=1 if CUDA else 0)
