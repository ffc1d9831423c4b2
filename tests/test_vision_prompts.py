"""Image / video / audio-in-video prompts through the Runtime: greedy thinker ids equal transformers'
``thinker.generate`` on the tiny checkpoint (TM-RoPE positions, deepstack, pad expansion), plus the layout checks.

The reference gets our preprocessing's pixel values (equal to the HF processors, tests/test_vision_preprocess.py)
and the token ids our prompt builder made (whose expansion is checked against the processor's rule here).
"""
from __future__ import annotations

import fractions

import numpy as np
import pytest
import torch

import omni_rt
from omni_rt import vision
from omni_rt.models.mrope import VisionItem, expand_vision_pads, multimodal_positions

from _fixtures import runtime_fixture

GREEDY = omni_rt.SamplingParams(temperature=0.0, max_new_tokens=10)
RNG = np.random.default_rng(7)
IMG = RNG.integers(0, 256, (70, 90, 3), dtype=np.uint8)
IMG2 = RNG.integers(0, 256, (40, 130, 3), dtype=np.uint8)
FRAMES = RNG.integers(0, 256, (5, 30, 40, 3), dtype=np.uint8)
_t = np.arange(16000 * 4) / 16000
WAV = (0.3 * np.sin(2 * np.pi * 220 * _t) * (1 + np.sin(_t * 3))).astype(np.float32)


# max_prefill_tokens 7: prefill chunk boundaries fall inside images and videos (deepstack slicing).
rt = runtime_fixture(max_prefill_tokens=7)


def _features(wav):
    from transformers import WhisperFeatureExtractor

    fe = WhisperFeatureExtractor(feature_size=128)
    out = fe(wav, sampling_rate=16000, padding=True, truncation=False, return_attention_mask=True,
             return_tensors="pt")
    return dict(input_features=out["input_features"], feature_attention_mask=out["attention_mask"])


def _ref(hf_tiny, ids, **kw):
    x = torch.tensor([ids])
    return hf_tiny.thinker.generate(x, max_new_tokens=GREEDY.max_new_tokens, do_sample=False,
                                    **kw)[0, x.shape[1]:].tolist()


def _user(*parts):
    return [{"role": "user", "content": list(parts)}]


def _check(rt, hf_tiny, msgs, aiv=None, **kw):
    prepared = rt._resolve_prompt(msgs, aiv)
    out = rt.generate(msgs, thinker=GREEDY, return_audio=False, use_audio_in_video=aiv)
    assert out.token_ids == _ref(hf_tiny, prepared.ids, **kw)
    return prepared


def test_image_prompt(rt, hf_tiny):
    pv, g = vision.preprocess_images([IMG])
    rt.stage_times(reset=True)
    prep = _check(rt, hf_tiny, _user({"type": "image", "image": IMG}, {"type": "text", "text": "What is it?"}),
                  pixel_values=pv, image_grid_thw=g)
    assert prep.ids.count(rt.cfg.thinker.image_token_id) == g.prod().item() // 4
    assert rt.stage_times()["vision_encode"] > 0        # the engine's own stage, timed apart from prefill


def test_two_image_prompt(rt, hf_tiny):
    pv, g = vision.preprocess_images([IMG, IMG2])
    _check(rt, hf_tiny, _user({"type": "image", "image": IMG}, {"type": "text", "text": "and"},
                              {"type": "image", "image": IMG2}), pixel_values=pv, image_grid_thw=g)


def test_video_prompt_fractional_positions(rt, hf_tiny):
    pv, g, spg = vision.preprocess_video(FRAMES, 2.5)
    prep = _check(rt, hf_tiny, _user({"type": "video", "video": FRAMES, "fps": 2.5},
                                     {"type": "text", "text": "What happens?"}),
                  pixel_values_videos=pv, video_grid_thw=g, video_second_per_grid=torch.tensor([spg]))
    pos, delta = multimodal_positions(prep.ids, rt.cfg.thinker, 2, [], [v.item for v in prep.vision])
    assert pos.dtype == torch.float32 and delta != int(delta)          # 0.8 s per grid · 13 → 10.4, 20.8
    vid = torch.tensor(prep.ids) == rt.cfg.thinker.video_token_id
    t = sorted(set(pos[0, vid].tolist()))
    assert [round(x - t[0], 4) for x in t] == [0.0, 10.4, 20.8]


