"""Runtime: the public entry point (see api.md). Owns the engine thread; generate/stream/astream/abort.

    rt = omni_rt.Runtime("path/to/checkpoint")
    out = rt.generate(messages_or_prompt, speaker="ethan")
    for chunk in rt.stream(messages_or_prompt): ...
"""
from __future__ import annotations

import os
import random
import threading
import time
import warnings
import weakref
from typing import Any, Callable

import numpy as np
import torch

from . import audio as audio_mod
from . import vision as vision_mod
from .config import OmniConfig
from .errors import DeviceFault
from .engine.engine import Engine
from .engine.config import EngineConfig
from .engine.sequence import Request, Sequence
from .engine.text_output import TextOutput
from .models.omni import OmniModel, load_model
from .profiling import TorchProfiler
from .request import GenerationOutput, Prompt, SamplingParams, new_request_id
from .prompting import PreparedPrompt, PromptBuilder, load_audio
from .streams import AsyncRequestStream, RequestStream
from .tokenizer import IncrementalDetokenizer, OmniTokenizer, TokenizerMissing
from .validate import check_bool, check_int, check_real, check_str


# Largest accepted batch (each slot holds decoder state: a larger value is a typo, not a plan).
MAX_BATCH_SIZE = 1024
MAX_KV_BLOCK_SIZE = 4096


def _default_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if not isinstance(device, (str, torch.device)):
        raise TypeError(f"device must be 'cuda', 'cpu' or a torch.device, got {type(device).__name__}")
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device!r} ({e})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was asked for but no CUDA device is available")
    if device.type not in ("cuda", "cpu"):
        raise ValueError(f"device must be 'cuda' or 'cpu', got {device}")
    return device


