"""CUDA graphs: a generic bucketed runner, the thinker decode step, the speech frame and the prefill chunks.

``GraphRunner`` wraps any step ``fn(inputs: dict[str, Tensor]) -> dict[str, Tensor]`` whose inputs live in
named static buffers sized for ``max_batch_size`` (anchors: mini-sglang ``engine/graph.py``, nano-vllm
``ModelRunner.capture_cudagraph``):

- batch buckets ``[1, 2, 4, 8, ...]`` up to ``max_batch_size`` (itself included); one graph per bucket,
  captured largest first so every later capture fits in the first one's memory pool (``graph.pool()``);
- an eager warm-up before each capture (Triton JIT compiles, lazily built buffers, cuBLAS workspaces);
- on each call the first ``n`` rows of every input are filled, rows ``n..bucket`` get the input's padding value
  (for the decoder: slot -1 so nothing is written to the KV cache, context_len 0 so nothing is read), the
  bucket's graph replays, and the outputs' first ``n`` rows are returned;
- eager fallback for batches above the largest bucket, and everywhere when graphs are off or on CPU — the CPU
  eager run goes through the same static buffers and padding, so that logic is tested without a GPU.

Nothing on the per-token path reads a device value back: the host inputs (ids, positions, KV metadata,
sampling parameters) are staged in one host buffer (pinned on CUDA) and copied with ONE non_blocking copy, the
replay is asynchronous, and the caller decides when to read the outputs (the engine's one read-back per step).
Prefill chunks use the same runner with token-count buckets (``PrefillGraphs``).

The code-predictor frame loop and the Code2Wav streaming step can be wrapped the same way: a callable over
named static buffers (their state tensors updated in place with ``copy_``) plus the padding value per input.
"""
from __future__ import annotations

import logging
import time
from typing import Callable, Mapping, Sequence, Union

import numpy as np
import torch

from ..models.code_predictor import FrameSampling, FrameWorkspace
from ..models.code2wav import Code2WavState, StateLayout
from ..models.layers import AttentionMetadata
from ..profiling import census_graphed, census_stage
from .kv_cache import KVCachePool
from ..sampling import SamplingTensors, params_within_cap, sample, to_device

logger = logging.getLogger(__name__)

StepFn = Callable[[dict], dict]
# An input value: a batch-n tensor copied into the buffer's first n rows, or a callable given the bucket's
# whole buffer slice that fills every row of it itself (padding included), e.g. the KV pool's ``out=`` fillers.
# For a host input (``host_inputs``) the value is host data (list / numpy, n rows) and a callable is given the
# bucket's slice of the host staging buffer as a numpy array.
InputValue = Union[torch.Tensor, Callable[[torch.Tensor], object]]
_NP = {torch.int64: np.int64, torch.int32: np.int32, torch.float32: np.float32, torch.bool: np.bool_}