def test_image_and_audio_prompt(rt, hf_tiny):
    pv, g = vision.preprocess_images([IMG])
    _check(rt, hf_tiny, _user({"type": "image", "image": IMG}, {"type": "audio", "audio": WAV},
                              {"type": "text", "text": "Hi"}), pixel_values=pv, image_grid_thw=g, **_features(WAV))


def test_video_then_image_deepstack_in_position_order(rt, hf_tiny):
    pv, g = vision.preprocess_images([IMG2])
    pvv, gv, spg = vision.preprocess_video(FRAMES[:2], 2.0)
    _check(rt, hf_tiny, _user({"type": "video", "video": FRAMES[:2], "fps": 2.0}, {"type": "image", "image": IMG2}),
           pixel_values=pv, image_grid_thw=g, pixel_values_videos=pvv, video_grid_thw=gv,
           video_second_per_grid=torch.tensor([spg]))


def write_video_file(path, frames, fps, wav=None, sr=16000):
    """A lossless (ffv1) video with an optional PCM audio track."""
    av = pytest.importorskip("av")
    with av.open(str(path), "w") as c:
        vs = c.add_stream("ffv1", rate=fractions.Fraction(fps).limit_denominator(1000))
        vs.width, vs.height, vs.pix_fmt = frames.shape[2], frames.shape[1], "bgr0"
        a = None
        if wav is not None:
            a = c.add_stream("pcm_s16le", rate=sr)
            a.layout = "mono"
        for f in frames:
            for pkt in vs.encode(av.VideoFrame.from_ndarray(f, format="rgb24").reformat(format="bgr0")):
                c.mux(pkt)
        for pkt in vs.encode():
            c.mux(pkt)
        if a is not None:
            fr = av.AudioFrame.from_ndarray((np.clip(wav, -1, 1) * 32767).astype(np.int16)[None], format="s16",
                                            layout="mono")
            fr.sample_rate = sr
            for pkt in list(a.encode(fr)) + list(a.encode()):
                c.mux(pkt)
    return str(path)


def test_audio_in_video_prompt(rt, hf_tiny, tmp_path):
    frames = RNG.integers(0, 256, (16, 30, 40, 3), dtype=np.uint8)
    path = write_video_file(tmp_path / "clip.mkv", frames, 4, WAV)
    decoded, fps = vision.load_video(path)
    track = vision.load_video_audio(path)
    assert decoded.shape[0] == 8 and fps == pytest.approx(2.0)      # 4 s at 4 fps sampled at 2 fps
    assert np.abs(track - WAV).max() < 1e-4
    pv, g, spg = vision.preprocess_video(decoded, fps, float_resize=True)   # as the runtime does for files
    msgs = _user({"type": "video", "video": path}, {"type": "text", "text": "What happens?"})
    prep = _check(rt, hf_tiny, msgs, aiv=True, pixel_values_videos=pv, video_grid_thw=g,
                  video_second_per_grid=torch.tensor([spg]), use_audio_in_video=True, **_features(track))
    th = rt.cfg.thinker
    vs = prep.ids.index(th.vision_start_token_id)
    assert prep.ids[vs + 1] == th.audio_start_token_id                 # VS AS [V… A…]… AE VE
    # Same request as a pre-tokenized Prompt gives the same ids out.
    p = omni_rt.Prompt(prep.ids, audios=[track], videos=[decoded], video_fps=[fps], use_audio_in_video=True)
    assert rt.generate(p, thinker=GREEDY, return_audio=False).token_ids == \
        rt.generate(msgs, thinker=GREEDY, return_audio=False, use_audio_in_video=True).token_ids


