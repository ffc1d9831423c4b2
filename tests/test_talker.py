"""Talker and code predictor parity with transformers on the tiny oracle checkpoint (fp32, CPU): talker prefill
and decode logits over the paged KV (chunked prefill), the code-predictor frame (batched rows vs the reference's
per-row generate), the talker prompt / trailing text built from thinker states (system and earlier assistant
turns dropped), the incremental wait semantics, seeded frame sampling, and the Triton-forced path."""
from __future__ import annotations

import pytest
import torch

from omni_rt.engine.kv_cache import KVCachePool
from omni_rt.engine.model_runner import DecoderRunner, text_positions
from omni_rt.models.talker import TalkerTextFeed
from omni_rt.kernels import force_triton
from omni_rt.models.code_predictor import FrameSampling
from omni_rt.models.omni import load_model
from omni_rt.request import SamplingParams

from _engine import make_engine, make_request, run
from _tolerances import PARITY, rel_err

IM_START, IM_END, SYSTEM, USER, ASSISTANT, NL = 449, 450, 10, 11, 12, 5


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint, torch.float32, "cpu")


def talker_runner(model, block_size=4, max_prefill_tokens=8192, num_blocks=64):
    c = model.cfg.talker.text
    pool = KVCachePool(c.num_hidden_layers, num_blocks, block_size, c.num_key_value_heads, c.head_dim,
                       torch.float32, "cpu")
    return DecoderRunner(model.talker.forward, pool, max_prefill_tokens=max_prefill_tokens)


def thinker_states(model, ids):
    """(input embeddings, hidden after accept_hidden_layer layers) for the prompt."""
    tc = model.cfg.thinker.text
    pool = KVCachePool(tc.num_hidden_layers, 64, 16, tc.num_key_value_heads, tc.head_dim, torch.float32, "cpu")
    runner = DecoderRunner(model.thinker.forward, pool)
    with torch.inference_mode():
        x = model.thinker.embed(torch.tensor(ids))
        _, taps = runner.prefill([0], [x], [text_positions(0, len(ids), "cpu")],
                                 tap_layer=model.cfg.talker.accept_hidden_layer)
    return x, taps[0]


def test_talker_prefill_and_decode_logits_match_reference(model, hf_tiny):
    h = model.cfg.talker.text.hidden_size
    g = torch.Generator().manual_seed(1)
    x = torch.randn(23, h, generator=g)
    runner = talker_runner(model, block_size=4, max_prefill_tokens=7)  # 4 prefill chunks over 6 pages
    with torch.inference_mode():
        hidden, _ = runner.prefill([0], [x[:22]], [text_positions(0, 22, "cpu")])
        step, _ = runner.decode([0], x[22:], torch.full((3, 1), 22))
        ours = model.talker.logits(torch.cat((hidden[0], step)))
        ref = hf_tiny.talker(inputs_embeds=x[None]).logits[0]
    assert rel_err(ours, ref) <= PARITY["logits_rel"]
    assert torch.equal(ours.argmax(-1), ref.argmax(-1))


def _reference_frame(hf_tiny, past_hidden, code0):
    """The reference's frame step for one row: code-predictor generate + the summed codec embeddings."""
    talker = hf_tiny.talker
    last_id_hidden = talker.get_input_embeddings()(code0.view(1, 1))
    res = talker.code_predictor.generate(inputs_embeds=torch.cat((past_hidden.view(1, 1, -1), last_id_hidden), 1),
                                         max_new_tokens=talker.config.num_code_groups - 1, do_sample=False,
                                         output_hidden_states=True, return_dict_in_generate=True)
    mids = [hid[0] for hid in res.hidden_states[1:]]
    last = talker.code_predictor.get_input_embeddings()[-1](res.sequences[..., -1:])
    return res.sequences[0], torch.cat([last_id_hidden] + mids + [last], dim=1).sum(1)[0]


