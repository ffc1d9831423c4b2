"""Code2Wav: offline parity with transformers, the sample-count formula, and the exact streaming decoder.

Oracles: ``hf_tiny.code2wav`` (the tiny checkpoint) and, for configs the checkpoint generator does not make
(GQA, other rates, stride-3 upsampling, 300+ frames cheaply), a randomly initialised transformers
``Qwen3OmniMoeCode2Wav`` whose weights are copied into ours.
"""
from __future__ import annotations

import os

import pytest
import torch

import omni_rt
from omni_rt.config import Code2WavConfig, OmniConfig
from omni_rt.kernels import force_triton
from omni_rt.loader import assign_parameters, iter_weights
from omni_rt.models.code2wav import Code2Wav, Code2WavState
from tests._tolerances import PARITY, assert_close

ATOL = PARITY["code2wav_abs"]
RELEASED = os.path.join(os.path.dirname(omni_rt.__file__), "assets", "qwen3-omni-30b-a3b-instruct.json")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # These models are tiny: with 2 OpenMP threads on a loaded 2-core CI box every small op pays for thread
    # wake-ups (measured 40x slower per streaming step), so this file runs single-threaded.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def c2w(tiny_checkpoint, tiny_config):
    with torch.device("meta"):
        m = Code2Wav(tiny_config.code2wav)
    assign_parameters(m, iter_weights(tiny_checkpoint, tiny_config, torch.float32, "cpu"), prefix="code2wav.")
    return m.eval()


def _codes(cfg: Code2WavConfig, batch: int, frames: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, cfg.codebook_size, (batch, cfg.num_quantizers, frames), generator=g)


# A config the tiny checkpoint does not cover: GQA (4 heads over 2 kv heads), stride-3 upsampling ratio,
# rates (2, 3), a 4-frame window, and a max_position_embeddings far below the decoded length.
_CUSTOM = dict(codebook_size=16, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, num_quantizers=3, decoder_dim=16, sliding_window=4, upsample_rates=[2, 3],
               upsampling_ratios=[3], max_position_embeddings=8, rms_norm_eps=1e-5, layer_scale_initial_scale=0.01)


@pytest.fixture(scope="module")
def custom_pair():
    """(ours, transformers' Qwen3OmniMoeCode2Wav) with identical, perturbed random weights."""
    mod = pytest.importorskip("transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe")
    conf = pytest.importorskip("transformers.models.qwen3_omni_moe.configuration_qwen3_omni_moe")
    hf_cfg = conf.Qwen3OmniMoeCode2WavConfig(**_CUSTOM, rope_parameters={"rope_type": "default", "rope_theta": 100.0})
    torch.manual_seed(1)
    hf = mod.Qwen3OmniMoeCode2Wav(hf_cfg).eval()
    with torch.no_grad():
        # init leaves LayerScale at 0.01, ConvNeXt gamma at 1e-6 and snake params at 0: perturb everything
        # so the transformer, ConvNeXt and activations all shape the waveform
        for p in hf.parameters():
            p.add_(0.1 * torch.randn_like(p))
    c = dict(_CUSTOM, rope_theta=100.0, upsample_rates=tuple(_CUSTOM["upsample_rates"]),
             upsampling_ratios=tuple(_CUSTOM["upsampling_ratios"]))
    ours = Code2Wav(Code2WavConfig(**c))
    ours.load_state_dict(hf.state_dict(), strict=True)
    return ours.eval(), hf


# ------------------------------------------------------------------------------------------ offline parity
@pytest.mark.parametrize("frames", [1, 2, 5, 37])
def test_offline_matches_transformers(c2w, hf_tiny, frames):
    codes = _codes(c2w.cfg, 2, frames, seed=frames)
    with torch.no_grad():
        ref = hf_tiny.code2wav(codes).squeeze(1)
    ours = c2w.decode(codes)
    assert ours.shape == (2, c2w.num_samples(frames))
    assert_close(ours, ref, atol=ATOL, rtol=0, name=f"decode({frames} frames)")