def test_audio_in_video_interleaving_is_the_processors(tiny_config):
    th = tiny_config.thinker
    item = VisionItem("video", (3, 4, 6), second_per_grid=1.0, audio_tokens=30)
    ids = expand_vision_pads(item, th, 2)
    # The processor's rule: a video grid at its start time (t·spg·13), audio tokens one position each.
    v, a = th.video_token_id, th.audio_token_id
    assert ids[0] == th.audio_start_token_id and ids[-1] == th.audio_end_token_id
    assert ids[1:-1] == [v] * 6 + [a] * 13 + [v] * 6 + [a] * 13 + [v] * 6 + [a] * 4


def test_prompt_with_pre_tokenized_image_equals_messages(rt):
    msgs = _user({"type": "image", "image": IMG}, {"type": "text", "text": "What is it?"})
    prep = rt._resolve_prompt(msgs)
    a = rt.generate(msgs, thinker=GREEDY, return_audio=False).token_ids
    b = rt.generate(omni_rt.Prompt(prep.ids, images=[IMG]), thinker=GREEDY, return_audio=False).token_ids
    assert a == b


def test_pad_count_mismatch_names_the_item(rt):
    msgs = _user({"type": "image", "image": IMG}, {"type": "image", "image": IMG2})
    ids = rt._resolve_prompt(msgs).ids
    img = rt.cfg.thinker.image_token_id
    last = len(ids) - 1 - ids[::-1].index(img)
    bad = ids[:last] + ids[last + 1:]                                    # one pad short in the second image
    with pytest.raises(ValueError, match="image 1"):
        rt.generate(omni_rt.Prompt(bad, images=[IMG, IMG2]), thinker=GREEDY, return_audio=False)
    with pytest.raises(ValueError, match="image blocks"):
        rt.generate(omni_rt.Prompt(ids, images=[IMG]), thinker=GREEDY, return_audio=False)


def test_audio_in_video_layout_breaking_the_rule_is_refused(rt, tiny_config):
    th = tiny_config.thinker
    frames = FRAMES[:4]
    pv, g, spg = vision.preprocess_video(frames, 2.0)
    n_audio = omni_rt.audio.num_audio_tokens(omni_rt.audio.num_frames(WAV.size))
    block = expand_vision_pads(VisionItem("video", tuple(g[0].tolist()), spg, n_audio), th, 2)
    body = block[1:-1]
    swapped = sorted(body, key=lambda t: t != th.video_token_id)      # all video first: breaks the rule
    assert swapped != body
    head = [449, 11, 198 if 198 < 448 else 10, th.vision_start_token_id]
    tail = [th.vision_end_token_id, 450, 198 if 198 < 448 else 10, 449, 12, 10]
    good = head + block + tail
    bad = head + [block[0]] + swapped + [block[-1]] + tail
    ok = omni_rt.Prompt(good, audios=[WAV], videos=[frames], video_fps=[2.0], use_audio_in_video=True)
    rt.generate(ok, thinker=omni_rt.SamplingParams(temperature=0.0, max_new_tokens=2), return_audio=False)
    with pytest.raises(ValueError, match="video 0 .*interleaved"):
        rt.generate(omni_rt.Prompt(bad, audios=[WAV], videos=[frames], video_fps=[2.0], use_audio_in_video=True),
                    thinker=GREEDY, return_audio=False)


@pytest.mark.parametrize("part, match", [
    ({"type": "image", "image": "/no/such/file.png"}, "image 0: file not found"),   # FileNotFoundError (issue 12)
    ({"type": "image", "image": np.zeros((0, 4, 3), np.uint8)}, "image 0: zero-size"),
    ({"type": "image", "image": 3.5}, "image 0: not an image"),
    ({"type": "video", "video": np.zeros((0, 8, 8, 3), np.uint8)}, "video 0: the video has no frames"),
])
def test_bad_vision_inputs_fail_that_request_only(rt, part, match):
    with pytest.raises(FileNotFoundError if "not found" in match else ValueError, match=match):
        rt.generate(_user(part), thinker=GREEDY, return_audio=False)
    # the runtime keeps serving
    assert rt.generate(_user({"type": "text", "text": "Hi"}), thinker=GREEDY, return_audio=False).token_ids


