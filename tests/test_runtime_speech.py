"""Speech through the Runtime on the tiny checkpoint: equal to transformers' generate (ids, codes, waveform),
stream == generate sample for sample, the first packet after exactly one talker frame, concurrent speaking
requests equal to their solo runs, cancellation returning every block and decoder slot."""
from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import omni_rt
from omni_rt.bench import question_prompt, spoken_question

from _tolerances import PARITY
from _fixtures import hf_speech_generate, runtime_fixture

T_GREEDY = omni_rt.SamplingParams(temperature=0.0, max_new_tokens=10)
K_GREEDY = omni_rt.SamplingParams(temperature=0.0, max_new_tokens=26)


rt = runtime_fixture(max_batch_size=4)


@pytest.fixture(scope="module")
def question(rt):
    return question_prompt(rt.cfg, spoken_question(2.5))


def hf_generate(hf, prompt: omni_rt.Prompt, speaker: str):
    from transformers import WhisperFeatureExtractor

    kwargs = {}
    if prompt.audios:
        fe = WhisperFeatureExtractor(feature_size=128)
        f = fe(prompt.audios[0], sampling_rate=16000, padding=True, truncation=False, return_attention_mask=True,
               return_tensors="pt")
        kwargs = dict(input_features=f["input_features"], feature_attention_mask=f["attention_mask"])
    ids, codes, wav = hf_speech_generate(hf, list(prompt.token_ids), speaker, T_GREEDY.max_new_tokens,
                                         K_GREEDY.max_new_tokens, **kwargs)
    return ids, codes.numpy(), wav.numpy()


@pytest.mark.parametrize("speaker", ["Ethan", "chelsie", "AIDEN"])
def test_generate_equals_transformers_audio_prompt(rt, hf_tiny, question, speaker):
    out = rt.generate(question, speaker=speaker, thinker=T_GREEDY, talker=K_GREEDY)
    ids, codes, wav = hf_generate(hf_tiny, question, speaker.lower())
    assert out.token_ids == ids
    assert out.codes.shape == codes.shape and np.array_equal(out.codes, codes)
    assert out.audio.shape == wav.shape
    assert np.abs(out.audio - wav).max() <= PARITY["waveform_abs"]


def test_generate_equals_transformers_text_prompt(rt, hf_tiny):
    p = omni_rt.Prompt(token_ids=[449, 11, 198, 100, 200, 300, 42, 450, 198, 449, 12, 198])
    out = rt.generate(p, speaker="ethan", thinker=T_GREEDY, talker=K_GREEDY)
    ids, codes, wav = hf_generate(hf_tiny, p, "ethan")
    assert out.token_ids == ids and np.array_equal(out.codes, codes)
    assert np.abs(out.audio - wav).max() <= PARITY["waveform_abs"]


def test_fixture_speaks(rt, question):
    """The tiny oracle must make speech tests meaningful: enough frames, audible, not clipped, varied codes."""
    out = rt.generate(question, thinker=T_GREEDY, talker=K_GREEDY)
    assert out.codes.shape[1] >= 20
    rms = float(np.sqrt(np.mean(out.audio ** 2)))
    clipped = float(np.mean(np.abs(out.audio) >= 0.999))
    assert rms > 0.05 and clipped < 0.01, (rms, clipped)
    assert len(set(out.codes[0].tolist())) >= 2
    assert out.audio.size == out.codes.shape[1] * 1920 - 555


def test_stream_equals_generate_and_first_packet_is_one_frame(rt, question):
    out = rt.generate(question, speaker="ethan", thinker=T_GREEDY, talker=K_GREEDY)
    chunks = list(rt.stream(question, speaker="ethan", thinker=T_GREEDY, talker=K_GREEDY))
    audio_chunks = [c.audio for c in chunks if c.audio.size]
    # first_chunk_frames = 1: the first packet is exactly one frame (1920 - 555 samples), later ones 1920 each
    assert audio_chunks[0].size == 1920 - 555
    assert all(a.size == 1920 for a in audio_chunks[1:])
    assert np.array_equal(np.concatenate(audio_chunks), out.audio)
    assert [t for c in chunks for t in c.token_ids] == out.token_ids
    # the first audio packet leaves while the thinker is still generating
    first_audio = next(i for i, c in enumerate(chunks) if c.audio.size)
    last_token = max(i for i, c in enumerate(chunks) if c.token_ids)
    assert first_audio < last_token


