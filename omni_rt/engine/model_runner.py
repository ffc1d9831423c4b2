"""Runs a paged-KV decoder (thinker or talker) for batches of sequences: chunked varlen prefill and decode.

The runner owns the mapping from sequences to KV pages (through ``KVCachePool``) and builds the attention
metadata for each forward; the model only computes. Prefill chunks of up to ``PREFILL_GRAPH_TOKENS`` tokens run
in bucketed token-count shapes through ``graphs.PrefillGraphs`` (pad tokens on slot -1; one CUDA graph per
bucket on a GPU); longer chunks and chunks carrying deepstack features run eagerly at their length. Decode
builds only device tensors of fixed shape per batch size (captured by ``graphs.ThinkerDecodeGraphs``).
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..models.layers import AttentionMetadata, text_positions  # noqa: F401 - text_positions re-exported
from .kv_cache import KVCachePool, OutOfBlocksError

# forward(embeds (tokens, H), positions (3, tokens), kv_caches, meta, tap_layer) -> (normed (tokens, H), tap)
ForwardFn = Callable[..., tuple[torch.Tensor, torch.Tensor | None]]


def _deepstack_chunk(items: list, starts: list[int], lens: list[int], device
                     ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The packed batch's visual mask and per-tap feature rows for tokens [start, start + len) of each item."""
    masks, feats = [], None
    for item, s, n in zip(items, starts, lens):
        if item is None:
            masks.append(torch.zeros(n, dtype=torch.bool, device=device))
            continue
        mask, taps = item
        before = int(mask[:s].sum())
        inside = mask[s: s + n]
        count = int(inside.sum())
        masks.append(inside.to(device))
        if feats is None:
            feats = [[] for _ in taps]
        for k, t in enumerate(taps):
            feats[k].append(t[before: before + count])
    return torch.cat(masks), [torch.cat(f) for f in (feats or [])]


class DecoderRunner:
    """Prefill/decode for one decoder over its own KV pool."""

    def __init__(self, forward: ForwardFn, pool: KVCachePool, max_prefill_tokens: int = 8192, graphs=None):
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens must be >= 1, got {max_prefill_tokens}")
        self.forward = forward
        self.pool = pool
        self.max_prefill_tokens = max_prefill_tokens
        self.graphs = graphs   # graphs.PrefillGraphs: chunks in bucketed token shapes (None: always eager)

    @property
    def kv_caches(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return list(zip(self.pool.k_caches, self.pool.v_caches))

    def prefill(self, seq_ids: Sequence[int], embeds: Sequence[torch.Tensor], positions: Sequence[torch.Tensor],
                tap_layer: int | None = None, deepstack: Sequence | None = None
                ) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Append each sequence's tokens to its KV (creating the sequence if new) and run them.

        embeds[i]: (n_i, H); positions[i]: (3, n_i). Long inputs are split in chunks so one forward holds at
        most ``max_prefill_tokens`` tokens; later chunks read earlier ones from the pages (chunked prefill).
        Returns per sequence the normed hidden states (n_i, H) and the tapped hidden states (n_i, H) or None.
        deepstack[i] (thinker only): None or (visual mask (n_i,) bool, [features (mask.sum(), H)] per tap) for
        sequence i's tokens; each chunk gets its slice, so a chunk boundary may fall inside an image.
        """
        ids = list(seq_ids)
        if len(ids) != len(embeds) or len(ids) != len(positions):
            raise ValueError("seq_ids, embeds and positions must have the same length")
        self._check_room(ids, [e.shape[0] for e in embeds])
        outs: list[list[torch.Tensor]] = [[] for _ in ids]
        taps: list[list[torch.Tensor]] = [[] for _ in ids]
        done = [0] * len(ids)
        while any(done[j] < embeds[j].shape[0] for j in range(len(ids))):
            budget = self.max_prefill_tokens
            batch, chunk_lens = [], []
            for j in range(len(ids)):
                left = embeds[j].shape[0] - done[j]
                if left <= 0 or budget <= 0:
                    continue
                n = min(left, budget)
                budget -= n
                batch.append(j)
                chunk_lens.append(n)
            batch_ids = [ids[j] for j in batch]
            for sid, n in zip(batch_ids, chunk_lens):
                self.pool.reserve(sid, n)
            x = torch.cat([embeds[j][done[j]: done[j] + n] for j, n in zip(batch, chunk_lens)])
            pos = torch.cat([positions[j][:, done[j]: done[j] + n] for j, n in zip(batch, chunk_lens)], dim=1)
            extra = {}
            if deepstack is not None and any(deepstack[j] is not None for j in batch):
                extra["deepstack"] = _deepstack_chunk([deepstack[j] for j in batch],
                                                      [done[j] for j in batch], chunk_lens, x.device)
            if self.graphs is not None and not extra and self.graphs.fits(len(batch), tap_layer):
                hidden, tap = self.graphs.run(batch_ids, chunk_lens, x, pos)
                tap = tap if tap_layer is not None else None
            else:   # deepstack features (data-dependent shapes) or a layout the buffers do not hold: eager
                cu = torch.tensor([0] + chunk_lens, dtype=torch.int32).cumsum(0).to(torch.int32)
                meta = AttentionMetadata(
                    slot_mapping=self.pool.slot_mapping(batch_ids), block_tables=self.pool.block_tables(batch_ids),
                    context_lens=self.pool.context_lens(batch_ids), cu_seqlens_q=cu.to(x.device),
                    max_query_len=max(chunk_lens))
                hidden, tap = self.forward(x, pos, self.kv_caches, meta, tap_layer, **extra)
            offset = 0
            for j, n in zip(batch, chunk_lens):
                outs[j].append(hidden[offset: offset + n])
                if tap is not None:
                    taps[j].append(tap[offset: offset + n])
                offset += n
                done[j] += n
        return ([torch.cat(o) if o else embeds[j][:0] for j, o in enumerate(outs)],
                [torch.cat(t) if t else None for t in taps])

    def _check_room(self, ids: list[int], counts: list[int]) -> None:
        """Fail before touching any page if the whole prefill cannot fit (nothing half-written)."""
        manager = self.pool.manager
        need = sum(manager.blocks_to_append(i, n) if self.pool.has_seq(i) else manager.blocks_for_tokens(n)
                   for i, n in zip(ids, counts) if n > 0)
        if need > self.pool.num_free_blocks():
            raise OutOfBlocksError(f"out of KV blocks: prefill of {sum(counts)} tokens needs {need} blocks, "
                                   f"{self.pool.num_free_blocks()} of {self.pool.num_blocks} free")

    def decode_metadata(self, seq_ids: Sequence[int]) -> AttentionMetadata:
        """Reserve one slot per sequence and describe the step (all device tensors, fixed shapes)."""
        ids = list(seq_ids)
        slots = self.pool.append_token(ids)
        return AttentionMetadata(slot_mapping=slots, block_tables=self.pool.block_tables(ids),
                                 context_lens=self.pool.context_lens(ids))

    def decode(self, seq_ids: Sequence[int], embeds: torch.Tensor, positions: torch.Tensor,
               tap_layer: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One token per sequence. embeds: (B, H); positions: (3, B) → normed hidden (B, H), tap (B, H)."""
        meta = self.decode_metadata(seq_ids)
        return self.forward(embeds, positions, self.kv_caches, meta, tap_layer)

    def free(self, seq_id: int) -> None:
        if self.pool.has_seq(seq_id):
            self.pool.free(seq_id)
