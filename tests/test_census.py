"""The launch census (omni_rt.census / omni_rt.profiling): its JSON, its counting rules, that it sees what the
engine runs, and the launch budgets at the released shapes (batch 1)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from omni_rt import profiling
from omni_rt.census import STAGES, census
from omni_rt.kernels import force_triton
from omni_rt.profiling import CensusRecorder, census_stage

PER_TOKEN = ("thinker_decode", "talker_decode", "code_predictor_frame", "code2wav_step")


@pytest.fixture(scope="module")
def full_census():
    return census("full", 1)


def test_json_shape_and_stage_names():
    data = census("tiny", 2).to_json()
    json.dumps(data)
    assert data["config"] == "tiny" and data["batch"] == 2
    assert [s["name"] for s in data["stages"]] == list(STAGES)
    for s in data["stages"]:
        assert set(s) >= {"name", "aten_ops", "triton_launches", "launches", "host_syncs", "bytes", "flops",
                          "graphed", "est_ms"}
        assert s["launches"] == s["aten_ops"] + s["triton_launches"] > 0
        assert set(s["est_ms"]) == {"h100", "h200"} and s["est_ms"]["h100"] >= s["est_ms"]["h200"] > 0
    graphed = {s["name"]: s["graphed"] for s in data["stages"]}
    assert graphed == GRAPHED
    assert set(data["first_packet"]["est_ms"]) == {"h100", "h200"}
    # Outside its stages the census launches almost nothing (the model is built on meta with no init kernels).
    # setup (zeroed static graph buffers and decoder states, KV pools, the talker's text feed) is a fixed cost:
    # a fixed count (what is reached), not a share of the stages: they shrink with every launch saved in them
    # (the full-shape test bounds it too)
    assert data["outside_stages"]["launches"] <= 300


# Whether the engine replays each stage from a CUDA graph (cuda_graphs=True): the thinker decode step, the
# speech frame (talker decode + code 0 + code-predictor frame + Code2Wav step: one graph per batch bucket) and
# both prefills (one graph per token bucket, up to 512 tokens).
GRAPHED = {"audio_encode": False, "vision_encode": False, "thinker_prefill": True, "thinker_decode": True, "talker_prefill": True,
           "talker_decode": True, "code_predictor_frame": True, "code2wav_step": True}


def test_graphed_flags_are_what_the_engine_replays(full_census):
    data = full_census.to_json()
    assert {s["name"]: s["graphed"] for s in data["stages"]} == GRAPHED
    for name, graphed in GRAPHED.items():   # an eager stage has no launch costed at the graphed floor
        assert any(x.graphed for x in full_census.stage(name).launches) == graphed, name


def test_recorder_counts_ops_syncs_and_triton_launches():
    from omni_rt.kernels.kv_write import kv_write

    x = torch.zeros(4, 8, device="meta", dtype=torch.bfloat16)
    with CensusRecorder(dry=True) as rec, force_triton(True):
        with census_stage("s"):
            y = x.float() * 2                  # _to_copy + mul
            _ = y.view(32).t()                 # views: not launches
            torch.empty(3, device="meta")      # allocation: not a launch
            _ = y.sum().item()                 # sum + a host read
            _ = y[y > 0]                       # gt + boolean mask (a host read) + index
            _ = y.tolist()                     # a host read
            k = torch.empty(2, 2, 4, device="meta", dtype=torch.bfloat16)
            cache = torch.empty(3, 4, 2, 4, device="meta", dtype=torch.bfloat16)
            kv_write(k, k, cache, cache, torch.empty(2, dtype=torch.long, device="meta"))
        _ = x + 1                              # outside any stage
    s = rec.stages["s"]
    assert [n for n in s.op_names() if n.startswith("aten:")] == [
        "aten:_to_copy", "aten:mul", "aten:sum", "aten:gt", "aten:index"]
    assert s.triton_launches == 1 and s.launches[-1].name == "_kv_write_kernel"
    assert s.host_syncs == 3 and s.sync_ops == ["item", "boolean_mask", "to_cpu"]
    assert rec.stages[CensusRecorder.OUTSIDE].aten_ops == 1


def test_roofline_model():
    rec = profiling.StageRecord("s", [profiling.Launch("aten", "mm", 3.35e9, 0.0, graphed=True),
                                      profiling.Launch("aten", "add", 10.0, 10.0, graphed=False),
                                      profiling.Launch("aten", "mm", 0.0, 989e12, graphed=True)], host_syncs=1)
    # 1 ms of bytes + one eager launch floor + 1 s of flops + one sync
    want = 1.0 + profiling.T_LAUNCH_EAGER_S * 1e3 + 1000.0 + profiling.T_SYNC_S * 1e3
    assert rec.est_ms("h100") == pytest.approx(want)


def test_moe_bytes_count_only_touched_experts():
    w = torch.empty(128, 768, 2048, device="meta", dtype=torch.bfloat16)
    named = {"wg_ptr": w, "wu_ptr": w, "num_assign": 8, "N": 768, "K": 2048}
    nbytes, flops = profiling.triton_cost("_moe_gate_up_kernel", named)
    assert nbytes >= 8 * 2 * 768 * 2048 * 2 and nbytes < 9 * 2 * 768 * 2048 * 2
    assert flops == 2 * 8 * 2 * 768 * 2048


def test_quant_fp8_counts_the_fp8_kernels():
    bf16 = census("tiny", 1).records
    fp8 = census("tiny", 1, quant="fp8").records
    names = {x.name for x in fp8["thinker_decode"].launches if x.kind == "triton"}
    assert {"_fp8_linear_kernel", "_moe_gate_up_decode_kernel", "_moe_down_sum_kernel"} <= names

    def moe_bytes(records):   # the MoE kernels run on FP8 codes (SCALED) and read fewer bytes
        return sum(x.bytes for x in records["thinker_decode"].launches if x.name.startswith("_moe_"))
    assert moe_bytes(fp8) < moe_bytes(bf16)
    # weights read in FP8: fewer bytes than bf16 for the same step
    assert sum(x.bytes for x in fp8["thinker_decode"].launches) < sum(x.bytes for x in bf16["thinker_decode"].launches)
    with pytest.raises(ValueError, match="quant"):
        census("tiny", 1, quant="int4")


def _engine_stage_ops(tiny_checkpoint):
    """Run a tiny engine (fp32, CPU, every Triton kernel forced on under the interpreter, the graph runners it
    builds on CUDA installed) for its first two steps, one fresh recorder per engine step."""
    from _engine import make_engine, make_request
    from omni_rt.engine.graphs import ThinkerDecodeGraphs, code2wav_graphs, code_predictor_graphs
    from omni_rt.models.audio_encoder import num_audio_tokens
    from omni_rt.models.omni import load_model
    from omni_rt.request import SamplingParams

    model = load_model(tiny_checkpoint, torch.float32, "cpu")
    cfg = model.cfg
    engine = make_engine(model, max_batch_size=1)
    st = engine.stages
    st.decode_graphs = ThinkerDecodeGraphs(model.thinker, st.thinker_pool, 1, engine.cfg.max_model_len)
    st.frame_graph = code_predictor_graphs(model.talker.code_predictor, 1, "cpu", torch.float32)
    st.c2w_graph = code2wav_graphs(model.code2wav, 1, frames=1)
    st.speech_graph = st.speech_frame_runner()   # step 2's frame runs as on a GPU: the one-step speech frame
    seconds = 1.0
    n_audio = num_audio_tokens(int(seconds * 100))
    prompt = ([cfg.im_start_token_id, cfg.user_token_id] + [cfg.thinker.audio_token_id] * n_audio + [7, 8]
              + [cfg.im_end_token_id, cfg.im_start_token_id, cfg.assistant_token_id, 5])
    wav = np.random.default_rng(0).standard_normal(int(seconds * 16000)).astype(np.float32) * 0.1
    req = make_request(model, "r", prompt, SamplingParams(max_new_tokens=8), SamplingParams(max_new_tokens=8),
                       audios=[wav])
    engine.submit(req)
    steps = []
    with force_triton(True):
        for _ in range(2):
            with CensusRecorder(dry=False) as rec:
                engine.step()
            steps.append(rec.stages)
    return steps, seconds, len(prompt)


def _compare(ops: list[str]) -> list[str]:
    # Host->device input copies (the graph runner's buffer fills, small index tensors) are copies between CPU
    # tensors in a CPU engine and host->device copies on meta/CUDA: compare the compute, not the data movement.
    return [o for o in ops if o not in ("aten:_to_copy_h2d", "aten:copy_", "aten:fill_")]


def test_tiny_engine_step_and_tiny_census_see_the_same_ops(tiny_checkpoint):
    steps, seconds, prompt_len = _engine_stage_ops(tiny_checkpoint)
    cen = census("tiny", 1, dtype=torch.float32, audio_seconds=seconds, thinker_prefill_tokens=prompt_len,
                 context=prompt_len + 1).records
    for name in STAGES:   # the per-token stages as in steady state (the latest step that ran them)
        if name == "vision_encode":
            continue   # an audio prompt: test_tiny_engine_and_tiny_census_encode_an_image_alike covers it
        order = steps[::-1] if name in PER_TOKEN else steps
        where = next((s for s in order if s.get(name) is not None and s[name].launches), None)
        assert where is not None, f"the engine's first two steps never ran {name}"
        assert _compare(where[name].op_names()) == _compare(cen[name].op_names()), name


def test_tiny_engine_and_tiny_census_encode_an_image_alike(tiny_checkpoint):
    """The vision_encode stage: the tiny engine's first step on an image prompt (every Triton kernel forced on,
    under the interpreter) runs the same ops as the tiny census at that image size."""
    from _engine import make_engine, make_request
    from omni_rt import vision
    from omni_rt.models.mrope import VisionItem, expand_vision_pads
    from omni_rt.models.omni import load_model
    from omni_rt.prompting import VisionInput
    from omni_rt.request import SamplingParams

    model = load_model(tiny_checkpoint, torch.float32, "cpu")
    cfg, th = model.cfg, model.cfg.thinker
    size = (64, 96)   # one frame of 4×6 patches: 6 tokens
    img = np.random.default_rng(0).integers(0, 256, size + (3,), dtype=np.uint8)
    pv, grid = vision.preprocess_images([img])
    item = VisionItem("image", tuple(grid[0].tolist()))
    prompt = ([cfg.im_start_token_id, cfg.user_token_id, th.vision_start_token_id]
              + expand_vision_pads(item, th, th.vision.spatial_merge_size)
              + [th.vision_end_token_id, 7, cfg.im_end_token_id, cfg.im_start_token_id, cfg.assistant_token_id])
    engine = make_engine(model, max_batch_size=1)
    req = make_request(model, "r", prompt, SamplingParams(max_new_tokens=2))
    req.vision = [VisionInput(item, pv)]
    engine.submit(req)
    with force_triton(True), CensusRecorder(dry=False) as rec:
        engine.step()
    assert req.error is None
    ours = rec.stages.get("vision_encode")
    assert ours is not None and ours.launches, "the engine's first step did not run vision_encode"
    cen = census("tiny", 1, dtype=torch.float32, image_size=size).records["vision_encode"]
    assert _compare(ours.op_names()) == _compare(cen.op_names())
    assert any(n == "triton:_block_window_attn_kernel" for n in cen.op_names())


def test_budgets_at_full_shapes(full_census):
    """The launch budgets at the released shapes, batch 1 (issue 13). Where a budget of the issue is not
    reached yet the bound is the one reached (see benchmarks/results/census/after.json)."""
    data = full_census.to_json()
    by = {s["name"]: s for s in data["stages"]}
    budgets = BUDGETS
    for name, limit in budgets.items():
        assert by[name]["launches"] <= limit, (name, by[name]["launches"], limit)
    for name in PER_TOKEN:
        assert by[name]["host_syncs"] == 0, (name, by[name]["host_syncs"])
    # an outside counter around the whole command agrees with the stage totals up to the fixed setup cost (KV
    # pools, static graph buffers), which may not grow: as the stages shrink towards their budgets a bound
    # relative to them would tighten with every launch saved inside them
    assert data["outside_stages"]["launches"] <= OUTSIDE_LAUNCHES
    assert data["first_packet"]["est_ms"]["h100"] <= FIRST_PACKET_H100_MS


def test_every_code2wav_conv_fills_the_sms(full_census):
    """Issue 13: every Code2Wav conv at the released shapes launches >= 132 CTAs at batch 1 (an H100's SMs), so a
    one-frame step pulls its conv weights through every SM: dense convs and the transposed upsamplers split their
    input channels, the depthwise ConvNeXt convs shrink their channel tile."""
    from omni_rt.kernels.causal_conv1d import MIN_PROGRAMS

    convs = [x for x in full_census.stage("code2wav_step").launches
             if x.kind == "triton" and "conv1d" in x.name]
    assert {x.name for x in convs} == {"_causal_conv1d_dense_kernel", "_causal_conv1d_depthwise_kernel",
                                       "_trans_conv1d_kernel"}
    small = [(x.name, x.ctas) for x in convs if x.ctas < MIN_PROGRAMS]
    assert MIN_PROGRAMS >= 132 and not small, small


# Launch budgets held at full shapes, batch 1. Issue 13 asks thinker_decode <= 600, talker_decode <= 300,
# code_predictor_frame <= 1000, code2wav_step <= 250, thinker_prefill <= 800, talker_prefill <= 400 and a first
# packet <= 60 ms (H100 model). Where a budget is not reached yet the bound is what is reached
# (benchmarks/results/census/after.json): no stage may grow back. vision_encode (issue 14: one 1280×720 image,
# 27 layers) has no issue budget: its bound is what is reached.
BUDGETS = {"thinker_decode": 541, "talker_decode": 236, "code_predictor_frame": 757, "code2wav_step": 122,
           "thinker_prefill": 649, "talker_prefill": 285, "vision_encode": 474}
FIRST_PACKET_H100_MS = 60.0
# launches outside the stages at full shapes, batch 1 (setup: KV pools, static buffers, the vision stage's inputs)
OUTSIDE_LAUNCHES = 260