def test_code_predictor_frame_matches_reference_batched(model, hf_tiny):
    h = model.cfg.talker.text.hidden_size
    g = torch.Generator().manual_seed(2)
    past = torch.randn(3, h, generator=g)
    code0 = torch.tensor([5, 17, 63])
    with torch.inference_mode():
        codes, embed_sum = model.talker.code_predictor.frame(past, model.talker.embed_codec(code0))
    assert codes.shape == (3, model.cfg.talker.num_code_groups - 1)
    for row in range(3):
        ref_codes, ref_sum = _reference_frame(hf_tiny, past[row], code0[row])
        assert codes[row].tolist() == ref_codes.tolist()
        assert rel_err(embed_sum[row], ref_sum) <= PARITY["hidden_rel"]
    assert len({tuple(c) for c in codes.tolist()}) > 1  # rows are not all the same frame


def test_frame_sampling_is_seeded_and_batch_independent(model):
    h = model.cfg.talker.text.hidden_size
    past = torch.randn(3, h, generator=torch.Generator().manual_seed(3))
    code0 = torch.tensor([1, 2, 3])

    def sampling(rows, seeds, temps):
        n = len(rows)
        return FrameSampling(temperature=torch.tensor(temps), top_k=torch.full((n,), 50),
                             top_p=torch.full((n,), 0.8), seeds=torch.tensor(seeds),
                             frame_index=torch.zeros(n, dtype=torch.long))

    cp = model.talker.code_predictor
    with torch.inference_mode():
        e = model.talker.embed_codec(code0)
        batch, _ = cp.frame(past, e, sampling=sampling([0, 1, 2], [7, 8, 9], [1.0, 0.0, 1.0]))
        solo, _ = cp.frame(past[2:], e[2:], sampling=sampling([2], [9], [1.0]))
        greedy, _ = cp.frame(past[1:2], e[1:2])
        draws = [cp.frame(past[:1], e[:1], sampling=sampling([0], [s], [1.0]))[0][0].tolist() for s in range(6)]
    assert batch[2].tolist() == solo[0].tolist()
    assert batch[1].tolist() == greedy[0].tolist()   # temperature 0 rows stay greedy inside a sampled batch
    assert len({tuple(d) for d in draws}) > 1         # the seed matters


MULTI_TURN = [IM_START, SYSTEM, NL, 30, 31, 32, IM_END, NL,
              IM_START, USER, NL, 100, 200, 300, IM_END, NL,
              IM_START, ASSISTANT, NL, 60, 61, IM_END, NL,
              IM_START, USER, NL, 42, 43, IM_END, NL,
              IM_START, ASSISTANT, NL]


def test_talker_prompt_and_trailing_text_match_reference(model, hf_tiny):
    """Capture the inputs transformers hands to talker.generate and compare with TalkerTextFeed's."""
    ids = MULTI_TURN
    captured = {}
    orig = hf_tiny.talker.generate

    def spy(**kwargs):
        captured.update(kwargs)
        return orig(**kwargs)

    hf_tiny.talker.generate = spy
    try:
        seqs, _ = hf_tiny.generate(torch.tensor([ids]), speaker="chelsie", return_audio=True,
                                   thinker_max_new_tokens=6, thinker_eos_token_id=IM_END, thinker_do_sample=False,
                                   talker_do_sample=False, talker_max_new_tokens=3)
    finally:
        hf_tiny.talker.generate = orig
    gen = seqs[0, len(ids):].tolist()
    x, hid = thinker_states(model, ids)
    feed = TalkerTextFeed(model, ids, x, hid, model.cfg.talker.speaker("Chelsie"), [IM_END], 6)
    feed.push(gen, finished=True)
    with torch.inference_mode():
        embeds, positions = feed.prefill()
        trailing = feed.all_entries()
    ref = captured["inputs_embeds"][0]
    n_user = 8 + 7  # both user turns, "<|im_start|>user\n … <|im_end|>\n"; system and assistant turns dropped
    assert embeds.shape == ref.shape == (n_user + 9, model.cfg.talker.text.hidden_size)
    assert rel_err(embeds, ref) <= PARITY["hidden_rel"]
    assert captured["talker_input_ids"][0, :n_user].tolist() == ids[8:16] + ids[23:30]
    assert torch.equal(positions, text_positions(0, n_user + 9, "cpu"))
    assert rel_err(trailing, captured["trailing_text_hidden"][0]) <= PARITY["hidden_rel"]
    assert rel_err(feed.tts_pad, captured["tts_pad_embed"].flatten()) <= PARITY["hidden_rel"]


