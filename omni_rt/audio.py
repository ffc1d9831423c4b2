"""Audio in and out: loading, resampling to 16 kHz, Whisper-compatible log-mel features, WAV writing.

Conventions (the model's, see docs/anchors.md B.6):

* Input audio for the model is mono float32 at ``SAMPLE_RATE`` (16 kHz), nominally in [-1, 1].
* Features are Whisper-style log-mel: ``n_fft=400``, ``hop_length=160`` (100 frames/s), 128 Slaney mel bins,
  ``log10``, clamped to ``max - 8`` over the whole input, then ``(x + 4) / 4``. Unlike the stock
  ``WhisperFeatureExtractor`` call there is no 30 s truncation or padding: :func:`log_mel` returns exactly the
  frames that Qwen3-Omni's processor marks valid in ``feature_attention_mask`` for a single audio
  (``len(wav) // 160``), so ``num_audio_tokens(frames)`` gives the ``<|audio_pad|>`` count.
* Output audio (speech replies) is mono at 24 kHz; :func:`write_wav` stores it as 16-bit PCM.

Optional dependencies are imported lazily: ``soundfile`` (wav/flac/ogg; plain PCM ``.wav`` also reads with
the standard library's ``wave`` when soundfile is absent) and ``scipy`` (``resample_poly``; an equivalent
polyphase windowed-sinc resampler in torch is used when scipy is absent).
"""
from __future__ import annotations

import math
import os
import wave
from typing import Any

import numpy as np
import torch

__all__ = [
    "SAMPLE_RATE",
    "N_FFT",
    "HOP_LENGTH",
    "N_MELS",
    "MAX_AUDIO_SECONDS",
    "MIN_LOG_MEL_SAMPLES",
    "MAX_CHANNELS",
    "MAX_AMPLITUDE",
    "MIN_SAMPLE_RATE",
    "MAX_SAMPLE_RATE",
    "load",
    "resample",
    "log_mel",
    "num_frames",
    "num_audio_tokens",
    "mel_filters",
    "write_wav",
]

SAMPLE_RATE = 16000
N_FFT = 400
HOP_LENGTH = 160
N_MELS = 128
# 60 minutes. Long audio is a user request (docs/anchors.md B.5 item 10); beyond an hour the encoder's
# prefill is better served by splitting the recording upstream.
MAX_AUDIO_SECONDS = 3600.0
# Float samples are nominally in [-1, 1]. Louder input is refused, not normalised (normalising would change the
# features the model sees): far beyond any PCM scale, yet far below where the fp32 power spectrum overflows
# (about 1e17), so every accepted audio has finite features.
MAX_AMPLITUDE = 1e10
# Sample rates accepted by load(): refused outside this range before any resampling filter is built (a rate of
# 1 Hz would upsample 16000x; 10**12 Hz would build a filter of 2·10**13 taps).
MIN_SAMPLE_RATE = 1000
MAX_SAMPLE_RATE = 768000
# torch.stft's centred (reflect-padded by n_fft // 2) framing, which the reference uses, needs strictly more
# than n_fft // 2 samples; transformers raises a RuntimeError below this, we raise a ValueError.
MIN_LOG_MEL_SAMPLES = N_FFT // 2 + 1
# 2-D arrays put channels on the shorter axis; more channels than this is not an audio array.
MAX_CHANNELS = 64

# Frames per STFT chunk in log_mel: bounds peak memory (≈ 60 MB per chunk in fp64) for hour-long inputs
# without changing any value, since every frame's FFT is independent.
_MEL_CHUNK_FRAMES = 16384
# Output samples per chunk in the torch resampler (bounds the [chunk, taps] gather buffer).
_RESAMPLE_CHUNK_ELEMS = 1 << 22


# --------------------------------------------------------------------------------------------------------
# lazy optional imports (module-level functions so tests can simulate a machine without them)
# --------------------------------------------------------------------------------------------------------
def _import_soundfile():
    """The soundfile module, or None when it is not installed."""
    try:
        import soundfile

        return soundfile
    except (ImportError, OSError):  # OSError: the wheel is present but libsndfile failed to load
        return None


def _import_scipy_signal():
    """scipy.signal, or None when scipy is not installed."""
    try:
        import scipy.signal

        return scipy.signal
    except ImportError:
        return None


