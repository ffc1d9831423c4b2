"""Speech out end to end against transformers' ``generate(..., return_audio=True)`` on the tiny oracle checkpoint
(fp32, CPU, greedy): same thinker ids, same codec codes (captured at the reference's Code2Wav input), waveform
within 1e-4, for a text prompt ending on a stop id, an audio prompt cut by max_new_tokens (the reference never
voices the last token then), and every speaker; plus the fixture actually speaks, and the no-talker errors."""
from __future__ import annotations

import pytest
import torch

import types

import omni_rt
from omni_rt.models.omni import load_model
from omni_rt.request import SamplingParams

from _engine import audio_of, make_engine, make_request, run
from _fixtures import hf_speech_generate
from _tolerances import PARITY
from test_thinker import audio_prompt, hf_features, speech_like

IM_START, IM_END, USER, ASSISTANT, NL = 449, 450, 11, 12, 5
TEXT = [IM_START, USER, NL, 100, 200, 300, 42, IM_END, NL, IM_START, ASSISTANT, NL]


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint, torch.float32, "cpu")


def reference(hf_tiny, ids, speaker, thinker_max, talker_max, eos=IM_END, **kwargs):
    """(generated thinker ids, codes (G, frames), waveform (samples,)) from the reference's greedy generate."""
    return hf_speech_generate(hf_tiny, ids, speaker, thinker_max, talker_max, thinker_eos_token_id=eos, **kwargs)


def ours(model, ids, speaker, thinker_max, talker_max, eos=IM_END, audio=None, talker=None):
    """The engine (8-token KV pages, 16-token prefill budget) on one speaking request."""
    req = make_request(model, "r", ids, SamplingParams(temperature=0.0, max_new_tokens=thinker_max, stop_token_ids=[eos]),
                       talker or SamplingParams(temperature=0.0, max_new_tokens=talker_max), speaker,
                       audios=[audio] if audio is not None else ())
    run(make_engine(model, kv_block_size=8, max_prefill_tokens=16), [req])
    g = model.cfg.talker.num_code_groups
    return types.SimpleNamespace(token_ids=req.output, thinker_finish_reason=req.finish_reason,
                                 codes=torch.from_numpy(req.all_codes(g)), code0=req.talker.output,
                                 wav=torch.from_numpy(audio_of(req)))


def assert_same(out, ref_ids, ref_codes, ref_wav):
    assert out.token_ids == ref_ids
    assert out.codes.shape == ref_codes.shape
    assert torch.equal(out.codes, ref_codes)
    assert out.code0[:-1] == ref_codes[0].tolist()   # T talker tokens → T − 1 frames
    assert out.wav.shape == ref_wav.shape
    assert (out.wav - ref_wav).abs().max().item() <= PARITY["waveform_abs"]


def assert_speaks(codes, wav):
    """The oracle's own output is a usable test: enough frames, audible, not clipped, not one repeated code."""
    assert codes.shape[1] >= 20
    assert wav.pow(2).mean().sqrt().item() > 0.05
    assert (wav.abs() >= 0.999).float().mean().item() < 0.01
    assert len(set(codes[0].tolist())) >= 2


def test_text_prompt_ending_on_stop_id(model, hf_tiny):
    # The tiny thinker rarely emits <|im_end|>; use one of its own greedy tokens as the stop id so the
    # reference run ends on a stop id (the stop id is never voiced).
    first = hf_tiny.thinker.generate(torch.tensor([TEXT]), max_new_tokens=10, do_sample=False,
                                     eos_token_id=IM_END)[0, len(TEXT):].tolist()
    k = next(k for k in range(5, 10) if first[k] not in first[:k])
    stop = first[k]
    ref_ids, ref_codes, ref_wav = reference(hf_tiny, TEXT, "Ethan", 16, 24, eos=stop)
    assert ref_ids[-1] == stop and len(ref_ids) == k + 1
    assert_speaks(ref_codes, ref_wav)
    out = ours(model, TEXT, "ethan", 16, 24, eos=stop)
    assert out.thinker_finish_reason == "stop"
    assert_same(out, ref_ids, ref_codes, ref_wav)


def test_audio_prompt_cut_by_length(model, hf_tiny):
    wav = speech_like(2.1, seed=3)
    feats, mask = hf_features(wav)
    n_tok = model.thinker.audio_tower.num_audio_tokens(int(mask.sum()))
    ids = audio_prompt(n_tok)
    ref_ids, ref_codes, ref_wav = reference(hf_tiny, ids, "Ethan", 5, 22, input_features=feats,
                                            feature_attention_mask=mask)
    assert len(ref_ids) == 5 and IM_END not in ref_ids
    assert_speaks(ref_codes, ref_wav)
    out = ours(model, ids, "Ethan", 5, 22, audio=wav)
    assert out.thinker_finish_reason == "length"
    assert_same(out, ref_ids, ref_codes, ref_wav)


def test_every_speaker_case_insensitive(model, hf_tiny):
    names = sorted(model.cfg.talker.speaker_id)
    codes = []
    for name in names:
        ref_ids, ref_codes, ref_wav = reference(hf_tiny, TEXT, name.capitalize(), 3, 5)
        out = ours(model, TEXT, name.upper(), 3, 5)
        assert_same(out, ref_ids, ref_codes, ref_wav)
        codes.append(tuple(out.codes.flatten().tolist()))
    assert len(set(codes)) > 1   # the speaker id reaches the talker


def test_unknown_speaker_lists_valid_ones(model):
    with pytest.raises(ValueError, match="aiden, chelsie, ethan"):
        ours(model, TEXT, "Vivian", 3, 5)


def test_no_talker_asked_for_audio_is_a_clear_error(tiny_checkpoint, hf_tiny):
    text_only = load_model(tiny_checkpoint, torch.float32, "cpu", with_talker=False)
    greedy = SamplingParams(temperature=0.0, max_new_tokens=4)
    with omni_rt.Runtime(text_only, device="cpu") as rt:
        with pytest.raises(ValueError, match="no talker"):
            rt.generate(omni_rt.Prompt(token_ids=TEXT), thinker=greedy, return_audio=True)
        out = rt.generate(omni_rt.Prompt(token_ids=TEXT), return_audio=False, thinker=greedy)
    ref = hf_tiny.thinker.generate(torch.tensor([TEXT]), max_new_tokens=4, do_sample=False,
                                   eos_token_id=IM_END)[0, len(TEXT):].tolist()
    assert out.token_ids == ref and out.codes is None and out.audio is None


def test_sampled_speech_is_seeded(model):
    def run_seed(seed):
        return ours(model, TEXT, "aiden", 3, 6, talker=SamplingParams(seed=seed, max_new_tokens=6))

    a, b, c = run_seed(11), run_seed(11), run_seed(12)
    assert torch.equal(a.codes, b.codes) and torch.equal(a.wav, b.wav)
    assert a.codes.shape == (model.cfg.talker.num_code_groups, 5)
    assert not torch.equal(a.codes, c.codes)
