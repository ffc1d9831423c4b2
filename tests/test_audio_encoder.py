"""AuT audio encoder vs transformers' audio tower (the oracle), fp32 on CPU.

The oracle is called the way transformers' thinker calls it: ``thinker.get_audio_features(input_features
(batch, 128, frames), feature_attention_mask (batch, frames))``, which packs the valid frames and passes
``feature_lens`` to the audio tower.
"""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from omni_rt.models.audio_encoder import AudioEncoder, num_audio_tokens
from tests._tolerances import PARITY, rel_err

FPS = 100  # mel frames per second (hop 160 at 16 kHz)
PREFIX = "thinker.audio_tower."


def log_mel_like(frames: int, seed: int, mels: int = 128) -> torch.Tensor:
    """(mels, frames) in the Whisper feature extractor's value range.

    Whisper clamps log10-mel to (max - 8) and maps it through (x + 4) / 4, so features span about 2.0 below
    their maximum, roughly [-1, 1.5]; a per-bin spectral tilt plus a slow envelope keeps it speech-like.
    """
    g = torch.Generator().manual_seed(seed)
    tilt = torch.linspace(0.6, -0.6, mels)[:, None]
    envelope = 0.3 * torch.sin(torch.arange(frames)[None, :] / 37.0 + seed)
    x = tilt + envelope + 0.35 * torch.randn(mels, frames, generator=g)
    return torch.maximum(x, x.max() - 2.0)


@pytest.fixture(scope="module")
def encoder(tiny_weights, tiny_config):
    with torch.device("meta"):
        m = AudioEncoder(tiny_config.thinker.audio)
    from omni_rt.loader import assign_parameters

    assign_parameters(m, ((n, t) for n, t in tiny_weights.items() if n.startswith(PREFIX)), prefix=PREFIX)
    return m.eval()


def make_encoder(weights, cfg) -> AudioEncoder:
    from omni_rt.loader import assign_parameters

    with torch.device("meta"):
        m = AudioEncoder(cfg)
    assign_parameters(m, ((n, t) for n, t in weights.items() if n.startswith(PREFIX)), prefix=PREFIX)
    return m.eval()


