"""Host synchronisations per engine step, counted on CPU: in steady state (every request past its prefills) a
step — thinker decode + the speech frame (talker decode, code 0, code-predictor frame, Code2Wav) — reads the
device back at most once.

On CPU ``.tolist()``, ``.cpu()`` and ``.numpy()`` dispatch nothing, so those Tensor methods are patched; ``.item()``
(``_local_scalar_dense``), ``nonzero``, ``masked_select`` and boolean-mask indexing are counted in a
TorchDispatchMode. One sync of each kind is planted to prove the counter sees it. The engine runs under
``kernels.graph_safe()``: on CPU the kernels' static-shape torch paths stand in for the Triton kernels (which read
nothing back); the plain ``*_ref`` paths index with boolean masks and are not what a GPU runs."""
from __future__ import annotations

import contextlib

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from omni_rt.kernels import graph_safe
from omni_rt.models.omni import load_model
from omni_rt.request import SamplingParams

from _engine import make_engine, make_request

aten = torch.ops.aten
_SYNC_OPS = {aten._local_scalar_dense.default, aten.nonzero.default, aten.masked_select.default,
             aten.is_nonzero.default}


class SyncCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.events: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _SYNC_OPS:
            self.events.append(str(func))
        elif func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default):
            if any(i is not None and i.dtype == torch.bool for i in args[1]):
                self.events.append(f"{func} (boolean mask)")
        return func(*args, **kwargs)


@contextlib.contextmanager
def count_syncs(monkeypatch):
    counter = SyncCounter()
    for name in ("tolist", "cpu", "numpy"):
        original = getattr(torch.Tensor, name)

        def patched(self, *a, _orig=original, _name=name, **k):
            counter.events.append(f"Tensor.{_name}")
            return _orig(self, *a, **k)
        monkeypatch.setattr(torch.Tensor, name, patched)
    with counter:
        yield counter
    monkeypatch.undo()


def test_the_counter_sees_each_kind_of_sync(monkeypatch):
    t = torch.arange(6)
    mask = t > 2
    planted = [lambda: t.tolist(), lambda: t.cpu(), lambda: t.numpy(), lambda: t[0].item(),
               lambda: torch.nonzero(t), lambda: t[mask], lambda: int(t[1])]
    for plant in planted:
        with count_syncs(monkeypatch) as c:
            plant()
        assert len(c.events) == 1, c.events
    with count_syncs(monkeypatch) as c:
        torch.where(mask, t, -t).index_select(0, torch.tensor([1, 2]))  # sync-free
    assert c.events == []


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint, torch.float32, "cpu")


@pytest.mark.parametrize("speech_graph", [False, True], ids=["stage-by-stage", "speech-frame-runner"])
def test_steady_state_step_syncs_at_most_once(model, monkeypatch, speech_graph):
    engine = make_engine(model, max_batch_size=4)
    if speech_graph:   # the one-step speech frame over static buffers (what a GPU replays as one graph)
        runner = engine.stages.speech_graph = engine.stages.speech_frame_runner(use_graphs=False)
        replays, run = [], runner.run
        runner.run = lambda n, values: (replays.append(n), run(n, values))[1]
    prompt = [449, 11, 198, 100, 200, 300, 42, 450, 198, 449, 12, 198]
    reqs = [make_request(model, "speak", prompt, SamplingParams(temperature=0.0, max_new_tokens=24),
                         SamplingParams(temperature=0.0, max_new_tokens=12)),
            make_request(model, "sampled", prompt[:4] + prompt[5:], SamplingParams(temperature=0.8, max_new_tokens=24,
                                                                                    seed=3),
                         SamplingParams(seed=5, max_new_tokens=12)),
            make_request(model, "text", prompt, SamplingParams(temperature=0.0, max_new_tokens=20))]
    for r in reqs:
        engine.submit(r)
    steady, steps = [], 0
    with torch.inference_mode(), graph_safe():
        while engine.sched.running or engine.sched.waiting:
            running = list(engine.sched.running)
            is_steady = (not engine.sched.waiting and len(running) == len(reqs)
                         and all(r.thinker.started and not r.thinker.finished for r in running)
                         and all(r.talker is None or (r.talker.started and not r.talker.finished) for r in running))
            with count_syncs(monkeypatch) as c:
                engine.step()
            steps += 1
            if is_steady:
                steady.append(list(c.events))
            assert steps < 200
    assert all(r.error is None for r in reqs), [r.error for r in reqs]
    assert len(steady) >= 5, steady
    assert max(len(e) for e in steady) <= 1, steady
    if speech_graph:
        assert len(replays) >= 5   # the steady-state frames went through the one-step runner


@pytest.mark.gpu
def test_steady_state_steps_do_not_synchronise_on_the_gpu(tiny_checkpoint):
    """Every graph captured: steady-state steps run under ``torch.cuda.set_sync_debug_mode("error")``, so a
    synchronising CUDA call (pageable copy, ``.item()``, ``nonzero``...) raises; the step's one read-back waits on
    an event after a non_blocking copy into pinned memory, which the mode does not flag."""
    gpu_model = load_model(tiny_checkpoint, torch.float32, "cuda")
    engine = make_engine(gpu_model, device="cuda", max_batch_size=4, cuda_graphs=True)
    assert all(engine.stages.graph_report().values())
    prompt = [449, 11, 198, 100, 200, 300, 42, 450, 198, 449, 12, 198]
    reqs = [make_request(gpu_model, "speak", prompt, SamplingParams(temperature=0.0, max_new_tokens=24),
                         SamplingParams(temperature=0.0, max_new_tokens=12)),
            make_request(gpu_model, "sampled", prompt, SamplingParams(temperature=0.8, max_new_tokens=24, seed=3),
                         SamplingParams(seed=5, max_new_tokens=12))]
    for r in reqs:
        engine.submit(r)
    checked = 0
    while engine.sched.running or engine.sched.waiting:
        steady = (not engine.sched.waiting and all(r.thinker.started and not r.thinker.finished and r.talker.started
                                                   and not r.talker.finished for r in engine.sched.running))
        if steady:
            torch.cuda.set_sync_debug_mode("error")
        try:
            engine.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        checked += steady
    assert all(r.error is None for r in reqs), [r.error for r in reqs]
    assert checked >= 5
