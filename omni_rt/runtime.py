"""Runtime: the public entry point (see api.md). Owns the engine thread; generate/stream/astream/abort.

    rt = omni_rt.Runtime("path/to/checkpoint")
    out = rt.generate(messages_or_prompt, speaker="ethan")
    for chunk in rt.stream(messages_or_prompt): ...
"""
from __future__ import annotations

import asyncio
import os
import random
import time
from typing import Any, AsyncIterator, Callable, Iterator

import numpy as np
import torch

from . import audio as audio_mod
from . import vision as vision_mod
from .config import OmniConfig
from .engine.engine import Engine
from .engine.requests import EngineRequest
from .engine.text_output import TextOutput
from .models.omni import OmniModel, load_model
from .profiling import TorchProfiler
from .request import GenerationOutput, Prompt, SamplingParams, StreamChunk, new_request_id
from .prompting import PreparedPrompt, PromptBuilder
from .tokenizer import IncrementalDetokenizer, OmniTokenizer, TokenizerMissing


def _default_device(device: str | torch.device | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
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
    """

    def __init__(self, model: str | os.PathLike | OmniModel, device: str | torch.device | None = None,
                 dtype: torch.dtype | None = None, cuda_graphs: bool = True, max_batch_size: int = 8,
                 gpu_memory_utilization: float = 0.9, max_model_len: int | None = None,
                 kv_cache_tokens: int | None = None, kv_block_size: int = 16, max_prefill_tokens: int = 4096,
                 first_chunk_frames: int = 1, profile_dir: str | os.PathLike | None = None,
                 progress: Callable[[str], None] | None = None, quantization: str | None = None):
        self.device = _default_device(device)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        if self.dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise ValueError(f"dtype must be float32, float16 or bfloat16, got {self.dtype}")
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        if first_chunk_frames < 1:
            raise ValueError(f"first_chunk_frames must be >= 1, got {first_chunk_frames}")
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
                                    quantization=quantization)
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
        self.max_model_len = max_model_len or min(tc.max_position_embeddings, 32768)
        if kv_cache_tokens is None:
            kv_cache_tokens = self._plan_kv_tokens(max_batch_size, gpu_memory_utilization, kv_block_size)
        speech_factory = None
        if self.model.has_talker:
            from .engine.speech_stage import SpeechStage

            speech_factory = lambda engine: SpeechStage(engine, first_chunk_frames=first_chunk_frames)  # noqa: E731
        self.engine = Engine(self.model, self.device, self.dtype, max_batch_size, kv_cache_tokens, kv_block_size,
                             max_prefill_tokens, self.max_model_len, speech_factory=speech_factory,
                             cuda_graphs=self.cuda_graphs)
        self._profiler = TorchProfiler(profile_dir) if profile_dir else None
        if self._profiler:
            self._profiler.start()
        self.engine.start()

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
        return self.model.has_talker

    @property
    def speakers(self) -> list[str]:
        """This checkpoint's voices, lower case ([] without a talker)."""
        return sorted(k.lower() for k in self.cfg.talker.speaker_id) if self.has_talker else []

    def stats(self) -> dict:
        """Cheap, thread-safe counters (api.md): KV blocks free/total (thinker and talker), speech slots
        free/total, requests running and waiting, and the sticky device fault (None or its message)."""
        e = self.engine
        speech = e.speech
        fault = e.fault
        return {
            "kv_free_blocks": e.pool.num_free_blocks(),
            "kv_total_blocks": e.pool.num_blocks,
            "talker_kv_free_blocks": speech.pool.num_free_blocks() if speech is not None else 0,
            "talker_kv_total_blocks": speech.pool.num_blocks if speech is not None else 0,
            "speech_slots_free": len(speech.slots) if speech is not None else 0,
            "speech_slots_total": e.max_batch_size if speech is not None else 0,
            "running": len(e.running),
            "waiting": len(e.waiting),
            "fault": None if fault is None else f"{type(fault).__name__}: {fault}",
        }

    def close(self) -> None:
        """Stop the engine thread (requests in flight are not finished)."""
        self.engine.shutdown()
        if self._profiler:
            self._profiler.stop()
            self._profiler = None

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def encode_audio(self, wav_16k: np.ndarray | str | os.PathLike) -> torch.Tensor:
        """The AuT encoder output for one audio: (n_tokens, output_dim)."""
        wav = audio_mod.load(wav_16k) if not isinstance(wav_16k, np.ndarray) else wav_16k
        mel = audio_mod.log_mel(wav, device=self.device)
        with torch.inference_mode():
            return self.model.thinker.audio_tower(mel.to(self.dtype), [mel.shape[1]])

    def memory(self) -> dict[str, int]:
        """Weight bytes per component as loaded (actual dtypes: FP8 codes and scales where kept): thinker,
        audio_tower, vision (when the checkpoint has one), talker, code_predictor, code2wav (absent without a
        talker), and total."""
        return self.model.weight_memory()

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
        visual = self.model.thinker.visual
        if visual is None:
            raise ValueError(f"{what}: this checkpoint has no vision tower (thinker_config.vision_config is "
                             f"absent), so it cannot take images or video")
        return visual

    def stage_times(self, reset: bool = False) -> dict[str, float]:
        """Engine wall time per stage in ms, summed since the start (or the last reset)."""
        snap = self.engine.timer.snapshot()
        if reset:
            self.engine.timer.reset()
        return snap

    def abort(self, request_id: str) -> bool:
        """Cancel a request in flight; its KV blocks and decoder state are freed at the engine's next step."""
        return self.engine.abort(request_id)

    def generate(self, prompt: Prompt | list[dict], speaker: str = "ethan", return_audio: bool | None = None,
                 thinker: SamplingParams | None = None, talker: SamplingParams | None = None,
                 request_id: str | None = None, use_audio_in_video: bool | None = None) -> GenerationOutput:
        """Run one request to completion; returns text, token ids, codes, audio and metrics.

        use_audio_in_video: a video file's own audio track is heard too, interleaved by time (chat messages;
        a Prompt carries its own flag)."""
        text, ids, audio, reasoning = [], [], [], []
        last = None
        req_holder: list[EngineRequest] = []
        for chunk in self._stream(prompt, speaker, return_audio, thinker, talker, request_id, req_holder,
                                  use_audio_in_video):
            text.append(chunk.text_delta)
            reasoning.append(chunk.reasoning_delta)
            ids.extend(chunk.token_ids)
            if chunk.audio.size:
                audio.append(chunk.audio)
            last = chunk
        req = req_holder[0]
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
               request_id: str | None = None, use_audio_in_video: bool | None = None) -> Iterator[StreamChunk]:
        """Yield chunks (text deltas, audio, finished) as they are produced; leaving the loop aborts."""
        return self._stream(prompt, speaker, return_audio, thinker, talker, request_id, [], use_audio_in_video)

    async def astream(self, prompt: Prompt | list[dict], speaker: str = "ethan", return_audio: bool | None = None,
                      thinker: SamplingParams | None = None, talker: SamplingParams | None = None,
                      request_id: str | None = None, use_audio_in_video: bool | None = None
                      ) -> AsyncIterator[StreamChunk]:
        """Async ``stream``; cancelling the consuming task aborts the request."""
        t_call = time.perf_counter()
        req = self._make_request(prompt, speaker, return_audio, thinker, talker, request_id, use_audio_in_video)
        req.t_submit = t_call
        self.engine.submit(req)
        loop = asyncio.get_running_loop()
        done = False
        try:
            while not done:
                chunk = await loop.run_in_executor(None, req.out.get)
                done = _check_chunk(chunk)
                yield chunk
        finally:
            if not done:  # the task was cancelled or the consumer stopped early: cancel the request
                self.engine.abort(req.request_id)

    # ------------------------------------------------------------------------------------------ internals
    def _stream(self, prompt, speaker, return_audio, thinker, talker, request_id,
                holder: list, use_audio_in_video: bool | None = None) -> Iterator[StreamChunk]:
        t_call = time.perf_counter()
        req = self._make_request(prompt, speaker, return_audio, thinker, talker, request_id, use_audio_in_video)
        req.t_submit = t_call  # metrics count from the call (audio loading and tokenizing included)
        holder.append(req)
        self.engine.submit(req)
        return self._drain(req)

    def _drain(self, req: EngineRequest) -> Iterator[StreamChunk]:
        done = False
        try:
            while not done:
                chunk = req.out.get()
                done = _check_chunk(chunk)
                yield chunk
        finally:
            if not done:  # the caller left the loop early (or the generator was closed): cancel
                self.engine.abort(req.request_id)

    def _make_request(self, prompt, speaker, return_audio, thinker, talker, request_id,
                      use_audio_in_video: bool | None = None) -> EngineRequest:
        if return_audio is None:
            return_audio = self.has_talker
        if return_audio and not self.has_talker:
            raise ValueError("this checkpoint has no talker/code2wav (text-only model): call with "
                             "return_audio=False")
        speaker_id = self.cfg.talker.speaker(speaker) if return_audio else None
        prepared = self._resolve_prompt(prompt, use_audio_in_video)
        ids, audios = prepared.ids, prepared.audios
        thinker_p = (thinker or SamplingParams()).resolved("thinker")
        talker_p = (talker or SamplingParams()).resolved("talker") if return_audio else None
        if request_id is None:
            request_id = new_request_id()
        elif not isinstance(request_id, str) or not request_id:
            raise ValueError("request_id must be a non-empty string")
        stop = thinker_p.stop_token_ids if thinker_p.stop_token_ids is not None else [self.cfg.im_end_token_id]
        return EngineRequest(
            request_id=request_id, prompt=ids, audios=audios, thinker_params=thinker_p, talker_params=talker_p,
            speaker_id=speaker_id, thinker_stop_ids=frozenset(int(t) for t in stop),
            thinker_seed=thinker_p.seed if thinker_p.seed is not None else random.getrandbits(63),
            talker_seed=(talker_p.seed if talker_p and talker_p.seed is not None else random.getrandbits(63)),
            detok=IncrementalDetokenizer(self.tokenizer), text_out=self._text_output(ids, thinker_p),
            vision=prepared.vision)

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

    def _resolve_prompt(self, prompt: Prompt | list[dict], use_audio_in_video: bool | None = None
                        ) -> PreparedPrompt:
        if use_audio_in_video is not None and not isinstance(use_audio_in_video, (bool, np.bool_)):
            raise ValueError(f"use_audio_in_video must be a bool, got {use_audio_in_video!r}")
        if isinstance(prompt, Prompt):
            return self._prompts.from_prompt(prompt, use_audio_in_video)
        if isinstance(prompt, list):
            return self._prompts.from_messages(prompt, use_audio_in_video)
        raise ValueError(f"prompt must be an omni_rt.Prompt or a list of chat messages, got {type(prompt).__name__}")


def plan_kv_tokens(cfg: OmniConfig, free_bytes: int, dtype: torch.dtype, has_talker: bool, fraction: float,
                   block_size: int) -> int:
    """Thinker KV capacity in tokens for ``free_bytes`` of device memory left after the weights."""
    from .engine.kv_cache import plan_num_blocks

    tc = cfg.thinker.text
    # The talker's pools and activations come out of the same memory: keep a share for them.
    share = 0.8 if has_talker else 1.0
    blocks = plan_num_blocks(int(free_bytes * share), tc.num_hidden_layers, block_size, tc.num_key_value_heads,
                             tc.head_dim, dtype, fraction)
    return blocks * block_size


def _check_chunk(chunk: StreamChunk) -> bool:
    """Raise the request's error if the chunk carries one; else whether it is the last chunk."""
    if chunk.error is not None:
        raise chunk.error
    return chunk.finished
