"""Profiling hooks: NVTX ranges per stage (no-ops where CUDA/NVTX is absent) and a torch.profiler switch.

nsys (on a machine where it works):
    nsys profile -t cuda,nvtx,osrt --cuda-graph-trace=node -o omni_rt_profile \\
        python -u -m omni_rt bench --synthetic full --concurrency 1
    nsys stats --report cuda_gpu_kern_sum,nvtx_sum omni_rt_profile.nsys-rep
NVTX ranges are host events: inside a CUDA-graph replay nothing is re-emitted, so ranges wrap the replay call.

Where nsys is unavailable, ``Runtime(..., profile_dir=DIR)`` (or ``omni-rt bench --profile DIR``) records a
torch.profiler trace (Chrome/Perfetto JSON) of the engine steps into DIR.
"""
from __future__ import annotations

import contextlib
import functools
import os
from typing import Iterator


@functools.lru_cache(maxsize=1)
def _nvtx():
    """torch's NVTX bindings when this torch build has CUDA and a device is present; else None."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        torch.cuda.nvtx.range_push("omni_rt:probe")
        torch.cuda.nvtx.range_pop()
        return torch.cuda.nvtx
    except Exception:
        return None


@contextlib.contextmanager
def nvtx_range(name: str) -> Iterator[None]:
    """An NVTX range named ``omni_rt:<name>`` around the block; nothing at all without CUDA/NVTX."""
    nv = _nvtx()
    if nv is None:
        yield
        return
    nv.range_push(f"omni_rt:{name}")
    try:
        yield
    finally:
        nv.range_pop()


class TorchProfiler:
    """Records a torch.profiler trace of everything between start() and stop() into ``out_dir``."""

    def __init__(self, out_dir: str | os.PathLike):
        import torch

        self.out_dir = os.fspath(out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._prof = torch.profiler.profile(activities=activities, record_shapes=False, with_stack=False)
        self.path: str | None = None

    def start(self) -> None:
        self._prof.__enter__()

    def stop(self) -> str:
        self._prof.__exit__(None, None, None)
        self.path = os.path.join(self.out_dir, f"omni_rt_trace_{os.getpid()}.json")
        self._prof.export_chrome_trace(self.path)
        return self.path


class StageTimer:
    """Wall time per named stage (accumulated), each stage also an NVTX range. ``snapshot()`` → {name: ms}."""

    def __init__(self):
        import time

        self._clock = time.perf_counter
        self.totals: dict[str, float] = {}
        self.counts: dict[str, int] = {}

    @contextlib.contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        start = self._clock()
        with nvtx_range(name):
            yield
        self.totals[name] = self.totals.get(name, 0.0) + self._clock() - start
        self.counts[name] = self.counts.get(name, 0) + 1

    def snapshot(self) -> dict[str, float]:
        return {k: v * 1000.0 for k, v in self.totals.items()}

    def reset(self) -> None:
        self.totals.clear()
        self.counts.clear()


# ==========================================================================================================
# Launch census: what each stage launches, counted without a GPU
# ==========================================================================================================
#
# ``census_stage(name)`` markers sit in the engine's own code around each stage's device work. They cost one
# thread-local read when no census is recording. ``omni_rt.census`` builds the model on the meta device, turns
# a ``CensusRecorder`` on and calls the engine's stage callables; the recorder sees every ATen op through a
# ``TorchDispatchMode`` and every Triton launch through a hook on the launcher, and attributes them to the
# innermost open stage.
#
# The time estimate is a MODEL, never a measurement: per launch max(bytes / HBM bandwidth, flops / peak,
# t_launch), summed, plus t_sync per host synchronisation. Its constants live here and nowhere else.

import dataclasses  # noqa: E402
import math  # noqa: E402
import threading  # noqa: E402

#: Roofline of each modelled GPU: HBM bandwidth (bytes/s) and dense bf16 tensor-core peak (flop/s).
HARDWARE = {
    "h100": {"bandwidth": 3.35e12, "peak_flops": 989e12},   # H100 SXM: 3.35 TB/s HBM3, 989 TFLOP/s bf16 dense
    "h200": {"bandwidth": 4.8e12, "peak_flops": 989e12},    # H200: same SM as H100, 4.8 TB/s HBM3e
}
#: The floor of one kernel launch: replayed inside a CUDA graph / launched eagerly from Python.
T_LAUNCH_GRAPHED_S = 2e-6
T_LAUNCH_EAGER_S = 6e-6
#: One device->host read: the queue drains and the host waits for the copy (plus the copy's own latency).
T_SYNC_S = 20e-6
#: KV context length at which decode stages are counted (the attention kernels read this many positions).
DECODE_CONTEXT = 1024

_census_state = threading.local()


class census_graphed:
    """Marks launches replayed from a CUDA graph on a GPU (``GraphRunner`` wraps its step in it), so the census
    costs them at ``T_LAUNCH_GRAPHED_S``. A no-op unless a census records on this thread."""

    __slots__ = ("enabled", "_rec", "_prev")

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._rec = None

    def __enter__(self):
        rec = getattr(_census_state, "recorder", None)
        if rec is not None:
            self._rec, self._prev = rec, rec.graphed
            rec.graphed = rec.graphed or self.enabled
        return self

    def __exit__(self, *exc):
        if self._rec is not None:
            self._rec.graphed = self._prev
            self._rec = None
        return False


class census_stage:
    """Marks the device work of one engine stage (``thinker_decode``, ``code2wav_step``, ...) for the launch
    census. A no-op unless a ``CensusRecorder`` records on this thread. Nested markers: the innermost wins."""

    __slots__ = ("name", "_rec")

    def __init__(self, name: str):
        self.name = name
        self._rec = None

    def __enter__(self):
        rec = getattr(_census_state, "recorder", None)
        if rec is not None:
            self._rec = rec
            rec.stack.append(self.name)
        return self

    def __exit__(self, *exc):
        if self._rec is not None:
            self._rec.stack.pop()
            self._rec = None
        return False


@dataclasses.dataclass
class Launch:
    """One recorded launch: ``kind`` "aten" or "triton", the op/kernel name, modelled bytes and flops, and the
    number of CTAs (Triton grids only; 0 for ATen ops)."""

    kind: str
    name: str
    bytes: float
    flops: float
    ctas: int = 0
    graphed: bool = False


@dataclasses.dataclass
class StageRecord:
    name: str
    launches: list = dataclasses.field(default_factory=list)
    host_syncs: int = 0
    sync_ops: list = dataclasses.field(default_factory=list)

    @property
    def aten_ops(self) -> int:
        return sum(1 for x in self.launches if x.kind == "aten")

    @property
    def triton_launches(self) -> int:
        return sum(1 for x in self.launches if x.kind == "triton")

    def op_names(self) -> list[str]:
        return [f"{x.kind}:{x.name}" for x in self.launches]

    @property
    def graphed(self) -> bool:
        """Whether the stage replays a CUDA graph on a GPU. The eager launches around the replay (input fills,
        sampling) are each costed as eager; they may outnumber the graphed ones at tiny shapes, where a graphed
        decoder step holds few kernels, so the label does not go by a majority."""
        return any(x.graphed for x in self.launches)

    def est_ms(self, hardware: str) -> float:
        """The roofline-plus-launch MODEL (see the module constants), in ms."""
        hw = HARDWARE[hardware]
        total = 0.0
        for x in self.launches:
            t_launch = T_LAUNCH_GRAPHED_S if x.graphed else T_LAUNCH_EAGER_S
            total += max(x.bytes / hw["bandwidth"], x.flops / hw["peak_flops"], t_launch)
        return (total + self.host_syncs * T_SYNC_S) * 1e3

    def summary(self) -> dict:
        return {"name": self.name, "aten_ops": self.aten_ops, "triton_launches": self.triton_launches,
                "launches": len(self.launches), "host_syncs": self.host_syncs,
                "bytes": int(sum(x.bytes for x in self.launches)), "flops": int(sum(x.flops for x in self.launches)),
                "graphed": self.graphed, "est_ms": {hw: round(self.est_ms(hw), 4) for hw in HARDWARE}}


# ---------------------------------------------------------------------------------------------- byte model

def _span_bytes(t) -> int:
    """Bytes a kernel touches reading/writing ``t`` once: broadcast (stride-0) dimensions count once."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size() if t.numel() else 0