class Runtime:
    """Loads a Qwen3-Omni checkpoint and serves requests from one engine thread that owns the device.

    Args:
        model: a HF-format checkpoint directory (config.json + safetensors), or an already built ``OmniModel``.
        device: "cuda" | "cpu" (default: cuda when available). dtype: default bf16 on cuda, fp32 on cpu.
        cuda_graphs: capture per-token paths in CUDA graphs (ignored on cpu).
        max_batch_size: requests decoded together.
        gpu_memory_utilization: fraction of the memory left after the weights that the KV pages may take.
        max_model_len: longest prompt + max_new_tokens accepted (longer requests are refused).
        kv_cache_tokens: KV capacity in tokens, overriding the memory plan (default on cpu:
            max_batch_size · max_model_len, at most 262144).
        max_prefill_tokens: prompt tokens per engine step (chunked prefill keeps decoding requests moving).
        first_chunk_frames: talker frames decoded before the first audio packet is sent (default 1).
        profile_dir: record a torch.profiler trace of the engine into this folder (see omni_rt.profiling).
        progress: called with a line of text per checkpoint shard read (load progress for large checkpoints).
        quantization: None (weights as stored: an FP8 checkpoint is recognised from its config.json) or "fp8"
            (quantize the thinker's and talker's decoder projections to block FP8 while loading). FP8 weights
            stay FP8 in device memory on GPUs with FP8 hardware (sm_89/sm_90, decided at load); on CPU and
            sm_80 they are dequantized to ``dtype`` at load.
        fp8_activations: with FP8 weights kept on the device, prefill GEMMs (≥ 64 tokens) of the dense
            projections and the MoE experts also quantize activations per token and 128 columns (w8a8 on FP8
            tensor cores); decode stays weight-only. Off by default.
    """

    def __init__(self, model: str | os.PathLike | OmniModel, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, cuda_graphs: bool = True, max_batch_size: int = 8,
                 gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
                 kv_cache_tokens: int | None = None, kv_block_size: int = 16, max_prefill_tokens: int = 4096,
                 first_chunk_frames: int = 1, profile_dir: str | os.PathLike | None = None,
                 progress: Callable[[str], None] | None = None, quantization: str | None = None,
                 fp8_activations: bool = False):
        if not isinstance(model, (str, os.PathLike, OmniModel)):
            raise TypeError(f"model must be a checkpoint directory (str or os.PathLike) or an OmniModel, got "
                            f"{type(model).__name__}")
        self.device = _default_device(device)
        if dtype is not None and not isinstance(dtype, torch.dtype):
            raise TypeError(f"dtype must be a torch.dtype (torch.float32, torch.float16 or torch.bfloat16), got "
                            f"{type(dtype).__name__} {dtype!r}")
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        if self.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype}")
        cuda_graphs = check_bool("cuda_graphs", cuda_graphs)
        max_batch_size = check_int("max_batch_size", max_batch_size, 1, MAX_BATCH_SIZE)
        gpu_memory_utilization = check_real("gpu_memory_utilization", gpu_memory_utilization, 0.0, 1.0,
                                            lo_open=True)
        if max_model_len is not None:
            max_model_len = check_int("max_model_len", max_model_len, 1)
        kv_block_size = check_int("kv_block_size", kv_block_size, 1, MAX_KV_BLOCK_SIZE)
        if kv_cache_tokens is not None:
            kv_cache_tokens = check_int("kv_cache_tokens", kv_cache_tokens, 1)
        max_prefill_tokens = check_int("max_prefill_tokens", max_prefill_tokens, 1)
        first_chunk_frames = check_int("first_chunk_frames", first_chunk_frames, 1)
        if profile_dir is not None and not isinstance(profile_dir, (str, os.PathLike)):
            raise TypeError(f"profile_dir must be a folder path (str or os.PathLike), got {type(profile_dir).__name__}")
        if progress is not None and not callable(progress):
            raise TypeError(f"progress must be a callable taking one str, got {type(progress).__name__}")
        if quantization is not None and not isinstance(quantization, str):
            raise TypeError(f"quantization must be None or 'fp8', got {type(quantization).__name__}")
        if quantization not in (None, "fp8"):
            raise ValueError(f"quantization must be None or 'fp8', got {quantization!r}")
        self.cuda_graphs = cuda_graphs and self.device.type == "cuda"
        self.first_chunk_frames = first_chunk_frames
        self.path = None
        if isinstance(model, OmniModel):
            self.model = model
        else:
            self.path = os.fspath(model)
            if not os.path.isdir(self.path):
                raise FileNotFoundError(f"checkpoint directory not found: {self.path}")
            self.model = load_model(self.path, self.dtype, self.device, progress=progress,
                                    quantization=quantization, fp8_activations_from=64 if fp8_activations else None)
        self.cfg: OmniConfig = self.model.cfg
        self.tokenizer = None
        if self.path is not None:
            try:
                self.tokenizer = OmniTokenizer(self.path)
            except TokenizerMissing:
                self.tokenizer = None
        # Image/video preprocessing settings: the checkpoint's preprocessor_config.json, else the released ones.
        self.vision_preprocess = (vision_mod.VisionPreprocessConfig.from_checkpoint(self.path, self.cfg.thinker.vision)
                                  if self.cfg.thinker.vision is not None else None)
        self._prompts = PromptBuilder(self.cfg, self.tokenizer, self.vision_preprocess)
        tc = self.cfg.thinker.text
        if max_model_len is not None and max_model_len > tc.max_position_embeddings:
            raise ValueError(f"max_model_len must be an integer in [1, {tc.max_position_embeddings}] (the "
                             f"checkpoint's max_position_embeddings), got {max_model_len}")
        self.max_model_len = max_model_len or min(tc.max_position_embeddings, 32768)
        if kv_cache_tokens is None:
            kv_cache_tokens = self._plan_kv_tokens(max_batch_size, gpu_memory_utilization, kv_block_size)
        else:
            self._check_kv_fits(kv_cache_tokens, kv_block_size)
        self.engine_config = EngineConfig(
            max_batch_size=max_batch_size, max_model_len=self.max_model_len, max_prefill_tokens=max_prefill_tokens,
            kv_block_size=kv_block_size, kv_cache_tokens=kv_cache_tokens, first_chunk_frames=first_chunk_frames,
            cuda_graphs=self.cuda_graphs, gpu_memory_utilization=gpu_memory_utilization)
        self.engine = Engine(self.model, self.engine_config, self.device, self.dtype)
        self.warmup_s = self.engine.warmup_s   # graph capture + warm-up of every batch bucket at start-up
        self._has_talker = self.model.has_talker
        self._closed = False
        self._final_stats: dict | None = None
        self._final_memory: dict | None = None
        self._close_lock = threading.Lock()
        self._profiler = TorchProfiler(profile_dir) if profile_dir else None
        if self._profiler:
            self._profiler.start()
        self.engine.start()
        # A runtime dropped without close() (or alive at interpreter exit) still stops its engine thread: the
        # thread holds only the engine, never the runtime, and this finalizer stops it.
        self._finalizer = weakref.finalize(self, _stop_unclosed, self.engine, self._profiler)

    def _check_kv_fits(self, kv_tokens: int, block_size: int) -> None:
        """Refuse a KV size that the device's whole memory could not hold, before trying to allocate it."""
        from .engine.kv_cache import kv_block_bytes

        blocks = -(-kv_tokens // block_size)
        pools = [self.cfg.thinker.text] + ([self.cfg.talker.text] if self.model.has_talker else [])
        need = sum(blocks * kv_block_bytes(c.num_hidden_layers, block_size, c.num_key_value_heads, c.head_dim,
                                           self.dtype) for c in pools)
        if self.device.type == "cuda":
            total = torch.cuda.get_device_properties(self.device).total_memory
        else:
            total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        if need > total:
            raise ValueError(f"kv_cache_tokens={kv_tokens} needs {need / 2 ** 30:.1f} GiB of KV cache, more than "
                             f"the {self.device.type} device's {total / 2 ** 30:.1f} GiB of memory")

    def _plan_kv_tokens(self, max_batch_size: int, fraction: float, block_size: int) -> int:
        from .engine.kv_cache import kv_block_bytes

        tc = self.cfg.thinker.text
        if self.device.type != "cuda":
            # CPU: enough for every batch slot at max_model_len, within a quarter of RAM (at most 4 GiB).
            per_token = kv_block_bytes(tc.num_hidden_layers, 1, tc.num_key_value_heads, tc.head_dim, self.dtype)
            ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
            budget = min(ram // 4, 4 << 30)
            return max(block_size, min(max_batch_size * self.max_model_len, 262144, budget // per_token))
        # Measured after the weights are resident: FP8 weights leave the memory they save to the KV pages.
        free, _ = torch.cuda.mem_get_info(self.device)
        return plan_kv_tokens(self.cfg, free, self.dtype, self.model.has_talker, fraction, block_size)

    # ------------------------------------------------------------------------------------------- API
    @property
    def has_talker(self) -> bool:
        return self._has_talker

    @property
    def speakers(self) -> list[str]:
        """This checkpoint's voices, lower case ([] without a talker)."""
        return sorted(k.lower() for k in self.cfg.talker.speaker_id) if self._has_talker else []

    @property
    def closed(self) -> bool:
        return self._closed

    def _live(self) -> Engine:
        """The engine, for a call on an open runtime; RuntimeError at once after close() (or a device fault).
        Callers keep the returned engine: ``self.engine`` becomes None when close() frees it."""
        engine = self.engine
        if self._closed or engine is None:
            raise RuntimeError("this omni_rt.Runtime is closed: create a new one")
        if engine.fault is not None:
            raise DeviceFault(f"the runtime hit a device fault and must be recreated: {engine.fault}")
        return engine

    def close(self) -> None:
        """End every request in flight or queued (with a RuntimeError), stop and join the engine thread and free
        the model's device memory. Idempotent; every later call on this runtime raises RuntimeError at once."""
        with self._close_lock:
            if self._closed:
                return
            self._closed = True
        self._finalizer.detach()
        self.engine.shutdown()
        self._final_stats = self._stats(self.engine)   # stats() keeps answering (from this snapshot) after close
        self._final_memory = self.model.weight_memory()
        if self._profiler:
            self._profiler.stop()
            self._profiler = None
        # Drop the weights, KV pools and decoder state (handles hold the engine weakly, so this frees them).
        self.engine = None
        self.model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def __enter__(self) -> "Runtime":
        self._live()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def stats(self) -> dict:
        """Cheap, thread-safe counters (api.md): KV blocks and speech slots free/total, requests running and
        waiting, ``warmup_s`` (seconds the start-up warm-up of every batch and prefill bucket took: Triton
        compiles and graph captures; ~0 on CPU) and ``fault`` (None, or what killed the runtime). After ``close()`` it returns the counters as
        the runtime left them (every request ended, every block and slot returned); it never raises."""
        engine = self.engine
        if engine is None or self._final_stats is not None:
            return dict(self._final_stats)
        return self._stats(engine)

    @staticmethod
    def _stats(e: Engine) -> dict:
        return e.stats()

    def encode_audio(self, wav_16k: np.ndarray | str | os.PathLike) -> torch.Tensor:
        """The AuT encoder output for one audio: (n_tokens, output_dim)."""
        model = self._live().model
        wav = load_audio(wav_16k, "wav_16k")
        mel = audio_mod.log_mel(wav, device=self.device, n_mels=self.cfg.thinker.audio.num_mel_bins)
        with torch.inference_mode():
            return model.thinker.audio_tower(mel.to(self.dtype), [mel.shape[1]])

    def memory(self) -> dict[str, int]:
        """Weight bytes per component as loaded (actual dtypes: FP8 codes and scales where kept): thinker,
        audio_tower, vision (when the checkpoint has one), talker, code_predictor, code2wav (absent without a
        talker), and total. After ``close()`` (which frees them): the figures the runtime had."""
        engine = self.engine
        if engine is None:
            return dict(self._final_memory)
        return engine.model.weight_memory()

    def encode_image(self, image: Any, deepstack: bool = False
                     ) -> torch.Tensor | tuple[torch.Tensor, list[torch.Tensor]]:
        """The vision encoder output for one image (path, PIL image or uint8 (H, W, 3) array):
        (n_tokens, out_hidden_size); with ``deepstack=True`` also the deepstack features, one
        (n_tokens, out_hidden_size) per tap layer."""
        visual = self._require_vision("encode_image")
        pixel_values, grid = vision_mod.preprocess_images([image], self.vision_preprocess)
        with torch.inference_mode():
            out, taps = visual(pixel_values.to(self.device, self.dtype), grid, deepstack=deepstack)
        return (out, taps) if deepstack else out

    def _require_vision(self, what: str):
        visual = self._live().model.thinker.visual
        refusal = self.cfg.vision_refusal()
        if refusal is not None or visual is None:
            raise ValueError(f"{what}: {refusal or 'this checkpoint has no vision tower'}")
        return visual

    def stage_times(self, reset: bool = False) -> dict[str, float]:
        """Engine wall time per stage in ms, summed since the start (or the last reset)."""
        engine = self._live()
        snap = engine.timer.snapshot()
        if reset:
            engine.timer.reset()
        return snap

    def abort(self, request_id: str) -> bool:
        """Cancel a request in flight; its KV blocks and decoder state are freed at the engine's next step.
        Returns False when no request with this id is in flight."""
        check_str("request_id", request_id)
        return self._live().abort(request_id)

    def generate(self, prompt: Prompt | list[dict], speaker: str = "ethan", return_audio: bool | None = None,
                 thinker: SamplingParams | None = None, talker: SamplingParams | None = None,
                 request_id: str | None = None, use_audio_in_video: bool | None = None) -> GenerationOutput:
        """Run one request to completion; returns text, token ids, codes, audio and metrics.

        use_audio_in_video: a video file's own audio track is heard too, interleaved by time (chat messages;
        a Prompt carries its own flag)."""
        chunks = self._submit(RequestStream, prompt, speaker, return_audio, thinker, talker, request_id,
                              use_audio_in_video)
        req = chunks.request
        text, ids, audio, reasoning = [], [], [], []
        last = None
        with chunks:
            for chunk in chunks:
                text.append(chunk.text_delta)
                reasoning.append(chunk.reasoning_delta)
                ids.extend(chunk.token_ids)
                if chunk.audio.size:
                    audio.append(chunk.audio)
                last = chunk
        codes = None
        wav = None
        if req.speaking:
            codes = (np.concatenate(req.codes, axis=1) if req.codes else
                     np.zeros((self.cfg.talker.num_code_groups, 0), dtype=np.int64))
            wav = np.concatenate(audio) if audio else np.zeros(0, dtype=np.float32)
        return GenerationOutput(request_id=req.request_id, text="".join(text), token_ids=ids, codes=codes,
                                audio=wav, metrics=last.metrics or {}, finish_reason=req.finish_reason or "stop",
                                reasoning="".join(reasoning))

    def stream(self, prompt: Prompt | list[dict], speaker: str = "ethan", return_audio: bool | None = None,
               thinker: SamplingParams | None = None, talker: SamplingParams | None = None,
               request_id: str | None = None, use_audio_in_video: bool | None = None) -> RequestStream:
        """Submit now and return an iterator of chunks (text deltas, audio, finished) as they are produced.

        Arguments are validated by this call. Closing the stream, or dropping it before the last chunk
        (leaving the loop early), aborts the request."""
        return self._submit(RequestStream, prompt, speaker, return_audio, thinker, talker, request_id,
                            use_audio_in_video)

    def astream(self, prompt: Prompt | list[dict], speaker: str = "ethan", return_audio: bool | None = None,
                thinker: SamplingParams | None = None, talker: SamplingParams | None = None,
                request_id: str | None = None, use_audio_in_video: bool | None = None) -> AsyncRequestStream:
        """Async ``stream`` (``async for chunk in rt.astream(...)``); cancelling the consuming task, closing the
        stream or dropping it aborts the request. No executor thread waits on the engine."""
        return self._submit(AsyncRequestStream, prompt, speaker, return_audio, thinker, talker, request_id,
                            use_audio_in_video)

    # ------------------------------------------------------------------------------------------ internals
    def _submit(self, handle, prompt, speaker, return_audio, thinker, talker, request_id,
                use_audio_in_video: bool | None = None):
        """Validate, build and submit a request; returns ``handle(engine, request)`` (a stream that owns it)."""
        t_call = time.perf_counter()
        engine = self._live()
        req = self._make_request(prompt, speaker, return_audio, thinker, talker, request_id, use_audio_in_video)
        req.t_submit = t_call  # metrics count from the call (audio loading and tokenizing included)
        engine.submit(req)
        # The handle exists only once the request is in: a refused submit (say, a request id already in
        # flight) must never leave a handle whose finalizer would abort someone else's request.
        return handle(engine, req)

    def _make_request(self, prompt, speaker, return_audio, thinker, talker, request_id,
                      use_audio_in_video: bool | None = None) -> Request:
        """Validate every argument (TypeError/ValueError/FileNotFoundError naming it) and build the request:
        nothing invalid reaches the engine thread."""
        if return_audio is None:
            return_audio = self.has_talker
        return_audio = check_bool("return_audio", return_audio)
        if return_audio and not self.has_talker:
            raise ValueError("this checkpoint has no talker/code2wav (text-only model): call with "
                             "return_audio=False")
        check_str("speaker", speaker)
        speaker_id = self.cfg.talker.speaker(speaker) if return_audio else None
        for name, p in (("thinker", thinker), ("talker", talker)):
            if p is not None and not isinstance(p, SamplingParams):
                raise TypeError(f"{name} must be an omni_rt.SamplingParams or None, got {type(p).__name__}")
        if request_id is None:
            request_id = new_request_id()
        else:
            check_str("request_id", request_id)
        tc = self.cfg.thinker.text
        thinker_p = (thinker or SamplingParams()).resolved("thinker").for_vocab(tc.vocab_size, "thinker")
        talker_p = None
        if return_audio:
            talker_p = (talker or SamplingParams()).resolved("talker").for_vocab(self.cfg.talker.text.vocab_size,
                                                                                "talker")
        prepared = self._resolve_prompt(prompt, use_audio_in_video)
        ids, audios = prepared.ids, prepared.audios
        self._check_prompt(ids, audios, return_audio)
        if prepared.vision:
            self._check_vision_fits(prepared, thinker_p.max_new_tokens)
        stop = thinker_p.stop_token_ids if thinker_p.stop_token_ids is not None else [self.cfg.im_end_token_id]
        thinker_seq = Sequence(-1, thinker_p, stop, _seed(thinker_p), prompt_ids=ids)
        talker_seq = None
        if talker_p is not None:
            talker_stop = (talker_p.stop_token_ids if talker_p.stop_token_ids is not None
                           else [self.cfg.talker.codec_eos_token_id])
            talker_seq = Sequence(-1, talker_p, talker_stop, _seed(talker_p))
        return Request(request_id=request_id, thinker=thinker_seq, audios=audios, talker=talker_seq,
                       speaker_id=speaker_id, detok=IncrementalDetokenizer(self.tokenizer),
                       text_out=self._text_output(ids, thinker_p), vision=prepared.vision)

    def _text_output(self, prompt_ids: list[int], params: SamplingParams) -> TextOutput:
        """Text side of a request: stop strings and, when the tokenizer has think tags, the reasoning span (on
        from the start when the prompt itself opens it, as Thinking templates may)."""
        think = None
        if self.tokenizer is not None:
            ids = [self.tokenizer.tok.token_to_id(t) for t in ("<think>", "</think>")]
            if None not in ids:
                think = (ids[0], ids[1])
        opened = think is not None and think[0] in prompt_ids[-2:]
        return TextOutput(self.tokenizer, params.stop, think, in_reasoning=opened)

    def _check_vision_fits(self, prepared: PreparedPrompt, max_new_tokens: int) -> None:
        """Images and video make long prompts: name what made this one too long for max_model_len. The longest
        video accepted is the one whose tokens (grid_t·grid_h·grid_w/4 per video) plus the rest of the prompt and
        max_new_tokens fit max_model_len (README, "Images and video")."""
        total = len(prepared.ids) + max_new_tokens
        if total <= self.max_model_len:
            return
        merge = self.cfg.thinker.vision.spatial_merge_size
        counts = {"image": 0, "video": 0}
        parts = []
        for v in prepared.vision:
            t, h, w = v.item.grid
            label = f"{v.item.kind} {counts[v.item.kind]}"
            counts[v.item.kind] += 1
            extra = f", {t * self.vision_preprocess.temporal_patch_size} frames" if v.item.kind == "video" else ""
            parts.append(f"{label}: {v.item.tokens(merge)} tokens ({h * self.vision_preprocess.patch_size}×"
                         f"{w * self.vision_preprocess.patch_size}{extra})")
        raise ValueError(f"the prompt is {len(prepared.ids)} tokens ({'; '.join(parts)}) + max_new_tokens "
                         f"{max_new_tokens} = {total}, over max_model_len {self.max_model_len}: pass fewer frames "
                         f"or smaller frames, or raise max_model_len")

    def _check_prompt(self, ids: list[int], audios: list[np.ndarray], speaking: bool) -> None:
        """What the engine would otherwise find out on its own thread: ids in the vocabulary, one audio token
        run per audio of the right length, and (for speech) an assistant turn to answer."""
        cfg = self.cfg
        vocab = cfg.thinker.text.vocab_size
        top = max(ids)
        if top >= vocab:
            raise ValueError(f"prompt token id {top} is outside the vocabulary [0, {vocab}) of the thinker")
        audio_id = cfg.thinker.audio_token_id
        pads = sum(1 for t in ids if t == audio_id)
        n_window = cfg.thinker.audio.n_window
        counts = [audio_mod.num_audio_tokens(audio_mod.num_frames(a.size), n_window) for a in audios]
        if pads != sum(counts):
            raise ValueError(f"the prompt has {pads} <|audio_pad|> tokens but its {len(audios)} audio(s) give "
                             f"{sum(counts)} ({counts}); expand each audio's pad run to its token count")
        if speaking:
            pair = (cfg.im_start_token_id, cfg.assistant_token_id)
            if not any((ids[i], ids[i + 1]) == pair for i in range(len(ids) - 1)):
                raise ValueError("a speech reply needs a prompt with an '<|im_start|>assistant' turn to answer "
                                 "(or call with return_audio=False)")

    def _resolve_prompt(self, prompt: Prompt | list[dict], use_audio_in_video: bool | None = None
                        ) -> PreparedPrompt:
        if use_audio_in_video is not None and not isinstance(use_audio_in_video, (bool, np.bool_)):
            raise TypeError(f"use_audio_in_video must be True, False or None, got {use_audio_in_video!r}")
        if isinstance(prompt, Prompt):
            return self._prompts.from_prompt(prompt, use_audio_in_video)
        if isinstance(prompt, list):
            return self._prompts.from_messages(prompt, use_audio_in_video)
        raise TypeError(f"prompt must be an omni_rt.Prompt or a list of chat messages, got {type(prompt).__name__}")


def _stop_unclosed(engine: Engine, profiler) -> None:
    """Finalizer of a Runtime that was never closed: garbage-collected, or still open at interpreter exit."""
    warnings.warn("an omni_rt.Runtime was not closed; its engine thread is stopped now (use `with "
                  "omni_rt.Runtime(...) as rt:` or rt.close())", ResourceWarning, stacklevel=2)
    engine.shutdown()
    if profiler is not None:
        profiler.stop()


def plan_kv_tokens(cfg: OmniConfig, free_bytes: int, dtype: torch.dtype, has_talker: bool, fraction: float,
                   block_size: int) -> int:
    """Thinker KV capacity in tokens for ``free_bytes`` of device memory left after the weights."""
    from .engine.kv_cache import plan_num_blocks

    tc = cfg.thinker.text
    # The talker's pools and activations come out of the same memory: keep a share for them.
    share = EngineConfig.talker_memory_share if has_talker else 1.0
    blocks = plan_num_blocks(int(free_bytes * share), tc.num_hidden_layers, block_size, tc.num_key_value_heads,
                             tc.head_dim, dtype, fraction)
    return blocks * block_size


def _seed(p: SamplingParams) -> int:
    return p.seed if p.seed is not None else random.getrandbits(63)