def test_feed_waits_for_thinker_tokens(model):
    """Talker step k needs thinker token k+1 (or the thinker's end): until then entry() is None, never pad."""
    ids = MULTI_TURN
    x, hid = thinker_states(model, ids)
    spk = model.cfg.talker.speaker("ethan")
    gen = [70, 71, 72, 73, IM_END]
    full = TalkerTextFeed(model, ids, x, hid, spk, [IM_END], 32)
    full.push(gen, finished=True)
    lazy = TalkerTextFeed(model, ids, x, hid, spk, [IM_END], None)   # no max_new_tokens: waits one token more
    eager = TalkerTextFeed(model, ids, x, hid, spk, [IM_END], 32)
    assert not eager.prefill_ready() and eager.entry(0) is None
    for n, tok in enumerate(gen):
        lazy.push([tok])
        eager.push([tok])
        assert eager.prefill_ready()
        assert lazy.prefill_ready() == (n >= 1 or tok == IM_END)
        for k in range(6):
            want = full.entry(k)
            got_eager, got_lazy = eager.entry(k), lazy.entry(k)
            # eager knows token k+1 is not the last once it exists (max_new_tokens not reached)
            assert (got_eager is not None) == (k + 1 <= n or eager.finished)
            assert (got_lazy is not None) == (k + 2 <= n or lazy.finished)
            for got in (got_eager, got_lazy):
                if got is not None:
                    assert torch.equal(got, want)
    assert torch.equal(full.entry(3), full.tts_eos) and torch.equal(full.entry(4), full.tts_pad)
    # cut by length: the last token is never voiced and takes tts_eos instead
    cut = TalkerTextFeed(model, ids, x, hid, spk, [IM_END], 4)
    cut.push(gen[:3])
    assert cut.entry(1) is not None and cut.entry(2) is None
    cut.push(gen[3:4])
    assert cut.finished and torch.equal(cut.entry(2), cut.tts_eos)
    # a thinker whose first token is its stop has nothing to say
    silent = TalkerTextFeed(model, ids, x, hid, spk, [IM_END], 32)
    silent.push([IM_END])
    assert silent.silent and not silent.prefill_ready()
    # text-only prompts need no hidden-state tap; multimodal ones do
    no_tap = TalkerTextFeed(model, ids, x, None, spk, [IM_END], 32)
    no_tap.push(gen, finished=True)
    assert rel_err(no_tap.prefill()[0], full.prefill()[0]) <= 1e-6
    audio_ids = ids[:-3] + [IM_START, USER, NL, 480, IM_END, NL] + ids[-3:]
    with pytest.raises(ValueError, match="thinker_hidden"):
        TalkerTextFeed(model, audio_ids, model.thinker.embed(torch.tensor(audio_ids)), None, spk)


def _run_frames(model, ids, frames, block_size, max_prefill_tokens):
    """The engine on one speaking request (thinker 4 tokens, talker frames + 1 steps); returns (request, the
    talker's post-norm hidden of every step: prefill's last position, then each decode step)."""
    engine = make_engine(model, kv_block_size=block_size, max_prefill_tokens=max_prefill_tokens)
    hiddens = []
    prefill, decode = engine.stages.talker_prefill, engine.stages.talker_decode

    def spy_prefill(*a):
        out = prefill(*a)
        hiddens.extend(h.clone() for h in out)
        return out

    def spy_decode(*a):
        out = decode(*a)
        hiddens.extend(out.clone())
        return out

    engine.stages.talker_prefill, engine.stages.talker_decode = spy_prefill, spy_decode
    req = make_request(model, "r", ids, SamplingParams(temperature=0.0, max_new_tokens=4),
                       SamplingParams(temperature=0.0, max_new_tokens=frames + 1), speaker="aiden")
    run(engine, [req])
    st = engine.stats()
    assert st["talker_kv_free_blocks"] == st["talker_kv_total_blocks"]
    return req, torch.stack(hiddens)


