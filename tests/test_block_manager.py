"""Paged-KV block manager: C++ (omni_rt._C) and the Python reference run the same suite.

Beyond targeted cases, random operation sequences are replayed on a "page memory" model: every token
written goes to the slot the manager returns (after applying its copy-on-write pairs), and every live
sequence must read back exactly its own tokens through its block table.  The same sequences run on both
implementations in lockstep and must agree on every result and error.
"""
from __future__ import annotations

import os
import random
import re

import numpy as np
import pytest

from block_manager_ref import OutOfBlocksError, PyBlockManager

IMPLS = ["cpp", "py"]
OOB = re.compile(r"^out of KV blocks: need \d+, \d+ free of \d+$")


def _cpp_module():
    try:
        from omni_rt import _C
    except ImportError as e:
        if os.environ.get("OMNI_RT_SKIP_BUILD", "0") in ("1", "true", "TRUE", "yes"):
            pytest.skip(f"omni_rt._C not built (OMNI_RT_SKIP_BUILD set): {e}")
        raise AssertionError(f"omni_rt._C failed to import; build it with `pip install -e . --no-build-isolation "
                             f"--no-deps`: {e}") from e
    return _C


def make(impl: str, num_blocks: int, block_size: int):
    if impl == "cpp":
        return _cpp_module().BlockManager(num_blocks, block_size)
    return PyBlockManager(num_blocks, block_size)


@pytest.fixture(params=IMPLS)
def impl(request):
    return request.param


def snapshot(bm) -> tuple:
    ids = bm.seq_ids()
    return (bm.num_free_blocks(), tuple(ids),
            tuple((tuple(bm.block_table(i)), bm.num_tokens(i), tuple(bm.slot_mapping(i))) for i in ids),
            tuple(bm.ref_count(b) for b in range(bm.num_blocks)))