# --------------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------------
def load(src: Any, sr: int | None = None) -> np.ndarray:
    """Load audio as the model wants it: ``np.ndarray`` float32, shape ``(samples,)``, mono, 16 kHz.

    Args:
        src: one of
            * a path (``str`` / ``os.PathLike``) to a wav/flac/ogg file (anything libsndfile reads), or a binary
              file object. Without soundfile installed only uncompressed PCM ``.wav`` files can be read.
            * an ``np.ndarray`` or ``torch.Tensor`` of samples: ``(samples,)`` mono, or 2-D with channels on
              the **shorter** axis — ``(channels, samples)`` (torchaudio style) and ``(samples, channels)``
              (soundfile style) both work; a square 2-D array is rejected as ambiguous. Channels are averaged.
              Floats are taken as is (nominally [-1, 1]); integer PCM is scaled to [-1, 1): int16 / 32768,
              int32 / 2**31, int8 / 128, uint8 (x - 128) / 128. Other dtypes (int64, bool, complex) are
              rejected because their scale is unknown.
        sr: sample rate of an array ``src`` in Hz (default 16000). For files the header gives the rate, so
            ``sr`` must be None (or 16000, the output rate). Any integer rate is resampled to 16 kHz with
            ``scipy.signal.resample_poly`` (Kaiser-windowed sinc, polyphase, exact rational factor).

    Returns:
        ``np.ndarray`` float32 of shape ``(samples,)`` at 16 kHz.

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: empty audio, NaN/inf samples, a peak amplitude above ``MAX_AMPLITUDE`` (refused, not
            normalised), not audio (bad dtype/ndim/shape, unreadable file, bad ``sr``), a sample rate outside
            [``MIN_SAMPLE_RATE``, ``MAX_SAMPLE_RATE``] (refused before any resampling), or longer than
            ``MAX_AUDIO_SECONDS``.
        ImportError: a non-WAV file was given and soundfile is not installed.
    """
    if isinstance(src, (str, os.PathLike)) or hasattr(src, "read"):
        if sr is not None and sr != SAMPLE_RATE:
            raise ValueError(
                f"sr={sr!r} was given with a file: a file's header states its own sample rate, and load() "
                f"always returns {SAMPLE_RATE} Hz audio. Pass sr only with an array.")
        data, rate = _read_file(src)
        name = f"audio file {os.fspath(src)!r}" if not hasattr(src, "read") else "audio file object"
    elif isinstance(src, (np.ndarray, torch.Tensor)):
        if isinstance(src, torch.Tensor):
            src = src.detach().cpu()
            data = (src.float() if src.dtype == torch.bfloat16 else src).numpy()  # numpy has no bf16
        else:
            data = src
        rate = SAMPLE_RATE if sr is None else sr
        name = "audio array"
    else:
        raise ValueError(
            f"load() takes a path, a binary file object, an np.ndarray or a torch.Tensor of samples; got "
            f"{type(src).__name__}")
    rate = _check_rate(rate)
    mono = _to_mono_float(data, name)
    _check_duration(mono.shape[0], rate, name)
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise ValueError(f"{name}: sample rate {rate} Hz is outside the accepted range [MIN_SAMPLE_RATE, "
                         f"MAX_SAMPLE_RATE] = [{MIN_SAMPLE_RATE}, {MAX_SAMPLE_RATE}] Hz")
    _check_samples(mono, name)
    out = resample(mono, rate, SAMPLE_RATE)
    return np.ascontiguousarray(out, dtype=np.float32)


def _check_rate(rate: Any) -> int:
    if isinstance(rate, bool) or not isinstance(rate, (int, float, np.integer, np.floating)):
        raise ValueError(f"sample rate must be a positive integer number of Hz, got {rate!r}")
    if not math.isfinite(float(rate)) or float(rate) != int(rate) or int(rate) < 1:
        raise ValueError(f"sample rate must be a positive integer number of Hz, got {rate!r}")
    return int(rate)


