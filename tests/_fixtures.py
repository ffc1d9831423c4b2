"""Shared test helpers over the tiny oracle checkpoint: the speaking Runtime fixture and transformers' speech
reference (greedy ``generate(..., return_audio=True)`` with the codec codes captured at Code2Wav's input)."""
from __future__ import annotations

import pytest
import torch

import omni_rt


def runtime_fixture(checkpoint: str = "tiny_checkpoint", **kwargs):
    """A module-scoped ``rt`` fixture: the Runtime on CPU over the checkpoint that the fixture named
    ``checkpoint`` gives (default the tiny one, talker included, so it speaks), built with ``kwargs`` and closed
    after the module. Use as ``rt = runtime_fixture(max_batch_size=4)``."""

    @pytest.fixture(scope="module")
    def rt(request):
        runtime = omni_rt.Runtime(request.getfixturevalue(checkpoint), device="cpu", **kwargs)
        try:
            yield runtime
        finally:
            runtime.close()

    return rt


def hf_speech_generate(hf, ids: list[int], speaker: str, thinker_max: int, talker_max: int, **kwargs):
    """transformers' greedy thinker + talker on the prompt ``ids`` → (generated thinker ids, codec codes
    (G, frames) as Code2Wav received them, waveform (samples,)). ``kwargs`` go to ``generate`` (audio features,
    pixel values, ``thinker_eos_token_id``, ...)."""
    captured = {}
    original = hf.code2wav.chunked_decode

    def spy(codes, *args, **kw):
        captured["codes"] = codes.clone()
        return original(codes, *args, **kw)

    hf.code2wav.chunked_decode = spy
    try:
        seqs, wav = hf.generate(torch.tensor([ids]), speaker=speaker, return_audio=True,
                                thinker_max_new_tokens=thinker_max, thinker_do_sample=False,
                                talker_do_sample=False, talker_max_new_tokens=talker_max, **kwargs)
    finally:
        del hf.code2wav.chunked_decode   # the instance attribute goes; the bound method shows through again
    assert hf.code2wav.chunked_decode == original
    return seqs[0, len(ids):].tolist(), captured["codes"][0], wav.flatten()
