"""The talker speaks about what it saw: image-only and video-only prompts through the Runtime give thinker ids,
codec codes and waveform equal to transformers' ``generate(..., return_audio=True)`` (tiny checkpoint, greedy).

Audio + vision with speech has no reference to equal: transformers crashes ('Qwen3OmniMoeTalkerConfig' object has
no attribute 'audio_config'). omni_rt's rule is that the talker follows the thinker's position rule; for an
image + audio prompt that is exactly what the reference computes once minimally patched (the talker config given
the thinker's audio_config), which the last test checks, saying so. Audio-in-video has no such check: the patched
reference gives the talker 1-D positions there (use_audio_in_video is not passed to it), a reference bug.
"""
from __future__ import annotations

import numpy as np
import torch

import omni_rt
from omni_rt import vision

from _tolerances import PARITY
from _fixtures import hf_speech_generate, runtime_fixture

RNG = np.random.default_rng(11)
IMG = RNG.integers(0, 256, (70, 90, 3), dtype=np.uint8)
FRAMES = RNG.integers(0, 256, (5, 30, 40, 3), dtype=np.uint8)
THINKER = omni_rt.SamplingParams(temperature=0.0, max_new_tokens=12)
TALKER = omni_rt.SamplingParams(temperature=0.0, max_new_tokens=40)


rt = runtime_fixture(max_prefill_tokens=64)


def reference(hf_tiny, ids, **kwargs):
    return hf_speech_generate(hf_tiny, ids, "ethan", THINKER.max_new_tokens, TALKER.max_new_tokens,
                              thinker_eos_token_id=450, **kwargs)


def check(rt, hf_tiny, msgs, **kwargs):
    prep = rt._resolve_prompt(msgs)
    out = rt.generate(msgs, speaker="ethan", return_audio=True, thinker=THINKER, talker=TALKER)
    ref_ids, ref_codes, ref_wav = reference(hf_tiny, prep.ids, **kwargs)
    assert out.token_ids == ref_ids
    assert out.codes.shape == tuple(ref_codes.shape) and np.array_equal(out.codes, ref_codes.numpy())
    assert out.codes.shape[1] >= 5
    assert out.audio.shape == tuple(ref_wav.shape)
    assert np.abs(out.audio - ref_wav.numpy()).max() <= PARITY["waveform_abs"]


def test_image_only_prompt_speaks_as_reference(rt, hf_tiny):
    pv, g = vision.preprocess_images([IMG])
    check(rt, hf_tiny, [{"role": "user", "content": [{"type": "image", "image": IMG},
                                                      {"type": "text", "text": "What is it?"}]}],
          pixel_values=pv, image_grid_thw=g)


def test_video_only_prompt_speaks_as_reference(rt, hf_tiny):
    pv, g, spg = vision.preprocess_video(FRAMES, 2.5)
    check(rt, hf_tiny, [{"role": "user", "content": [{"type": "video", "video": FRAMES, "fps": 2.5},
                                                      {"type": "text", "text": "What happens?"}]}],
          pixel_values_videos=pv, video_grid_thw=g, video_second_per_grid=torch.tensor([spg]))


def test_image_and_audio_speech_follows_the_thinker_rule_patched_reference(rt, hf_tiny):
    """transformers crashes on any audio + vision prompt with audio output ('Qwen3OmniMoeTalkerConfig' object has
    no attribute 'audio_config', in the talker's get_rope_index). Minimal patch for this test only: give the
    talker config the thinker's audio_config; the patched reference then applies the thinker's position rule to
    the talker prompt, which is omni_rt's defined behaviour, and the outputs must be identical."""
    from transformers import WhisperFeatureExtractor

    t = np.arange(16000 * 2) / 16000
    wav = (0.3 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    fe = WhisperFeatureExtractor(feature_size=128)
    fa = fe(wav, sampling_rate=16000, padding=True, truncation=False, return_attention_mask=True,
            return_tensors="pt")
    pv, g = vision.preprocess_images([IMG])
    talker_cfg = hf_tiny.talker.config
    assert not hasattr(talker_cfg, "audio_config")  # the reference bug this patch works around
    talker_cfg.audio_config = hf_tiny.config.thinker_config.audio_config
    try:
        check(rt, hf_tiny, [{"role": "user", "content": [{"type": "image", "image": IMG},
                                                          {"type": "audio", "audio": wav},
                                                          {"type": "text", "text": "Hi"}]}],
              pixel_values=pv, image_grid_thw=g, input_features=fa["input_features"],
              feature_attention_mask=fa["attention_mask"])
    finally:
        del talker_cfg.audio_config


def test_concurrent_mixed_modality_speech_equals_solo(rt):
    import threading

    t = np.arange(16000 * 2) / 16000
    wav = (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32)
    prompts = [
        [{"role": "user", "content": [{"type": "image", "image": IMG}, {"type": "text", "text": "What is it?"}]}],
        [{"role": "user", "content": [{"type": "video", "video": FRAMES, "fps": 2.5}]}],
        [{"role": "user", "content": [{"type": "audio", "audio": wav}, {"type": "text", "text": "Hi"}]}],
        [{"role": "user", "content": [{"type": "image", "image": IMG[:40]}, {"type": "audio", "audio": wav}]}],
    ]
    talker = omni_rt.SamplingParams(temperature=0.0, max_new_tokens=12)

    def run(p):
        out = rt.generate(p, return_audio=True, thinker=THINKER, talker=talker)
        return out.token_ids, out.codes.tolist()

    solo = [run(p) for p in prompts]
    results = [None] * len(prompts)

    def go(i):
        results[i] = run(prompts[i])

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(prompts))]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert results == solo
