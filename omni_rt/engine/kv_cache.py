"""Paged KV cache: per-layer K/V page tensors plus the block manager that hands pages to sequences.

One allocation ``kv: (2, num_layers, num_blocks, block_size, num_kv_heads, head_dim)`` holds every page, so
a copy-on-write of a block touches all layers in one indexed copy; ``k_caches[l]``/``v_caches[l]`` are
contiguous views ``(num_blocks, block_size, num_kv_heads, head_dim)`` of it.  Token slot ``s`` of layer
``l`` is ``k_caches[l].view(-1, num_kv_heads, head_dim)[s]`` with ``s = block * block_size + offset``.

Host bookkeeping runs in the block manager (C++ ``omni_rt._C`` when built, else the Python reference);
each per-step method fills a host int array through the buffer protocol and moves it to the device in one
copy, so nothing here loops over tokens in Python.  Works the same on CPU and CUDA tensors.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .._ext import load_ext

try:
    from omni_rt._C import OutOfBlocksError  # the block manager's own exception (a MemoryError)
except ImportError:  # _C not built: KVCachePool says how to build it
    class OutOfBlocksError(MemoryError):
        """Not enough free KV blocks for the request; the block manager's state is unchanged."""

__all__ = ["KVCachePool", "OutOfBlocksError", "kv_block_bytes", "plan_num_blocks"]


def kv_block_bytes(num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                   dtype: torch.dtype) -> int:
    """Bytes one block takes across all layers, K and V."""
    return 2 * num_layers * block_size * num_kv_heads * head_dim * dtype.itemsize