def test_offline_long_sequence_custom_config(custom_pair):
    # 40 frames = 10 sliding windows; GQA; positions far past max_position_embeddings (8)
    ours, hf = custom_pair
    codes = _codes(ours.cfg, 2, 40, seed=3)
    with torch.no_grad():
        ref = hf(codes).squeeze(1)
    assert (ref.abs() < 1).float().mean() > 0.9, "oracle output saturated: the test would not see errors"
    assert_close(ours.decode(codes), ref, atol=ATOL, rtol=0, name="decode(custom, 40 frames)")
    # bounded-memory offline decode goes through the streaming state and must agree too
    assert_close(ours.decode(codes, chunk_frames=6), ref, atol=ATOL, rtol=0, name="decode(chunk_frames=6)")


def test_sample_count_formula(c2w, custom_pair):
    released = OmniConfig.from_file(RELEASED).code2wav
    with torch.device("meta"):
        full = Code2Wav(released)
    assert (full.samples_per_frame, full.delay, full.first_frame_samples) == (1920, 555, 1365)
    assert [full.num_samples(n) for n in (0, 1, 2, 100)] == [0, 1365, 3285, 100 * 1920 - 555]
    # general configs: D from d <- d·s + (k - s); the oracle's output length is the check
    ours, hf = custom_pair
    assert (ours.samples_per_frame, ours.delay) == (18, 9)
    for n in (1, 3, 8):
        with torch.no_grad():
            got = hf(_codes(ours.cfg, 1, n, seed=n)).shape[-1]
        assert got == ours.num_samples(n) == ours.decode(_codes(ours.cfg, 1, n, seed=n)).shape[-1]
    assert c2w.num_samples(3) == 3 * 1920 - 555


def test_chunked_decode_tiny(c2w, hf_tiny):
    # up to 300 frames transformers' chunked_decode is one forward call, so ours must equal it
    codes = _codes(c2w.cfg, 1, 12, seed=7)
    with torch.no_grad():
        ref = hf_tiny.code2wav.chunked_decode(codes, 300, 25).squeeze(1)
    assert_close(c2w.decode(codes), ref, atol=ATOL, rtol=0, name="chunked_decode(12 frames)")


def test_chunked_decode_past_300_frames(custom_pair):
    """The first 300 frames agree; after the boundary chunked_decode resumes at sample 300·T, skipping
    the D samples (300·T − D .. 300·T) that our exact decode keeps — its output is D shorter per boundary."""
    ours, hf = custom_pair
    codes = _codes(ours.cfg, 1, 310, seed=11)
    with torch.no_grad():
        ref = hf.chunked_decode(codes, 300, 25).squeeze(1)
    out = ours.decode(codes)
    t, d = ours.samples_per_frame, ours.delay
    assert ref.shape[-1] == out.shape[-1] - d
    head = ours.num_samples(300)
    assert_close(out[:, :head], ref[:, :head], atol=ATOL, rtol=0, name="first 300 frames")
    # this config's receptive field is < 25 frames, so the re-decoded chunk is exact at its own offsets
    assert_close(out[:, 300 * t:], ref[:, head:], atol=ATOL, rtol=0, name="after the chunk boundary")


# ---------------------------------------------------------------------------------------------- streaming
class _Stream:
    """Streams decoded together through the model's streaming state (init_state + step)."""

    def __init__(self, model, batch):
        self.model, self.state = model, model.init_state(batch)

    @property
    def frames(self) -> int:
        return int(self.state.pos[0])

    def push(self, codes):
        audio, self.state = self.model.step(codes, self.state)
        return audio


def _stream(model, codes, sizes):
    s = _Stream(model, codes.shape[0])
    outs, a = [], 0
    for k in sizes:
        outs.append(s.push(codes[..., a:a + k]))
        a += k
    assert a == codes.shape[-1]
    return outs, s


@pytest.mark.parametrize("sizes", [[1] * 24, [2] * 12, [7, 7, 7, 3], [1, 2, 7, 3, 1, 5, 5]],
                         ids=["1", "2", "7", "mixed"])
def test_streaming_equals_offline(custom_pair, sizes):
    # the custom config (18 samples per frame) keeps 24 frames = 6 sliding windows cheap
    model = custom_pair[0]
    codes = _codes(model.cfg, 2, 24, seed=5)
    offline = model.decode(codes)
    outs, stream = _stream(model, codes, sizes)
    t, d = model.samples_per_frame, model.delay
    assert [o.shape[-1] for o in outs] == [sizes[0] * t - d] + [k * t for k in sizes[1:]]
    assert_close(torch.cat(outs, -1), offline, atol=ATOL, rtol=0, name=f"stream {sizes}")
    assert stream.frames == 24


