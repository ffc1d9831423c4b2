"""omni_rt.audio: loading, resampling, mix-down, PCM scaling, errors, and log-mel parity with transformers.

The oracle is ``WhisperFeatureExtractor(feature_size=128)`` called the way Qwen3-Omni's processor calls it
(``padding=True, truncation=False, return_attention_mask=True``), restricted to the frames its attention mask
marks valid — what the model reads through ``feature_attention_mask``.
"""
from __future__ import annotations

import functools
import io
import math
import os
import wave

import numpy as np
import pytest
import torch

from omni_rt import audio
from _tolerances import PARITY, assert_close

# Optional here as in the package: the GPU machines have neither, and the log-mel tests must still run there.
try:
    import soundfile as sf
except (ImportError, OSError):
    sf = None
try:
    import scipy.signal as signal
except ImportError:
    signal = None
needs_sf = pytest.mark.skipif(sf is None, reason="needs soundfile")
needs_scipy = pytest.mark.skipif(signal is None, reason="needs scipy")

ASSET = os.path.join(os.path.dirname(audio.__file__), "assets", "question.wav")
LOG_MEL_ATOL = PARITY["log_mel_abs"]


# ----------------------------------------------------------------------------------------------------------
# signals
# ----------------------------------------------------------------------------------------------------------
def speech_like(n: int, seed: int = 0, sr: int = 16000) -> np.ndarray:
    """Voiced harmonics with a gliding pitch through three moving formants, noise bursts and pauses."""
    return _speech_like(n, seed, sr).copy()


@functools.lru_cache(maxsize=None)
def _speech_like(n: int, seed: int, sr: int) -> np.ndarray:
    rs = np.random.RandomState(seed)
    t = np.arange(n) / sr
    f0 = 110 + 40 * np.sin(2 * np.pi * 0.9 * t) + 15 * np.sin(2 * np.pi * 3.1 * t)
    phase = 2 * np.pi * np.cumsum(f0) / sr
    voiced = np.zeros(n)
    formants = [(600 + 200 * np.sin(2 * np.pi * 1.3 * t), 90), (1500 + 400 * np.sin(2 * np.pi * 0.7 * t), 120),
                (2600 + 300 * np.sin(2 * np.pi * 0.4 * t), 160)]
    for k in range(1, 25):
        fk = k * f0
        gain = sum(np.exp(-0.5 * ((fk - fc) / bw) ** 2) for fc, bw in formants) + 0.02
        voiced += gain * np.sin(k * phase) / k
    syllables = 0.5 + 0.5 * np.sin(2 * np.pi * 4.0 * t)
    fric = rs.randn(n) * (np.sin(2 * np.pi * 1.7 * t) > 0.8)
    x = voiced * syllables + 0.3 * fric
    x[(t % 2.3) > 1.9] *= 1e-3  # pauses
    return (0.4 * x / np.abs(x).max()).astype(np.float32)


def long_speech_like(seconds: int) -> np.ndarray:
    """`seconds` of audio from a 20 s speech-like pool: one-second blocks with random offsets and ±20 dB gain."""
    pool = speech_like(20 * 16000, seed=1)
    rs = np.random.RandomState(2)
    starts = rs.randint(0, pool.size - 16000, size=seconds)
    gains = 10.0 ** rs.uniform(-1.0, 1.0, size=seconds).astype(np.float32) * 0.5
    return (pool[starts[:, None] + np.arange(16000)[None, :]] * gains[:, None]).reshape(-1)


def sine(freq: float, sr: int, seconds: float, amp: float = 0.5) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(sr * seconds)) / sr)).astype(np.float32)


def peak_freq(x: np.ndarray, sr: int) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(x.size)))
    return float(np.argmax(spec) * sr / x.size)


# ----------------------------------------------------------------------------------------------------------
# the reference
# ----------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def whisper_fe():
    transformers = pytest.importorskip("transformers")
    return transformers.WhisperFeatureExtractor(feature_size=128)


