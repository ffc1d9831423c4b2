"""The scheduler: admission with one reservation rule over both KV pools, one token budget per step, and what
each stage runs this step (prefill chunks, decode batches, the talker's readiness).

Reservation: a request is admitted only when a batch slot is free and each pool it uses (thinker; talker for
speech) can reserve its whole length — thinker prompt + max_new_tokens, talker prompt bound + max_new_tokens —
beyond what running sequences were promised and have not allocated yet, so a running request never runs out
of pages mid-way. A request that could never fit is refused at submit; the others wait (back-pressure).

Budget: at most ``max_prefill_tokens`` prompt tokens per step, thinker chunks first, talker chunks from the
rest, so long prompts are spread over steps while decoding requests keep moving.
"""
from __future__ import annotations

import collections

from .config import EngineConfig
from .kv_cache import KVCachePool
from .sequence import Request, Sequence

# The talker prompt is at most every thinker prompt position plus the 9 assistant positions.
TALKER_PROMPT_EXTRA = 9


class Scheduler:
    def __init__(self, cfg: EngineConfig, thinker_pool: KVCachePool, talker_pool: KVCachePool | None):
        self.cfg = cfg
        self.pools = {"thinker": thinker_pool, "talker": talker_pool}
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.free_slots = list(range(cfg.max_batch_size))[::-1]

    # ------------------------------------------------------------------------------------ reservation
    def _needs(self, req: Request) -> list[tuple[str, Sequence, int]]:
        """(pool, sequence, blocks for its whole length) for each stream of the request."""
        th = self.pools["thinker"]
        out = [("thinker", req.thinker, th.manager.blocks_for_tokens(req.thinker.needed_tokens()))]
        if req.speaking and self.pools["talker"] is not None:
            tokens = req.thinker.prompt_len + TALKER_PROMPT_EXTRA + req.talker.params.max_new_tokens
            out.append(("talker", req.talker, self.pools["talker"].manager.blocks_for_tokens(tokens)))
        return out

    def _outstanding(self, name: str) -> int:
        """Blocks promised to running sequences of a pool but not allocated yet."""
        pool, total = self.pools[name], 0
        for r in self.running:
            seq = r.thinker if name == "thinker" else r.talker
            if seq is None or seq.reserved_blocks == 0:
                continue
            held = pool.manager.blocks_for_tokens(pool.num_tokens(seq.seq_id)) if pool.has_seq(seq.seq_id) else 0
            total += max(0, seq.reserved_blocks - held)
        return total

    def check_fits(self, req: Request) -> None:
        """Refuse (ValueError) a request that could never be served, whatever else is running."""
        total = req.thinker.needed_tokens()
        if total > self.cfg.max_model_len:
            raise ValueError(f"prompt ({req.thinker.prompt_len} tokens) + max_new_tokens "
                             f"({req.thinker.params.max_new_tokens}) = {total} exceeds max_model_len "
                             f"{self.cfg.max_model_len}")
        for name, _, need in self._needs(req):
            pool = self.pools[name]
            if need > pool.num_blocks:
                what = "request" if name == "thinker" else "talker of this request"
                raise ValueError(f"the {what} needs {need} KV blocks but the {name} pool has only "
                                 f"{pool.num_blocks}; lower max_new_tokens or raise the KV memory "
                                 f"(kv_cache_tokens)")

    def admit(self) -> list[Request]:
        """Move waiting requests to running while a slot is free and every pool can reserve their length."""
        admitted = []
        while self.waiting and len(self.running) < self.cfg.max_batch_size and self.free_slots:
            req = self.waiting[0]
            needs = self._needs(req)
            if any(need > self.pools[n].num_free_blocks() - self._outstanding(n) for n, _, need in needs):
                break  # back-pressure: wait for running requests to return blocks
            self.waiting.popleft()
            for _, seq, need in needs:
                seq.reserved_blocks = need
            req.slot = self.free_slots.pop()
            self.running.append(req)
            admitted.append(req)
        return admitted

    def release(self, req: Request) -> None:
        """Return the request's KV blocks, reservations and slot (idempotent)."""
        for name, seq in (("thinker", req.thinker), ("talker", req.talker)):
            self.free_seq(name, seq)
        if req.slot >= 0:
            self.free_slots.append(req.slot)
            req.slot = -1
        if req in self.running:
            self.running.remove(req)

    def free_seq(self, name: str, seq: Sequence | None) -> None:
        """A finished stream's KV goes back at once (the talker only needs the recipe, not the thinker KV)."""
        pool = self.pools[name]
        if seq is None or pool is None:
            return
        if pool.has_seq(seq.seq_id):
            pool.free(seq.seq_id)
        seq.reserved_blocks = 0

    # --------------------------------------------------------------------------------------- per step
    def thinker_prefill(self, budget: int) -> tuple[list[tuple[Request, int]], int]:
        """Thinker prompt chunks within ``budget`` tokens → ([(request, tokens)], budget left)."""
        plan = []
        for r in self.running:
            left = r.thinker.prefill_left
            if left <= 0 or r.cancelled or budget <= 0:
                continue
            n = min(left, budget)
            plan.append((r, n))
            budget -= n
        return plan, budget

    def talker_prefill(self, budget: int) -> list[tuple[Request, int]]:
        """Talker prompt chunks within ``budget`` tokens, for requests whose talker prompt is known."""
        plan = []
        for r in self.running:
            t = r.talker
            if t is None or r.cancelled or t.finished or budget <= 0:
                continue
            if t.prefill_left > 0:
                n = min(t.prefill_left, budget)
                plan.append((r, n))
                budget -= n
        return plan

    def thinker_decode(self) -> list[Request]:
        return [r for r in self.running if r.thinker.started and not r.thinker.finished and not r.cancelled]

    @staticmethod
    def talker_prompt_ready(r: Request) -> bool:
        """The talker prompt needs the thinker's first token (and to know whether it was the last)."""
        t = r.talker
        return t is not None and t.feed is not None and not t.started and t.feed.prefill_ready()

    @staticmethod
    def talker_ready(r: Request) -> bool:
        """The talker's next step can run: its last frame is done and its next text entry is known (a
        request whose next thinker token is not out yet waits — it never gets tts_pad instead)."""
        t = r.talker
        return (t is not None and not r.cancelled and t.started and not t.finished
                and t.feed.entry(len(t.output) - 1) is not None)

    def talker_decode(self) -> list[Request]:
        return [r for r in self.running if self.talker_ready(r)]

    def flush(self) -> list[Request]:
        """Requests whose talker ended with frames still held back (first_chunk_frames > frames made)."""
        return [r for r in self.running if r.talker is not None and r.talker.finished and r.held
                and not r.cancelled]
