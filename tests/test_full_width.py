"""The released widths and token-id layout (vocab 152064, codec ids above 2048, speakers 2301-2303), one layer
per stack, random bf16 weights built in memory: the whole runtime path runs, stream equals generate, and the
output has the released shapes (16 code groups, 1920 samples per frame, 1365 for the first)."""
import numpy as np
import pytest
import torch

import omni_rt
from omni_rt.bench import question_prompt, spoken_question
from omni_rt.testing import build_synthetic_model


@pytest.fixture(scope="module")
def rt():
    model = build_synthetic_model("full-1layer", torch.bfloat16, "cpu")
    runtime = omni_rt.Runtime(model, device="cpu", dtype=torch.bfloat16, kv_cache_tokens=2048, max_model_len=2048)
    yield runtime
    runtime.close()


def test_released_layout_end_to_end(rt):
    p = question_prompt(rt.cfg, spoken_question(1.2))
    thinker = omni_rt.SamplingParams(temperature=0, max_new_tokens=3)
    talker = omni_rt.SamplingParams(temperature=0, max_new_tokens=5)
    out = rt.generate(p, speaker="Chelsie", thinker=thinker, talker=talker)
    assert len(out.token_ids) == 3 and all(0 <= t < 152064 for t in out.token_ids)
    groups, frames = out.codes.shape
    assert groups == 16 and 1 <= frames <= 4
    assert out.codes.min() >= 0 and out.codes.max() < 2048
    assert out.audio.size == frames * 1920 - 555 and np.isfinite(out.audio).all()
    chunks = [c for c in rt.stream(p, speaker="chelsie", thinker=thinker, talker=talker)]
    audio = [c.audio for c in chunks if c.audio.size]
    assert audio[0].size == 1365
    assert np.array_equal(np.concatenate(audio), out.audio)
    assert rt.stats()["kv_free_blocks"] == rt.stats()["kv_total_blocks"]