def test_streaming_equals_offline_tiny(c2w):
    # the checkpoint's own config: 1920 samples per frame, 1920 − 555 = 1365 for the first frame
    codes = _codes(c2w.cfg, 1, 11, seed=12)
    outs, _ = _stream(c2w, codes, [1, 2, 7, 1])
    assert [o.shape[-1] for o in outs] == [1365, 2 * 1920, 7 * 1920, 1920]
    assert_close(torch.cat(outs, -1), c2w.decode(codes), atol=ATOL, rtol=0, name="tiny stream")


def test_streaming_custom_config_equals_transformers(custom_pair):
    ours, hf = custom_pair
    codes = _codes(ours.cfg, 1, 30, seed=9)
    with torch.no_grad():
        ref = hf(codes).squeeze(1)
    outs, _ = _stream(ours, codes, [1, 4, 1, 9, 2, 13])
    assert outs[0].shape[-1] == ours.first_frame_samples * 1 and outs[1].shape[-1] == 4 * 18
    assert_close(torch.cat(outs, -1), ref, atol=ATOL, rtol=0, name="custom stream vs transformers")


def test_state_shapes_are_static(c2w):
    # no per-frame growth: the state after any number of frames has the initial shapes (graph-capturable)
    state = c2w.init_state(2)
    shapes = [t.shape for t in (state.pos, state.key, state.value, *state.conv, *state.tail)]
    codes = _codes(c2w.cfg, 2, 20, seed=2)
    for a, k in ((0, 3), (3, 1), (4, 16)):
        audio, new = c2w.step_padded(codes[..., a:a + k], state)
        assert audio.shape == (2, k * c2w.samples_per_frame)
        assert [t.shape for t in (new.pos, new.key, new.value, *new.conv, *new.tail)] == shapes
        assert torch.equal(state.pos, torch.full((2,), a)), "step_padded must not modify its input state"
        state = new
    assert state.key.shape[3] == c2w.cfg.sliding_window - 1


def test_batched_streams_equal_each_alone(c2w):
    codes = _codes(c2w.cfg, 3, 6, seed=4)
    batched, _ = _stream(c2w, codes, [3, 1, 2])
    for b in range(3):
        alone, _ = _stream(c2w, codes[b:b + 1], [3, 1, 2])
        for i, (x, y) in enumerate(zip(batched, alone)):
            assert_close(x[b:b + 1], y, atol=ATOL, rtol=0, name=f"stream {b} chunk {i}")


def test_streams_at_different_positions(c2w):
    """A pool holding a running stream (5 frames in) and a fresh one, stepped together with static shapes."""
    codes = _codes(c2w.cfg, 2, 9, seed=8)
    t, d = c2w.samples_per_frame, c2w.delay
    _, run = c2w.step(codes[:1, :, :5], c2w.init_state(1))
    pool = c2w.init_state(3)
    pool.scatter_([2], run)  # slot 2 runs, slot 0 is fresh, slot 1 idles (fresh, fed code 0)
    sel = pool.select([0, 2])
    assert sel.pos.tolist() == [0, 5]
    step_codes = torch.stack([codes[1, :, :4], codes[0, :, 5:9]])
    with pytest.raises(ValueError, match="mixes fresh and running"):
        c2w.step(step_codes, sel)
    audio, new = c2w.step_padded(step_codes, sel)
    assert audio.shape == (2, 4 * t) and new.pos.tolist() == [4, 9]
    fresh_ref = c2w.decode(codes[1:, :, :4])
    run_ref = c2w.decode(codes[:1])[:, c2w.num_samples(5):]
    assert_close(audio[:1, d:], fresh_ref, atol=ATOL, rtol=0, name="fresh stream in a mixed batch")
    assert_close(audio[1:], run_ref, atol=ATOL, rtol=0, name="running stream in a mixed batch")
    # the stepped streams go back to their slots and continue exactly
    pool.scatter_([0, 2], new)
    more = torch.stack([codes[1, :, 4:6], codes[1, :, 4:6], codes[0, :, :2]])
    audio2, _ = c2w.step_padded(more, pool)
    assert_close(audio2[:1], c2w.decode(codes[1:, :, :6])[:, c2w.num_samples(4):], atol=ATOL, rtol=0,
                 name="fresh stream after returning to its slot")
    # cat keeps stream order: the running stream first, then a fresh one, stepped as one batch
    both = Code2WavState.cat([new.select([1]), c2w.init_state(1)])
    audio3, _ = c2w.step_padded(torch.stack([codes[0, :, :1], codes[1, :, :1]]), both)
    assert_close(audio3[1:, d:], c2w.decode(codes[1:, :, :1]), atol=ATOL, rtol=0, name="fresh stream after cat")