def batch_buckets(max_batch_size: int) -> list[int]:
    """[1, 2, 4, ...] below ``max_batch_size``, then ``max_batch_size`` itself."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    buckets, b = [], 1
    while b < max_batch_size:
        buckets.append(b)
        b *= 2
    return buckets + [max_batch_size]


#: Prefill chunks up to this many tokens run in bucketed shapes (captured on CUDA); longer ones run eagerly.
PREFILL_GRAPH_TOKENS = 512


def token_buckets(max_tokens: int, smallest: int = 16) -> list[int]:
    """Prefill token-count buckets: [16, 32, 64, ...] below ``max_tokens``, then ``max_tokens`` itself."""
    buckets, b = [], smallest
    while b < max_tokens:
        buckets.append(b)
        b *= 2
    return buckets + [max_tokens]


def _free_mib(device: torch.device) -> float:
    return torch.cuda.mem_get_info(device)[0] / 2**20


class GraphRunner:
    """Bucketed CUDA-graph runner for ``fn`` over named static input buffers.

    Args:
        fn: the step; called with ``{name: buffer slice of the bucket}`` and returns ``{name: tensor}``
            (values may be None: left out), batch dimension 0 unless ``output_batch_dims`` says otherwise.
        inputs: static buffers, each with ``max_batch_size`` rows along its batch dim.
        pads: padding value per input (every input must have one).
        max_batch_size: the largest bucket.
        batch_dims: batch dimension per input (default 0), e.g. ``{"positions": 1}`` for ``(3, batch)``; None:
            a host input of fixed size every bucket sees whole (a prefill's per-sequence metadata).
        use_graphs: capture and replay graphs (only on CUDA; ignored on CPU).
        name: for logs.
        output_batch_dims: batch dimension per output (default 0).
        buckets: the bucket sizes (default ``batch_buckets(max_batch_size)``; the last is ``max_batch_size``).
        host_inputs: inputs the host fills each step (ids, positions, KV metadata, sampling parameters): they
            live as typed views of ONE device byte buffer, staged in a host buffer (pinned on CUDA) and copied
            with one ``non_blocking`` copy per step instead of one small copy per input.
    """

    def __init__(self, fn: StepFn, inputs: Mapping[str, torch.Tensor], pads: Mapping[str, object],
                 max_batch_size: int, batch_dims: Mapping[str, int] | None = None, use_graphs: bool = True,
                 name: str = "step", output_batch_dims: Mapping[str, int] | None = None,
                 host_inputs: Sequence[str] = (), buckets: Sequence[int] | None = None):
        self.fn = fn
        self.inputs = dict(inputs)
        self.pads = dict(pads)
        self.batch_dims = {k: 0 for k in self.inputs} | dict(batch_dims or {})
        missing = set(self.inputs) - set(self.pads)
        if missing:
            raise ValueError(f"inputs without a padding value: {sorted(missing)}")
        for k, t in self.inputs.items():
            if self.batch_dims[k] is None:
                if k not in set(host_inputs):
                    raise ValueError(f"input {k!r} without a batch dim must be a host input")
            elif t.shape[self.batch_dims[k]] != max_batch_size:
                raise ValueError(f"input {k!r} {tuple(t.shape)} has no {max_batch_size} rows along dim "
                                 f"{self.batch_dims[k]}")
        self.max_batch_size = max_batch_size
        self.buckets = list(buckets) if buckets else batch_buckets(max_batch_size)
        if self.buckets[-1] != max_batch_size:
            raise ValueError(f"the largest bucket must be {max_batch_size}, got {self.buckets}")
        devices = {t.device for t in self.inputs.values()}
        if len(devices) != 1:
            raise ValueError(f"all static inputs must be on one device, got {sorted(map(str, devices))}")
        self.device = devices.pop()
        self.graphs_requested = bool(use_graphs)  # on CUDA this step replays as graphs (the census costs it so)
        self.use_graphs = bool(use_graphs) and self.device.type == "cuda"
        self.name = name
        self.output_batch_dims = dict(output_batch_dims or {})
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.outputs: dict[str, torch.Tensor] = {}
        self._pool = None
        self.replays = 0  # graph replays so far (tests check the graph path is the one taken)
        self.host_inputs = [k for k in self.inputs if k in set(host_inputs)]
        self._pack()

    def _pack(self) -> None:
        """Re-home the host inputs as typed views of one byte buffer ``packed`` and build its host staging
        buffers: two, used in turn, each reused only once its previous copy is done (an event on CUDA)."""
        offsets, total = {}, 0
        for k in self.host_inputs:
            t = self.inputs[k]
            offsets[k], total = total, total + -(-t.numel() * t.element_size() // 16) * 16
        self.packed = torch.zeros(total, dtype=torch.uint8, device=self.device)
        pin = self.device.type == "cuda" and torch.cuda.is_available()
        self._staging = [torch.zeros(total, dtype=torch.uint8, pin_memory=pin) for _ in range(2)]
        raw = [h.numpy() for h in self._staging]
        self._host_views: list[dict[str, np.ndarray]] = [{} for _ in raw]
        for k in self.host_inputs:
            t, o = self.inputs[k], offsets[k]
            n = t.numel() * t.element_size()
            self.inputs[k] = self.packed[o: o + n].view(t.dtype).view(t.shape)
            for views, r in zip(self._host_views, raw):
                views[k] = r[o: o + n].view(_NP[t.dtype]).reshape(tuple(t.shape))
                views[k][...] = self.pads[k]
        if self.host_inputs:   # every row padding, as the caller's buffers were
            self.packed.copy_(self._staging[0])
        self._events: list = [None, None]
        self._turn = 0

    # -------------------------------------------------------------------------------------------- buffers
    def bucket_for(self, n: int) -> int | None:
        """The smallest bucket holding n rows, or None above the largest (eager fallback)."""
        for b in self.buckets:
            if n <= b:
                return b
        return None

    def view(self, bs: int) -> dict[str, torch.Tensor]:
        """Every input's first ``bs`` rows along its batch dim (views of the static buffers)."""
        return {k: t if self.batch_dims[k] is None else t.narrow(self.batch_dims[k], 0, bs)
                for k, t in self.inputs.items()}

    def fill(self, buffers: dict[str, torch.Tensor], n: int, values: Mapping[str, InputValue | None],
             staged: bool = True) -> None:
        """Write the step's n rows (and the padding up to the buffers' rows) into ``buffers``: the host inputs
        through the staging buffer and one copy (``staged``; False for buffers outside ``packed``)."""
        unknown = set(values) - set(buffers)
        if unknown:
            raise ValueError(f"unknown inputs for {self.name}: {sorted(unknown)}")
        if self.host_inputs:
            self._fill_host(buffers, n, values, staged)
        for k, buf in buffers.items():
            if k in self.host_inputs:
                continue
            value = values.get(k)
            dim = self.batch_dims[k]
            if value is None:
                buf.fill_(self.pads[k])
            elif callable(value):
                value(buf)
            else:
                if value.shape[dim] != n:
                    raise ValueError(f"input {k!r} has {value.shape[dim]} rows along dim {dim}, expected {n}")
                buf.narrow(dim, 0, n).copy_(value)
                if buf.shape[dim] > n:
                    buf.narrow(dim, n, buf.shape[dim] - n).fill_(self.pads[k])

    def _fill_host(self, buffers, batch: int, values, staged: bool) -> None:
        turn = self._turn = (self._turn + 1) % 2
        if self._events[turn] is not None:   # its last copy was read long ago (steps read back): no real wait
            self._events[turn].synchronize()
        for k in self.host_inputs:
            dim = self.batch_dims[k]
            static, n = dim is None, batch   # static: whole every time, n = the value's own row count
            dim = 0 if static else dim
            rows = buffers[k].shape[dim]
            view = self._host_views[turn][k]
            host = view[(slice(None),) * dim + (slice(0, rows),)] if staged else np.empty(
                tuple(buffers[k].shape), dtype=view.dtype)
            value, head = values.get(k), (slice(None),) * dim
            if callable(value):
                value(host)
            else:
                if value is not None:
                    value = np.asarray(value, dtype=host.dtype)
                    n = value.shape[0] if static else n
                    if value.ndim == host.ndim and value.shape[dim] != n:
                        raise ValueError(f"input {k!r} has {value.shape[dim]} rows along dim {dim}, expected {n}")
                    host[head + (slice(0, n),)] = value
                host[head + (slice(0 if value is None else n, rows),)] = self.pads[k]
            if not staged:
                buffers[k].copy_(torch.from_numpy(host))
        if staged:   # the step's one host → device copy of its inputs
            self.packed.copy_(self._staging[turn], non_blocking=True)
            if self.device.type == "cuda":
                self._events[turn] = torch.cuda.Event()
                self._events[turn].record()

    # -------------------------------------------------------------------------------------------- capture
    @torch.inference_mode()
    def warm_up(self) -> None:
        """Run every bucket once on all-padding inputs, eagerly, so the Triton kernels compile every
        specialisation the buckets hit at start-up, not at a request (``capture`` warms each bucket itself)."""
        for bs in self.buckets:
            view = self.view(bs)
            self.fill(view, 0, {})
            self.fn(view)

    @torch.inference_mode()
    def capture(self) -> None:
        """Capture one graph per bucket, largest first, sharing one memory pool. No-op without graphs."""
        if not self.use_graphs or self.graphs:
            return
        torch.cuda.synchronize(self.device)
        before, t0 = _free_mib(self.device), time.perf_counter()
        for bs in reversed(self.buckets):
            view = self.view(bs)
            self.fill(view, 0, {})  # all padding: the warm-up and capture touch no KV page
            out = self.fn(view)  # eager warm-up: JIT compiles and lazy allocations happen outside the capture
            if not self.outputs:
                self.outputs = {k: torch.empty_like(v) for k, v in out.items() if v is not None}
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=self._pool):
                out = self.fn(view)
                for k, v in out.items():
                    if v is not None:
                        self._rows(k, self.outputs[k], bs).copy_(v)
            if self._pool is None:
                self._pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize(self.device)
        after = _free_mib(self.device)
        logger.info("%s: captured %d CUDA graphs (batch %s) in %.1f s; free memory %.0f MiB -> %.0f MiB "
                    "(%.0f MiB used)", self.name, len(self.graphs), self.buckets, time.perf_counter() - t0,
                    before, after, before - after)

    # -------------------------------------------------------------------------------------------- run
    @torch.inference_mode()
    def run(self, n: int, values: Mapping[str, InputValue | None]) -> dict[str, torch.Tensor]:
        """One step for a batch of n: returns ``{name: output's first n rows}``.

        values: per input, a batch-n tensor or a filler callable (see ``InputValue``); a missing or None
        input is all padding. With a graph the outputs are views of the static output buffers, valid until
        the next ``run``: copy what must outlive it.
        """
        if n < 1:
            raise ValueError(f"batch size must be >= 1, got {n}")
        bs = self.bucket_for(n)
        if bs is None:
            return self._run_oversized(n, values)
        view = self.view(bs)
        self.fill(view, n, values)
        graph = self.graphs.get(bs)
        if graph is None:
            with census_graphed(self.graphs_requested):
                out = self.fn(view)
            return {k: self._rows(k, v, n) for k, v in out.items() if v is not None}
        graph.replay()
        self.replays += 1
        return {k: self._rows(k, v, n) for k, v in self.outputs.items()}

    def _rows(self, name: str, t: torch.Tensor, n: int) -> torch.Tensor:
        return t.narrow(self.output_batch_dims.get(name, 0), 0, n)

    def _run_oversized(self, n: int, values: Mapping[str, InputValue | None]) -> dict[str, torch.Tensor]:
        """Eager step on fresh buffers of exactly n rows (batches above the largest bucket)."""
        buffers = {}
        for k, t in self.inputs.items():
            shape = list(t.shape)
            if self.batch_dims[k] is not None:
                shape[self.batch_dims[k]] = n
            buffers[k] = t.new_empty(shape)
        self.fill(buffers, n, values, staged=False)
        out = self.fn(buffers)
        return {k: v for k, v in out.items() if v is not None}