def plan_num_blocks(free_bytes: int, num_layers: int, block_size: int, num_kv_heads: int, head_dim: int,
                    dtype: torch.dtype, fraction: float = 0.9) -> int:
    """How many KV blocks fit in ``fraction`` of ``free_bytes``.

    Call it after the weights (and a warm-up forward) are resident, with ``free_bytes`` from
    ``torch.cuda.mem_get_info()[0]``: ``fraction`` plays the role of gpu_memory_utilization for what is
    left, keeping ``1 - fraction`` as headroom for activations and CUDA graphs.

    Raises ValueError when the arguments are invalid or not even one block fits.
    """
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    if free_bytes < 0:
        raise ValueError(f"free_bytes must be >= 0, got {free_bytes}")
    for name, v in (("num_layers", num_layers), ("block_size", block_size), ("num_kv_heads", num_kv_heads),
                    ("head_dim", head_dim)):
        if v < 1:
            raise ValueError(f"{name} must be >= 1, got {v}")
    per_block = kv_block_bytes(num_layers, block_size, num_kv_heads, head_dim, dtype)
    budget = int(free_bytes * fraction)
    n = min(budget // per_block, 2**31 - 1)
    if n < 1:
        raise ValueError(f"not enough memory for one KV block: {fraction:.2f} x {free_bytes / 2**20:.1f} MiB free "
                         f"= {budget / 2**20:.1f} MiB, one block ({num_layers} layers x {block_size} tokens x "
                         f"{num_kv_heads} kv heads x {head_dim} x K,V in {dtype}) needs {per_block / 2**20:.2f} MiB")
    return n


class KVCachePool:
    """KV pages for ``num_layers`` attention layers and the block manager that assigns them.

    Args:
        num_layers, num_blocks, block_size, num_kv_heads, head_dim: page geometry; the pool holds
            ``num_blocks * block_size`` token slots per layer.
        dtype, device: of the page tensors.
        manager: the block manager (default: the C++ ``omni_rt._C.BlockManager``; an ImportError naming the build
            command when it is not built). Tests pass the Python specification here.

    Attributes:
        kv: (2, num_layers, num_blocks, block_size, num_kv_heads, head_dim), zero-initialised so padded reads
            of never-written slots see finite values.
        k_caches, v_caches: per layer, (num_blocks, block_size, num_kv_heads, head_dim) views of ``kv``.
        manager: the block manager (interface: omni_rt._C.BlockManager).

    Per-step methods return device tensors: slot mappings int64, block tables and context lengths int32.
    Running out of blocks raises OutOfBlocksError (a MemoryError) and changes nothing.
    """

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                 manager=None) -> None:
        for name, v in (("num_layers", num_layers), ("block_size", block_size), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim)):
            if v < 1:
                raise ValueError(f"{name} must be >= 1, got {v}")
        self.manager = manager if manager is not None else load_ext().BlockManager(num_blocks, block_size)
        self.num_layers = num_layers
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.dtype = dtype
        self.device = torch.device(device)
        self.kv = torch.zeros((2, num_layers, num_blocks, block_size, num_kv_heads, head_dim),
                              dtype=dtype, device=self.device)
        self.k_caches = [self.kv[0, layer] for layer in range(num_layers)]
        self.v_caches = [self.kv[1, layer] for layer in range(num_layers)]

    def __repr__(self) -> str:
        return (f"KVCachePool(layers={self.num_layers}, blocks={self.num_blocks}, block_size={self.block_size}, "
                f"kv_heads={self.num_kv_heads}, head_dim={self.head_dim}, dtype={self.dtype}, "
                f"device={self.device}, free={self.num_free_blocks()})")

    @property
    def nbytes(self) -> int:
        return self.kv.numel() * self.kv.element_size()

    # -- capacity --------------------------------------------------------------------------------------
    def num_free_blocks(self) -> int:
        return self.manager.num_free_blocks()

    def num_used_blocks(self) -> int:
        return self.manager.num_used_blocks()

    def has_seq(self, seq_id: int) -> bool:
        return self.manager.has_seq(seq_id)

    def num_tokens(self, seq_id: int) -> int:
        return self.manager.num_tokens(seq_id)

    # -- lifecycle -------------------------------------------------------------------------------------
    def add_sequence(self, seq_id: int, prompt_len: int) -> torch.Tensor:
        """Allocate pages for a prompt; returns its slot mapping, int64 (prompt_len,) on the pool's device."""
        self.manager.allocate(seq_id, prompt_len)
        return self._slots([seq_id], prompt_len)

    def reserve(self, seq_id: int, num_tokens: int) -> None:
        """Add num_tokens tokens to seq_id, creating it if new (a prefill chunk); its slots: ``slot_mapping``."""
        if self.has_seq(seq_id):
            self._copy_blocks(self.manager.append(seq_id, num_tokens))
        else:
            self.manager.allocate(seq_id, num_tokens)

    def extend(self, seq_id: int, num_tokens: int) -> torch.Tensor:
        """Add num_tokens tokens to seq_id (a prefill chunk); returns their slots, int64 (num_tokens,)."""
        self._copy_blocks(self.manager.append(seq_id, num_tokens))
        return self._slots([seq_id], num_tokens)

    def append_token(self, seq_ids: Sequence[int], out: np.ndarray | None = None) -> torch.Tensor | np.ndarray:
        """One decode step: one new token per sequence (distinct ids), all or nothing.

        Copy-on-write pages are copied before returning.  Returns slots int64 (len(seq_ids),): row i is where
        seq_ids[i]'s new token's K/V go; with out (a host int64 array, e.g. a staging buffer) they are
        written into it, rows past the batch -1.
        """
        ids = list(seq_ids)
        self._copy_blocks(self.manager.append_batch(ids))
        if out is not None:
            self.manager.fill_slot_mapping(ids, out, -1)
            return out
        return self._slots(ids, len(ids))

    def truncate(self, seq_id: int, num_tokens: int) -> int:
        """Undo appends: keep seq_id's first num_tokens tokens (a failed step's rollback); returns blocks freed."""
        return len(self.manager.truncate(seq_id, num_tokens))

    def free(self, seq_id: int) -> int:
        """Release seq_id's pages; returns how many blocks became free (shared ones stay with their owners)."""
        return len(self.manager.free(seq_id))

    # -- per-step metadata -----------------------------------------------------------------------------
    def block_tables(self, seq_ids: Sequence[int], width: int | None = None, pad: int = -1,
                     out: torch.Tensor | None = None) -> torch.Tensor:
        """Block tables, int32 (len(seq_ids), width) padded with pad.

        width defaults to the longest table (at least 1).  With out (int32 (rows >= len(seq_ids), width), e.g.
        a CUDA-graph static buffer) the tables are written into it, rows past the batch all pad, and out is
        returned.
        """
        ids = list(seq_ids)
        if out is not None:
            host = out if isinstance(out, np.ndarray) else np.empty(tuple(out.shape), dtype=np.int32)
            self.manager.fill_block_tables(ids, host, pad)
            return self._put(host, out)
        if width is None:
            width = max([1] + [self.manager.blocks_for_tokens(self.manager.num_tokens(i)) for i in ids])
        host = np.empty((len(ids), width), dtype=np.int32)
        self.manager.fill_block_tables(ids, host, pad)
        return self._put(host)

    def context_lens(self, seq_ids: Sequence[int], out: torch.Tensor | None = None) -> torch.Tensor:
        """Tokens held per sequence (including any just appended), int32 (len(seq_ids),); with out, written
        into it (entries past the batch = 0) and out returned."""
        ids = list(seq_ids)
        host = out if isinstance(out, np.ndarray) else np.empty(len(ids) if out is None else out.shape[0],
                                                                 dtype=np.int32)
        self.manager.fill_context_lens(ids, host, 0)
        return self._put(host, out)

    def slot_mapping(self, seq_ids: Sequence[int], out: torch.Tensor | None = None, pad: int = -1) -> torch.Tensor:
        """Slots of every token the last step of each of seq_ids added, back to back, int64; with out
        (int64 (n,) with n >= that count) written into it, the rest pad, and out returned."""
        ids = list(seq_ids)
        if out is not None:
            host = out if isinstance(out, np.ndarray) else np.empty(out.shape[0], dtype=np.int64)
            self.manager.fill_slot_mapping(ids, host, pad)
            return self._put(host, out)
        return self._slots(ids, sum(self.manager.num_last_tokens(i) for i in ids))

    # -- internals -------------------------------------------------------------------------------------
    def _put(self, host: np.ndarray, out: torch.Tensor | None = None) -> torch.Tensor:
        """Host metadata → the device without blocking the host: pinned staging + non_blocking copy on CUDA
        (an ``out`` that is itself a host array was filled in place)."""
        if isinstance(out, np.ndarray):
            return out
        t = torch.from_numpy(host)
        if self.device.type == "cuda":
            t = t.pin_memory()
        if out is not None:
            return out.copy_(t, non_blocking=True)
        return t.to(self.device, non_blocking=True)

    def _slots(self, ids: list[int], count: int) -> torch.Tensor:
        host = np.empty(count, dtype=np.int64)
        self.manager.fill_slot_mapping(ids, host, -1)
        return self._put(host)

    def _copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        if not pairs:
            return
        idx = self._put(np.asarray(pairs, dtype=np.int64))
        # Sources and destinations never overlap (destinations are fresh blocks), so gather-then-scatter is exact.
        self.kv[:, :, idx[:, 1]] = self.kv.index_select(2, idx[:, 0])