def test_rejects_bad_codes(c2w):
    with pytest.raises(ValueError, match="num_quantizers|frames"):
        c2w.decode(torch.zeros((1, c2w.cfg.num_quantizers + 1, 3), dtype=torch.long))
    with pytest.raises(ValueError, match="integer"):
        c2w.decode(torch.zeros((1, c2w.cfg.num_quantizers, 3)))
    assert c2w.decode(torch.zeros((2, c2w.cfg.num_quantizers, 0), dtype=torch.long)).shape == (2, 0)


# ------------------------------------------------------------------------------------------ Triton path
@pytest.mark.skipif(not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs CUDA or the Triton interpreter")
def test_triton_conv_path_matches_torch(custom_pair):
    # the custom config keeps the interpreter cheap (36 samples for 2 frames; the tiny config's 3840 take
    # minutes there); every conv kind is covered: depthwise (ConvNeXt), dense k7 with dilations 1/3/9 and
    # fused snake, pointwise, and the 16 -> 1 output conv
    model = custom_pair[0]
    codes = _codes(model.cfg, 2, 2, seed=6)
    ref = model.decode(codes)
    with force_triton():
        offline = model.decode(codes)
        # the second frame goes through the kernel's carried state and the transposed-conv tails
        outs, _ = _stream(model, codes, [1, 1])
    assert_close(offline, ref, atol=ATOL, rtol=0, name="decode, Triton convs")
    assert_close(torch.cat(outs, -1), ref, atol=ATOL, rtol=0, name="stream, Triton convs")


@pytest.mark.gpu
def test_gpu_matches_cpu_and_streams(c2w, tiny_checkpoint, tiny_config, monkeypatch):
    """CUDA (Triton convs): fp32 equals the CPU decode and streams exactly; bf16 streams match bf16 offline."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # the transposed convs run in cuDNN
    codes = _codes(c2w.cfg, 2, 9, seed=1)
    ref = c2w.decode(codes)
    for dtype, atol in ((torch.float32, 1e-4), (torch.bfloat16, 5e-2)):
        with torch.device("meta"):
            m = Code2Wav(tiny_config.code2wav)
        assign_parameters(m, iter_weights(tiny_checkpoint, tiny_config, dtype, "cuda"), prefix="code2wav.")
        offline = m.decode(codes.cuda())
        outs, _ = _stream(m, codes.cuda(), [1, 3, 5])
        assert_close(torch.cat(outs, -1).float(), offline.float(), atol=atol / 10 if dtype == torch.float32
                     else atol, rtol=0, name=f"{dtype} stream vs offline (GPU)")
        assert_close(offline.float().cpu(), ref, atol=atol, rtol=0, name=f"{dtype} GPU vs fp32 CPU")


@pytest.mark.gpu
def test_gpu_stream_step_cuda_graph(tiny_checkpoint, tiny_config):
    """step_padded is capturable: one graph replayed per frame (state copied back) equals the eager stream."""
    with torch.device("meta"):
        m = Code2Wav(tiny_config.code2wav)
    assign_parameters(m, iter_weights(tiny_checkpoint, tiny_config, torch.float32, "cuda"), prefix="code2wav.")
    codes = _codes(m.cfg, 2, 4, seed=3).cuda()
    eager, _ = _stream(m, codes, [1, 1, 1, 1])
    state, static_codes = m.init_state(2), codes[..., :1].clone()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):  # warm-up outside capture: Triton compiles, cuDNN picks algorithms
            m.step_padded(static_codes, state)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        audio, new = m.step_padded(static_codes, state)
    outs = []
    for i in range(4):
        static_codes.copy_(codes[..., i:i + 1])
        graph.replay()
        outs.append(audio.clone())
        state.copy_(new)
    outs[0] = outs[0][:, m.delay:]
    assert_close(torch.cat(outs, -1), torch.cat(eager, -1), atol=1e-5, rtol=0, name="graph replay vs eager")
