"""EngineConfig: the engine's settings as one validated dataclass (built by the Runtime from its keywords)."""
from __future__ import annotations

import dataclasses
import numbers


def _int(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an integer, got {type(value).__name__} {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


def _fraction(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
    if not 0 < value <= 1:
        raise ValueError(f"{name} must be in (0, 1], got {value}")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """What the engine needs to know, validated at construction (TypeError / ValueError naming the field).

    max_batch_size: requests decoded together (also the number of speech slots).
    max_model_len: longest prompt + thinker max_new_tokens accepted.
    max_prefill_tokens: the one token budget per engine step shared by thinker and talker prefill chunks.
    kv_block_size: tokens per KV page. kv_cache_tokens: thinker KV capacity in tokens (the talker pool gets
    the same number of blocks).
    first_chunk_frames: talker frames decoded before the first audio packet is sent.
    cuda_graphs: capture per-token paths (only honoured on CUDA).
    gpu_memory_utilization: share of the memory left after the weights that KV pages may take;
    talker_memory_share: share of that kept for the thinker pool when a talker exists (the talker's pool and
    activations come out of the rest).
    """

    max_batch_size: int = 8
    max_model_len: int = 32768
    max_prefill_tokens: int = 4096
    kv_block_size: int = 16
    kv_cache_tokens: int = 262144
    first_chunk_frames: int = 1
    cuda_graphs: bool = False
    gpu_memory_utilization: float = 0.9
    talker_memory_share: float = 0.8

    def __post_init__(self):
        for name, low in (("max_batch_size", 1), ("max_model_len", 1), ("max_prefill_tokens", 1),
                          ("kv_block_size", 1), ("kv_cache_tokens", 1), ("first_chunk_frames", 1)):
            _int(name, getattr(self, name), low)
        if not isinstance(self.cuda_graphs, bool):
            raise TypeError(f"cuda_graphs must be a bool, got {type(self.cuda_graphs).__name__}")
        _fraction("gpu_memory_utilization", self.gpu_memory_utilization)
        _fraction("talker_memory_share", self.talker_memory_share)

    @property
    def kv_blocks(self) -> int:
        """KV blocks per pool (at least one)."""
        return max(1, -(-self.kv_cache_tokens // self.kv_block_size))