def test_first_chunk_frames_is_configurable(tiny_checkpoint, question):
    with omni_rt.Runtime(tiny_checkpoint, device="cpu", first_chunk_frames=3) as rt3:
        chunks = [c.audio for c in rt3.stream(question, thinker=T_GREEDY, talker=K_GREEDY) if c.audio.size]
    assert chunks[0].size == 3 * 1920 - 555


def test_concurrent_speaking_requests_equal_solo(rt, question):
    other = omni_rt.Prompt(token_ids=[449, 11, 198, 7, 8, 9, 450, 198, 449, 12, 198])
    jobs = [(question, "ethan"), (other, "chelsie"), (question, "aiden"), (other, "ethan")]
    solo = [rt.generate(p, speaker=s, thinker=T_GREEDY, talker=K_GREEDY) for p, s in jobs]
    results = [None] * len(jobs)

    def worker(i):
        p, s = jobs[i]
        results[i] = rt.generate(p, speaker=s, thinker=T_GREEDY, talker=K_GREEDY)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for a, b in zip(results, solo):
        assert a.token_ids == b.token_ids and np.array_equal(a.codes, b.codes)
        # ids and codes exactly; the waveform to fp32 rounding (batched convs sum in another order)
        assert a.audio.shape == b.audio.shape and np.abs(a.audio - b.audio).max() <= PARITY["code2wav_abs"]
    st = rt.stats()
    assert st["talker_kv_free_blocks"] == st["talker_kv_total_blocks"]
    assert st["kv_free_blocks"] == st["kv_total_blocks"]
    assert st["speech_slots_free"] == st["speech_slots_total"] == 4


def test_sampled_speech_is_seeded(rt, question):
    t = omni_rt.SamplingParams(temperature=0.9, max_new_tokens=8, seed=5)
    k = omni_rt.SamplingParams(max_new_tokens=12, seed=7)   # talker reference defaults, sampled
    a = rt.generate(question, thinker=t, talker=k)
    b = rt.generate(question, thinker=t, talker=k)
    assert a.token_ids == b.token_ids and np.array_equal(a.codes, b.codes)


def test_unknown_speaker_and_cancellation(rt, question):
    with pytest.raises(ValueError, match="aiden, chelsie, ethan"):
        rt.generate(question, speaker="nobody")
    long_k = omni_rt.SamplingParams(temperature=0.0, max_new_tokens=400, stop_token_ids=[])
    for chunk in rt.stream(question, thinker=T_GREEDY, talker=long_k, request_id="cut"):
        if chunk.audio.size:
            break
    for _ in range(300):
        if "cut" not in rt.engine.requests:
            break
        threading.Event().wait(0.01)
    st = rt.stats()
    assert st["talker_kv_free_blocks"] == st["talker_kv_total_blocks"]
    assert st["speech_slots_free"] == st["speech_slots_total"] == 4


def test_code_predictor_through_the_graph_runner_equals_eager(tiny_checkpoint, question):
    """The engine's frame-graph path (static buffers, bucket padding, copies out of the static outputs),
    run eagerly on CPU: same codes and audio as the plain frame loop, greedy and sampled."""
    from omni_rt.engine.graphs import code_predictor_graphs

    k_sampled = omni_rt.SamplingParams(max_new_tokens=14, seed=3)
    with omni_rt.Runtime(tiny_checkpoint, device="cpu", max_batch_size=3) as plain:
        expected = [plain.generate(question, thinker=T_GREEDY, talker=k) for k in (K_GREEDY, k_sampled)]
    with omni_rt.Runtime(tiny_checkpoint, device="cpu", max_batch_size=3) as graphed:
        stage = graphed.engine.stages
        stage.frame_graph = code_predictor_graphs(graphed.model.talker.code_predictor, 3, "cpu", torch.float32,
                                                  use_graphs=False)
        got = [graphed.generate(question, thinker=T_GREEDY, talker=k) for k in (K_GREEDY, k_sampled)]
    for a, b in zip(got, expected):
        assert np.array_equal(a.codes, b.codes) and np.abs(a.audio - b.audio).max() <= PARITY["code2wav_abs"]


