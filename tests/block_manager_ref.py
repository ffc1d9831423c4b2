"""Paged-KV block manager: which KV page (block) holds which token of which sequence.

``PyBlockManager`` is the specification: the oracle the package's one block manager, ``omni_rt._C.BlockManager``
(csrc/), is checked against — both hand out the same block ids for the same operations (tests replay random
operation sequences on both).

Model
-----
- The pool has ``num_blocks`` blocks of ``block_size`` token slots.  Token position ``p`` of a sequence
  lives in slot ``table[p // block_size] * block_size + p % block_size``; a sequence of ``n`` tokens holds
  exactly ``ceil(n / block_size)`` blocks.
- Free blocks form a stack: a fresh pool hands out 0, 1, 2, ...; ``free`` pushes a table back last-to-first,
  so the next allocation gets the same blocks in the same order.
- Blocks are ref-counted.  ``fork(parent, child)`` shares all of the parent's blocks.  Whoever writes next
  into a shared, partially filled last block first moves onto a fresh block: the write returns the
  ``(src, dst)`` block pair whose page contents the caller copies before writing the new tokens' KV
  (copy-on-write).  The last remaining holder writes in place.
- The "last step" of a sequence is its most recent ``allocate``/``append``/``append_batch``;
  ``slot_mapping`` gives the slots of the tokens it added (``fork`` leaves the child an empty last step).
- Every mutating call succeeds completely or raises with the state unchanged.

Errors: out of blocks → ``OutOfBlocksError`` (a ``MemoryError``; message "out of KV blocks: need N, M free
of T"); an id that is not allocated (never, or already freed: double free) → ``KeyError``; bad arguments
(negative counts, an id allocated twice, duplicate ids in a batch, a buffer of the wrong dtype/size) →
``ValueError``.

Counts are methods (``num_free_blocks()``, ``num_used_blocks()``, ``num_seqs()``); ``num_blocks`` and
``block_size`` are read-only attributes.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from omni_rt.engine.kv_cache import OutOfBlocksError  # one exception class for both implementations

__all__ = ["OutOfBlocksError", "PyBlockManager"]

_INT32_MAX = 2**31 - 1


class _Seq:
    __slots__ = ("blocks", "num_tokens", "last_start", "last_count")

    def __init__(self) -> None:
        self.blocks: list[int] = []
        self.num_tokens = 0
        self.last_start = 0
        self.last_count = 0


def _writable_int_array(out, name: str, ndim: int, itemsizes: tuple[int, ...]) -> np.ndarray:
    try:
        arr = np.asarray(out)
    except Exception as e:
        raise ValueError(f"{name} must be a writable buffer (e.g. a numpy array): {e}") from None
    if not arr.flags.writeable:
        raise ValueError(f"{name} must be a writable buffer (e.g. a numpy array)")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got ndim={arr.ndim}")
    if arr.dtype.kind != "i" or arr.dtype.itemsize not in itemsizes:
        want = " or ".join(f"int{8 * s}" for s in itemsizes)
        raise ValueError(f"{name} must hold {want}, got dtype {arr.dtype}")
    return arr


class PyBlockManager:
    """Pure-Python paged-KV block manager (the specification of ``omni_rt._C.BlockManager``).

    Args:
        num_blocks: blocks in the pool, in [0, 2**31 - 1] (block ids travel as int32).
        block_size: token slots per block, >= 1.
    """

    def __init__(self, num_blocks: int, block_size: int) -> None:
        num_blocks, block_size = int(num_blocks), int(block_size)
        if not 0 <= num_blocks <= _INT32_MAX:
            raise ValueError(f"num_blocks must be in [0, 2**31 - 1], got {num_blocks}")
        if not 1 <= block_size <= 2**30:
            raise ValueError(f"block_size must be in [1, 2**30], got {block_size}")
        self._num_blocks = num_blocks
        self._block_size = block_size
        self._free = list(range(num_blocks - 1, -1, -1))  # stack: pop() is handed out next
        self._ref = [0] * num_blocks
        self._seqs: dict[int, _Seq] = {}

    # -- counts ----------------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self._num_blocks

    @property
    def block_size(self) -> int:
        return self._block_size

    def num_free_blocks(self) -> int:
        return len(self._free)

    def num_used_blocks(self) -> int:
        return self._num_blocks - len(self._free)

    def num_seqs(self) -> int:
        return len(self._seqs)

    def has_seq(self, seq_id: int) -> bool:
        return int(seq_id) in self._seqs

    def seq_ids(self) -> list[int]:
        """Allocated sequence ids, ascending."""
        return sorted(self._seqs)

    def ref_count(self, block: int) -> int:
        if not 0 <= block < self._num_blocks:
            raise ValueError(f"block id {block} out of range [0, {self._num_blocks})")
        return self._ref[block]

    def __repr__(self) -> str:
        return (f"PyBlockManager(num_blocks={self._num_blocks}, block_size={self._block_size}, "
                f"free={len(self._free)}, seqs={len(self._seqs)})")

    # -- capacity checks -------------------------------------------------------------------------------
    def blocks_for_tokens(self, num_tokens: int) -> int:
        """Blocks a new sequence of num_tokens tokens takes."""
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        return -(-num_tokens // self._block_size)

    def can_allocate(self, num_tokens: int) -> bool:
        return self.blocks_for_tokens(num_tokens) <= len(self._free)

    def _blocks_to_append(self, s: _Seq, num_tokens: int) -> int:
        if num_tokens < 0:
            raise ValueError(f"num_tokens must be >= 0, got {num_tokens}")
        if num_tokens == 0:
            return 0
        # All holders of a block have the same tokens in it (shared blocks are written only after a COW),
        # so a shared partial last block always needs this sequence's own copy first.
        cow = s.num_tokens % self._block_size != 0 and self._ref[s.blocks[-1]] > 1
        return self.blocks_for_tokens(s.num_tokens + num_tokens) - len(s.blocks) + int(cow)

    def blocks_to_append(self, seq_id: int, num_tokens: int = 1) -> int:
        """Blocks appending num_tokens to seq_id takes (new blocks + a copy-on-write block)."""
        return self._blocks_to_append(self._get(seq_id), num_tokens)

    def can_append(self, seq_id: int, num_tokens: int = 1) -> bool:
        return self.blocks_to_append(seq_id, num_tokens) <= len(self._free)

    def blocks_to_append_batch(self, seq_ids: Sequence[int]) -> int:
        """Blocks a one-token append to each of seq_ids (distinct) takes, COW sharing counted exactly."""
        self._check_distinct(seq_ids)
        need = 0
        # k sharers of one partial block with ref count r: each COW lowers r, the last holder writes in
        # place, so they take min(k, r - 1) new blocks.
        sharers: dict[int, int] = {}
        for seq_id in seq_ids:
            s = self._get(seq_id)
            if s.num_tokens % self._block_size == 0:
                need += 1
            elif self._ref[s.blocks[-1]] > 1:
                sharers[s.blocks[-1]] = sharers.get(s.blocks[-1], 0) + 1
        for block, k in sharers.items():
            need += min(k, self._ref[block] - 1)
        return need

    def can_append_batch(self, seq_ids: Sequence[int]) -> bool:
        return self.blocks_to_append_batch(seq_ids) <= len(self._free)

    # -- mutations -------------------------------------------------------------------------------------
    def allocate(self, seq_id: int, num_tokens: int) -> None:
        """Create seq_id holding num_tokens tokens (its last step = those tokens)."""
        seq_id = int(seq_id)
        need = self.blocks_for_tokens(num_tokens)
        if seq_id in self._seqs:
            raise ValueError(f"sequence {seq_id} is already allocated")
        self._require_free(need)
        s = _Seq()
        self._seqs[seq_id] = s
        self._append_unchecked(s, num_tokens, [])

    def append(self, seq_id: int, num_tokens: int = 1) -> list[tuple[int, int]]:
        """Append num_tokens to seq_id; returns the (src, dst) blocks to copy before writing their KV."""
        s = self._get(seq_id)
        self._require_free(self._blocks_to_append(s, num_tokens))
        copies: list[tuple[int, int]] = []
        self._append_unchecked(s, num_tokens, copies)
        return copies

    def append_batch(self, seq_ids: Sequence[int]) -> list[tuple[int, int]]:
        """Append one token to each of seq_ids (distinct), all or nothing; COW pairs in batch order."""
        self._require_free(self.blocks_to_append_batch(seq_ids))
        copies: list[tuple[int, int]] = []
        for seq_id in seq_ids:
            self._append_unchecked(self._seqs[int(seq_id)], 1, copies)
        return copies

    def fork(self, parent_id: int, child_id: int) -> None:
        """child_id shares every block of parent_id (prefix sharing); its last step is empty."""
        parent = self._get(parent_id)
        child_id = int(child_id)
        if child_id in self._seqs:
            raise ValueError(f"fork target sequence {child_id} is already allocated")
        child = _Seq()
        child.blocks = list(parent.blocks)
        child.num_tokens = child.last_start = parent.num_tokens
        for b in child.blocks:
            self._ref[b] += 1
        self._seqs[child_id] = child

    def free(self, seq_id: int) -> list[int]:
        """Drop seq_id; returns the blocks that became free (ref count reached zero), in table order."""
        seq_id = int(seq_id)
        s = self._seqs.get(seq_id)
        if s is None:
            raise KeyError(f"cannot free sequence {seq_id}: not allocated (never allocated or already freed)")
        freed = []
        for b in reversed(s.blocks):
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free.append(b)
                freed.append(b)
        del self._seqs[seq_id]
        freed.reverse()
        return freed

    def truncate(self, seq_id: int, num_tokens: int) -> list[int]:
        """Shrink seq_id to its first num_tokens tokens (undo of appends); frees the blocks past them
        last-to-first, leaves an empty last step; returns the freed blocks in table order."""
        s = self._get(seq_id)
        if not 0 <= num_tokens <= s.num_tokens:
            raise ValueError(f"truncate: num_tokens must be in [0, {s.num_tokens}], got {num_tokens}")
        keep = self.blocks_for_tokens(num_tokens)
        freed = []
        while len(s.blocks) > keep:
            b = s.blocks.pop()
            self._ref[b] -= 1
            if self._ref[b] == 0:
                self._free.append(b)
                freed.append(b)
        freed.reverse()
        s.num_tokens, s.last_start, s.last_count = num_tokens, num_tokens, 0
        return freed

    # -- queries ---------------------------------------------------------------------------------------
    def block_table(self, seq_id: int) -> list[int]:
        return list(self._get(seq_id).blocks)

    def num_tokens(self, seq_id: int) -> int:
        return self._get(seq_id).num_tokens

    def num_last_tokens(self, seq_id: int) -> int:
        return self._get(seq_id).last_count

    def slot_mapping(self, seq_id: int) -> list[int]:
        """Slots of the tokens added by seq_id's last step."""
        s = self._get(seq_id)
        bs = self._block_size
        return [s.blocks[p // bs] * bs + p % bs for p in range(s.last_start, s.last_start + s.last_count)]

    def fill_block_tables(self, seq_ids: Sequence[int], out, pad: int = -1) -> None:
        """out: int32 (rows >= len(seq_ids), max_blocks). Row i = table of seq_ids[i] padded; later rows = pad."""
        arr = _writable_int_array(out, "out", 2, (4,))
        if len(seq_ids) > arr.shape[0]:
            raise ValueError(f"block table buffer has {arr.shape[0]} rows for {len(seq_ids)} sequences")
        tables = []
        for seq_id in seq_ids:
            blocks = self._get(seq_id).blocks
            if len(blocks) > arr.shape[1]:
                raise ValueError(f"block table of sequence {int(seq_id)} has {len(blocks)} blocks, the buffer only "
                                 f"{arr.shape[1]} columns")
            tables.append(blocks)
        arr[...] = pad
        for i, blocks in enumerate(tables):
            arr[i, :len(blocks)] = blocks

    def fill_slot_mapping(self, seq_ids: Sequence[int], out, pad: int = -1) -> int:
        """out: int64 or int32 (n,). Writes the last-step slots of seq_ids back to back, pads the rest;
        returns the number of slots written."""
        arr = _writable_int_array(out, "out", 1, (8, 4))
        if self._num_blocks * self._block_size > np.iinfo(arr.dtype).max:
            raise ValueError(f"slot ids of this pool ({self._num_blocks} blocks x {self._block_size}) overflow the "
                             f"slot buffer's integer type")
        slots = [slot for seq_id in seq_ids for slot in self.slot_mapping(seq_id)]
        if len(slots) > arr.shape[0]:
            raise ValueError(f"slot buffer has {arr.shape[0]} entries for {len(slots)} slots")
        arr[...] = pad
        arr[:len(slots)] = slots
        return len(slots)

    def fill_context_lens(self, seq_ids: Sequence[int], out, pad: int = 0) -> None:
        """out: int32 (n >= len(seq_ids),). out[i] = num_tokens(seq_ids[i]); the rest = pad."""
        arr = _writable_int_array(out, "out", 1, (4,))
        if len(seq_ids) > arr.shape[0]:
            raise ValueError(f"context length buffer has {arr.shape[0]} entries for {len(seq_ids)} sequences")
        lens = [self._get(seq_id).num_tokens for seq_id in seq_ids]
        arr[...] = pad
        arr[:len(lens)] = lens

    # -- internals -------------------------------------------------------------------------------------
    def _get(self, seq_id: int) -> _Seq:
        s = self._seqs.get(int(seq_id))
        if s is None:
            raise KeyError(f"sequence {int(seq_id)} is not allocated (never allocated or already freed)")
        return s

    def _check_distinct(self, seq_ids: Sequence[int]) -> None:
        seen = set()
        for seq_id in seq_ids:
            if int(seq_id) in seen:
                raise ValueError(f"sequence {int(seq_id)} appears twice in one batch")
            seen.add(int(seq_id))

    def _require_free(self, need: int) -> None:
        if need > len(self._free):
            raise OutOfBlocksError(f"out of KV blocks: need {need}, {len(self._free)} free of {self._num_blocks}")

    def _take_block(self) -> int:
        b = self._free.pop()
        self._ref[b] = 1
        return b

    def _append_unchecked(self, s: _Seq, num_tokens: int, copies: list[tuple[int, int]]) -> None:
        s.last_start, s.last_count = s.num_tokens, num_tokens
        if num_tokens == 0:
            return
        if s.num_tokens % self._block_size != 0 and self._ref[s.blocks[-1]] > 1:
            src = s.blocks[-1]
            dst = self._take_block()
            self._ref[src] -= 1
            s.blocks[-1] = dst
            copies.append((src, dst))
        total = self.blocks_for_tokens(s.num_tokens + num_tokens)
        while len(s.blocks) < total:
            s.blocks.append(self._take_block())
        s.num_tokens += num_tokens
