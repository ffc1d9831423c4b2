"""Property-based fuzzing of the public surface (issue 12 item 6), with hypothesis.

Property, for every generated input: the call raises a clear ``ValueError`` / ``TypeError`` /
``FileNotFoundError`` / ``CheckpointError`` (messages name what was wrong), or returns a correct result — and
one shared runtime still serves a healthy request afterwards, equal to its result before any fuzzing, with no
fault recorded. Every bad input named in the issue is an explicit ``@example``. Bounded for CI: derandomized,
no deadline, at most ``MAX_EXAMPLES`` examples per property.
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, event, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import omni_rt  # noqa: E402
from omni_rt.config import OmniConfig  # noqa: E402
from omni_rt.models.omni import OmniModel  # noqa: E402
from omni_rt.testing import tiny_config  # noqa: E402

MAX_EXAMPLES = 50
FUZZ = settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                       HealthCheck.data_too_large, HealthCheck.filter_too_much])
CLEAR = (ValueError, TypeError, FileNotFoundError, omni_rt.CheckpointError)

IM_START, IM_END, USER, ASSISTANT, NL = 449, 450, 11, 12, 198
AUDIO_PAD = 480
HEALTHY = omni_rt.Prompt(token_ids=[IM_START, USER, NL, 5, 6, 7, IM_END, NL, IM_START, ASSISTANT, NL])
HEALTHY_PARAMS = omni_rt.SamplingParams(temperature=0.0, max_new_tokens=3)


@pytest.fixture(scope="module")
def rt(tiny_checkpoint):
    with omni_rt.Runtime(tiny_checkpoint, device="cpu", max_batch_size=4) as runtime:
        runtime._healthy_reference = runtime.generate(HEALTHY, thinker=HEALTHY_PARAMS, return_audio=False).token_ids
        yield runtime


def assert_healthy(rt) -> None:
    """The shared runtime still serves, with the same greedy answer as before any fuzzing, and nothing leaked."""
    assert rt.generate(HEALTHY, thinker=HEALTHY_PARAMS, return_audio=False).token_ids == rt._healthy_reference
    s = rt.stats()
    assert s["fault"] is None, s["fault"]
    assert s["running"] == 0 and s["waiting"] == 0
    assert s["kv_free_blocks"] == s["kv_total_blocks"]
    assert s["talker_kv_free_blocks"] == s["talker_kv_total_blocks"]
    assert s["speech_slots_free"] == s["speech_slots_total"]


def check_output(rt, out, params: omni_rt.SamplingParams, speaking: bool) -> None:
    """What every correct result satisfies, whatever the (valid) parameters."""
    p = params.resolved("thinker")
    vocab = rt.cfg.thinker.text.vocab_size
    assert 1 <= len(out.token_ids) <= p.max_new_tokens
    assert all(0 <= t < vocab for t in out.token_ids)
    stops = set(p.stop_token_ids) if p.stop_token_ids is not None else {rt.cfg.im_end_token_id}
    assert not any(t in stops for t in out.token_ids[:-1])     # nothing generated past a stop id
    if not p.stop:
        assert out.text == rt.tokenizer.decode(out.token_ids)
    if speaking:
        assert out.codes is not None and out.codes.shape[0] == rt.cfg.talker.num_code_groups
        assert out.audio.dtype == np.float32 and bool(np.isfinite(out.audio).all())
    else:
        assert out.audio is None and out.codes is None


# ------------------------------------------------------------------------------------------- strategies
def junk() -> st.SearchStrategy:
    """Values of the wrong kind for almost any field."""
    return st.one_of(st.text(max_size=5), st.lists(st.integers(-3, 3), max_size=3), st.dictionaries(
        st.text(max_size=3), st.integers(), max_size=2), st.just(b"x"), st.just(object()), st.complex_numbers(
        allow_nan=False, allow_infinity=False, max_magnitude=2))


def floats_any() -> st.SearchStrategy:
    return st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.floats(-2, 3), st.booleans())


def ints_any(lo: int = -5, hi: int = 6) -> st.SearchStrategy:
    return st.one_of(st.integers(lo, hi), st.integers(-(2 ** 70), 2 ** 70), st.sampled_from([2 ** 63, 2 ** 63 - 1,
                                                                                               -(2 ** 63), 10 ** 30]))


def mostly(valid: st.SearchStrategy, invalid: st.SearchStrategy) -> st.SearchStrategy:
    """Valid four times in five, so that served requests are common too."""
    return st.integers(0, 4).flatmap(lambda i: invalid if i == 0 else valid)


sampling_fields = st.fixed_dictionaries({}, optional={
    "temperature": mostly(st.one_of(st.none(), st.floats(0, 1.5)), st.one_of(floats_any(), junk())),
    "top_k": mostly(st.one_of(st.none(), st.integers(0, 60), st.integers(400, 10 ** 20)),
                    st.one_of(ints_any(-2, 700), st.floats(0, 50), junk())),
    "top_p": mostly(st.one_of(st.none(), st.floats(0.05, 1.0)), st.one_of(floats_any(), junk())),
    "repetition_penalty": mostly(st.one_of(st.none(), st.floats(0.5, 2.0)), st.one_of(floats_any(), junk())),
    "max_new_tokens": mostly(st.one_of(st.none(), st.integers(1, 4)), st.sampled_from([0, -1, 10 ** 9, 2.0, "3",
                                                                                        True])),
    "stop_token_ids": mostly(st.one_of(st.none(), st.lists(st.integers(0, 511), max_size=3)), st.one_of(
        st.lists(st.one_of(st.integers(-2, 600), st.floats(0, 5), st.text(max_size=2)), min_size=1, max_size=3),
        st.integers(0, 500), st.text(max_size=3))),
    "seed": mostly(st.one_of(st.none(), st.integers(0, 2 ** 63 - 1)), st.one_of(ints_any(0, 2 ** 64),
                                                                               st.floats(0, 10), junk())),
    "stop": mostly(st.one_of(st.none(), st.lists(st.text(min_size=1, max_size=3), max_size=2)),
                   st.one_of(st.text(max_size=3), st.lists(st.just(""), min_size=1, max_size=1), junk())),
})


def make_params(fields: dict):
    """SamplingParams(**fields) with an unbounded max_new_tokens kept short (the property, not a soak)."""
    fields = dict(fields)
    if fields.get("max_new_tokens") is None:
        fields["max_new_tokens"] = 3
    return omni_rt.SamplingParams(**fields)


# ---------------------------------------------------------------------------------------- SamplingParams
@FUZZ
@given(fields=sampling_fields, stage=st.sampled_from(["thinker", "talker"]))
@example(fields={"seed": 2 ** 63}, stage="thinker")
@example(fields={"seed": 1.5}, stage="thinker")
@example(fields={"seed": 3.0}, stage="talker")
@example(fields={"top_k": 10 ** 30, "temperature": 1.0, "seed": 1}, stage="thinker")
@example(fields={"top_k": 2 ** 63, "temperature": 0.9, "seed": 2}, stage="talker")
@example(fields={"temperature": "0.7"}, stage="thinker")
@example(fields={"stop_token_ids": 450}, stage="thinker")
@example(fields={"stop_token_ids": [10 ** 6]}, stage="thinker")
@example(fields={"stop_token_ids": [5000]}, stage="talker")
@example(fields={"max_new_tokens": 0}, stage="thinker")
@example(fields={"temperature": float("nan")}, stage="talker")
def test_fuzz_sampling_params(rt, fields, stage):
    try:
        params = make_params(fields)
        speaking = stage == "talker"
        kwargs = dict(thinker=params, return_audio=False) if not speaking else dict(
            thinker=omni_rt.SamplingParams(temperature=0.0, max_new_tokens=2), talker=params)
        out = rt.generate(HEALTHY, **kwargs)
    except CLEAR as e:
        event(f"refused: {type(e).__name__}: {str(e)[:48]}")
    else:
        event("served")
        check_output(rt, out, params if not speaking else kwargs["thinker"], speaking)
    assert_healthy(rt)


# ---------------------------------------------------------------------------------------- request arguments
@FUZZ
@given(thinker=mostly(st.sampled_from([HEALTHY_PARAMS, omni_rt.SamplingParams(temperature=0.5, max_new_tokens=2)]),
                     st.one_of(
           st.just("greedy"), st.dictionaries(st.sampled_from(["temperature", "top_k"]), st.integers(0, 3),
                                              max_size=2), st.integers(0, 2))),
       return_audio=mostly(st.sampled_from([None, True, False, np.bool_(False)]),
                           st.sampled_from(["no", "yes", 0, 1])),
       speaker=mostly(st.sampled_from(["ethan", "CHELSIE", "Aiden"]),
                      st.one_of(st.sampled_from(["nobody", ""]), st.integers(), st.none())),
       request_id=mostly(st.one_of(st.none(), st.text(min_size=1, max_size=8)), st.one_of(st.integers(),
                                                                                         st.just(""))))
@example(thinker={"temperature": 0.0}, return_audio=False, speaker="ethan", request_id=None)
@example(thinker=HEALTHY_PARAMS, return_audio="no", speaker="ethan", request_id=None)
@example(thinker=HEALTHY_PARAMS, return_audio=False, speaker=5, request_id="")
def test_fuzz_request_arguments(rt, thinker, return_audio, speaker, request_id):
    talker = omni_rt.SamplingParams(temperature=0.0, max_new_tokens=3)
    try:
        out = rt.generate(HEALTHY, thinker=thinker, talker=talker, return_audio=return_audio, speaker=speaker,
                          request_id=request_id)
    except CLEAR as e:
        event(f"refused: {type(e).__name__}: {str(e)[:48]}")
    else:
        event("served")
        check_output(rt, out, thinker, return_audio is None or bool(return_audio))
        if isinstance(request_id, str) and request_id:
            assert out.request_id == request_id
    assert_healthy(rt)


# --------------------------------------------------------------------------------------------- Prompt
def valid_audio() -> st.SearchStrategy:
    lengths = st.sampled_from([201, 800, 4800, 15840, 16160, 17600])
    return st.one_of(
        st.builds(lambda n, s: (np.random.RandomState(s).randn(n) * 0.1).astype(np.float32), lengths,
                  st.integers(0, 3)),
        st.builds(lambda n, s: (np.random.RandomState(s).randn(2, n) * 3000).astype(np.int16), lengths,
                  st.integers(0, 3)),
        st.builds(lambda n: torch.linspace(-0.5, 0.5, n), lengths),
    )


def bad_audio() -> st.SearchStrategy:
    lengths = st.sampled_from([0, 1, 150, 4800])
    return st.one_of(
        st.builds(lambda n, v: np.full(n, v, np.float32), lengths,
                  st.floats(allow_nan=True, allow_infinity=True, width=32)),
        st.builds(lambda n: np.ones((n, 3, 2), np.float32), st.sampled_from([1, 300])),
        st.sampled_from([np.array(0.5, np.float32), np.zeros(1000, np.complex64), np.zeros(1000, bool),
                         np.zeros((300, 300), np.float32), "/no/such/audio.wav", 42, None, [0.0] * 300]),
    )


def audio_arrays() -> st.SearchStrategy:
    return mostly(valid_audio(), bad_audio())


@FUZZ
@given(ids=mostly(st.lists(st.integers(0, 447), min_size=1, max_size=12), st.one_of(
           st.lists(st.integers(-3, 10 ** 6), max_size=6), st.integers(), st.text(max_size=4),
           st.lists(st.one_of(st.integers(0, 511), st.floats(), st.text(max_size=1), st.booleans()), max_size=6))),
       audios=mostly(st.lists(audio_arrays(), max_size=2), audio_arrays()),
       pad_audio=mostly(st.just(True), st.just(False)),
       assistant=mostly(st.sampled_from(["full", "no_newline"]), st.just("none")), speak=st.booleans())
@example(ids=[5, 6], audios=[], pad_audio=False, assistant="no_newline", speak=True)
@example(ids=[5], audios=[np.full(16000, 1e30, np.float32)], pad_audio=True, assistant="full", speak=False)
@example(ids=[5], audios=[np.full(16000, np.inf, np.float32)], pad_audio=True, assistant="full", speak=False)
@example(ids=[5], audios=["/no/such/audio.wav"], pad_audio=True, assistant="full", speak=False)
@example(ids=[10 ** 6], audios=[], pad_audio=False, assistant="full", speak=False)
@example(ids=[], audios=[], pad_audio=False, assistant="none", speak=False)
@example(ids=[5], audios=[(np.random.RandomState(0).randn(4800) * 0.1).astype(np.float32)], pad_audio=True,
         assistant="no_newline", speak=True)
def test_fuzz_prompt(rt, ids, audios, pad_audio, assistant, speak):
    try:
        if isinstance(ids, list) and pad_audio and isinstance(audios, list):
            # lay each audio's pad run out as the processor does (when the audio is valid enough to count)
            runs = []
            for a in audios:
                n = a.shape[-1] if isinstance(a, (np.ndarray, torch.Tensor)) and a.ndim in (1, 2) else 0
                runs += [AUDIO_PAD] * omni_rt.audio.num_audio_tokens(omni_rt.audio.num_frames(n))
            ids = [IM_START, USER, NL] + runs + list(ids) + [IM_END, NL]
        if isinstance(ids, list):
            ids = list(ids) + {"full": [IM_START, ASSISTANT, NL], "no_newline": [IM_START, ASSISTANT],
                               "none": []}[assistant]
        prompt = omni_rt.Prompt(token_ids=ids, audios=audios)
        out = rt.generate(prompt, thinker=omni_rt.SamplingParams(temperature=0.0, max_new_tokens=3),
                          talker=omni_rt.SamplingParams(temperature=0.0, max_new_tokens=3), return_audio=speak)
    except CLEAR as e:
        event(f"refused: {type(e).__name__}: {str(e)[:48]}")
    else:
        event("served")
        check_output(rt, out, omni_rt.SamplingParams(temperature=0.0, max_new_tokens=3), speak)
    assert_healthy(rt)


# ------------------------------------------------------------------------------------------- messages
def parts() -> st.SearchStrategy:
    return mostly(st.one_of(
        st.builds(lambda t: {"type": "text", "text": t}, st.text(max_size=12)),
        st.builds(lambda a: {"type": "audio", "audio": a}, audio_arrays()),
        st.builds(lambda: {"type": "image", "image": np.zeros((28, 28, 3), np.uint8)}),
    ), st.one_of(
        st.builds(lambda x: {"type": "image", "image": x}, st.one_of(junk(), st.just("/no/such.png"))),
        st.fixed_dictionaries({"type": st.one_of(st.text(max_size=5), st.integers(), st.none())}),
        st.just({"text": "no type"}), junk(),
    ))


message = st.fixed_dictionaries({
    "role": mostly(st.sampled_from(["user", "system", "assistant"]), st.one_of(st.text(max_size=4), st.integers())),
    "content": mostly(st.one_of(st.text(max_size=12), st.lists(parts(), max_size=3)), st.one_of(junk(), st.none())),
})


@FUZZ
@given(messages=mostly(st.lists(message, min_size=1, max_size=3), st.one_of(junk(), st.none(), st.just([]))))
@example(messages=[{"role": "user", "content": [{"type": "audio", "audio": np.full(8000, 1e20, np.float32)}]}])
@example(messages=[{"role": "user", "content": [{"type": "audio", "audio": "/no/such/q.wav"}]}])
@example(messages=[{"role": "robot", "content": "hi"}])
@example(messages="hello")
def test_fuzz_messages(rt, messages):
    try:
        out = rt.generate(messages, thinker=omni_rt.SamplingParams(temperature=0.0, max_new_tokens=3),
                          return_audio=False)
    except CLEAR as e:
        event(f"refused: {type(e).__name__}: {str(e)[:48]}")
    else:
        event("served")
        check_output(rt, out, omni_rt.SamplingParams(temperature=0.0, max_new_tokens=3), False)
    assert_healthy(rt)


# ---------------------------------------------------------------------------------------------- audio
@FUZZ
@given(wav=audio_arrays(), sr=mostly(st.one_of(st.none(), st.sampled_from([8000, 16000, 22050, 44100, 48000])),
                                     st.one_of(st.integers(-5, 10 ** 13), st.floats(), junk())))
@example(wav=np.full(16000, 1e30, np.float32), sr=None)                            # huge finite amplitude
@example(wav=np.full(16000, np.finfo(np.float64).max, np.float64), sr=None)
@example(wav=np.zeros(1000, np.float32), sr=1)                                     # absurd sample rates
@example(wav=np.zeros(1000, np.float32), sr=10 ** 12)
@example(wav=(np.random.RandomState(1).randn(4800) * 0.1).astype(np.float32), sr=None)   # a 0.3 s "yes"
def test_fuzz_audio_arrays(rt, wav, sr):
    try:
        out = omni_rt.audio.load(wav, sr=sr)
        assert out.dtype == np.float32 and out.ndim == 1 and bool(np.isfinite(out).all())
        assert float(np.abs(out).max()) <= omni_rt.audio.MAX_AMPLITUDE * 1.01 + 1
        feats = rt.encode_audio(out)
    except CLEAR as e:
        event(f"refused: {type(e).__name__}: {str(e)[:48]}")
    else:
        event("served")
        n = omni_rt.audio.num_audio_tokens(omni_rt.audio.num_frames(out.size))
        assert feats.shape == (n, rt.cfg.thinker.audio.output_dim) and bool(torch.isfinite(feats).all())
    assert_healthy(rt)


# ------------------------------------------------------------------------------------------- config dicts
def _leaves(d, prefix=()):
    for k, v in d.items():
        if isinstance(v, dict):
            yield prefix + (k,)
            yield from _leaves(v, prefix + (k,))
        else:
            yield prefix + (k,)


_PATHS = sorted(_leaves(tiny_config()))
config_values = st.one_of(st.none(), st.integers(-3, 3), st.integers(10 ** 6, 10 ** 12), st.floats(),
                          st.booleans(), st.text(max_size=4), st.lists(st.integers(0, 4), max_size=3),
                          st.dictionaries(st.text(max_size=3), st.integers(0, 3), max_size=2))


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(_PATHS), config_values), min_size=1, max_size=3))
@example(edits=[(("talker_config", "codec_eos_token_id"), 10 ** 6)])      # end of speech outside the vocab
@example(edits=[(("talker_config", "codec_eos_token_id"), 1088)])
@example(edits=[(("thinker_config", "audio_config", "num_mel_bins"), 20)])   # transformers' test config: served
@example(edits=[(("im_end_token_id",), 512)])
@example(edits=[(("talker_config", "speaker_id"), {"ethan": 10 ** 6})])
@example(edits=[(("thinker_config",), [1, 2])])
def test_fuzz_config_dicts(edits):
    cfg = tiny_config()
    for path, value in edits:
        node = cfg
        for k in path[:-1]:
            if not isinstance(node.get(k), dict):
                break
            node = node[k]
        else:
            node[path[-1]] = value
    try:
        parsed = OmniConfig.from_dict(cfg)
        with torch.device("meta"):
            model = OmniModel(parsed)
    except (omni_rt.ConfigError, omni_rt.CheckpointError) as e:
        event(f"refused: {type(e).__name__}: {str(e)[:48]}")
        return
    event("accepted")
    # accepted: a config the runtime can serve — ids in their vocabularies, modules built
    tv = parsed.thinker.text.vocab_size
    assert 0 <= parsed.im_end_token_id < tv and 0 <= parsed.thinker.audio_token_id < tv
    if parsed.has_talker:
        kv = parsed.talker.text.vocab_size
        assert 0 <= parsed.talker.codec_eos_token_id < kv
        assert all(0 <= v < kv for v in parsed.talker.speaker_id.values())
        assert model.talker is not None
    assert math.isfinite(parsed.thinker.text.rms_norm_eps)


# --------------------------------------------------------------------------------------------- Runtime options
@pytest.fixture(scope="module")
def tiny_model(tiny_checkpoint):
    from omni_rt.models.omni import load_model

    return load_model(tiny_checkpoint, torch.float32, "cpu")


runtime_options = st.fixed_dictionaries({}, optional={
    "kv_block_size": mostly(st.sampled_from([1, 7, 16, 32]), st.one_of(st.integers(-2, 0), st.just(16.0),
                                                                       st.just(10 ** 9), junk())),
    "kv_cache_tokens": mostly(st.one_of(st.none(), st.integers(64, 4096)),
                              st.one_of(st.integers(-5, 0), st.just(10 ** 15), st.floats(), junk())),
    "max_model_len": mostly(st.one_of(st.none(), st.integers(32, 512)),
                            st.one_of(st.integers(-3, 0), st.just(10 ** 9), st.just(64.0), junk())),
    "max_batch_size": mostly(st.integers(1, 6), st.one_of(st.integers(-1, 0), st.just(10 ** 8), st.just("4"))),
    "max_prefill_tokens": mostly(st.integers(1, 64), st.one_of(st.integers(-1, 0), st.just(2.5))),
    "first_chunk_frames": mostly(st.integers(1, 3), st.one_of(st.just(0), st.just("1"))),
    "gpu_memory_utilization": mostly(st.floats(0.1, 1.0), st.one_of(floats_any(), junk())),
    "cuda_graphs": mostly(st.booleans(), st.sampled_from(["yes", 1, None])),
})


@settings(FUZZ, max_examples=30)
@given(options=runtime_options)
@example(options={"kv_block_size": 0})
@example(options={"kv_cache_tokens": -5})
@example(options={"max_model_len": -1})
@example(options={"kv_cache_tokens": 10 ** 15})
@example(options={"max_batch_size": "4"})
def test_fuzz_runtime_options(rt, tiny_model, options):
    """Runtime options (on an already built model, so no checkpoint is read per example)."""
    before = {t for t in __import__("threading").enumerate()}
    try:
        runtime = omni_rt.Runtime(tiny_model, device="cpu", **options)
    except CLEAR as e:
        event(f"refused: {type(e).__name__}: {str(e)[:48]}")
    else:
        event("served")
        with runtime:
            try:
                out = runtime.generate(HEALTHY, thinker=HEALTHY_PARAMS, return_audio=False)
            except ValueError as e:   # a request the chosen KV size cannot hold is refused, and says why
                assert "KV" in str(e) or "max_model_len" in str(e), e
            else:
                assert out.token_ids == rt._healthy_reference
            try:
                speech = runtime.generate(HEALTHY, thinker=omni_rt.SamplingParams(temperature=0.0, max_new_tokens=2),
                                          talker=omni_rt.SamplingParams(temperature=0.0, max_new_tokens=3))
            except ValueError as e:
                assert "KV" in str(e) or "max_model_len" in str(e), e
            else:
                assert speech.codes is not None and speech.audio is not None
    leaked = [t for t in __import__("threading").enumerate() if t not in before and t.is_alive()]
    assert not leaked, leaked
    assert_healthy(rt)