def check_invariants(bm) -> None:
    bs = bm.block_size
    refs = [0] * bm.num_blocks
    for i in bm.seq_ids():
        table = bm.block_table(i)
        n = bm.num_tokens(i)
        assert len(table) == -(-n // bs), f"seq {i}: {len(table)} blocks for {n} tokens"
        assert len(set(table)) == len(table), f"seq {i} holds a block twice: {table}"
        for b in table:
            refs[b] += 1
        last = bm.num_last_tokens(i)
        expect = [table[p // bs] * bs + p % bs for p in range(n - last, n)]
        assert bm.slot_mapping(i) == expect
    assert [bm.ref_count(b) for b in range(bm.num_blocks)] == refs, "ref counts != number of holders"
    assert bm.num_free_blocks() == refs.count(0), "free count != blocks nobody holds"
    assert bm.num_used_blocks() == bm.num_blocks - bm.num_free_blocks()
    assert bm.num_seqs() == len(bm.seq_ids())


# -- targeted cases ------------------------------------------------------------------------------------------
def test_pool_without_the_extension_names_the_build_command(monkeypatch):
    import omni_rt._ext as ext
    import omni_rt.engine.kv_cache as kv

    def missing():
        raise ImportError("omni_rt._C (the C++ paged-KV block manager) is not built. Build it with "
                          "`pip install -e . --no-build-isolation` or `python setup.py build_ext --inplace`")

    monkeypatch.setattr(kv, "load_ext", missing)
    with pytest.raises(ImportError, match="build_ext --inplace"):
        kv.KVCachePool(1, 4, 2, 1, 8)
    import inspect

    assert "build_ext --inplace" in inspect.getsource(ext)   # the real message names the build command too


def test_truncate_undoes_appends(impl):
    bm = make(impl, 8, 3)
    bm.allocate(1, 4)                     # blocks 0, 1
    bm.append(1, 5)                       # 9 tokens: blocks 0, 1, 2
    assert bm.truncate(1, 4) == [2] and bm.num_tokens(1) == 4 and bm.block_table(1) == [0, 1]
    assert bm.num_last_tokens(1) == 0 and bm.slot_mapping(1) == []
    bm.append_batch([1])
    assert bm.slot_mapping(1) == [4] and bm.num_tokens(1) == 5
    assert bm.truncate(1, 0) == [0, 1] and bm.block_table(1) == [] and bm.num_free_blocks() == 8
    with pytest.raises(ValueError):
        bm.truncate(1, 1)
    check_invariants(bm)


def test_out_of_blocks_error_is_shared_and_a_memory_error():
    assert issubclass(OutOfBlocksError, MemoryError)
    assert _cpp_module().OutOfBlocksError is OutOfBlocksError


def test_allocate_and_slots_with_non_dividing_block_size(impl):
    bm = make(impl, 10, 3)
    assert (bm.num_blocks, bm.block_size) == (10, 3)
    bm.allocate(7, 7)                                   # 3 blocks: 3 + 3 + 1
    assert bm.block_table(7) == [0, 1, 2]
    assert bm.slot_mapping(7) == [0, 1, 2, 3, 4, 5, 6]
    assert bm.num_tokens(7) == 7 and bm.num_last_tokens(7) == 7
    assert bm.append(7, 2) == []                        # fills block 2
    assert bm.block_table(7) == [0, 1, 2] and bm.slot_mapping(7) == [7, 8]
    assert bm.append(7) == []                           # block full: grows
    assert bm.block_table(7) == [0, 1, 2, 3] and bm.slot_mapping(7) == [9]
    assert bm.append(7, 0) == [] and bm.slot_mapping(7) == [] and bm.num_tokens(7) == 10
    bm.allocate(-5, 0)                                  # empty sequence, negative id: fine, no blocks
    assert bm.block_table(-5) == [] and bm.slot_mapping(-5) == []
    assert bm.append(-5, 4) == [] and bm.block_table(-5) == [4, 5] and bm.slot_mapping(-5) == [12, 13, 14, 15]
    assert bm.num_free_blocks() == 4 and bm.num_used_blocks() == 6 and bm.num_seqs() == 2
    check_invariants(bm)
    assert bm.free(7) == [0, 1, 2, 3]
    assert bm.num_free_blocks() == 8
    bm.allocate(8, 5)                                   # freed blocks come back in table order
    assert bm.block_table(8) == [0, 1]
    check_invariants(bm)


def test_block_size_one(impl):
    bm = make(impl, 5, 1)
    bm.allocate(0, 3)
    assert bm.block_table(0) == [0, 1, 2] and bm.slot_mapping(0) == [0, 1, 2]
    bm.fork(0, 1)
    assert bm.append_batch([0, 1]) == []                # block_size 1: nothing is ever partially filled
    assert bm.block_table(0) == [0, 1, 2, 3] and bm.block_table(1) == [0, 1, 2, 4]
    check_invariants(bm)


def test_fork_shares_full_blocks_and_copies_partial_on_write(impl):
    bm = make(impl, 8, 4)
    bm.allocate(1, 6)                                   # blocks [0 full, 1 partial: 2 tokens]
    bm.fork(1, 2)
    assert bm.block_table(2) == [0, 1] and bm.num_tokens(2) == 6
    assert bm.slot_mapping(2) == [] and bm.num_last_tokens(2) == 0
    assert bm.ref_count(0) == 2 and bm.ref_count(1) == 2
    assert bm.num_free_blocks() == 6
    assert bm.blocks_to_append(2) == 1 and bm.blocks_to_append(2, 3) == 2
    assert bm.append(2) == [(1, 2)]                     # child writes first: moves onto a copy
    assert bm.block_table(2) == [0, 2] and bm.slot_mapping(2) == [2 * 4 + 2]
    assert bm.ref_count(1) == 1 and bm.ref_count(2) == 1 and bm.ref_count(0) == 2
    assert bm.blocks_to_append(1) == 0
    assert bm.append(1) == []                           # parent is now sole owner: writes in place
    assert bm.block_table(1) == [0, 1] and bm.slot_mapping(1) == [1 * 4 + 2]
    check_invariants(bm)
    assert bm.free(1) == [1]                            # block 0 still held by the child
    assert bm.ref_count(0) == 1
    assert bm.free(2) == [0, 2]
    assert bm.num_free_blocks() == 8
    check_invariants(bm)


def test_fork_at_block_boundary_needs_no_copy(impl):
    bm = make(impl, 8, 4)
    bm.allocate(1, 8)
    bm.fork(1, 2)
    bm.fork(2, 3)
    assert bm.ref_count(0) == 3 and bm.ref_count(1) == 3
    assert bm.append_batch([1, 2, 3]) == []
    assert [bm.block_table(i)[-1] for i in (1, 2, 3)] == [2, 3, 4]
    check_invariants(bm)


def test_batch_cow_among_many_sharers(impl):
    bm = make(impl, 10, 4)
    bm.allocate(0, 5)                                   # [0, 1(partial)]
    for child in (1, 2, 3):
        bm.fork(0, child)
    assert bm.ref_count(1) == 4
    # 3 of the 4 sharers write: all 3 need copies (the untouched sharer 3 keeps block 1).
    assert bm.blocks_to_append_batch([0, 1, 2]) == 3
    # All 4 write: the last one is then sole owner and writes in place.
    assert bm.blocks_to_append_batch([3, 0, 1, 2]) == 3
    free_before = bm.num_free_blocks()
    copies = bm.append_batch([3, 0, 1, 2])
    assert copies == [(1, 2), (1, 3), (1, 4)]
    assert bm.num_free_blocks() == free_before - 3
    assert [bm.block_table(i) for i in (3, 0, 1, 2)] == [[0, 2], [0, 3], [0, 4], [0, 1]]
    assert bm.fill_slot_mapping([3, 0, 1, 2], np.empty(4, np.int64)) == 4
    check_invariants(bm)


def test_out_of_blocks_is_clear_and_leaves_state_unchanged(impl):
    bm = make(impl, 5, 4)
    bm.allocate(1, 10)                                  # 3 blocks
    bm.fork(1, 2)
    bm.allocate(3, 4)                                   # 4 blocks used, 1 free
    before = snapshot(bm)
    assert not bm.can_allocate(5) and bm.can_allocate(4) and bm.can_allocate(0)
    with pytest.raises(OutOfBlocksError, match=r"^out of KV blocks: need 2, 1 free of 5$"):
        bm.allocate(9, 5)
    with pytest.raises(MemoryError, match=OOB):         # catchable as MemoryError too
        bm.append(3, 5)                                 # needs 2 new blocks
    assert not bm.can_append(1, 3)                      # COW + 1 new block
    with pytest.raises(OutOfBlocksError, match=OOB):
        bm.append(1, 3)
    # Batch: seq 3 needs a new block (full), seqs 1 and 2 share a partial block: one COW; 2 > 1 free.
    assert bm.blocks_to_append_batch([3, 1, 2]) == 2 and not bm.can_append_batch([3, 1, 2])
    with pytest.raises(OutOfBlocksError, match=r"need 2, 1 free of 5"):
        bm.append_batch([3, 1, 2])
    assert snapshot(bm) == before
    assert not bm.has_seq(9)
    check_invariants(bm)
    assert bm.append_batch([1, 2]) == [(2, 4)]          # exactly fits: 1 COW, the other writes in place
    assert bm.num_free_blocks() == 0
    with pytest.raises(OutOfBlocksError, match=r"need 1, 0 free of 5"):
        bm.allocate(9, 1)
    check_invariants(bm)


def test_empty_pool(impl):
    bm = make(impl, 0, 16)
    bm.allocate(1, 0)
    with pytest.raises(OutOfBlocksError, match=r"need 1, 0 free of 0"):
        bm.append(1)
    assert bm.num_free_blocks() == 0 and bm.block_table(1) == []


def test_errors(impl):
    bm = make(impl, 4, 2)
    bm.allocate(1, 3)
    for call in (lambda: bm.append(5), lambda: bm.free(5), lambda: bm.fork(5, 6), lambda: bm.block_table(5),
                 lambda: bm.num_tokens(5), lambda: bm.slot_mapping(5), lambda: bm.append_batch([1, 5]),
                 lambda: bm.can_append(5), lambda: bm.fill_context_lens([5], np.empty(1, np.int32))):
        with pytest.raises(KeyError, match=r"sequence 5\b.*not allocated"):
            call()
    assert bm.block_table(1) == [0, 1] and bm.num_tokens(1) == 3  # the failed batch appended nothing
    bm.allocate(2, 1)
    bm.free(2)
    with pytest.raises(KeyError, match="already freed"):
        bm.free(2)                                      # double free
    with pytest.raises(ValueError, match="already allocated"):
        bm.allocate(1, 1)
    with pytest.raises(ValueError, match="already allocated"):
        bm.fork(1, 1)
    with pytest.raises(ValueError, match="twice in one batch"):
        bm.append_batch([1, 1])
    with pytest.raises(ValueError, match=">= 0"):
        bm.allocate(3, -1)
    with pytest.raises(ValueError, match=">= 0"):
        bm.append(1, -2)
    with pytest.raises(ValueError, match="out of range"):
        bm.ref_count(4)
    assert not bm.has_seq(3)
    for args in ((-1, 4), (4, 0), (2**31, 4)):
        with pytest.raises(ValueError):
            make(impl, *args)
    check_invariants(bm)


# -- buffers -------------------------------------------------------------------------------------------------
def test_fill_block_tables(impl):
    bm = make(impl, 16, 4)
    bm.allocate(10, 9)      # 3 blocks
    bm.allocate(11, 1)      # 1 block
    bm.allocate(12, 0)      # none
    out = np.full((4, 5), 77, dtype=np.int32)
    bm.fill_block_tables([11, 10, 12], out)
    assert out.tolist() == [[3, -1, -1, -1, -1], [0, 1, 2, -1, -1], [-1] * 5, [-1] * 5]
    bm.fill_block_tables([10], out, pad=0)
    assert out.tolist() == [[0, 1, 2, 0, 0]] + [[0] * 5] * 3
    # Strided and transposed views are written through their strides; memoryviews work too.
    big = np.full((6, 8), 99, dtype=np.int32)
    view = big[1::2, ::2]                               # (3, 4), non-contiguous
    bm.fill_block_tables([10, 11], view, pad=-2)
    assert view.tolist() == [[0, 1, 2, -2], [3, -2, -2, -2], [-2] * 4]
    assert (big[0] == 99).all() and (big[:, 1::2] == 99).all()
    t = np.zeros((3, 2), dtype=np.int32).T              # (2, 3) transposed
    bm.fill_block_tables([10, 11], t)
    assert t.tolist() == [[0, 1, 2], [3, -1, -1]]
    mv = memoryview(bytearray(4 * 2 * 3)).cast("i", (2, 3))
    bm.fill_block_tables([11], mv)
    assert mv.tolist() == [[3, -1, -1], [-1, -1, -1]]
    before = out.copy()
    with pytest.raises(ValueError, match="only 2 columns"):
        bm.fill_block_tables([11, 10], np.zeros((2, 2), np.int32))
    with pytest.raises(ValueError, match="1 rows for 2"):
        bm.fill_block_tables([10, 11], np.zeros((1, 4), np.int32))
    with pytest.raises(ValueError, match="int32"):
        bm.fill_block_tables([10], np.zeros((1, 4), np.int64))
    with pytest.raises(ValueError, match="int32"):
        bm.fill_block_tables([10], np.zeros((1, 4), np.float32))
    with pytest.raises(ValueError, match="2-D"):
        bm.fill_block_tables([10], np.zeros(4, np.int32))
    with pytest.raises(ValueError, match="writable"):
        ro = np.zeros((1, 4), np.int32)
        ro.flags.writeable = False
        bm.fill_block_tables([10], ro)
    with pytest.raises(KeyError):
        bm.fill_block_tables([10, 99], out)
    assert (out == before).all()                        # failed fills leave the buffer untouched


@pytest.mark.parametrize("dtype", [np.int64, np.int32])
def test_fill_slot_mapping_and_context_lens(impl, dtype):
    bm = make(impl, 16, 4)
    bm.allocate(1, 6)
    bm.allocate(2, 3)
    bm.append(2, 2)                                     # positions 3, 4 → block 2 offset 3, block 3 offset 0
    bm.fork(1, 3)
    out = np.full(10, 5, dtype=dtype)
    assert bm.fill_slot_mapping([2, 3, 1], out) == 2 + 0 + 6
    assert out.tolist() == [11, 12, 0, 1, 2, 3, 4, 5, -1, -1]
    assert bm.fill_slot_mapping([], out, pad=-7) == 0 and (out == -7).all()
    with pytest.raises(ValueError, match="3 entries for 8 slots"):
        bm.fill_slot_mapping([2, 3, 1], np.zeros(3, dtype))
    strided = np.zeros(8, dtype)[::2]
    assert bm.fill_slot_mapping([2], strided) == 2 and strided.tolist() == [11, 12, -1, -1]
    with pytest.raises(ValueError, match="int64 or int32"):
        bm.fill_slot_mapping([1], np.zeros(4, np.float64))
    lens = np.full(4, 9, dtype=np.int32)
    bm.fill_context_lens([3, 2], lens)
    assert lens.tolist() == [6, 5, 0, 0]
    with pytest.raises(ValueError, match="1 entries for 2"):
        bm.fill_context_lens([3, 2], np.zeros(1, np.int32))
    with pytest.raises(ValueError, match="int32"):
        bm.fill_context_lens([3], np.zeros(1, np.int64))


def test_int32_slot_buffer_overflow_is_refused(impl):
    bm = make(impl, 2**20, 2**12)                       # 2**32 slots: not representable in int32
    bm.allocate(0, 1)
    with pytest.raises(ValueError, match="overflow"):
        bm.fill_slot_mapping([0], np.zeros(1, np.int32))
    assert bm.fill_slot_mapping([0], np.zeros(1, np.int64)) == 1


# -- randomized --------------------------------------------------------------------------------------------
class PageMemory:
    """What the KV pages would hold: applies COW copies, writes each token's value at its slot."""

    def __init__(self, num_blocks: int, block_size: int) -> None:
        self.bs = block_size
        self.mem = [[None] * block_size for _ in range(num_blocks)]
        self.tokens: dict[int, list] = {}

    def copy(self, pairs) -> None:
        for src, dst in pairs:
            self.mem[dst] = list(self.mem[src])

    def write(self, bm, seq_id: int, values: list) -> None:
        slots = bm.slot_mapping(seq_id)
        assert len(slots) == len(values)
        for s, v in zip(slots, values):
            self.mem[s // self.bs][s % self.bs] = v
        self.tokens.setdefault(seq_id, []).extend(values)

    def check(self, bm) -> None:
        assert sorted(self.tokens) == bm.seq_ids()
        for i, toks in self.tokens.items():
            table = bm.block_table(i)
            got = [self.mem[table[p // self.bs]][p % self.bs] for p in range(len(toks))]
            assert got == toks, f"seq {i} reads back {got}, wrote {toks}"


def _random_op(rng: random.Random, live: list[int], next_id: int):
    r = rng.random()
    if not live or r < 0.2:
        return ("allocate", next_id, rng.choice([0, 1, 2, 3, 5, 8, 13, 21]))
    if r < 0.4:
        return ("append", rng.choice(live), rng.choice([0, 1, 1, 1, 2, 3, 7]))
    if r < 0.6:
        k = rng.randint(1, len(live))
        ids = rng.sample(live, k)
        if rng.random() < 0.05:
            ids.append(ids[0])                          # duplicate: ValueError, nothing changes
        return ("append_batch", ids)
    if r < 0.75:
        return ("fork", rng.choice(live), next_id)
    if r < 0.95:
        return ("free", rng.choice(live))
    return ("free", next_id + 1000)                     # unknown id: KeyError


def _apply(bm, mem: PageMemory, op, counter: list[int]):
    """Run op on bm and mirror it into mem; returns (result, error) for lockstep comparison."""
    kind = op[0]
    before = snapshot(bm)
    try:
        if kind == "allocate":
            need = bm.blocks_for_tokens(op[2])
            assert bm.can_allocate(op[2]) == (need <= bm.num_free_blocks())
            free0 = bm.num_free_blocks()
            bm.allocate(op[1], op[2])
            assert bm.num_free_blocks() == free0 - need
            res = None
            vals = list(range(counter[0], counter[0] + op[2]))
            mem.tokens[op[1]] = []
            mem.write(bm, op[1], vals)
        elif kind == "append":
            need = bm.blocks_to_append(op[1], op[2])
            free0 = bm.num_free_blocks()
            res = bm.append(op[1], op[2])
            assert bm.num_free_blocks() == free0 - need
            mem.copy(res)
            vals = list(range(counter[0], counter[0] + op[2]))
            mem.write(bm, op[1], vals)
        elif kind == "append_batch":
            need = bm.blocks_to_append_batch(op[1]) if len(set(op[1])) == len(op[1]) else None
            free0 = bm.num_free_blocks()
            res = bm.append_batch(op[1])
            assert bm.num_free_blocks() == free0 - need
            mem.copy(res)
            for j, i in enumerate(op[1]):
                mem.write(bm, i, [counter[0] + j])
        elif kind == "fork":
            free0 = bm.num_free_blocks()
            res = bm.fork(op[1], op[2])
            assert bm.num_free_blocks() == free0
            mem.tokens[op[2]] = list(mem.tokens[op[1]])
        else:
            held = set(b for i in bm.seq_ids() if i != op[1] for b in bm.block_table(i))
            table = bm.block_table(op[1]) if bm.has_seq(op[1]) else []
            res = bm.free(op[1])
            assert res == [b for b in table if b not in held]
            del mem.tokens[op[1]]
        counter[0] += 100
        return res, None
    except (OutOfBlocksError, KeyError, ValueError) as e:
        assert snapshot(bm) == before, f"{op} failed with {e!r} but changed the state"
        if isinstance(e, OutOfBlocksError):
            assert OOB.match(str(e)), str(e)
        return None, (type(e).__name__, str(e))


@pytest.mark.parametrize("block_size", [1, 3, 4, 16])
def test_random_operations_invariants(impl, block_size):
    num_blocks = 24 if block_size < 16 else 6
    rng = random.Random(block_size)
    bm = make(impl, num_blocks, block_size)
    mem = PageMemory(num_blocks, block_size)
    counter, next_id, errors = [0], 0, set()
    for _ in range(400):
        op = _random_op(rng, bm.seq_ids(), next_id)
        if op[0] in ("allocate", "fork"):
            next_id += 1
        _, err = _apply(bm, mem, op, counter)
        if err:
            errors.add(err[0])
        check_invariants(bm)
        mem.check(bm)
    assert "OutOfBlocksError" in errors and "KeyError" in errors  # the pool was exercised to exhaustion
    for i in bm.seq_ids():
        bm.free(i)
    assert bm.num_free_blocks() == num_blocks and bm.num_seqs() == 0
    assert all(bm.ref_count(b) == 0 for b in range(num_blocks))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_cpp_matches_python_reference(seed):
    rng = random.Random(seed)
    block_size = [2, 5, 8][seed]
    cpp, py = make("cpp", 20, block_size), make("py", 20, block_size)
    mem_c, mem_p = PageMemory(20, block_size), PageMemory(20, block_size)
    cc, cp = [0], [0]
    next_id = 0
    for step in range(500):
        op = _random_op(rng, py.seq_ids(), next_id)
        if op[0] in ("allocate", "fork"):
            next_id += 1
        rc = _apply(cpp, mem_c, op, cc)
        rp = _apply(py, mem_p, op, cp)
        assert rc == rp, f"step {step} {op}: C++ {rc} vs Python {rp}"
        assert snapshot(cpp) == snapshot(py), f"state differs after step {step} {op}"
    ids = py.seq_ids()
    oc, op_ = np.empty((len(ids) + 1, 12), np.int32), np.empty((len(ids) + 1, 12), np.int32)
    cpp.fill_block_tables(ids, oc)
    py.fill_block_tables(ids, op_)
    assert (oc == op_).all()
