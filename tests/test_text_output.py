"""The text side of a request (omni_rt.engine.text_output): stop strings end the reply before the first match and
hold back from the talker every id that could belong to one; the <think>…</think> span goes to ``reasoning``; and
through the Runtime: greedy ids are unchanged by either, deltas join to the outputs exactly."""
from __future__ import annotations

import numpy as np
import pytest

import omni_rt
from omni_rt.engine.text_output import TextOutput
from omni_rt.tokenizer import OmniTokenizer


@pytest.fixture(scope="module")
def tok(tiny_checkpoint):
    return OmniTokenizer(tiny_checkpoint)


def run(out: TextOutput, ids, final_at=None):
    text, reasoning, released, finished = [], [], [], False
    for i, t in enumerate(ids):
        step = out.push(t, final=(i == len(ids) - 1) if final_at is None else i == final_at)
        text.append(step.text)
        reasoning.append(step.reasoning)
        released.extend(step.release)
        finished = finished or step.finished
        if step.stopped or step.finished:
            break
    return "".join(text), "".join(reasoning), released, finished


def test_without_stop_strings_every_id_is_released_at_once(tok):
    ids = tok.encode("The weather today is sunny with a light breeze.")
    out = TextOutput(tok)
    for t in ids[:-1]:
        step = out.push(t)
        assert step.release == [t] and not step.finished
    assert out.push(ids[-1], final=True).finished


@pytest.mark.parametrize("stop", ["sunny", "y w", "breeze.", "e", "The"])
def test_stop_string_cuts_text_and_speech(tok, stop):
    sentence = "The weather today is sunny with a light breeze. Thank you for asking."
    ids = tok.encode(sentence)
    text, _, released, finished = run(TextOutput(tok, stop=[stop, "never-there"]), ids)
    cut = sentence.find(stop)
    assert text == sentence[:cut] and finished
    # the talker gets the ids whose text lies before the stop string, then exactly one terminator id (the one the
    # stop string begins in) — nothing after it
    spoken = released[:-1]
    assert tok.decode(spoken) == sentence[:len(tok.decode(spoken))] and len(tok.decode(spoken)) <= cut
    assert len(tok.decode(released)) > cut
    assert released == ids[:len(released)]


def test_partial_match_is_released_when_it_turns_out_not_to_be_a_stop(tok):
    sentence = "Thank you for asking, it is a pleasant afternoon."
    ids = tok.encode(sentence)
    text, _, released, finished = run(TextOutput(tok, stop=["pleasant evening"]), ids)
    assert text == sentence and released == ids and finished


def test_reasoning_span_is_kept_apart(tok):
    think = (tok.token_id("<think>"), tok.token_id("</think>"))
    r_ids, c_ids = tok.encode("I can hear you clearly."), tok.encode("Fine, thanks!")
    ids = [think[0], *r_ids, think[1], *c_ids]
    text, reasoning, released, _ = run(TextOutput(tok, think_ids=think), ids)
    assert reasoning == "I can hear you clearly." and text == "Fine, thanks!" and released == ids
    # a prompt that already opened the span (Thinking templates may end with "<think>\n")
    text, reasoning, _, _ = run(TextOutput(tok, think_ids=think, in_reasoning=True), [*r_ids, think[1], *c_ids])
    assert reasoning == "I can hear you clearly." and text == "Fine, thanks!"
    # no span at all: everything is text
    text, reasoning, _, _ = run(TextOutput(tok, think_ids=think), c_ids)
    assert text == "Fine, thanks!" and reasoning == ""


@pytest.fixture(scope="module")
def rt(tiny_checkpoint):
    runtime = omni_rt.Runtime(tiny_checkpoint, device="cpu", max_batch_size=2)
    yield runtime
    runtime.close()


def test_runtime_stop_string_ends_text_and_speech(rt):
    msgs = [{"role": "user", "content": "What is the weather like today?"}]
    g = omni_rt.SamplingParams(temperature=0.0, max_new_tokens=16)
    full = rt.generate(msgs, thinker=g, talker=omni_rt.SamplingParams(temperature=0.0, max_new_tokens=40))
    assert len(full.text) >= 6, full.text
    stop = full.text[len(full.text) // 2:][:2]
    cut = full.text.find(stop)
    gs = omni_rt.SamplingParams(temperature=0.0, max_new_tokens=16, stop=[stop])
    out = rt.generate(msgs, thinker=gs, talker=omni_rt.SamplingParams(temperature=0.0, max_new_tokens=40))
    assert out.text == full.text[:cut] and out.finish_reason == "stop"
    assert out.token_ids == full.token_ids[:len(out.token_ids)] and len(out.token_ids) < len(full.token_ids)
    chunks = list(rt.stream(msgs, thinker=gs, talker=omni_rt.SamplingParams(temperature=0.0, max_new_tokens=40)))
    assert "".join(c.text_delta for c in chunks) == out.text
    assert np.array_equal(np.concatenate([c.audio for c in chunks]), out.audio)
    with pytest.raises(TypeError, match="stop"):   # a string where a list of strings belongs (issue 12)
        rt.generate(msgs, thinker=omni_rt.SamplingParams(stop="x"))
    with pytest.raises(ValueError, match="stop"):
        rt.generate(msgs, thinker=omni_rt.SamplingParams(stop=[""]))


def test_runtime_reasoning_when_the_prompt_opens_a_think_span(rt):
    """A prompt ending in '<think>\\n' (a Thinking template): everything up to </think> is reasoning; greedy ids are
    exactly those of the same prompt without the split (the split is on the text side only)."""
    tok = rt.tokenizer
    base = tok.encode(tok.render([{"role": "user", "content": [{"type": "text", "text": "Hello, how are you?"}]}]))
    ids = base + [tok.token_id("<think>"), *tok.encode("\n")]
    g = omni_rt.SamplingParams(temperature=0.0, max_new_tokens=10)
    out = rt.generate(omni_rt.Prompt(ids), return_audio=False, thinker=g)
    think_end = tok.token_id("</think>")
    gen = out.token_ids
    n_r = gen.index(think_end) if think_end in gen else len(gen)
    assert out.reasoning == tok.decode(gen[:n_r]) and out.reasoning
    assert out.text == tok.decode(gen[n_r + 1:])
    chunks = list(rt.stream(omni_rt.Prompt(ids), return_audio=False, thinker=g))
    assert "".join(c.reasoning_delta for c in chunks) == out.reasoning
    assert [t for c in chunks for t in c.token_ids] == gen