def test_small_prefill_budget_spreads_prefills_over_steps_with_same_output(tiny_checkpoint, question, rt):
    """max_prefill_tokens 8: the thinker and talker prompts (~45 tokens) are prefilled over several engine
    steps (chunked prefill reading earlier pages), and the output is unchanged."""
    expected = rt.generate(question, speaker="chelsie", thinker=T_GREEDY, talker=K_GREEDY)
    with omni_rt.Runtime(tiny_checkpoint, device="cpu", max_prefill_tokens=8) as chunked:
        calls = {"thinker": 0, "talker": 0}

        def spy(runner, name):
            original = runner.prefill

            def counted(*a, **k):
                calls[name] += 1
                return original(*a, **k)
            runner.prefill = counted

        spy(chunked.engine.stages.thinker_runner, "thinker")
        spy(chunked.engine.stages.talker_runner, "talker")
        out = chunked.generate(question, speaker="chelsie", thinker=T_GREEDY, talker=K_GREEDY)
        assert calls["thinker"] >= len(question.token_ids) // 8   # one budgeted chunk per engine step
        assert calls["talker"] >= 4
    assert out.token_ids == expected.token_ids and np.array_equal(out.codes, expected.codes)
    assert np.abs(out.audio - expected.audio).max() <= PARITY["code2wav_abs"]


def test_code2wav_through_the_graph_runner_equals_eager(tiny_checkpoint, question):
    """The engine's Code2Wav graph path for one-frame steps (static buffers, padding to a bucket, state
    copied back into the slot pool), run eagerly on CPU: identical audio to the plain streaming step."""
    from omni_rt.engine.graphs import code2wav_graphs

    jobs = [(question, "ethan"), (omni_rt.Prompt(token_ids=[449, 11, 198, 7, 8, 450, 198, 449, 12, 198]), "aiden")]
    with omni_rt.Runtime(tiny_checkpoint, device="cpu", max_batch_size=3) as plain:
        expected = [plain.generate(p, speaker=s, thinker=T_GREEDY, talker=K_GREEDY) for p, s in jobs]
    with omni_rt.Runtime(tiny_checkpoint, device="cpu", max_batch_size=3) as graphed:
        stage = graphed.engine.stages
        stage.c2w_graph = code2wav_graphs(graphed.model.code2wav, 3, frames=1, use_graphs=False)
        results = [None, None]

        def worker(i):
            p, s = jobs[i]
            results[i] = graphed.generate(p, speaker=s, thinker=T_GREEDY, talker=K_GREEDY)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    for a, b in zip(results, expected):
        assert np.array_equal(a.codes, b.codes)
        assert a.audio.shape == b.audio.shape and np.abs(a.audio - b.audio).max() <= PARITY["code2wav_abs"]


def test_encode_audio_equals_reference_tower(rt, hf_tiny, tmp_path):
    """Runtime.encode_audio (array or path in) == transformers' audio tower on the same log-mel."""
    from transformers import WhisperFeatureExtractor

    from _tolerances import rel_err

    wav = spoken_question(3.3)
    ours = rt.encode_audio(wav)
    f = WhisperFeatureExtractor(feature_size=128)(wav, sampling_rate=16000, padding=True, truncation=False,
                                                   return_attention_mask=True, return_tensors="pt")
    with torch.inference_mode():
        ref = hf_tiny.thinker.get_audio_features(f["input_features"],
                                                 feature_attention_mask=f["attention_mask"]).last_hidden_state
    assert ours.shape == (omni_rt.audio.num_audio_tokens(omni_rt.audio.num_frames(wav.size)), 48)
    assert rel_err(ours, ref) <= PARITY["audio_encoder_rel"]
    path = tmp_path / "q.wav"
    omni_rt.audio.write_wav(path, wav, 16000)
    assert rel_err(rt.encode_audio(str(path)), ref) <= 1e-3  # 16-bit PCM round trip