class ThinkerDecodeStep:
    """The thinker's per-token step over named tensors: embed → decoder over the paged KV → lm_head → sample.

    Inputs (B = batch): input_ids (B,) int64; positions (3, B) float32; slot_mapping (B,) int64;
    block_tables (B, max_blocks) int32; context_lens (B,) int32; temperature, top_p, repetition_penalty (B,)
    float32; top_k, seeds, steps (B,) int64; seen (B, vocab) bool (ids seen so far, for the repetition
    penalty; all False leaves the scores untouched). Outputs: next_ids (B,) int64 and tap (B, H) when ``tap_layer`` is set.

    within_cap: True when every batch this step will see has 1 <= top_k <= ``sampling.CANDIDATES`` on its
    sampled rows (the caller checks the host parameters): the draw then runs over the top candidates only; None
    sorts the whole vocabulary (exact for any parameters).
    """

    def __init__(self, thinker, kv_caches: Sequence[tuple[torch.Tensor, torch.Tensor]], tap_layer: int | None = None,
                 within_cap: bool | None = None):
        self.thinker = thinker
        self.kv_caches = list(kv_caches)
        self.tap_layer = tap_layer
        self.within_cap = within_cap

    def __call__(self, b: dict) -> dict:
        with census_stage("thinker_decode"):
            return self._step(b)

    def _step(self, b: dict) -> dict:
        embeds = self.thinker.embed(b["input_ids"])
        meta = AttentionMetadata(slot_mapping=b["slot_mapping"], block_tables=b["block_tables"],
                                 context_lens=b["context_lens"])
        hidden, tap = self.thinker(embeds, b["positions"], self.kv_caches, meta, self.tap_layer)
        st = SamplingTensors(temperature=b["temperature"], top_k=b["top_k"], top_p=b["top_p"],
                             repetition_penalty=b["repetition_penalty"], seeds=b["seeds"], steps=b["steps"],
                             within_cap=self.within_cap)
        next_ids = sample(self.thinker.logits(hidden), st, b["seen"])
        return {"next_ids": next_ids, "tap": tap}