def padded_batch(clips: list[torch.Tensor], fill: float = 7.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(batch, mels, max_frames) with ``fill`` in the padding (which must never be read), and the mask."""
    t = max(c.shape[1] for c in clips)
    x = torch.full((len(clips), clips[0].shape[0], t), fill)
    mask = torch.zeros((len(clips), t), dtype=torch.long)
    for i, c in enumerate(clips):
        x[i, :, :c.shape[1]] = c
        mask[i, :c.shape[1]] = 1
    return x, mask


def oracle(hf_tiny, clips: list[torch.Tensor]) -> torch.Tensor:
    x, mask = padded_batch(clips, fill=0.0)
    with torch.inference_mode():
        return hf_tiny.thinker.get_audio_features(x, feature_attention_mask=mask).last_hidden_state


def test_parameter_names_are_the_checkpoint_names(encoder, tiny_config):
    """The checkpoint's names, except q/k/v (weights and biases), which are one fused parameter each."""
    from omni_rt.layout import checkpoint_layout, fused_layout

    disk = {n[len(PREFIX):]: s for n, s in checkpoint_layout(tiny_config).items() if n.startswith(PREFIX)}
    ours = {n: tuple(p.shape) for n, p in encoder.named_parameters()}
    assert ours == fused_layout(disk)
    d = tiny_config.thinker.audio.d_model
    assert ours["layers.0.self_attn.qkv_proj.weight"] == (3 * d, d) and "layers.0.self_attn.q_proj.weight" in disk
    assert not any(p.requires_grad for p in encoder.parameters())


def test_num_audio_tokens_matches_reference(encoder):
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

    frames = list(range(0, 1203)) + [FPS * 60 * 40, FPS * 60 * 40 + 1, 430, 18_001, 1_000_099]
    ref = _get_feat_extract_output_lengths(torch.tensor(frames)).tolist()
    assert [num_audio_tokens(n) for n in frames] == ref
    assert [encoder.num_audio_tokens(n) for n in frames] == ref
    with pytest.raises(ValueError):
        num_audio_tokens(-1)


@pytest.mark.parametrize("lens, conv_chunksize", [
    ([430], 500), ([100, 37, 3000, 199, 201, 250], 500), ([1234, 5, 2600], 3), ([1234, 5, 2600], 1),
    ([18_000, 99], 7), ([2600], 4),
])
def test_windows_match_reference_cu_seqlens(tiny_config, lens, conv_chunksize):
    """Window boundaries (joined over passes) are exactly transformers' cu_seqlens; passes hold whole windows."""
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import (chunk_and_pad_features,
                                                                              get_audio_cu_seqlens)

    cfg = dataclasses.replace(tiny_config.thinker.audio, conv_chunksize=conv_chunksize)
    with torch.device("meta"):
        m = AudioEncoder(cfg)
    feature_lens = torch.tensor(lens)
    _, chunk_lengths = chunk_and_pad_features(torch.zeros(cfg.num_mel_bins, sum(lens)), feature_lens, cfg.n_window)
    ref = get_audio_cu_seqlens(chunk_lengths, feature_lens, cfg.n_window_infer, cfg.n_window)
    passes = m.plan(lens)
    windows = [w for p in passes for w in p.window_tokens]
    ours = torch.tensor([0] + windows).cumsum(0)
    assert ours.tolist() == ref.tolist()
    budget = max(conv_chunksize, m.chunks_per_window)
    for p in passes:
        assert len(p.chunk_tokens) <= budget and sum(p.chunk_tokens) == p.num_tokens
    assert [p.token_start for p in passes] == torch.tensor([0] + [p.num_tokens for p in passes[:-1]]).cumsum(0).tolist()


@pytest.mark.parametrize("seconds", [1.0, 4.3, 30.0, 180.0])
def test_matches_reference_single_audio(encoder, hf_tiny, seconds):
    frames = round(seconds * FPS)
    clip = log_mel_like(frames, seed=frames)
    ref = oracle(hf_tiny, [clip])
    ours = encoder(clip, torch.tensor([frames]))
    assert ours.shape == ref.shape == (num_audio_tokens(frames), encoder.cfg.output_dim)
    err = rel_err(ours, ref)
    print(f"{seconds} s: {frames} frames -> {ours.shape[0]} tokens, rel err {err:.3g}")
    assert err <= PARITY["audio_encoder_rel"]


def test_batch_equals_each_alone_and_reference(encoder, hf_tiny):
    """A batch gives every clip exactly its tokens alone, which are transformers' tokens for that clip alone."""
    lens = [430, 100, 2610, 37, 250, 1234]
    clips = [log_mel_like(n, seed=i) for i, n in enumerate(lens)]
    ref = torch.cat([oracle(hf_tiny, [c]) for c in clips])
    concat = encoder(torch.cat(clips, dim=1), lens)
    x, _ = padded_batch(clips)
    padded = encoder(x, torch.tensor(lens))
    scale = ref.abs().max()
    assert rel_err(concat, ref) <= PARITY["audio_encoder_rel"], rel_err(concat, ref)
    assert rel_err(padded, concat) <= PARITY["audio_encoder_rel"]
    # Each audio padded to its own longest chunk: every clip's tokens are independent of its batch,
    # the 37-frame clip included.
    start = 0
    for clip, n in zip(clips, lens):
        alone = encoder(clip, [n])
        k = num_audio_tokens(n)
        assert ((alone - concat[start:start + k]).abs().max() / scale).item() <= PARITY["audio_encoder_rel"]
        start += k
    assert start == concat.shape[0]


@pytest.mark.parametrize("seconds", [0.05, 0.3, 0.99, 1.01])
def test_short_audio_equals_reference(encoder, hf_tiny, seconds):
    """Audio shorter than (or just over) one 100-frame chunk equals transformers' tower on it alone: a
    sub-second clip is padded only to its own length, as the reference pads it (it used to be 7e-3 off)."""
    frames = round(seconds * FPS)
    clip = log_mel_like(frames, seed=frames)
    ref = oracle(hf_tiny, [clip])
    ours = encoder(clip, [frames])
    assert ours.shape == ref.shape == (num_audio_tokens(frames), encoder.cfg.output_dim)
    assert rel_err(ours, ref) <= PARITY["audio_encoder_rel"], rel_err(ours, ref)


def test_small_conv_chunksize_gives_the_same_tokens(encoder, tiny_weights, tiny_config):
    lens = [1234, 37, 650]
    clips = [log_mel_like(n, seed=10 + i) for i, n in enumerate(lens)]
    x = torch.cat(clips, dim=1)
    full = encoder(x, lens)
    for chunksize in (1, 3):
        cfg = dataclasses.replace(tiny_config.thinker.audio, conv_chunksize=chunksize)
        m = make_encoder(tiny_weights, cfg)
        assert len(m.plan(lens)) > len(encoder.plan(lens))
        assert rel_err(m(x, lens), full) <= 1e-5


def test_zero_length_audio_and_bad_inputs(encoder):
    clip = log_mel_like(250, seed=5)
    out = encoder(clip, [0, 250, 0])
    assert torch.equal(out, encoder(clip, [250]))
    assert encoder(torch.zeros(128, 0), [0]).shape == (0, encoder.cfg.output_dim)
    with pytest.raises(ValueError, match="sum"):
        encoder(clip, [200])
    with pytest.raises(ValueError, match="padded"):
        encoder(clip[None], [300])
    with pytest.raises(ValueError, match=">= 0"):
        encoder(clip, [-1, 251])
    with pytest.raises(ValueError):
        encoder(clip[0], [250])


def test_triton_attention_matches_torch_path(encoder):
    from omni_rt.kernels import force_triton

    # 250 frames: a full 26-token window plus a ragged 7-token one; sliced from a wider tensor.
    clip = log_mel_like(300, seed=6)[:, 25:275]
    torch_out = encoder(clip, [250])
    with force_triton():
        triton_out = encoder(clip, [250])
    err = rel_err(triton_out, torch_out)
    print(f"triton vs torch rel err {err:.3g}")
    assert err <= 1e-5


_MEMORY_SCRIPT = textwrap.dedent("""
    import dataclasses, json, sys, time
    import torch
    from omni_rt.config import OmniConfig
    from omni_rt.models.audio_encoder import AudioEncoder
    from omni_rt.testing import tiny_config

    torch.set_num_threads(2)
    # One layer: the memory question is the chunking, and the test must stay cheap.
    cfg = dataclasses.replace(OmniConfig.from_dict(tiny_config()).thinker.audio, conv_chunksize=20, encoder_layers=1)
    m = AudioEncoder(cfg).eval()
    frames = int(sys.argv[1])
    x = torch.randn(cfg.num_mel_bins, frames)
    def status_kb(field):
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith(field)) * 1024

    with torch.inference_mode():
        m(x[:, :2000], [2000])  # warm-up: allocator and oneDNN caches are not the encoder's working set
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM (peak RSS), so the peak below is this call's
        except OSError:
            pass  # then the earlier peak counts too: the growth can only be overestimated
        base = status_kb("VmRSS:")
        t = time.perf_counter()
        out = m(x, [frames])
        dt = time.perf_counter() - t
        peak = status_kb("VmHWM:")
    print(json.dumps({"growth": peak - base, "input": x.numel() * 4, "output": out.numel() * 4,
                      "tokens": out.shape[0], "seconds": dt}))
""")


def test_forty_minutes_encode_in_bounded_memory():
    """40 min = 240k frames = 2400 chunks: peak RSS grows by the output plus one pass, not with the input.

    Measured in a fresh process with VmHWM (ru_maxrss would carry the forking parent's RSS across exec).

    Padding every chunk at once (as transformers does) would alone add the input's size (123 MB) and the
    first conv's output for all chunks 2x that; the bound is a quarter of the input.
    """
    frames = 40 * 60 * FPS
    # A fixed mmap threshold makes glibc hand every tensor-sized block back to the OS when it is freed; with
    # the default dynamic threshold, freed blocks may stay in the heap and RSS would measure the allocator.
    env = dict(os.environ, OMP_NUM_THREADS="2", MALLOC_MMAP_THRESHOLD_="131072", MALLOC_ARENA_MAX="2")
    proc = subprocess.run([sys.executable, "-c", _MEMORY_SCRIPT, str(frames)], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    print(r)
    assert r["tokens"] == num_audio_tokens(frames) == 31200
    assert r["growth"] <= r["output"] + r["input"] // 4, r


def test_attention_gets_the_longest_window_from_the_host_plan(tiny_checkpoint, monkeypatch):
    """Every layer's window attention is told the longest window by the host-side chunk plan (max_seqlen), so
    the kernel never copies cu_seqlens back to the host (one sync per layer before)."""
    import omni_rt.models.audio_encoder as ae
    from omni_rt.models.omni import load_model

    enc = load_model(tiny_checkpoint, torch.float32, "cpu", with_talker=False).thinker.audio_tower
    cfg = enc.cfg
    seen = []
    original = ae.block_window_attention

    def spy(q, k, v, cu_seqlens, scale=None, max_seqlen=None):
        seen.append((max_seqlen, int((cu_seqlens[1:] - cu_seqlens[:-1]).max())))
        return original(q, k, v, cu_seqlens, scale, max_seqlen)

    monkeypatch.setattr(ae, "block_window_attention", spy)
    with torch.inference_mode():
        enc(torch.randn(cfg.num_mel_bins, 730), [730])
    assert len(seen) >= cfg.encoder_layers
    assert all(isinstance(m, int) and m == longest for m, longest in seen), seen