def _check_samples(x: np.ndarray, name: str) -> None:
    """Finite samples of at most MAX_AMPLITUDE in magnitude (float32 (samples,))."""
    if not np.isfinite(x).all():
        bad = int((~np.isfinite(x)).sum())
        raise ValueError(f"{name} contains {bad} NaN/inf sample(s); audio samples must be finite")
    peak = float(np.abs(x).max())
    if peak > MAX_AMPLITUDE:
        raise ValueError(f"{name} has peak amplitude {peak:.3g}; float samples are nominally in [-1, 1] and at "
                         f"most MAX_AMPLITUDE = {MAX_AMPLITUDE:.0e} is accepted (such audio is refused, not "
                         f"normalised)")


def _check_duration(n: int, rate: int, name: str) -> None:
    if n == 0:
        raise ValueError(f"{name} is empty (0 samples)")
    if n / rate > MAX_AUDIO_SECONDS:
        raise ValueError(
            f"{name} is {n / rate:.1f} s long; the maximum is MAX_AUDIO_SECONDS = {MAX_AUDIO_SECONDS:.0f} s "
            f"({MAX_AUDIO_SECONDS / 60:.0f} min). Split longer recordings.")


def _to_mono_float(data: Any, name: str) -> np.ndarray:
    """(samples,) or 2-D array of any supported dtype → float32 (samples,), channels averaged."""
    data = np.asarray(data)
    if not data.dtype.isnative:  # e.g. big-endian PCM from a raw buffer
        data = data.astype(data.dtype.newbyteorder("="))
    if data.ndim not in (1, 2):
        raise ValueError(
            f"{name} must be 1-D (samples,) or 2-D (channels, samples) / (samples, channels); got shape "
            f"{tuple(data.shape)}")
    if data.size == 0:
        raise ValueError(f"{name} is empty (shape {tuple(data.shape)})")
    x = _scale_pcm(data, name)
    if x.ndim == 2:
        rows, cols = x.shape
        if rows == cols and rows > 1:
            raise ValueError(
                f"{name} has square shape {tuple(x.shape)}: cannot tell channels from samples (the channel "
                f"axis is the shorter one)")
        ch_axis = 0 if rows < cols else 1
        if x.shape[ch_axis] > MAX_CHANNELS:
            raise ValueError(
                f"{name} of shape {tuple(x.shape)} would have {x.shape[ch_axis]} channels (the shorter "
                f"axis); at most MAX_CHANNELS = {MAX_CHANNELS} are accepted. Is this really audio?")
        # Accumulate in fp64 so averaging many channels adds no rounding of its own.
        x = x.mean(axis=ch_axis, dtype=np.float64).astype(np.float32)
    return x


def _scale_pcm(data: np.ndarray, name: str) -> np.ndarray:
    dt = data.dtype
    if dt == np.int16:
        return data.astype(np.float32) / 32768.0
    if dt == np.int32:
        return (data.astype(np.float64) / 2147483648.0).astype(np.float32)
    if dt == np.int8:
        return data.astype(np.float32) / 128.0
    if dt == np.uint8:
        return (data.astype(np.float32) - 128.0) / 128.0
    if dt in (np.float16, np.float32, np.float64):
        return data.astype(np.float32, copy=False)
    raise ValueError(
        f"{name} has dtype {dt}, which is not audio: accepted are float16/32/64 (nominally [-1, 1]) and "
        f"integer PCM int8/uint8/int16/int32")


def _read_file(src: Any) -> tuple[np.ndarray, int]:
    """Read a file → (data (frames,) or (frames, channels), sample rate)."""
    is_path = not hasattr(src, "read")
    if is_path:
        path = os.fspath(src)
        if not os.path.exists(path):
            raise FileNotFoundError(f"audio file not found: {path!r}")
        if os.path.isdir(path):
            raise ValueError(f"{path!r} is a directory, not an audio file")
    sf = _import_soundfile()
    if sf is not None:
        return _read_soundfile(sf, src)
    is_wav = (not is_path) or os.fspath(src).lower().endswith((".wav", ".wave"))
    if not is_wav:
        raise ImportError(
            f"reading {os.fspath(src)!r} needs the 'soundfile' package (pip install soundfile, or "
            f"pip install 'omni_rt[audio]'); without it only PCM .wav files can be read")
    return _read_wave(src)