class ThinkerDecodeGraphs:
    """The thinker decode step behind a ``GraphRunner``: static buffers, KV metadata fill, sampling inputs.

    ``max_blocks`` (block table width) comes from ``max_model_len``, so one graph serves any context length
    up to it: the paged-attention kernel reads the lengths from ``context_lens`` on the device.

    Two steps, each behind its own runner: ``runner`` replays the step whose sampler draws from the top
    ``sampling.CANDIDATES`` (every batch whose sampled rows have 1 <= top_k <= CANDIDATES: the defaults), and
    batches with a row outside that go through ``full_runner`` (``step``: the whole vocabulary sorted once),
    built and captured on first use — so no parameter silently changes what is sampled.
    """

    def __init__(self, thinker, pool: KVCachePool, max_batch_size: int, max_model_len: int,
                 use_graphs: bool = True, tap_layer: int | None = None):
        self.pool = pool
        self.thinker, self.max_batch_size, self.max_model_len = thinker, max_batch_size, max_model_len
        self.use_graphs = use_graphs
        kv = list(zip(pool.k_caches, pool.v_caches))
        self.step = ThinkerDecodeStep(thinker, kv, tap_layer)    # exact for any sampling parameters
        self.runner = self._runner(ThinkerDecodeStep(thinker, kv, tap_layer, within_cap=True), "thinker_decode")
        self._full_runner: GraphRunner | None = None

    def _runner(self, step: "ThinkerDecodeStep", name: str) -> GraphRunner:
        """A GraphRunner of ``step`` over its own static buffers."""
        device = self.pool.device
        vocab = self.thinker.cfg.text.vocab_size
        max_blocks = -(-self.max_model_len // self.pool.block_size)
        B = self.max_batch_size
        i64, i32, f32 = torch.int64, torch.int32, torch.float32
        with torch.inference_mode():
            inputs = {
                "input_ids": torch.zeros(B, dtype=i64, device=device),
                "positions": torch.zeros(3, B, dtype=torch.float32, device=device),
                "slot_mapping": torch.full((B,), -1, dtype=i64, device=device),
                "block_tables": torch.full((B, max_blocks), -1, dtype=i32, device=device),
                "context_lens": torch.zeros(B, dtype=i32, device=device),
                "temperature": torch.zeros(B, dtype=f32, device=device),
                "top_k": torch.zeros(B, dtype=i64, device=device),
                "top_p": torch.ones(B, dtype=f32, device=device),
                "repetition_penalty": torch.ones(B, dtype=f32, device=device),
                "seeds": torch.zeros(B, dtype=i64, device=device),
                "steps": torch.zeros(B, dtype=i64, device=device),
                "seen": torch.zeros(B, vocab, dtype=torch.bool, device=device),
            }
        # Padding rows: greedy, no filters, write nowhere, read nothing.
        pads = {"input_ids": 0, "positions": 0, "slot_mapping": -1, "block_tables": -1, "context_lens": 0,
                "temperature": 0.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0, "seeds": 0, "steps": 0,
                "seen": False}
        return GraphRunner(step, inputs, pads, B, batch_dims={"positions": 1}, use_graphs=self.use_graphs,
                           name=name, host_inputs=[k for k in inputs if k != "seen"])

    def capture(self) -> None:
        self.runner.capture()

    @property
    def full_runner(self) -> GraphRunner:
        """The exact-sampling step (``step``) behind its own runner; captured (when ``runner`` is) on first use."""
        if self._full_runner is None:
            self._full_runner = self._runner(self.step, "thinker_decode_full_vocab")
            if self.runner.graphs:
                self._full_runner.capture()
        return self._full_runner

    def decode(self, seq_ids: Sequence[int], input_ids: Sequence[int], positions: Sequence[int], params: Sequence,
               steps: Sequence[int], seeds: Sequence[int],
               seen_ids: Sequence[Sequence[int]] | None = None) -> dict[str, torch.Tensor]:
        """One decode step for sequences already holding their prompts in the KV pool.

        input_ids[i] is the last token of seq_ids[i], at text position positions[i]; params:
        SamplingParams-like objects; steps: tokens generated so far (the sampler's counter); seen_ids: per row,
        the prompt + output ids when some row has a repetition penalty, else None. Returns next_ids (n,) int64,
        (and tap (n, H) with a tap layer): views valid until the next call.
        """
        values = self.inputs_for(seq_ids, input_ids, positions, params, steps, seeds, seen_ids)
        runner = self.runner if params_within_cap(params) else self.full_runner
        return runner.run(len(seq_ids), values)

    def inputs_for(self, seq_ids: Sequence[int], input_ids: Sequence[int], positions: Sequence[int],
                   params: Sequence, steps: Sequence[int], seeds: Sequence[int],
                   seen_ids: Sequence[Sequence[int]] | None = None) -> dict[str, InputValue | None]:
        """Reserve one KV slot per sequence and describe the step's inputs for ``GraphRunner.fill``/``run``
        (arguments as :meth:`decode`)."""
        ids = list(seq_ids)
        slots = self.pool.append_token(ids, out=np.empty(len(ids), dtype=np.int64))
        values: dict[str, InputValue | None] = {   # host data: staged and copied once (GraphRunner.host_inputs)
            "input_ids": list(input_ids), "positions": list(positions),   # (3, n) broadcast; fractional (TM-RoPE)
            "slot_mapping": slots,
            "block_tables": lambda buf: self.pool.block_tables(ids, out=buf),
            "context_lens": lambda buf: self.pool.context_lens(ids, out=buf),
            "temperature": [p.temperature for p in params], "top_k": [p.top_k or 0 for p in params],
            "top_p": [p.top_p for p in params], "repetition_penalty": [p.repetition_penalty for p in params],
            "seeds": list(seeds), "steps": list(steps), "seen": None,
        }
        if seen_ids is not None:
            def fill_seen(buf: torch.Tensor) -> None:
                buf.zero_()
                for i, row in enumerate(seen_ids):
                    buf[i, to_device(list(row), torch.int64, buf.device)] = True   # pinned, non_blocking
            values["seen"] = fill_seen
        return values


def code_predictor_graphs(code_predictor, max_batch_size: int, device=None, dtype: torch.dtype | None = None,
                          use_graphs: bool = True) -> GraphRunner:
    """The code predictor's frame (codes 1..G-1 of B talker frames) behind a ``GraphRunner``.

    Inputs: past_hidden, code0_embed (B, H) in the model dtype; temperature, top_p (B,) fp32; top_k, seeds,
    frame_index (B,) int64 (``FrameSampling``; temperature 0 rows are greedy). Outputs: codes (B, G-1) int64,
    next_embed (B, H) (the next talker input). The frame KV workspace is one static buffer, sliced per bucket.
    """
    w = code_predictor.lm_head[0].weight
    device = w.device if device is None else torch.device(device)
    dtype = w.dtype if dtype is None else dtype
    hidden = code_predictor.cfg.hidden_size
    B = max_batch_size
    with torch.inference_mode():
        ws = code_predictor.workspace(B, device, dtype)
        inputs = {"past_hidden": torch.zeros(B, hidden, device=device, dtype=dtype),
                  "code0_embed": torch.zeros(B, hidden, device=device, dtype=dtype),
                  "temperature": torch.zeros(B, device=device), "top_p": torch.ones(B, device=device),
                  "top_k": torch.zeros(B, dtype=torch.int64, device=device),
                  "seeds": torch.zeros(B, dtype=torch.int64, device=device),
                  "frame_index": torch.zeros(B, dtype=torch.int64, device=device)}
    pads = {"past_hidden": 0.0, "code0_embed": 0.0, "temperature": 0.0, "top_p": 1.0, "top_k": 0, "seeds": 0,
            "frame_index": 0}

    def frame(b: dict) -> dict:
        bs = b["past_hidden"].shape[0]
        # filled from FrameSampling.for_talker: top_k CP_TOP_K on sampled rows, within the sampler's cap
        sampling = FrameSampling(temperature=b["temperature"], top_k=b["top_k"], top_p=b["top_p"],
                                 seeds=b["seeds"], frame_index=b["frame_index"], within_cap=True)
        # Above the largest bucket the slice is short and frame() builds its own workspace (eager fallback).
        codes, nxt = code_predictor.frame(b["past_hidden"], b["code0_embed"],
                                          ws.narrow(bs), sampling)
        return {"codes": codes, "next_embed": nxt}

    return GraphRunner(frame, inputs, pads, max_batch_size, use_graphs=use_graphs, name="code_predictor_frame",
                       host_inputs=("temperature", "top_p", "top_k", "seeds", "frame_index"))


def code2wav_graphs(code2wav, max_batch_size: int, frames: int = 1, use_graphs: bool = True) -> GraphRunner:
    """Code2Wav's streaming step (``step_padded``: ``frames`` more frames per stream) behind a ``GraphRunner``.

    Inputs: codes (B, num_quantizers, frames) int64 and the state tensors by name — pos (B,), data (B, N)
    (``Code2WavState``; padding rows are fresh zero states). Outputs: audio (B, frames·samples_per_frame) and the
    new state under the same names prefixed ``new_``: copy them back into the streams' state after each call.
    """
    B = max_batch_size
    with torch.inference_mode():
        state = code2wav.init_state(B)
        device = state.pos.device
        inputs = {"codes": torch.zeros(B, code2wav.cfg.num_quantizers, frames, dtype=torch.int64, device=device)}
    names = state_names(state)
    inputs.update(zip(names, state.tensors()))
    pads = {k: 0 for k in inputs}

    def step(b: dict) -> dict:
        st = state_from(b, state.layout)
        audio, new = code2wav.step_padded(b["codes"], st)
        return {"audio": audio} | {f"new_{k}": t for k, t in zip(names, new.tensors())}

    return GraphRunner(step, inputs, pads, max_batch_size, use_graphs=use_graphs, name="code2wav_step")


def state_names(state: Code2WavState | None = None) -> list[str]:
    """The names of a ``Code2WavState``'s tensors, in ``tensors()`` order."""
    return list(Code2WavState.NAMES)


def state_from(b: Mapping[str, torch.Tensor], layout: StateLayout, prefix: str = "") -> Code2WavState:
    """Rebuild a ``Code2WavState`` from named tensors (``prefix`` ``new_`` for a step's outputs)."""
    return Code2WavState(pos=b[prefix + "pos"], data=b[prefix + "data"], layout=layout)


class SpeechFrameStep:
    """The speech frame of B speaking requests as one step over named tensors (one graph per batch bucket):
    talker decode over the paged KV → code-0 sampling → the code predictor's frame → one streaming Code2Wav
    step. Per-request state is read from slot-indexed pools by ``slots`` (padding rows use the scratch slot);
    nothing is written back: the outputs carry the new state, committed by the engine once the step succeeded.

    Inputs (B = batch): slots (B,) int64; entries (B, H) the talker's next text entries; positions (3, B)
    float32; slot_mapping (B,) int64, block_tables (B, max_blocks) int32, context_lens (B,) int32 (talker KV);
    temperature, top_p, repetition_penalty (B,) float32, top_k, seeds, steps (B,) int64 (code 0);
    cp_temperature, cp_top_p (B,) float32, cp_top_k, cp_seeds, frame_index (B,) int64 (codes 1..G-1).
    Outputs: code0 (B,), frames (B, G) int64, next_embed (B, H), audio (B, samples_per_frame) float32, and the
    new Code2Wav state as ``new_pos`` / ``new_data``.
    """

    def __init__(self, model, kv_caches, pools, workspace):
        self.talker, self.c2w = model.talker, model.code2wav
        self.kv_caches = list(kv_caches)
        self.pools = pools          # .codec_embed (S+1, H), .seen (S+1, V), .c2w_state (S+1 streams), .suppress
        self.ws = workspace

    def __call__(self, b: dict) -> dict:
        bs, slots, p = b["slots"].shape[0], b["slots"], self.pools
        # census markers: the frame's parts are costed as the per-token stages they replace
        with census_stage("talker_decode"):
            x = p.codec_embed.index_select(0, slots) + b["entries"]
            meta = AttentionMetadata(slot_mapping=b["slot_mapping"], block_tables=b["block_tables"],
                                     context_lens=b["context_lens"])
            hidden, _ = self.talker(x, b["positions"], self.kv_caches, meta)
            # the engine routes batches with a talker top_k outside the sampler's cap to the eager frame
            st = SamplingTensors(temperature=b["temperature"], top_k=b["top_k"], top_p=b["top_p"],
                                 repetition_penalty=b["repetition_penalty"], seeds=b["seeds"], steps=b["steps"],
                                 within_cap=True)
            code0 = sample(self.talker.logits(hidden), st, p.seen.index_select(0, slots), p.suppress)
        with census_stage("code_predictor_frame"):
            fs = FrameSampling(temperature=b["cp_temperature"], top_k=b["cp_top_k"], top_p=b["cp_top_p"],
                               seeds=b["cp_seeds"], frame_index=b["frame_index"], within_cap=True)
            codes, nxt = self.talker.code_predictor.frame(hidden, self.talker.embed_codec(code0),
                                                          self.ws.narrow(bs), fs)
            frames = torch.cat((code0[:, None], codes), dim=1)
        with census_stage("code2wav_step"):
            state = p.c2w_state.select(slots)
            audio, new = self.c2w.step_padded(frames[:, :, None], state)
        out = {"code0": code0, "frames": frames, "next_embed": nxt, "audio": audio.float()}
        return out | {f"new_{k}": t for k, t in zip(state_names(new), new.tensors())}


def speech_frame_graphs(model, pool: KVCachePool, pools, max_batch_size: int, max_blocks: int,
                        use_graphs: bool = True) -> GraphRunner:
    """``SpeechFrameStep`` behind a ``GraphRunner``: static buffers sized for ``max_batch_size``, padding rows
    on the scratch slot ``max_batch_size`` (slot -1 in the KV, context 0, greedy, fresh Code2Wav state)."""
    device, dtype = pool.device, pool.dtype
    B, S = max_batch_size, max_batch_size
    h = model.cfg.talker.text.hidden_size
    i64, i32, f32 = torch.int64, torch.int32, torch.float32
    with torch.inference_mode():
        z = lambda dt, fill=0: torch.full((B,), fill, dtype=dt, device=device)  # noqa: E731
        inputs = {"slots": z(i64, S), "entries": torch.zeros(B, h, device=device, dtype=dtype),
                  "positions": torch.zeros(3, B, dtype=f32, device=device), "slot_mapping": z(i64, -1),
                  "block_tables": torch.full((B, max_blocks), -1, dtype=i32, device=device),
                  "context_lens": z(i32), "temperature": z(f32), "top_p": z(f32, 1), "repetition_penalty": z(f32, 1),
                  "top_k": z(i64), "seeds": z(i64), "steps": z(i64), "cp_temperature": z(f32), "cp_top_p": z(f32, 1),
                  "cp_top_k": z(i64), "cp_seeds": z(i64), "frame_index": z(i64)}
        ws = model.talker.code_predictor.workspace(B, device, dtype)
    pads = {"slots": S, "entries": 0.0, "positions": 0.0, "slot_mapping": -1, "block_tables": -1, "context_lens": 0,
            "temperature": 0.0, "top_p": 1.0, "repetition_penalty": 1.0, "top_k": 0, "seeds": 0, "steps": 0,
            "cp_temperature": 0.0, "cp_top_p": 1.0, "cp_top_k": 0, "cp_seeds": 0, "frame_index": 0}
    step = SpeechFrameStep(model, zip(pool.k_caches, pool.v_caches), pools, ws)
    return GraphRunner(step, inputs, pads, max_batch_size, batch_dims={"positions": 1}, use_graphs=use_graphs,
                       name="speech_frame",
                       host_inputs=[k for k in inputs if k != "entries"])


class PrefillGraphs:
    """A decoder's prefill chunk (up to ``max_seqs`` packed sequences, at most ``max_tokens`` tokens) behind a
    ``GraphRunner`` whose buckets are token counts, captured whole: the prefill attention kernel takes static
    metadata (``cu_seqlens`` on the device, the bucket as ``max_query_len``), so no piecewise split is needed.

    Pad tokens (bucket rows past the chunk) sit on slot -1 (nothing written to the KV pages) past
    ``cu_seqlens[-1]`` (no sequence: attention leaves them zero) and feed no real row; pad sequences are empty
    (``cu_seqlens`` repeated, context 0). Inputs: embeds (T, H), positions (3, T) float32 (device);
    slot_mapping (T,) int64, block_tables (S, max_blocks) int32, context_lens (S,) int32, cu_seqlens (S + 1,)
    int32 (host, staged once). Outputs: hidden (T, H) post-norm and tap (T, H) when ``tap_layer`` is set.
    """

    def __init__(self, forward, pool: KVCachePool, max_seqs: int, max_blocks: int, hidden: int,
                 dtype: torch.dtype, tap_layer: int | None = None, max_tokens: int = PREFILL_GRAPH_TOKENS,
                 use_graphs: bool = True, name: str = "prefill"):
        self.forward, self.pool, self.tap_layer, self.max_seqs = forward, pool, tap_layer, max_seqs
        self.kv_caches = list(zip(pool.k_caches, pool.v_caches))
        T, S, device = max_tokens, max_seqs, pool.device
        with torch.inference_mode():
            inputs = {"embeds": torch.zeros(T, hidden, dtype=dtype, device=device),
                      "positions": torch.zeros(3, T, dtype=torch.float32, device=device),
                      "slot_mapping": torch.empty(T, dtype=torch.int64, device=device),
                      "block_tables": torch.empty(S, max_blocks, dtype=torch.int32, device=device),
                      "context_lens": torch.empty(S, dtype=torch.int32, device=device),
                      "cu_seqlens": torch.empty(S + 1, dtype=torch.int32, device=device)}
        pads = {"embeds": 0.0, "positions": 0.0, "slot_mapping": -1, "block_tables": -1, "context_lens": 0,
                "cu_seqlens": 0}
        self.runner = GraphRunner(self._step, inputs, pads, T, use_graphs=use_graphs, name=name,
                                  batch_dims={"positions": 1, "block_tables": None, "context_lens": None,
                                              "cu_seqlens": None},
                                  host_inputs=("slot_mapping", "block_tables", "context_lens", "cu_seqlens"),
                                  buckets=token_buckets(T))

    def _step(self, b: dict) -> dict:
        meta = AttentionMetadata(slot_mapping=b["slot_mapping"], block_tables=b["block_tables"],
                                 context_lens=b["context_lens"], cu_seqlens_q=b["cu_seqlens"],
                                 max_query_len=b["embeds"].shape[0])   # the bucket: a static attention grid
        hidden, tap = self.forward(b["embeds"], b["positions"], self.kv_caches, meta, self.tap_layer)
        return {"hidden": hidden, "tap": tap}

    def fits(self, seqs: int, tap_layer: int | None) -> bool:
        return seqs <= self.max_seqs and tap_layer in (None, self.tap_layer)

    def run(self, seq_ids: list[int], lens: list[int], x: torch.Tensor, pos: torch.Tensor):
        """One chunk whose KV pages are reserved: x (n, H), pos (3, n), lens[i] tokens of seq_ids[i] back to
        back → (hidden (n, H), tap (n, H) or None). Above the largest bucket it runs eagerly at its length."""
        cu = np.cumsum([0] + list(lens))

        def fill_cu(h: np.ndarray) -> None:
            h[: len(cu)], h[len(cu):] = cu, cu[-1]

        out = self.runner.run(x.shape[0], {
            "embeds": x, "positions": pos, "cu_seqlens": fill_cu,
            "slot_mapping": lambda h: self.pool.slot_mapping(seq_ids, out=h),
            "block_tables": lambda h: self.pool.block_tables(seq_ids, out=h),
            "context_lens": lambda h: self.pool.context_lens(seq_ids, out=h)})
        hidden, tap = out["hidden"], out.get("tap")
        if self.runner.graphs:   # views of the static outputs: the next chunk's replay overwrites them
            hidden, tap = hidden.clone(), None if tap is None else tap.clone()
        return hidden, tap