def test_audio_in_video_without_an_audio_track(rt, tmp_path):
    path = write_video_file(tmp_path / "silent.mkv", FRAMES, 2)
    with pytest.raises(ValueError, match="no audio track"):
        rt.generate(_user({"type": "video", "video": path}), thinker=GREEDY, return_audio=False,
                    use_audio_in_video=True)
    with pytest.raises(ValueError, match="array"):
        rt.generate(_user({"type": "video", "video": FRAMES}), thinker=GREEDY, return_audio=False,
                    use_audio_in_video=True)


def test_checkpoint_without_vision_tower_refuses_images(tmp_path_factory):
    from omni_rt.testing import make_checkpoint
    from omni_rt.testing.configs import tiny_config

    cfg = tiny_config()
    del cfg["thinker_config"]["vision_config"]
    path = make_checkpoint(tmp_path_factory.mktemp("novision"), cfg, seed=0, dtype=torch.float32)
    with omni_rt.Runtime(path, device="cpu") as r:
        assert r.model.thinker.visual is None
        with pytest.raises(ValueError, match="no vision tower"):
            r.generate(_user({"type": "image", "image": IMG}), thinker=GREEDY, return_audio=False)
        with pytest.raises(ValueError, match="no vision tower"):
            r.encode_image(IMG)
        assert r.generate(_user({"type": "text", "text": "Hi"}), thinker=GREEDY, return_audio=False).token_ids


def _text_only(cfg: dict) -> dict:
    """A config of a checkpoint without a talker, as Thinking and Captioner ship (enable_audio_output false)."""
    cfg["enable_audio_output"] = False
    for key in ("talker_config", "code2wav_config"):
        cfg.pop(key, None)
    return cfg


def test_captioner_checkpoint_takes_audio_and_refuses_images_and_video(tmp_path_factory):
    """A Captioner-shaped checkpoint (no talker, no vision tower: audio in, text out) loads, describes audio,
    and refuses images and videos with an error that names the checkpoint kind."""
    from omni_rt.testing import make_checkpoint
    from omni_rt.testing.configs import tiny_config

    cfg = _text_only(tiny_config())
    del cfg["thinker_config"]["vision_config"]
    path = make_checkpoint(tmp_path_factory.mktemp("captioner"), cfg, seed=0, dtype=torch.float32)
    with omni_rt.Runtime(path, device="cpu") as r:
        assert r.cfg.kind == "Captioner" and r.model.thinker.visual is None and not r.cfg.has_talker
        assert r.generate(_user({"type": "audio", "audio": WAV[:16000]}), thinker=GREEDY,
                          return_audio=False).token_ids
        for item in ({"type": "image", "image": IMG}, {"type": "video", "video": FRAMES, "fps": 2.0}):
            with pytest.raises(ValueError, match="Captioner checkpoint.*no images or video"):
                r.generate(_user(item, {"type": "text", "text": "Hi"}), thinker=GREEDY, return_audio=False)
        with pytest.raises(ValueError, match="Captioner"):
            r.encode_image(IMG)
        th = r.cfg.thinker
        pretokenized = omni_rt.Prompt(token_ids=[th.vision_start_token_id, th.image_token_id, th.vision_end_token_id],
                                      images=[IMG])
        with pytest.raises(ValueError, match="Captioner"):
            r.generate(pretokenized, thinker=GREEDY, return_audio=False)


def test_checkpoint_kinds_from_config():
    """Instruct (talker), Thinking (text out, vision tower), Captioner (its shape, or a name that says so: then
    images are refused even if its config carries a vision tower); Thinking and Instruct take images."""
    from omni_rt.config import OmniConfig
    from omni_rt.testing.configs import tiny_config

    instruct = OmniConfig.from_dict(tiny_config())
    thinking = OmniConfig.from_dict(_text_only(tiny_config()))
    named = OmniConfig.from_dict(dict(_text_only(tiny_config()), _name_or_path="Qwen/Qwen3-Omni-30B-A3B-Captioner"))
    assert (instruct.kind, thinking.kind, named.kind) == ("Instruct", "Thinking", "Captioner")
    assert instruct.vision_refusal() is None and thinking.vision_refusal() is None
    assert "Captioner" in named.vision_refusal() and named.thinker.vision is not None
    no_tower = tiny_config()
    del no_tower["thinker_config"]["vision_config"]
    assert "Instruct checkpoint has no vision tower" in OmniConfig.from_dict(no_tower).vision_refusal()