def _read_soundfile(sf, src: Any) -> tuple[np.ndarray, int]:
    what = repr(os.fspath(src)) if not hasattr(src, "read") else "file object"
    try:
        with sf.SoundFile(src) as f:
            rate = f.samplerate
            _check_duration(max(f.frames, 1), rate, f"audio file {what}")
            data = f.read(dtype="float32", always_2d=True)
    except ValueError:
        raise
    except Exception as e:  # libsndfile reports unreadable/unsupported data as LibsndfileError/RuntimeError
        raise ValueError(f"cannot read {what} as audio: {e}") from e
    return data, rate


def _read_wave(src: Any) -> tuple[np.ndarray, int]:
    what = repr(os.fspath(src)) if not hasattr(src, "read") else "file object"
    try:
        with wave.open(src if hasattr(src, "read") else os.fspath(src), "rb") as w:
            rate, width, channels, n = w.getframerate(), w.getsampwidth(), w.getnchannels(), w.getnframes()
            _check_duration(max(n, 1), rate, f"audio file {what}")
            raw = w.readframes(n)
    except ValueError:
        raise
    except (wave.Error, EOFError, OSError) as e:
        raise ValueError(
            f"cannot read {what} as a PCM WAV file with the standard library ({e}); install soundfile for "
            f"float/extensible WAV, FLAC and OGG") from e
    if width == 1:
        data = np.frombuffer(raw, dtype=np.uint8)
    elif width == 2:
        data = np.frombuffer(raw, dtype="<i2")
    elif width == 3:
        b = np.frombuffer(raw, dtype=np.uint8).reshape(-1, 3).astype(np.int32)
        # Put the 24-bit sample in the top bytes so the sign comes along; same scale as int32 PCM.
        data = (b[:, 0] << 8) | (b[:, 1] << 16) | (b[:, 2] << 24)
    elif width == 4:
        data = np.frombuffer(raw, dtype="<i4")
    else:
        raise ValueError(f"cannot read {what}: unsupported WAV sample width of {width} bytes")
    return data.reshape(-1, channels), rate


# --------------------------------------------------------------------------------------------------------
# resampling
# --------------------------------------------------------------------------------------------------------
def resample(x: np.ndarray, orig_sr: int, target_sr: int = SAMPLE_RATE) -> np.ndarray:
    """Band-limited resampling of ``x: (samples,)`` float32 by the exact rational factor target/orig.

    Uses ``scipy.signal.resample_poly(x, up, down)`` (Kaiser(5.0)-windowed sinc low-pass with cutoff at the
    lower Nyquist, 20·max(up, down)+1 taps, zero padding at the ends); without scipy an identical filter is
    applied in polyphase form with torch. Output length is ``ceil(len(x) * up / down)``.
    """
    orig_sr, target_sr = _check_rate(orig_sr), _check_rate(target_sr)
    g = math.gcd(orig_sr, target_sr)
    up, down = target_sr // g, orig_sr // g
    x = np.asarray(x, dtype=np.float32)
    if up == down:
        return x
    signal = _import_scipy_signal()
    if signal is not None:
        return signal.resample_poly(x, up, down).astype(np.float32, copy=False)
    return _resample_poly_torch(x, up, down)


def _kaiser_lowpass(up: int, down: int) -> tuple[np.ndarray, int]:
    """scipy.signal.resample_poly's default filter: firwin(20·max+1, 1/max, window=('kaiser', 5.0)) · up."""
    max_rate = max(up, down)
    half_len = 10 * max_rate
    numtaps = 2 * half_len + 1
    cutoff = 1.0 / max_rate
    m = np.arange(numtaps, dtype=np.float64) - half_len
    h = cutoff * np.sinc(cutoff * m) * np.kaiser(numtaps, 5.0)
    h /= h.sum()  # unit DC gain, as firwin(scale=True) does for a low-pass
    return h * up, half_len