def reference_log_mel(fe, wav: np.ndarray) -> torch.Tensor:
    out = fe(wav, sampling_rate=16000, padding=True, truncation=False, return_attention_mask=True,
             return_tensors="pt")
    mask = out["attention_mask"][0].bool()
    return out["input_features"][0][:, mask]


SIGNALS = {
    "speech_like_7s": lambda: speech_like(7 * 16000 + 37),
    "white_noise": lambda: (0.1 * np.random.RandomState(3).randn(48013)).astype(np.float32),
    "silent": lambda: np.zeros(16000, np.float32),
    "clipped": lambda: np.clip(4 * speech_like(2 * 16000, seed=5), -1, 1),
    "full_scale_square": lambda: np.sign(sine(440, 16000, 1.5)).astype(np.float32),
    "short_0.3s": lambda: speech_like(4800, seed=6),
    "min_len_201": lambda: np.random.RandomState(7).randn(201).astype(np.float32),
    "exactly_30s": lambda: long_speech_like(30),
    "just_over_30s": lambda: np.concatenate([long_speech_like(30), speech_like(1, seed=9)]),
}


@pytest.mark.oracle
@pytest.mark.parametrize("name", list(SIGNALS))
def test_log_mel_matches_whisper_feature_extractor(whisper_fe, name):
    wav = SIGNALS[name]()
    ref = reference_log_mel(whisper_fe, wav)
    ours = audio.log_mel(wav)
    assert ours.dtype == torch.float32 and ours.shape == (128, wav.size // 160)
    assert_close(ours, ref, atol=LOG_MEL_ATOL, rtol=0, name=f"log_mel[{name}]")
    # fp64 is the computation log_mel uses on CUDA; check its numerics here on the CPU.
    ours64 = audio._log_mel(torch.from_numpy(wav), torch.device("cpu"), torch.float64)
    assert_close(ours64, ref, atol=LOG_MEL_ATOL, rtol=0, name=f"log_mel_fp64[{name}]")


@pytest.mark.oracle
def test_log_mel_ten_minutes_no_truncation(whisper_fe):
    wav = long_speech_like(600)
    ref = reference_log_mel(whisper_fe, wav)
    assert ref.shape == (128, 60000)  # the reference itself does not cap at 3000 frames with these arguments
    ours = audio.log_mel(wav)
    assert_close(ours, ref, atol=LOG_MEL_ATOL, rtol=0, name="log_mel[10 min]")
    ours64 = audio._log_mel(torch.from_numpy(wav), torch.device("cpu"), torch.float64)
    assert_close(ours64, ref, atol=LOG_MEL_ATOL, rtol=0, name="log_mel_fp64[10 min]")
    # The clamp floor is global: a quiet block far from the loudest one still sits above max - 8 (≡ -1 here).
    assert float(ours.min()) >= float(ours.max()) - 2.0 - 1e-6


@pytest.mark.oracle
def test_log_mel_chunking_is_invisible(whisper_fe, monkeypatch):
    # Tiny chunks: every chunk boundary must reproduce the single-shot frames (BLAS may round the mel
    # projection of a 7-frame block differently in the last bit, hence 1e-6 and not bit equality).
    wav = speech_like(16000 + 123, seed=11)
    whole = audio.log_mel(wav)
    monkeypatch.setattr(audio, "_MEL_CHUNK_FRAMES", 7)
    assert_close(audio.log_mel(wav), whole, atol=1e-6, rtol=0, name="chunked")
    assert_close(whole, reference_log_mel(whisper_fe, wav), atol=LOG_MEL_ATOL, rtol=0)


@pytest.mark.oracle
def test_log_mel_of_shipped_question(whisper_fe):
    wav = audio.load(ASSET)
    assert_close(audio.log_mel(wav), reference_log_mel(whisper_fe, wav), atol=LOG_MEL_ATOL, rtol=0)


@pytest.mark.oracle
def test_mel_filters_equal_transformers(whisper_fe):
    np.testing.assert_array_equal(audio.mel_filters(), whisper_fe.mel_filters)


@pytest.mark.oracle
@pytest.mark.parametrize("n", [201, 319, 320, 321, 16000, 16159, 16160, 480001])
def test_num_frames_equals_processor_mask(whisper_fe, n):
    out = whisper_fe(np.zeros(n, np.float32), sampling_rate=16000, padding=True, truncation=False,
                     return_attention_mask=True)
    assert audio.num_frames(n) == int(out["attention_mask"].sum())


@pytest.mark.oracle
def test_num_audio_tokens_equals_reference():
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

    lengths = torch.arange(0, 3001)
    for n_window in (50, 25):
        expect = _get_feat_extract_output_lengths(lengths, n_window)
        assert torch.equal(audio.num_audio_tokens(lengths, n_window), expect)
        assert [audio.num_audio_tokens(int(n), n_window) for n in lengths[::37]] == expect[::37].tolist()
    np.testing.assert_array_equal(audio.num_audio_tokens(np.arange(3001)), expect_np := np.asarray(
        _get_feat_extract_output_lengths(lengths)))
    assert expect_np[100] == 13 and expect_np[0] == 0  # 1 s = 13 tokens, as docs/anchors.md B.6 says


def test_log_mel_input_forms_agree():
    wav = speech_like(8000, seed=12)
    base = audio.log_mel(wav)
    # float64 input is rounded to fp32 first, as the reference does.
    assert torch.equal(audio.log_mel(wav.astype(np.float64)), base)
    assert torch.equal(audio.log_mel(torch.from_numpy(wav)), base)
    # A strided view (every other sample of a longer buffer) is read correctly.
    buf = np.zeros(2 * wav.size, np.float32)
    buf[::2] = wav
    assert torch.equal(audio.log_mel(buf[::2]), base)
    assert audio.log_mel(wav, device="cpu").device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.oracle
def test_log_mel_cuda_matches_reference(whisper_fe):
    for wav in (speech_like(7 * 16000 + 37), np.clip(4 * speech_like(32000, seed=5), -1, 1),
                long_speech_like(600)):
        ours = audio.log_mel(torch.from_numpy(wav).cuda())
        assert ours.device.type == "cuda"
        assert_close(ours.cpu(), reference_log_mel(whisper_fe, wav), atol=LOG_MEL_ATOL, rtol=0)
        assert audio.log_mel(wav, device="cuda").device.type == "cuda"


@pytest.mark.parametrize("bad, match", [
    (np.zeros(200, np.float32), "at least"),
    (np.zeros(1, np.float32), "at least"),
    (np.zeros((2, 16000), np.float32), "shape"),
    (np.zeros(16000, np.int16), "float"),
    (torch.zeros(16000, dtype=torch.int32), "float"),
    (np.array([0.0] * 500 + [np.nan], np.float32), "NaN"),
    (np.array([0.0] * 500 + [np.inf], np.float32), "NaN"),
    ([0.0] * 16000, "ndarray"),
])
def test_log_mel_errors(bad, match):
    with pytest.raises(ValueError, match=match):
        audio.log_mel(bad)


def test_log_mel_too_long():
    # np.zeros is lazily allocated: this costs no memory, and validation runs before any compute.
    with pytest.raises(ValueError, match="MAX_AUDIO_SECONDS"):
        audio.log_mel(np.zeros(int(audio.MAX_AUDIO_SECONDS * 16000) + 1, np.float32))


@pytest.mark.oracle
def test_reference_cannot_frame_200_samples(whisper_fe):
    # Why MIN_LOG_MEL_SAMPLES is 201: the reference fails there too (reflect padding of 200 needs > 200).
    with pytest.raises(RuntimeError):
        reference_log_mel(whisper_fe, np.zeros(200, np.float32))


# ----------------------------------------------------------------------------------------------------------
# resampling
# ----------------------------------------------------------------------------------------------------------
@needs_scipy
@pytest.mark.parametrize("sr", [8000, 22050, 44100, 48000])
def test_resample_is_scipy_resample_poly(sr):
    x = sine(1000.0, sr, 1.0) + sine(3100.0, sr, 1.0, amp=0.2)
    g = math.gcd(sr, 16000)
    np.testing.assert_array_equal(audio.load(x, sr=sr),
                                  signal.resample_poly(x, 16000 // g, sr // g).astype(np.float32))


@pytest.mark.parametrize("sr", [8000, 22050, 44100, 48000])
def test_resample_keeps_frequency(sr):
    x = sine(1000.0, sr, 1.0) + sine(3100.0, sr, 1.0, amp=0.2)
    y = audio.load(x, sr=sr)
    assert y.dtype == np.float32 and y.size == math.ceil(x.size * 16000 / sr)
    assert abs(peak_freq(y, 16000) - 1000.0) <= 1.0
    mid = y[2000:-2000]
    expect = sine(1000.0, 16000, 1.0)[2000:-2000] + sine(3100.0, 16000, 1.0, amp=0.2)[2000:-2000]
    assert np.abs(mid - expect).max() < 2e-3  # amplitude and phase survive, not just the peak bin


def test_resample_is_band_limited():
    # 12 kHz at 48 kHz is above the new Nyquist (8 kHz): it must be filtered out, not aliased to 4 kHz.
    y = audio.load(sine(12000.0, 48000, 1.0), sr=48000)
    assert np.sqrt(np.mean(y[1000:-1000] ** 2)) < 0.5 / np.sqrt(2) * 10 ** (-40 / 20)


@needs_scipy
@pytest.mark.parametrize("sr", [8000, 11025, 22050, 44100, 48000, 16001])
@pytest.mark.parametrize("n", [1, 5, 2 * 48000 + 7])
def test_torch_resampler_matches_scipy(monkeypatch, sr, n):
    x = np.random.RandomState(sr + n).randn(n).astype(np.float32) * 0.3
    g = math.gcd(sr, 16000)
    expect = signal.resample_poly(x.astype(np.float64), 16000 // g, sr // g)
    monkeypatch.setattr(audio, "_import_scipy_signal", lambda: None)
    got = audio.load(x, sr=sr)
    assert got.shape == expect.shape
    np.testing.assert_allclose(got, expect, atol=1e-6, rtol=0)


def test_resample_chunked_torch_path(monkeypatch):
    x = speech_like(3000, sr=44100)
    monkeypatch.setattr(audio, "_import_scipy_signal", lambda: None)
    whole = audio.load(x, sr=44100)
    monkeypatch.setattr(audio, "_RESAMPLE_CHUNK_ELEMS", 100)
    np.testing.assert_array_equal(audio.load(x, sr=44100), whole)


def test_16k_passthrough_is_exact():
    x = speech_like(1234)
    np.testing.assert_array_equal(audio.load(x), x)
    np.testing.assert_array_equal(audio.load(x, sr=16000.0), x)


# ----------------------------------------------------------------------------------------------------------
# channels and PCM scaling
# ----------------------------------------------------------------------------------------------------------
def test_stereo_mixdown_both_layouts():
    left, right = speech_like(5000, seed=1), speech_like(5000, seed=2)
    mean = ((left.astype(np.float64) + right) / 2).astype(np.float32)
    np.testing.assert_allclose(audio.load(np.stack([left, right])), mean, atol=1e-7, rtol=0)  # (ch, samples)
    np.testing.assert_allclose(audio.load(np.stack([left, right], 1)), mean, atol=1e-7, rtol=0)  # (samples, ch)
    np.testing.assert_array_equal(audio.load(left[None, :]), left)
    np.testing.assert_array_equal(audio.load(left[:, None]), left)
    # Mix-down happens before resampling (it is linear, so the order is only about cost).
    np.testing.assert_allclose(audio.load(np.stack([left, right]), sr=22050), audio.load(mean, sr=22050),
                               atol=1e-6, rtol=0)
    six = np.random.RandomState(0).randn(6, 3000).astype(np.float32)
    np.testing.assert_allclose(audio.load(six.T), six.mean(0), atol=1e-6, rtol=0)


def test_int_pcm_scaling():
    i16 = np.array([-32768, -16384, 0, 16384, 32767], np.int16)
    np.testing.assert_array_equal(audio.load(i16), np.array([-1, -0.5, 0, 0.5, 32767 / 32768], np.float32))
    i32 = np.array([-2**31, 0, 2**30], np.int32)
    np.testing.assert_array_equal(audio.load(i32), np.array([-1, 0, 0.5], np.float32))
    u8 = np.array([0, 128, 192, 255], np.uint8)
    np.testing.assert_array_equal(audio.load(u8), np.array([-1, 0, 0.5, 127 / 128], np.float32))
    i8 = np.array([-128, 0, 64], np.int8)
    np.testing.assert_array_equal(audio.load(i8), np.array([-1, 0, 0.5], np.float32))
    stereo = np.stack([i16, -i16 // 2]).astype(np.int16)  # scaled first, then averaged
    np.testing.assert_allclose(audio.load(stereo), (stereo / 32768.0).mean(0), atol=1e-7, rtol=0)
    np.testing.assert_array_equal(audio.load(torch.from_numpy(i16)), audio.load(i16))
    np.testing.assert_array_equal(audio.load(i16.astype(">i2")), audio.load(i16))  # byte order is honoured
    bf16 = torch.tensor([0.5, -0.25, 1.0], dtype=torch.bfloat16)
    np.testing.assert_array_equal(audio.load(bf16), np.array([0.5, -0.25, 1.0], np.float32))
    half = np.array([0.25, -0.5], np.float16)
    np.testing.assert_array_equal(audio.load(np.tile(half, 10)), np.tile(half.astype(np.float32), 10))


# ----------------------------------------------------------------------------------------------------------
# files
# ----------------------------------------------------------------------------------------------------------
@needs_sf
def test_load_files_all_formats(tmp_path):
    x = np.stack([sine(440, 44100, 0.5), sine(660, 44100, 0.5, amp=0.2)], 1)
    expect = audio.load(x, sr=44100)
    for fmt, subtype in [("WAV", "PCM_16"), ("WAV", "FLOAT"), ("FLAC", "PCM_16")]:
        p = tmp_path / f"a.{fmt.lower()}"
        sf.write(p, x, 44100, format=fmt, subtype=subtype)
        got = audio.load(p)
        np.testing.assert_allclose(got, expect, atol=1e-4 if subtype == "PCM_16" else 1e-6, rtol=0)
        assert got.dtype == np.float32
        got_str = audio.load(str(p), sr=16000)  # sr=16000 with a file is the (harmless) output rate
        np.testing.assert_array_equal(got_str, got)
    p = tmp_path / "a.ogg"
    sf.write(p, x, 44100, format="OGG", subtype="VORBIS")  # lossy: check the content, not the samples
    got = audio.load(p)
    assert abs(got.size - expect.size) <= 1 and abs(peak_freq(got, 16000) - 440) <= 3
    with open(tmp_path / "a.flac", "rb") as f:  # file objects too
        np.testing.assert_array_equal(audio.load(f), audio.load(tmp_path / "a.flac"))


@needs_sf
@pytest.mark.parametrize("subtype", ["PCM_U8", "PCM_16", "PCM_24", "PCM_32"])
def test_stdlib_wave_fallback_matches_soundfile(tmp_path, monkeypatch, subtype):
    x = np.stack([speech_like(4000, seed=3), -0.5 * speech_like(4000, seed=4)], 1)
    p = tmp_path / "a.wav"
    sf.write(p, x, 22050, subtype=subtype)
    with_sf = audio.load(p)
    monkeypatch.setattr(audio, "_import_soundfile", lambda: None)
    without_sf = audio.load(p)
    np.testing.assert_allclose(without_sf, with_sf, atol=1e-7, rtol=0)
    with open(p, "rb") as f:
        np.testing.assert_allclose(audio.load(f), with_sf, atol=1e-7, rtol=0)


@needs_sf
def test_without_soundfile_errors(tmp_path, monkeypatch):
    flac = tmp_path / "a.flac"
    sf.write(flac, sine(440, 16000, 0.1), 16000)
    fwav = tmp_path / "f.wav"
    sf.write(fwav, sine(440, 16000, 0.1), 16000, subtype="FLOAT")
    monkeypatch.setattr(audio, "_import_soundfile", lambda: None)
    with pytest.raises(ImportError, match="soundfile"):
        audio.load(flac)
    with pytest.raises(ValueError, match="soundfile"):
        audio.load(fwav)


def write_pcm16_wav(path, data: np.ndarray, rate: int) -> None:
    """Standard-library WAV writer for test inputs: data (frames,) or (frames, channels) int16."""
    data = data.reshape(data.shape[0], -1)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(data.shape[1])
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(data.astype("<i2").tobytes())


def read_pcm16_wav(path) -> tuple[np.ndarray, int, int]:
    with wave.open(str(path), "rb") as w:
        assert w.getsampwidth() == 2
        return np.frombuffer(w.readframes(w.getnframes()), "<i2"), w.getframerate(), w.getnchannels()


def test_load_wav_stdlib_only(tmp_path, monkeypatch):
    monkeypatch.setattr(audio, "_import_soundfile", lambda: None)
    stereo = (np.stack([speech_like(3000, seed=1), speech_like(3000, seed=2)], 1) * 32767).astype(np.int16)
    p = tmp_path / "s.wav"
    write_pcm16_wav(p, stereo, 8000)
    np.testing.assert_array_equal(audio.load(p), audio.load(stereo, sr=8000))


def test_shipped_question_wav():
    _, rate, channels = read_pcm16_wav(ASSET)  # also asserts 16-bit
    assert (rate, channels) == (16000, 1)
    assert os.path.getsize(ASSET) < 200_000
    wav = audio.load(ASSET)
    assert 3.0 <= wav.size / 16000 <= 5.0
    # Real speech: loud voiced frames and near-silent padding, energy concentrated below 4 kHz.
    frames = wav[: wav.size // 160 * 160].reshape(-1, 160)
    rms = np.sqrt((frames ** 2).mean(1))
    assert rms.max() > 0.05 and rms[:20].max() < 1e-3 and (rms > 0.01).mean() > 0.3
    spec = np.abs(np.fft.rfft(wav)) ** 2
    assert spec[: spec.size // 2].sum() > 0.9 * spec.sum()


def test_write_wav_round_trip(tmp_path):
    x = speech_like(24000, seed=13)
    p = tmp_path / "out.wav"
    audio.write_wav(p, x, 24000)
    back, rate, channels = read_pcm16_wav(p)
    assert (rate, channels) == (24000, 1)
    np.testing.assert_allclose(back / 32767, x, atol=0.5 / 32767 + 1e-7, rtol=0)
    np.testing.assert_allclose(audio.load(p, sr=16000), audio.load(back, sr=24000), atol=0, rtol=0)
    audio.write_wav(p, torch.tensor([2.0, -3.0, 0.0]), 24000)  # clipped, from a tensor
    np.testing.assert_array_equal(read_pcm16_wav(p)[0], [32767, -32767, 0])
    pcm = np.array([1, -2, 32767, -32768], np.int16)
    audio.write_wav(p, pcm, 16000)
    np.testing.assert_array_equal(read_pcm16_wav(p)[0], pcm)
    with pytest.raises(ValueError, match="mono"):
        audio.write_wav(p, np.zeros((2, 10), np.float32))
    with pytest.raises(ValueError, match="NaN"):
        audio.write_wav(p, np.array([np.nan], np.float32))
    with pytest.raises(ValueError, match="dtype"):
        audio.write_wav(p, np.zeros(4, np.int64))


# ----------------------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad, match", [
    (np.zeros(0, np.float32), "empty"),
    (np.zeros((2, 0), np.float32), "empty"),
    (np.array([0.1, np.nan, 0.2], np.float32), "NaN"),
    (np.array([0.1, -np.inf], np.float64), "NaN"),
    (np.zeros(100, np.int64), "dtype"),
    (np.zeros(100, bool), "dtype"),
    (np.zeros(100, np.complex64), "dtype"),
    (np.array(["a", "b"]), "dtype"),
    (np.array(0.5, np.float32), "1-D"),
    (np.zeros((2, 3, 100), np.float32), "1-D"),
    (np.zeros((4, 4), np.float32), "square"),
    (np.zeros((100, 300), np.float32), "channels"),
    ([0.1, 0.2], "np.ndarray"),
    (12345, "np.ndarray"),
])
def test_load_rejects(bad, match):
    with pytest.raises(ValueError, match=match):
        audio.load(bad)


@pytest.mark.parametrize("sr", [0, -16000, 22050.5, "16k", True, float("nan")])
def test_load_rejects_bad_rate(sr):
    with pytest.raises(ValueError, match="sample rate"):
        audio.load(np.zeros(100, np.float32), sr=sr)


def test_load_length_limit(tmp_path):
    assert audio.MAX_AUDIO_SECONDS >= 40 * 60
    # 40 minutes at 16 kHz loads (passthrough: no resampling cost).
    forty = np.zeros(40 * 60 * 16000, np.float32)
    assert audio.load(forty).size == forty.size
    # Over the limit: a 1 Hz "recording" keeps the array tiny while its duration exceeds the maximum.
    too_long = int(audio.MAX_AUDIO_SECONDS) + 1
    with pytest.raises(ValueError, match="MAX_AUDIO_SECONDS"):
        audio.load(np.zeros(too_long, np.float32), sr=1)
    p = tmp_path / "long.wav"
    with wave.open(str(p), "wb") as w:  # the header alone decides, before samples are read
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(1)
        w.writeframes(np.zeros(too_long, np.int16).tobytes())
    with pytest.raises(ValueError, match="MAX_AUDIO_SECONDS"):
        audio.load(p)


def test_load_file_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not found"):
        audio.load(tmp_path / "missing.wav")
    with pytest.raises(ValueError, match="directory"):
        audio.load(tmp_path)
    junk = tmp_path / "junk.wav"
    junk.write_bytes(b"this is not a RIFF file" * 10)
    with pytest.raises(ValueError, match="cannot read"):
        audio.load(junk)
    with pytest.raises(ValueError, match="cannot read"):
        audio.load(io.BytesIO(b"\x00" * 64))
    empty = tmp_path / "empty.wav"
    audio.write_wav(empty, np.zeros(0, np.float32), 16000)
    with pytest.raises(ValueError, match="empty"):
        audio.load(empty)
    ok = tmp_path / "ok.wav"
    audio.write_wav(ok, sine(440, 22050, 0.1), 22050)
    with pytest.raises(ValueError, match="header"):
        audio.load(ok, sr=22050)
    monkeypatch.setattr(audio, "_import_soundfile", lambda: None)
    with pytest.raises(ValueError, match="cannot read"):
        audio.load(junk)
    with pytest.raises(ValueError, match="empty"):
        audio.load(empty)


# ----------------------------------------------------------------------------------------------------------
# absurd inputs (issue 12 item 5): refused, never normalised, before anything large is allocated
# ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("sr", [1, 999, 768001, 10 ** 12, 2 ** 62])
def test_absurd_sample_rates_are_refused_before_resampling(monkeypatch, sr):
    def never(*a, **k):
        raise AssertionError("resample() was reached")

    monkeypatch.setattr(audio, "resample", never)
    with pytest.raises(ValueError, match="MIN_SAMPLE_RATE"):
        audio.load(np.zeros(1000, np.float32), sr=sr)


def test_huge_amplitudes_are_refused_not_normalised():
    loud = sine(440, 16000, 0.5) * 1e12
    with pytest.raises(ValueError, match="MAX_AMPLITUDE"):
        audio.load(loud)
    with pytest.raises(ValueError, match="MAX_AMPLITUDE"):
        audio.load(np.full(4000, np.finfo(np.float32).max, np.float32))
    edge = sine(440, 16000, 0.5) * audio.MAX_AMPLITUDE
    assert bool(torch.isfinite(audio.log_mel(audio.load(edge))).all())   # accepted => finite features
    with pytest.raises(ValueError, match="not finite"):
        audio.log_mel(np.full(4000, 1e30, np.float32))                   # log_mel called directly