def test_thinking_checkpoint_takes_images(rt, tmp_path_factory):
    """A Thinking-shaped checkpoint (no talker, vision tower kept) loads its vision tower and answers about an
    image as the Instruct checkpoint's thinker does (same seed: the same thinker weights, drawn per tensor)."""
    from omni_rt.testing import make_checkpoint
    from omni_rt.testing.configs import tiny_config

    path = make_checkpoint(tmp_path_factory.mktemp("thinking"), _text_only(tiny_config()), seed=0,
                           dtype=torch.float32)
    msgs = _user({"type": "image", "image": IMG}, {"type": "text", "text": "What is it?"})
    with omni_rt.Runtime(path, device="cpu") as r:
        assert r.cfg.kind == "Thinking" and r.model.thinker.visual is not None
        out = r.generate(msgs, thinker=GREEDY, return_audio=False).token_ids
    assert out == rt.generate(msgs, thinker=GREEDY, return_audio=False).token_ids


def test_concurrent_mixed_modalities_equal_solo(rt):
    import threading

    prompts = [
        _user({"type": "image", "image": IMG}, {"type": "text", "text": "What is it?"}),
        _user({"type": "video", "video": FRAMES, "fps": 2.5}),
        _user({"type": "audio", "audio": WAV}, {"type": "text", "text": "Hi"}),
        _user({"type": "text", "text": "Hello"}),
        _user({"type": "image", "image": IMG2}, {"type": "audio", "audio": WAV[:20000]}),
    ]
    solo = [rt.generate(p, thinker=GREEDY, return_audio=False).token_ids for p in prompts]
    results = [None] * len(prompts)

    def go(i):
        results[i] = rt.generate(prompts[i], thinker=GREEDY, return_audio=False).token_ids

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == solo


def test_too_long_video_is_a_clear_error(tiny_checkpoint):
    with omni_rt.Runtime(tiny_checkpoint, device="cpu", max_model_len=400) as r:
        frames = np.zeros((8, 32, 32, 3), np.uint8)      # scaled up to 384×384: 4 grids of 144 tokens
        with pytest.raises(ValueError, match=r"video 0: 576 tokens \(384×384, 8 frames\).*max_model_len 400"):
            r.generate(_user({"type": "video", "video": frames}), thinker=GREEDY, return_audio=False)
        # a shorter one fits, and both stages' KV plans count its visual tokens
        out = r.generate(_user({"type": "video", "video": frames[:2]}), thinker=GREEDY, return_audio=True,
                         talker=omni_rt.SamplingParams(temperature=0.0, max_new_tokens=4))
        assert len(out.token_ids) >= 1


def test_kv_plan_counts_visual_tokens(tiny_checkpoint):
    # A pool of 160 tokens: a 320×256 image is 80 visual tokens, so its prompt + max_new_tokens cannot fit,
    # while a 160×256 one (40 tokens) can.
    with omni_rt.Runtime(tiny_checkpoint, device="cpu", kv_cache_tokens=160) as r:
        small = np.zeros((160, 256, 3), np.uint8)
        msgs = _user({"type": "image", "image": np.zeros((320, 256, 3), np.uint8)})
        n = len(r._resolve_prompt(msgs).ids)
        assert n > 80
        with pytest.raises(ValueError, match="KV blocks"):
            r.generate(msgs, thinker=omni_rt.SamplingParams(temperature=0.0, max_new_tokens=160 - n + 16),
                       return_audio=False)
        assert r.generate(_user({"type": "image", "image": small}), thinker=GREEDY, return_audio=False).token_ids