def test_assistant_turn_without_newline_equals_transformers(rt, hf_tiny):
    # '<|im_start|>assistant' as the prompt's last tokens, no '\n': the reference's assistant segment then starts
    # with the generated tokens; this used to index past the prompt inside the engine step.
    p = omni_rt.Prompt(token_ids=[449, 11, 198, 100, 200, 300, 42, 450, 198, 449, 12])
    out = rt.generate(p, speaker="ethan", thinker=T_GREEDY, talker=K_GREEDY)
    ids, codes, wav = hf_generate(hf_tiny, p, "ethan")
    assert out.token_ids == ids and np.array_equal(out.codes, codes)
    assert np.abs(out.audio - wav).max() <= PARITY["waveform_abs"]
    assert rt.stats()["fault"] is None


@pytest.mark.parametrize("seconds", [0.05, 0.3, 0.99, 1.01])
def test_encode_short_audio_equals_reference(rt, hf_tiny, seconds):
    """Short waveforms (a "yes", a "hi") through log-mel and AuT == WhisperFeatureExtractor + transformers' tower."""
    from transformers import WhisperFeatureExtractor

    from _tolerances import rel_err

    wav = spoken_question(seconds)
    f = WhisperFeatureExtractor(feature_size=128)(wav, sampling_rate=16000, padding=True, truncation=False,
                                                   return_attention_mask=True, return_tensors="pt")
    with torch.inference_mode():
        ref = hf_tiny.thinker.get_audio_features(f["input_features"],
                                                 feature_attention_mask=f["attention_mask"]).last_hidden_state
    ours = rt.encode_audio(wav)
    assert ours.shape == ref.shape
    assert rel_err(ours, ref) <= PARITY["audio_encoder_rel"], rel_err(ours, ref)


def test_speech_frame_through_the_graph_runner_equals_eager(tiny_checkpoint, question):
    """The steady-state speech frame as one step (talker decode + code 0 + code-predictor frame + Code2Wav) over
    static buffers with bucket padding on the scratch slot, run eagerly on CPU: same ids, codes and audio as
    the stage-by-stage path, greedy and sampled, two requests at once."""
    jobs = [(question, "ethan", K_GREEDY),
            (omni_rt.Prompt(token_ids=[449, 11, 198, 7, 8, 450, 198, 449, 12, 198]), "aiden",
             omni_rt.SamplingParams(max_new_tokens=14, seed=3))]
    with omni_rt.Runtime(tiny_checkpoint, device="cpu", max_batch_size=3) as plain:
        expected = [plain.generate(p, speaker=s, thinker=T_GREEDY, talker=k) for p, s, k in jobs]
    with omni_rt.Runtime(tiny_checkpoint, device="cpu", max_batch_size=3) as graphed:
        stages = graphed.engine.stages
        stages.speech_graph = stages.speech_frame_runner(use_graphs=False)
        calls = []
        run = stages.speech_graph.run
        stages.speech_graph.run = lambda n, values: (calls.append(n), run(n, values))[1]
        results = [None, None]

        def worker(i):
            p, s, k = jobs[i]
            results[i] = graphed.generate(p, speaker=s, thinker=T_GREEDY, talker=k)

        threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        st = graphed.stats()
        assert st["talker_kv_free_blocks"] == st["talker_kv_total_blocks"]
    assert len(calls) >= 10   # the steady-state frames went through the runner
    for a, b in zip(results, expected):
        assert a.token_ids == b.token_ids and np.array_equal(a.codes, b.codes)
        assert a.audio.shape == b.audio.shape and np.abs(a.audio - b.audio).max() <= PARITY["code2wav_abs"]