def _tensors(obj):
    import torch

    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


def _numel(shape) -> int:
    return math.prod(int(s) for s in shape)


# ATen ops that gather rows of their first argument (a table) rather than reading all of it.
_GATHERS = {"embedding", "index_select", "index", "gather", "embedding_dense_backward"}


def aten_cost(func, args, kwargs, out) -> tuple[float, float]:
    """(bytes, flops) of one ATen op from its shapes: inputs + outputs once; matmuls and convolutions 2·MNK."""
    name = func._schema.name.split("::")[-1]
    outs = list(_tensors(out))
    ins = list(_tensors(args)) + list(_tensors(kwargs))
    out_bytes = sum(_span_bytes(t) for t in outs)
    if name in _GATHERS and ins:
        table = ins[0] if name != "embedding" else ins[0]
        in_bytes = min(_span_bytes(table), out_bytes) + sum(_span_bytes(t) for t in ins[1:])
    else:
        in_bytes = sum(_span_bytes(t) for t in ins)
    flops = float(sum(t.numel() for t in outs))
    if name in ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear") and outs and len(ins) >= 2:
        # the reduced dimension: the last dim of the first operand
        flops = 2.0 * outs[0].numel() * ins[0].shape[-1] if name not in ("addmm", "baddbmm") \
            else 2.0 * outs[0].numel() * ins[1].shape[-1]
    elif name.startswith("conv") and outs and len(ins) >= 2:
        w = ins[1]
        transposed = "transpose" in name or (name == "convolution" and len(args) > 6 and bool(args[6]))
        flops = 2.0 * (ins[0].numel() if transposed else outs[0].numel()) * w[0].numel()
    return float(in_bytes + out_bytes), flops


