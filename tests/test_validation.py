"""Validation at the door (issue 12 item 1): every public argument is checked when the call is made, with a
TypeError (wrong type) or ValueError (wrong value) naming it; config ids are checked against the vocabularies at
load; a checkpoint whose AuT has num_mel_bins != 128 is served (log-mel with its own bin count)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import omni_rt
from omni_rt.config import OmniConfig
from omni_rt.testing import make_checkpoint, tiny_config

from _tolerances import PARITY, rel_err

IM_START, IM_END, USER, ASSISTANT, NL = 449, 450, 11, 12, 198
GREEDY = omni_rt.SamplingParams(temperature=0.0, max_new_tokens=4)


def prompt(*words):
    return omni_rt.Prompt(token_ids=[IM_START, USER, NL, *words, IM_END, NL, IM_START, ASSISTANT, NL])


@pytest.fixture(scope="module")
def rt(tiny_checkpoint):
    with omni_rt.Runtime(tiny_checkpoint, device="cpu", max_batch_size=4) as runtime:
        yield runtime


# ---------------------------------------------------------------------------------------------- SamplingParams
@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(seed=2 ** 63), ValueError, r"seed must be an integer in \[0, 9223372036854775808\)"),
    (dict(seed=-1), ValueError, "seed"),
    (dict(seed=1.5), TypeError, "seed"),
    (dict(seed=3.0), TypeError, "seed"),
    (dict(seed=True), TypeError, "seed"),
    (dict(seed="7"), TypeError, "seed"),
    (dict(temperature="0.5"), TypeError, "temperature"),
    (dict(temperature=-0.1), ValueError, "temperature"),
    (dict(temperature=float("nan")), ValueError, "temperature"),
    (dict(temperature=float("inf")), ValueError, "temperature"),
    (dict(temperature=None, top_k=2.5), TypeError, "top_k"),
    (dict(top_k=-1), ValueError, "top_k"),
    (dict(top_k=True), TypeError, "top_k"),
    (dict(top_p=0), ValueError, "top_p"),
    (dict(top_p=1.5), ValueError, "top_p"),
    (dict(top_p="all"), TypeError, "top_p"),
    (dict(repetition_penalty=0), ValueError, "repetition_penalty"),
    (dict(repetition_penalty=[1.1]), TypeError, "repetition_penalty"),
    (dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    (dict(max_new_tokens=10.0), TypeError, "max_new_tokens"),
    (dict(stop_token_ids=5), TypeError, "stop_token_ids"),
    (dict(stop_token_ids="450"), TypeError, "stop_token_ids"),
    (dict(stop_token_ids=[450, "x"]), TypeError, r"stop_token_ids\[1\]"),
    (dict(stop_token_ids=[-1]), ValueError, r"stop_token_ids\[0\]"),
    (dict(stop_token_ids=[True]), TypeError, "stop_token_ids"),
])
def test_sampling_params_refuse_bad_fields_at_construction(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        omni_rt.SamplingParams(**kwargs)


def test_sampling_params_normalise_numpy_scalars():
    p = omni_rt.SamplingParams(temperature=np.float32(0.5), top_k=np.int64(3), seed=np.uint64(2 ** 63 - 1),
                               stop_token_ids=np.array([1, 2]), max_new_tokens=np.int32(4))
    assert type(p.top_k) is int and type(p.seed) is int and p.seed == 2 ** 63 - 1
    assert type(p.temperature) is float and p.stop_token_ids == [1, 2] and type(p.max_new_tokens) is int


def test_fields_assigned_after_construction_are_checked_at_submit(rt):
    p = omni_rt.SamplingParams(max_new_tokens=4)
    p.seed = 2 ** 64
    with pytest.raises(ValueError, match="seed"):
        rt.generate(prompt(1), thinker=p, return_audio=False)


def test_top_k_above_the_vocabulary_means_no_top_k(rt):
    vocab = rt.cfg.thinker.text.vocab_size
    ask = dict(temperature=1.0, max_new_tokens=6, seed=11, stop_token_ids=[])
    off = rt.generate(prompt(5, 6), thinker=omni_rt.SamplingParams(top_k=0, **ask), return_audio=False)
    for k in (vocab, vocab + 1, 2 ** 63, 10 ** 30):
        out = rt.generate(prompt(5, 6), thinker=omni_rt.SamplingParams(top_k=k, **ask), return_audio=False)
        assert out.token_ids == off.token_ids
    # the talker's vocabulary decides for the talker
    tv = rt.cfg.talker.text.vocab_size
    talk = dict(temperature=0.9, max_new_tokens=5, seed=3)
    a = rt.generate(prompt(5, 6), thinker=GREEDY, talker=omni_rt.SamplingParams(top_k=0, **talk))
    b = rt.generate(prompt(5, 6), thinker=GREEDY, talker=omni_rt.SamplingParams(top_k=10 ** 20, **talk))
    assert np.array_equal(a.codes, b.codes) and tv > 0
    assert rt.stats()["fault"] is None


def test_stop_ids_must_lie_in_the_stage_vocabulary(rt):
    vocab = rt.cfg.thinker.text.vocab_size
    with pytest.raises(ValueError, match=rf"thinker.stop_token_ids\[0\] must be in \[0, {vocab}\)"):
        rt.generate(prompt(1), thinker=omni_rt.SamplingParams(stop_token_ids=[vocab]), return_audio=False)
    tv = rt.cfg.talker.text.vocab_size
    with pytest.raises(ValueError, match=r"talker.stop_token_ids"):
        rt.generate(prompt(1), thinker=GREEDY, talker=omni_rt.SamplingParams(stop_token_ids=[tv + 5]))
    out = rt.generate(prompt(1), thinker=omni_rt.SamplingParams(stop_token_ids=[vocab - 1], max_new_tokens=3),
                      return_audio=False)
    assert len(out.token_ids) >= 1


# --------------------------------------------------------------------------------------------- request arguments
@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(return_audio="no"), TypeError, "return_audio"),
    (dict(return_audio=1), TypeError, "return_audio"),
    (dict(thinker={"temperature": 0.0}), TypeError, "thinker must be an omni_rt.SamplingParams"),
    (dict(talker=0.9), TypeError, "talker must be"),
    (dict(speaker=5), TypeError, "speaker"),
    (dict(speaker="nobody"), ValueError, "unknown speaker"),
    (dict(request_id=5), TypeError, "request_id"),
    (dict(request_id=""), ValueError, "request_id"),
])
def test_request_arguments_are_checked_at_the_call(rt, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        rt.generate(prompt(1), **kwargs)
    with pytest.raises(exc, match=match):
        rt.stream(prompt(1), **kwargs)          # raises at the call, before any iteration
    with pytest.raises(exc, match=match):
        rt.astream(prompt(1), **kwargs)         # likewise: no event loop needed to see the error
    assert rt.stats()["running"] == 0 and rt.stats()["waiting"] == 0


def test_prompt_fields(rt, tmp_path):
    with pytest.raises(TypeError, match="Prompt.token_ids"):
        omni_rt.Prompt(token_ids=5)
    with pytest.raises(TypeError, match="Prompt.token_ids"):
        omni_rt.Prompt(token_ids="hello")
    with pytest.raises(TypeError, match=r"Prompt.token_ids\[1\]"):
        omni_rt.Prompt(token_ids=[1, 2.0])
    with pytest.raises(ValueError, match=r"Prompt.token_ids\[0\]"):
        omni_rt.Prompt(token_ids=[-3])
    with pytest.raises(TypeError, match="Prompt.audios"):
        omni_rt.Prompt(token_ids=[1], audios=np.zeros(16000, np.float32))
    with pytest.raises(TypeError, match=r"Prompt.audios\[0\]"):
        omni_rt.Prompt(token_ids=[1], audios=[[0.0] * 400])
    with pytest.raises(FileNotFoundError, match="missing.wav"):
        omni_rt.Prompt(token_ids=[1], audios=[tmp_path / "missing.wav"])
    with pytest.raises(TypeError, match="prompt must be"):
        rt.generate("hello")
    with pytest.raises(ValueError, match="outside the vocabulary"):
        rt.generate(omni_rt.Prompt(token_ids=[IM_START, 10 ** 6]), thinker=GREEDY, return_audio=False)
    msgs = [{"role": "user", "content": [{"type": "audio", "audio": str(tmp_path / "gone.flac")}]}]
    with pytest.raises(FileNotFoundError, match="gone.flac"):
        rt.generate(msgs)
    with pytest.raises(ValueError, match="MIN_LOG_MEL_SAMPLES"):
        rt.generate(omni_rt.Prompt(token_ids=[IM_START, 480], audios=[np.zeros(100, np.float32)]))


def test_speech_needs_an_assistant_turn(rt):
    with pytest.raises(ValueError, match="assistant"):
        rt.generate(omni_rt.Prompt(token_ids=[IM_START, USER, NL, 5, IM_END]), thinker=GREEDY)
    out = rt.generate(omni_rt.Prompt(token_ids=[IM_START, USER, NL, 5, IM_END]), thinker=GREEDY,
                      return_audio=False)
    assert out.token_ids


# ---------------------------------------------------------------------------------------------- Runtime options
@pytest.mark.parametrize("kwargs, exc, match", [
    (dict(kv_block_size=0), ValueError, "kv_block_size"),
    (dict(kv_block_size=16.0), TypeError, "kv_block_size"),
    (dict(kv_cache_tokens=-5), ValueError, "kv_cache_tokens"),
    (dict(kv_cache_tokens="lots"), TypeError, "kv_cache_tokens"),
    (dict(kv_cache_tokens=10 ** 15), ValueError, "kv_cache_tokens=.* GiB"),   # refused before allocating
    (dict(max_model_len=-1), ValueError, "max_model_len"),
    (dict(max_model_len=10 ** 9), ValueError, "max_position_embeddings"),
    (dict(max_batch_size=0), ValueError, "max_batch_size"),
    (dict(max_batch_size="4"), TypeError, "max_batch_size"),
    (dict(max_batch_size=10 ** 7), ValueError, "max_batch_size"),
    (dict(max_prefill_tokens=0), ValueError, "max_prefill_tokens"),
    (dict(first_chunk_frames=0), ValueError, "first_chunk_frames"),
    (dict(gpu_memory_utilization=0), ValueError, "gpu_memory_utilization"),
    (dict(gpu_memory_utilization="90%"), TypeError, "gpu_memory_utilization"),
    (dict(cuda_graphs="yes"), TypeError, "cuda_graphs"),
    (dict(dtype="float32"), TypeError, "dtype"),
    (dict(dtype=torch.int8), ValueError, "dtype"),
    (dict(device="tpu"), ValueError, "device"),
    (dict(device=0.5), TypeError, "device"),
    (dict(progress="print"), TypeError, "progress"),
    (dict(profile_dir=3), TypeError, "profile_dir"),
])
def test_runtime_options(tiny_checkpoint, kwargs, exc, match):
    kwargs.setdefault("device", "cpu")
    with pytest.raises(exc, match=match):
        omni_rt.Runtime(tiny_checkpoint, **kwargs)


def test_runtime_model_argument(tmp_path):
    with pytest.raises(TypeError, match="model must be"):
        omni_rt.Runtime({"path": "x"}, device="cpu")
    with pytest.raises(FileNotFoundError):
        omni_rt.Runtime(tmp_path / "nope", device="cpu")


# --------------------------------------------------------------------------------------------- config ids
@pytest.mark.parametrize("where, key, value, match", [
    ("talker_config", "codec_eos_token_id", 10 ** 6, "talker_config.codec_eos_token_id"),
    ("talker_config", "codec_bos_id", 1088, "outside the talker vocabulary"),
    ("talker_config", "codec_pad_id", -1, "codec_pad_id"),
    (None, "im_end_token_id", 512, "im_end_token_id"),
    (None, "tts_pad_token_id", -2, "tts_pad_token_id"),
    (None, "assistant_token_id", 10 ** 9, "outside the thinker vocabulary"),
    ("thinker_config", "audio_token_id", 600, "thinker_config.audio_token_id"),
    ("talker_config", "image_token_id", 99999, "talker_config.image_token_id"),
])
def test_config_ids_are_checked_against_the_vocabularies(where, key, value, match):
    cfg = tiny_config()
    (cfg if where is None else cfg[where])[key] = value
    with pytest.raises(omni_rt.ConfigError, match=match):
        OmniConfig.from_dict(cfg)


def test_speaker_ids_are_checked():
    cfg = tiny_config()
    cfg["talker_config"]["speaker_id"] = {"ethan": 5000}
    with pytest.raises(omni_rt.ConfigError, match="speaker_id.ethan"):
        OmniConfig.from_dict(cfg)
    cfg["talker_config"]["speaker_id"] = {"ethan": True}
    with pytest.raises(omni_rt.ConfigError, match="speaker_id"):
        OmniConfig.from_dict(cfg)


# --------------------------------------------------------------------------------------------- num_mel_bins
def test_log_mel_with_other_bin_counts_matches_whisper_feature_extractor():
    from transformers import WhisperFeatureExtractor

    from omni_rt.bench import spoken_question

    wav = spoken_question(1.7)
    for bins in (20, 80):
        f = WhisperFeatureExtractor(feature_size=bins)(wav, sampling_rate=16000, padding=True, truncation=False,
                                                       return_attention_mask=True, return_tensors="pt")
        ref = f["input_features"][0][:, f["attention_mask"][0].bool()]
        ours = omni_rt.audio.log_mel(wav, n_mels=bins)
        assert ours.shape == ref.shape == (bins, wav.size // 160)
        assert (ours - ref).abs().max().item() <= PARITY["log_mel_abs"]


@pytest.fixture(scope="module")
def mel20_checkpoint(tmp_path_factory):
    cfg = tiny_config()
    cfg["thinker_config"]["audio_config"]["num_mel_bins"] = 20   # transformers' own test config uses 20
    cfg["enable_audio_output"] = False
    return make_checkpoint(tmp_path_factory.mktemp("mel20"), cfg, seed=1)


def test_num_mel_bins_20_is_served_and_equals_transformers(mel20_checkpoint):
    import transformers
    from transformers import WhisperFeatureExtractor

    from omni_rt.bench import question_prompt, spoken_question

    hf = transformers.Qwen3OmniMoeForConditionalGeneration.from_pretrained(mel20_checkpoint,
                                                                           dtype=torch.float32).eval()
    wav = spoken_question(1.3)
    f = WhisperFeatureExtractor(feature_size=20)(wav, sampling_rate=16000, padding=True, truncation=False,
                                                  return_attention_mask=True, return_tensors="pt")
    with omni_rt.Runtime(mel20_checkpoint, device="cpu") as rt20:
        ours = rt20.encode_audio(wav)
        with torch.inference_mode():
            ref = hf.thinker.get_audio_features(f["input_features"],
                                                feature_attention_mask=f["attention_mask"]).last_hidden_state
        assert ours.shape == ref.shape
        assert rel_err(ours, ref) <= PARITY["audio_encoder_rel"]
        q = question_prompt(rt20.cfg, wav)
        out = rt20.generate(q, thinker=GREEDY)
        with torch.inference_mode():
            seq = hf.thinker.generate(torch.tensor([q.token_ids]), input_features=f["input_features"],
                                      feature_attention_mask=f["attention_mask"], max_new_tokens=4,
                                      do_sample=False)
        assert out.token_ids == seq[0, len(q.token_ids):].tolist()