def _resample_poly_torch(x: np.ndarray, up: int, down: int) -> np.ndarray:
    """Polyphase FIR resampling, numerically the same algorithm as scipy's resample_poly (fp64 internally).

    Output sample k of the full upfirdn is y[k] = Σ_j h[j]·x_up[k·down − j], with x_up the zero-stuffed input;
    only taps j ≡ k·down (mod up) meet a real sample, so each output is a K = ceil(len(h)/up)-tap dot product
    of phase (k·down mod up) of the filter with x[(k·down)//up − K + 1 .. (k·down)//up].
    """
    h, half_len = _kaiser_lowpass(up, down)
    n_in = x.shape[0]
    n_out = -(-n_in * up // down)
    n_pre_pad = down - half_len % down
    n_pre_remove = (half_len + n_pre_pad) // down
    h = np.concatenate([np.zeros(n_pre_pad), h])
    taps = -(-h.shape[0] // up)
    h = np.concatenate([h, np.zeros(taps * up - h.shape[0])])
    # phases[p, e] = h[p + up·(K−1−e)]: the filter phase reversed so it lines up with an ascending window.
    phases = torch.from_numpy(h.reshape(taps, up).T.copy()).flip(1)

    k = torch.arange(n_pre_remove, n_pre_remove + n_out, dtype=torch.int64)
    t = k * down
    base, phase = t // up, t % up
    need = int(base[-1]) + taps if n_out else taps
    xpad = torch.zeros(max(need, taps - 1 + n_in), dtype=torch.float64)
    xpad[taps - 1:taps - 1 + n_in] = torch.from_numpy(x.astype(np.float64))
    windows = xpad.unfold(0, taps, 1)  # windows[b] = x[b − K + 1 .. b] (zeros outside the signal)

    out = torch.empty(n_out, dtype=torch.float64)
    step = max(1, _RESAMPLE_CHUNK_ELEMS // taps)
    for s in range(0, n_out, step):
        e = min(n_out, s + step)
        out[s:e] = (windows[base[s:e]] * phases[phase[s:e]]).sum(1)
    return out.numpy().astype(np.float32)


# --------------------------------------------------------------------------------------------------------
# log-mel features
# --------------------------------------------------------------------------------------------------------
def _hz_to_mel_slaney(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, dtype=np.float64)
    mel = 3.0 * f / 200.0
    log_region = f >= 1000.0
    mel = np.where(log_region, 15.0 + np.log(np.maximum(f, 1e-30) / 1000.0) * (27.0 / np.log(6.4)), mel)
    return mel


def _mel_to_hz_slaney(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    f = 200.0 * m / 3.0
    return np.where(m >= 15.0, 1000.0 * np.exp(np.log(6.4) / 27.0 * (m - 15.0)), f)


def mel_filters(n_mels: int = N_MELS) -> np.ndarray:
    """Slaney-scale, Slaney-normalised triangular mel filters, float64 ``(n_fft // 2 + 1, n_mels)``.

    The same matrix as ``transformers.audio_utils.mel_filter_bank(201, n_mels, 0, 8000, 16000, norm="slaney",
    mel_scale="slaney")``, which WhisperFeatureExtractor uses.
    """
    n_freqs = N_FFT // 2 + 1
    mels = np.linspace(_hz_to_mel_slaney(0.0), _hz_to_mel_slaney(8000.0), n_mels + 2)
    filter_freqs = _mel_to_hz_slaney(mels)
    fft_freqs = np.linspace(0, SAMPLE_RATE // 2, n_freqs)
    filter_diff = np.diff(filter_freqs)
    slopes = filter_freqs[None, :] - fft_freqs[:, None]
    down_slopes = -slopes[:, :-2] / filter_diff[:-1]
    up_slopes = slopes[:, 2:] / filter_diff[1:]
    fb = np.maximum(0.0, np.minimum(down_slopes, up_slopes))
    enorm = 2.0 / (filter_freqs[2:n_mels + 2] - filter_freqs[:n_mels])
    return fb * enorm[None, :]


_FILTER_CACHE: dict[tuple[str, torch.dtype, int], tuple[torch.Tensor, torch.Tensor]] = {}


def _mel_constants(device: torch.device, dtype: torch.dtype, n_mels: int = N_MELS
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    key = (str(device), dtype, n_mels)
    if key not in _FILTER_CACHE:
        # The reference multiplies by the filters rounded to fp32; round the same way before any upcast.
        fb = torch.from_numpy(mel_filters(n_mels)).to(torch.float32).to(device=device, dtype=dtype)
        window = torch.hann_window(N_FFT, dtype=torch.float32, device=device).to(dtype)
        _FILTER_CACHE[key] = (fb.T.contiguous(), window)
    return _FILTER_CACHE[key]


def num_frames(num_samples: int) -> int:
    """Valid log-mel frames for ``num_samples`` 16 kHz samples (= ``feature_attention_mask.sum()``)."""
    return int(num_samples) // HOP_LENGTH


def log_mel(wav_16k: np.ndarray | torch.Tensor, device: str | torch.device | None = None,
            n_mels: int = N_MELS) -> torch.Tensor:
    """Whisper-compatible log-mel features of one mono 16 kHz audio, with no 30 s cap.

    Args:
        wav_16k: ``(samples,)`` float samples at 16 kHz (``np.ndarray`` or ``torch.Tensor``), at least
            ``MIN_LOG_MEL_SAMPLES`` (201) of them. Cast to float32 first, as the reference does.
        device: where to compute and return; default: the tensor's device, else CPU.
        n_mels: mel bins (the audio encoder's ``num_mel_bins``: 128 for the released model).

    Returns:
        ``torch.Tensor`` float32 ``(n_mels, samples // 160)``: equal (≤ 1e-4) to ``input_features[0]`` of
        ``WhisperFeatureExtractor(feature_size=n_mels)(wav, sampling_rate=16000, padding=True, truncation=False,
        return_attention_mask=True)`` — the arguments Qwen3-Omni's processor passes — restricted to the frames
        its attention mask marks valid (for a single audio that is every frame). In a padded *batch* the
        reference's last valid frame of a shorter audio sees the zero padding instead of the reflected signal
        (the clamp floor stays per audio); this returns the single-audio features.

    Precision: on CPU the computation is fp32 with the same operations as the reference (≈ 1 ulp apart); on
    CUDA it is fp64, rounded to fp32 at the end, so the only gap is the reference's own fp32 rounding.

    Raises ValueError for samples that are not finite or whose features would not be (peak amplitude far above
    ``MAX_AMPLITUDE``: such audio is refused, not normalised).
    """
    if isinstance(n_mels, bool) or not isinstance(n_mels, (int, np.integer)) or not 1 <= n_mels <= 1024:
        raise ValueError(f"n_mels must be an integer in [1, 1024], got {n_mels!r}")
    x = _check_wav_16k(wav_16k)
    device = x.device if device is None else torch.device(device)
    # CPU: fp32 with the reference's own ops (its torch path runs on CPU), which agrees to ~1 ulp.
    # CUDA: cuFFT rounds fp32 differently from pocketfft, so compute in fp64 instead: then the gap is only
    # the reference's own fp32 error (measured ≤ 3.3e-5 on 10 min of speech-like audio).
    dtype = torch.float64 if device.type == "cuda" else torch.float32
    out = _log_mel(x, device, dtype, int(n_mels))
    if not bool(torch.isfinite(out).all()):
        raise ValueError(f"the audio's log-mel features are not finite (peak amplitude "
                         f"{float(x.abs().max()):.3g}); float samples are nominally in [-1, 1] and at most "
                         f"MAX_AMPLITUDE = {MAX_AMPLITUDE:.0e} is accepted")
    return out


def _log_mel(x: torch.Tensor, device: torch.device, dtype: torch.dtype, n_mels: int = N_MELS) -> torch.Tensor:
    """log_mel of a validated ``x: (samples,)`` computed in ``dtype``; returns float32 ``(n_mels, frames)``."""
    x = x.to(device=device, dtype=torch.float32).to(dtype)  # round to fp32 first, as the reference does
    fb_t, window = _mel_constants(device, dtype, n_mels)

    frames = num_frames(x.shape[0])
    pad = N_FFT // 2
    xp = torch.nn.functional.pad(x[None, None], (pad, pad), mode="reflect")[0, 0]
    out = torch.empty(n_mels, frames, dtype=dtype, device=device)
    # Frames are independent FFTs, so chunking (center=False on the once-padded signal) changes no value;
    # it bounds peak memory for hour-long audio. The reference drops the last centred frame; so do we.
    for f0 in range(0, frames, _MEL_CHUNK_FRAMES):
        f1 = min(frames, f0 + _MEL_CHUNK_FRAMES)
        seg = xp[f0 * HOP_LENGTH:(f1 - 1) * HOP_LENGTH + N_FFT]
        spec = torch.stft(seg, N_FFT, HOP_LENGTH, window=window, center=False, return_complex=True)
        power = spec.real.square() + spec.imag.square()
        out[:, f0:f1] = torch.clamp(fb_t @ power, min=1e-10).log10()
    # The clamp floor is relative to the whole audio's maximum, as in the reference's single-audio call.
    out = torch.maximum(out, out.max() - 8.0)
    return ((out + 4.0) / 4.0).to(torch.float32)


def _check_wav_16k(wav: Any) -> torch.Tensor:
    if isinstance(wav, np.ndarray):
        if wav.dtype not in (np.float16, np.float32, np.float64):
            raise ValueError(
                f"log_mel() needs float samples at 16 kHz, got dtype {wav.dtype} (use omni_rt.audio.load() to "
                f"convert PCM)")
        t = torch.from_numpy(np.ascontiguousarray(wav))
    elif isinstance(wav, torch.Tensor):
        if not wav.is_floating_point():
            raise ValueError(f"log_mel() needs float samples at 16 kHz, got dtype {wav.dtype}")
        t = wav.detach()
    else:
        raise ValueError(f"log_mel() takes an np.ndarray or torch.Tensor of samples, got {type(wav).__name__}")
    if t.dim() != 1:
        raise ValueError(
            f"log_mel() needs mono audio of shape (samples,), got shape {tuple(t.shape)} (mix down with "
            f"omni_rt.audio.load(array, sr))")
    if t.shape[0] < MIN_LOG_MEL_SAMPLES:
        raise ValueError(
            f"audio has {t.shape[0]} samples; log_mel() needs at least MIN_LOG_MEL_SAMPLES = "
            f"{MIN_LOG_MEL_SAMPLES} (≈ 12.6 ms at 16 kHz) for its centred 400-sample STFT window")
    if t.shape[0] / SAMPLE_RATE > MAX_AUDIO_SECONDS:
        raise ValueError(
            f"audio is {t.shape[0] / SAMPLE_RATE:.1f} s long; the maximum is MAX_AUDIO_SECONDS = "
            f"{MAX_AUDIO_SECONDS:.0f} s")
    if not bool(torch.isfinite(t).all()):
        raise ValueError("audio contains NaN/inf samples; audio samples must be finite")
    return t


def num_audio_tokens(num_frames: Any, n_window: int = 50) -> Any:
    """Audio-encoder output tokens for ``num_frames`` valid mel frames (``<|audio_pad|>`` count).

    Same arithmetic as ``_get_feat_extract_output_lengths`` in transformers' modeling_qwen3_omni_moe.py:
    each full chunk of ``2·n_window`` frames (1 s) gives 13 tokens (three stride-2 convs), the remainder
    ⌈⌈⌈r/2⌉/2⌉/2⌉. Works on ints, numpy arrays and torch tensors of non-negative lengths.
    """
    chunk = n_window * 2
    leave = num_frames % chunk
    feat = (leave - 1) // 2 + 1
    return ((feat - 1) // 2 + 1 - 1) // 2 + 1 + (num_frames // chunk) * 13


# --------------------------------------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------------------------------------
def write_wav(path: str | os.PathLike, pcm: np.ndarray | torch.Tensor, sample_rate: int = 24000) -> None:
    """Write mono audio as a 16-bit PCM WAV (standard library only, works without soundfile).

    Args:
        path: output file.
        pcm: ``(samples,)`` float (clipped to [-1, 1], scaled by 32767) or int16 samples.
        sample_rate: Hz; the model's speech output is 24000.
    """
    if isinstance(pcm, torch.Tensor):
        pcm = pcm.detach().float().cpu().numpy() if pcm.is_floating_point() else pcm.detach().cpu().numpy()
    pcm = np.asarray(pcm)
    if pcm.ndim != 1:
        raise ValueError(f"write_wav() takes mono audio of shape (samples,), got shape {tuple(pcm.shape)}")
    if pcm.dtype == np.int16:
        data = pcm
    elif pcm.dtype in (np.float16, np.float32, np.float64):
        if not np.isfinite(pcm).all():
            raise ValueError("write_wav(): audio contains NaN/inf samples")
        data = np.round(np.clip(pcm.astype(np.float64), -1.0, 1.0) * 32767.0).astype(np.int16)
    else:
        raise ValueError(f"write_wav() takes float or int16 samples, got dtype {pcm.dtype}")
    rate = _check_rate(sample_rate)
    with wave.open(os.fspath(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(data.astype("<i2").tobytes())