def _arg(named: dict, key: str, default=0):
    v = named.get(key, default)
    return int(v) if isinstance(v, (int, float, bool)) else v


def triton_cost(kernel: str, named: dict) -> tuple[float, float]:
    """(bytes, flops) of one Triton launch. Default: every tensor argument read or written once. Kernels whose
    tensor arguments are much larger than what they touch (MoE weights: only the experts the batch routes to,
    at most min(E, M·top_k)) or that do matmul work get their own rule."""
    # One tensor passed as several pointers counts once: launchers pass a real tensor as the placeholder of an
    # absent operand (never dereferenced), which would otherwise be billed again per placeholder.
    tensors = list({id(v): v for v in named.values() if hasattr(v, "element_size") and hasattr(v, "stride")}.values())
    default = float(sum(_span_bytes(t) for t in tensors))
    if kernel in ("_moe_gate_up_kernel", "_moe_down_kernel", "_moe_gate_up_decode_kernel", "_moe_down_sum_kernel"):
        n_assign, n, k = _arg(named, "num_assign"), _arg(named, "N"), _arg(named, "K")
        w = named.get("wg_ptr", named.get("w_ptr"))
        experts = w.shape[0] if w is not None else 1
        touched = min(experts, n_assign)
        elem = w.element_size() if w is not None else 2
        halves = 2 if "gate_up" in kernel else 1
        act = named.get("x_ptr", named.get("h_ptr"))
        act_elem = act.element_size() if act is not None else elem
        act_in = n_assign * k * act_elem
        out = named.get("out_ptr")
        # the decode down kernel writes the (M, N) sum, the others one row per assignment
        act_out = (out.numel() if kernel == "_moe_down_sum_kernel" and out is not None else n_assign * n) * act_elem
        return float(touched * halves * n * k * elem + act_in + act_out), 2.0 * n_assign * halves * n * k
    if kernel == "_fp8_linear_kernel":
        m, n, k = _arg(named, "M"), _arg(named, "N"), _arg(named, "K")
        return default, 2.0 * m * n * k
    if kernel in ("_paged_decode_kernel", "_prefill_kernel", "_block_window_attn_kernel"):
        q = named.get("q_ptr")
        kc = named.get("k_cache_ptr", named.get("k_ptr"))
        if q is not None and kc is not None and q.dim() == 3:
            # every query row against every cached key (upper bound for causal prefill)
            keys = _numel(kc.shape[:-2]) if kc.dim() == 4 else kc.shape[0]
            return default, 4.0 * q.shape[0] * q.shape[1] * q.shape[2] * keys
    return default, 0.0