def test_triton_forced_talker_and_code_predictor_match_torch(model):
    """Two frames with every Triton kernel forced on (interpreter on CPU) against the PyTorch path."""
    ids = MULTI_TURN[23:]   # one user turn: 7 + 9 talker prompt positions, two prefill chunks over 4 pages
    ref, h_ref = _run_frames(model, ids, 2, block_size=5, max_prefill_tokens=9)
    with force_triton():
        tri, h_tri = _run_frames(model, ids, 2, block_size=5, max_prefill_tokens=9)
    assert rel_err(h_tri, h_ref) <= 1e-4
    assert tri.talker.output == ref.talker.output and (tri.all_codes(16) == ref.all_codes(16)).all()
    assert ref.all_codes(model.cfg.talker.num_code_groups).shape == (model.cfg.talker.num_code_groups, 2)


def test_speaker_names():
    from omni_rt.config import OmniConfig
    from omni_rt.testing import tiny_config

    cfg = OmniConfig.from_dict(tiny_config()).talker
    assert cfg.speaker("ETHAN") == cfg.speaker("ethan") == cfg.speaker_id["ethan"]
    with pytest.raises(ValueError, match="aiden, chelsie, ethan"):
        cfg.speaker("Vivian")


def _feed(model, ids, speaker, gen, finished=True):
    x, hid = thinker_states(model, ids)
    feed = TalkerTextFeed(model, ids, x, hid, model.cfg.talker.speaker(speaker), [IM_END], 16)
    feed.push(gen, finished=finished)
    return feed


def test_batched_steps_equal_solo_and_late_text_waits(model):
    """Two speaking requests share the talker steps (varlen prefill, batched frame, batched decode) and match
    their solo runs; a request whose thinker is behind waits (the scheduler's readiness predicate: its frame
    is done, its decode step does not run until the thinker token it needs exists)."""
    from omni_rt.engine.scheduler import Scheduler

    a_ids, b_ids = MULTI_TURN[23:], MULTI_TURN[8:16] + MULTI_TURN[30:]
    params = SamplingParams(temperature=0.0, max_new_tokens=9)
    jobs = [(a_ids, "aiden", SamplingParams(temperature=0.0, max_new_tokens=6)),
            (b_ids, "ethan", SamplingParams(temperature=0.0, max_new_tokens=4))]
    solo = [run(make_engine(model), [make_request(model, f"s{i}", ids, tp, params, spk)])[0]
            for i, (ids, spk, tp) in enumerate(jobs)]
    engine = make_engine(model, kv_block_size=3)
    batch = run(engine, [make_request(model, f"b{i}", ids, tp, params, spk) for i, (ids, spk, tp) in enumerate(jobs)])
    st = engine.stats()
    assert st["talker_kv_free_blocks"] == st["talker_kv_total_blocks"]
    for got, want in zip(batch, solo):
        assert got.talker.output == want.talker.output
        assert (got.all_codes(16) == want.all_codes(16)).all()
        assert got.talker.finish_reason == want.talker.finish_reason
    assert batch[0].all_codes(16).shape[1] == len(batch[0].talker.output) - 1
    # late text: a's thinker has tokens 0..1, the talker made 2 code 0s (frames done): step 1 needs token 2
    late = make_request(model, "late", a_ids, jobs[0][2], params, "aiden")
    late.talker.feed = _feed(model, a_ids, "aiden", [70, 71], finished=False)
    late.talker.output = [5, 6]
    assert not Scheduler.talker_ready(late)
    late.talker.feed.push([72])
    assert Scheduler.talker_ready(late)