# ---------------------------------------------------------------------------------------------- recorder

_NOT_LAUNCHES = {
    "empty", "empty_strided", "new_empty", "new_empty_strided", "empty_like", "detach", "alias", "lift_fresh",
    "lift_fresh_copy", "_unsafe_view", "_reshape_alias", "set_", "resize_", "resize_as_", "sym_size",
    "sym_stride", "sym_numel", "is_nonzero", "_assert_async", "record_stream",
    "scalar_tensor",   # a Python scalar lifted for `t[idx] = 3.0`: a host value; the copy that follows is the fill
}


class CensusRecorder:
    """Counts ATen ops and Triton launches per ``census_stage``.

    dry=True (the census on the meta device): Triton kernels are recorded and not run, and host reads get
    stand-in values (0 for scalars, zeros for copies to the CPU, "no element" for nonzero/boolean masks)
    so the code after them runs on. dry=False records while everything really runs (tests on CPU tensors).
    Ops outside any stage are recorded under ``"<outside>"``.
    """

    OUTSIDE = "<outside>"

    def __init__(self, dry: bool = True):
        self.dry = dry
        self.graphed = False
        self._in_kernel = 0
        self.stack: list[str] = []
        self.stages: dict[str, StageRecord] = {}
        self._mode = None
        self._patched: list = []

    def stage(self, name: str) -> StageRecord:
        rec = self.stages.get(name)
        if rec is None:
            rec = self.stages[name] = StageRecord(name)
        return rec

    def _current(self) -> StageRecord:
        return self.stage(self.stack[-1] if self.stack else self.OUTSIDE)

    def record_launch(self, launch: Launch) -> None:
        launch.graphed = self.graphed
        self._current().launches.append(launch)

    def record_sync(self, what: str) -> None:
        rec = self._current()
        rec.host_syncs += 1
        rec.sync_ops.append(what)

    # -- Triton hook ------------------------------------------------------------------------------------
    def _triton_run(self, original):
        recorder = self

        def run(fn_self, *args, grid, warmup, **kwargs):
            if warmup:
                return original(fn_self, *args, grid=grid, warmup=warmup, **kwargs)
            names = list(getattr(fn_self, "arg_names", []))
            named = dict(zip(names, args))
            named.update(kwargs)
            g = grid(named) if callable(grid) else grid
            g = tuple(g) if isinstance(g, (tuple, list)) else (g,)
            ctas = math.prod(int(x) for x in g)
            kernel = getattr(getattr(fn_self, "fn", None), "__name__", None) or getattr(fn_self, "__name__", "?")
            nbytes, flops = triton_cost(kernel, named)
            recorder.record_launch(Launch("triton", kernel, nbytes, flops, ctas))
            if recorder.dry:
                return None
            recorder._in_kernel += 1   # the interpreter's own tensor work is not the program's
            try:
                return original(fn_self, *args, grid=grid, warmup=warmup, **kwargs)
            finally:
                recorder._in_kernel -= 1

        return run

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode
        from triton.runtime import interpreter, jit

        recorder = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                return recorder._dispatch(func, args, kwargs or {})

        for cls in (jit.JITFunction, interpreter.InterpretedFunction):
            original = cls.run
            self._patched.append((cls, original))
            cls.run = self._triton_run(original)
        if getattr(_census_state, "recorder", None) is not None:
            raise RuntimeError("a census is already recording on this thread")
        _census_state.recorder = self
        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        _census_state.recorder = None
        for cls, original in reversed(self._patched):
            cls.run = original
        self._patched.clear()
        return False

    # -- ATen hook --------------------------------------------------------------------------------------
    def _dispatch(self, func, args, kwargs):
        import torch

        if self._in_kernel:
            return func(*args, **kwargs)
        name = func._schema.name.split("::")[-1]
        # Device -> host reads.
        if name in ("_local_scalar_dense", "is_nonzero", "item"):
            t = args[0]
            if t.device.type != "cpu":
                self.record_sync("item")
                if self.dry:
                    return False if (t.dtype == torch.bool or name == "is_nonzero") else 0
            return func(*args, **kwargs)
        if name in ("_to_copy", "to", "copy_"):
            if name == "copy_":
                src, dst_dev = args[1], args[0].device
            else:
                src, dst_dev = args[0], kwargs.get("device")
                for a in args[1:]:
                    if isinstance(a, (torch.device, str)):
                        dst_dev = a
                    elif isinstance(a, torch.Tensor):
                        dst_dev = a.device
            if (dst_dev is not None and torch.device(dst_dev).type != "cpu" and isinstance(src, torch.Tensor)
                    and src.device.type == "cpu"):
                # host -> device: one copy launch (on CPU tensors nothing is dispatched at all)
                out = func(*args, **kwargs)
                self.record_launch(Launch("aten", "_to_copy_h2d", float(_span_bytes(src)), 0.0))
                return out
            if dst_dev is not None and torch.device(dst_dev).type == "cpu" and src.device.type != "cpu":
                self.record_sync("to_cpu")
                if self.dry:
                    if name == "copy_":
                        return args[0]
                    return torch.zeros(src.shape, dtype=kwargs.get("dtype") or src.dtype)
                return func(*args, **kwargs)
        if name in ("nonzero", "masked_select", "nonzero_static") or (
                name in ("index", "index_put", "index_put_") and any(
                    i is not None and i.dtype == torch.bool for i in (args[1] or ()))):
            self.record_sync(name if name != "index" else "boolean_mask")
            if self.dry:
                if name == "nonzero":
                    return torch.empty((0, args[0].dim()), dtype=torch.long, device=args[0].device)
                if name == "masked_select":
                    return args[0].new_empty((0,))
                # a boolean mask with no True element: index with empty long indices instead
                idx = []
                for i in args[1]:
                    if i is not None and i.dtype == torch.bool:
                        idx.extend(torch.empty(0, dtype=torch.long, device=i.device) for _ in range(i.dim()))
                    else:
                        idx.append(i)
                args = (args[0], idx) + tuple(args[2:])
        out = func(*args, **kwargs)
        if not any(True for _ in _tensors(out)):
            return out   # returns no tensor (promote_types, sizes, ...): no kernel
        if func.is_view or name in _NOT_LAUNCHES or name.startswith("empty") or (name == "to" and out is args[0]):
            return out
        nbytes, flops = aten_cost(func, args, kwargs, out)
        if name == "copy_" and isinstance(args[1], torch.Tensor) and (
                args[1].numel() == 1 or all(st == 0 for st in args[1].stride())):
            name = "fill_"   # `t[idx] = scalar`: CPU tensors dispatch fill_, others scalar_tensor + copy_
        self.record_launch(Launch("aten", name, nbytes, flops))
        return out
