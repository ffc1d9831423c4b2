"""KVCachePool: memory planning, page layout, and an end-to-end write/read-back through the paged layout.

The read-back test stores random K/V per token at the slots the pool returns, then gathers every live
sequence's K/V through its block table and context length (what a paged-attention kernel does) and
compares with the values each sequence was given, across forks, copy-on-write and frees.
"""
from __future__ import annotations

import random

import pytest
import torch

from block_manager_ref import OutOfBlocksError, PyBlockManager
from omni_rt.engine.kv_cache import KVCachePool as _KVCachePool
from omni_rt.engine.kv_cache import kv_block_bytes, plan_num_blocks


def KVCachePool(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype=torch.bfloat16, device="cpu",
                prefer_cpp=True):
    """The pool over the C++ manager, or over the Python specification (the oracle) when prefer_cpp is False."""
    manager = None if prefer_cpp else PyBlockManager(num_blocks, block_size)
    return _KVCachePool(num_layers, num_blocks, block_size, num_kv_heads, head_dim, dtype, device, manager=manager)


@pytest.fixture(params=[True, False], ids=["cpp", "py"])
def prefer_cpp(request):
    return request.param


def test_plan_num_blocks_thinker_geometry():
    # Qwen3-Omni thinker: 48 layers, 4 KV heads, head_dim 128, bf16, 16-token blocks → 1.5 MiB per block.
    per_block = kv_block_bytes(48, 16, 4, 128, torch.bfloat16)
    assert per_block == 2 * 48 * 16 * 4 * 128 * 2 == 1_572_864
    assert plan_num_blocks(10 * 2**30, 48, 16, 4, 128, torch.bfloat16, fraction=0.9) == int(10 * 2**30 * 0.9) // per_block
    assert plan_num_blocks(per_block, 48, 16, 4, 128, torch.bfloat16, fraction=1.0) == 1
    assert plan_num_blocks(per_block, 1, 16, 4, 128, torch.float32, fraction=1.0) == 48 // 2
    with pytest.raises(ValueError, match="not enough memory for one KV block"):
        plan_num_blocks(per_block - 1, 48, 16, 4, 128, torch.bfloat16, fraction=1.0)
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            plan_num_blocks(2**30, 48, 16, 4, 128, torch.bfloat16, fraction=bad)
    with pytest.raises(ValueError, match="head_dim"):
        plan_num_blocks(2**30, 48, 16, 4, 0, torch.bfloat16)


def test_pool_layout(prefer_cpp):
    pool = KVCachePool(3, 5, 4, 2, 8, dtype=torch.float16, device="cpu", prefer_cpp=prefer_cpp)
    assert pool.kv.shape == (2, 3, 5, 4, 2, 8) and pool.kv.dtype == torch.float16
    assert isinstance(pool.manager, PyBlockManager) != prefer_cpp
    assert pool.nbytes == 5 * kv_block_bytes(3, 4, 2, 8, torch.float16)
    assert (pool.kv == 0).all()
    for layer in range(3):
        k, v = pool.k_caches[layer], pool.v_caches[layer]
        assert k.shape == v.shape == (5, 4, 2, 8) and k.is_contiguous() and v.is_contiguous()
        k.view(-1, 2, 8)[layer * 4 + 1] = 1.0           # a slot write through the view lands in kv
        assert (pool.kv[0, layer, layer, 1] == 1).all()
    with pytest.raises(ValueError, match="num_kv_heads"):
        KVCachePool(1, 4, 4, 0, 8, prefer_cpp=prefer_cpp)


def test_metadata_tensors(prefer_cpp):
    pool = KVCachePool(1, 8, 4, 1, 2, dtype=torch.float32, prefer_cpp=prefer_cpp)
    s = pool.add_sequence(3, 6)
    assert s.dtype == torch.int64 and s.tolist() == [0, 1, 2, 3, 4, 5]
    assert pool.add_sequence(4, 1).tolist() == [8]
    assert pool.extend(4, 4).tolist() == [9, 10, 11, 12]
    assert pool.slot_mapping([3, 4]).tolist() == [0, 1, 2, 3, 4, 5, 9, 10, 11, 12]
    assert pool.append_token([4, 3]).tolist() == [13, 6]
    assert pool.slot_mapping([3, 4]).tolist() == [6, 13]
    bt = pool.block_tables([4, 3])
    assert bt.dtype == torch.int32 and bt.tolist() == [[2, 3], [0, 1]]
    assert pool.block_tables([3], width=4, pad=0).tolist() == [[0, 1, 0, 0]]
    assert pool.block_tables([]).shape == (0, 1)
    cl = pool.context_lens([3, 4])
    assert cl.dtype == torch.int32 and cl.tolist() == [7, 6]
    # Static (CUDA-graph style) buffers larger than the batch: rows/entries past it are padding.
    bt_out = torch.full((3, 5), 9, dtype=torch.int32)
    assert pool.block_tables([3, 4], out=bt_out) is bt_out
    assert bt_out.tolist() == [[0, 1, -1, -1, -1], [2, 3, -1, -1, -1], [-1] * 5]
    cl_out = torch.full((4,), 9, dtype=torch.int32)
    assert pool.context_lens([4], out=cl_out).tolist() == [6, 0, 0, 0]
    sm_out = torch.full((3,), 9, dtype=torch.int64)
    assert pool.slot_mapping([3, 4], out=sm_out).tolist() == [6, 13, -1]
    assert pool.num_tokens(3) == 7 and pool.has_seq(4) and not pool.has_seq(5)
    assert pool.num_free_blocks() == 4 and pool.num_used_blocks() == 4
    assert pool.free(3) == 2 and pool.num_free_blocks() == 6


def test_out_of_blocks_leaves_pool_unchanged(prefer_cpp):
    pool = KVCachePool(2, 3, 2, 1, 4, dtype=torch.float32, prefer_cpp=prefer_cpp)
    pool.add_sequence(0, 3)
    pool.kv.normal_()
    pool.manager.fork(0, 1)
    pool.add_sequence(2, 1)                             # 3 of 3 blocks used
    kv_before = pool.kv.clone()
    assert not pool.manager.can_allocate(1) and pool.manager.can_allocate(0)
    assert not pool.manager.can_append_batch([0, 1]) and not pool.manager.can_append(2, 2) and pool.manager.can_append(2, 1)
    with pytest.raises(OutOfBlocksError, match=r"out of KV blocks: need 1, 0 free of 3"):
        pool.append_token([0, 1])                       # one COW needed, no block left
    with pytest.raises(MemoryError):
        pool.add_sequence(7, 1)
    assert not pool.has_seq(7)
    assert torch.equal(pool.kv, kv_before)
    assert pool.block_tables([0, 1, 2]).tolist() == [[0, 1], [0, 1], [2, -1]]
    assert pool.append_token([2]).tolist() == [5]       # room in block 2: still works
    with pytest.raises(KeyError):
        pool.append_token([9])


def _gather(pool: KVCachePool, layer: int, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per sequence (k, v): (context_len, heads, head_dim), read through block tables like a paged kernel."""
    bt = pool.block_tables(ids)
    lens = pool.context_lens(ids)
    out = []
    for row, n in zip(bt.tolist(), lens.tolist()):
        pos = torch.arange(n)
        slots = torch.tensor(row, dtype=torch.int64)[pos // pool.block_size] * pool.block_size + pos % pool.block_size
        k = pool.k_caches[layer].view(-1, pool.num_kv_heads, pool.head_dim)[slots]
        v = pool.v_caches[layer].view(-1, pool.num_kv_heads, pool.head_dim)[slots]
        out.append((k, v))
    return out


@pytest.mark.parametrize("block_size", [3, 8])
def test_write_and_read_back_through_pages(prefer_cpp, block_size, monkeypatch):
    layers, heads, dim = 2, 2, 4
    pool = KVCachePool(layers, 40, block_size, heads, dim, dtype=torch.float32, prefer_cpp=prefer_cpp)
    copies = []
    copy_blocks = pool._copy_blocks
    monkeypatch.setattr(pool, "_copy_blocks", lambda pairs: (copies.extend(pairs), copy_blocks(pairs)))
    rng = random.Random(block_size)
    truth: dict[int, torch.Tensor] = {}                 # seq → (layers, 2, tokens, heads, dim)

    def write(seq_ids: list[int], slots: torch.Tensor, counts: list[int]) -> None:
        assert slots.dtype == torch.int64 and slots.numel() == sum(counts)
        new = torch.randn(layers, 2, int(slots.numel()), heads, dim)
        for layer in range(layers):
            pool.k_caches[layer].view(-1, heads, dim).index_copy_(0, slots, new[layer, 0])
            pool.v_caches[layer].view(-1, heads, dim).index_copy_(0, slots, new[layer, 1])
        start = 0
        for i, c in zip(seq_ids, counts):
            truth[i] = torch.cat([truth[i], new[:, :, start:start + c]], dim=2)
            start += c

    next_id, forks, frees = 0, 0, 0
    for _ in range(80):
        live = sorted(truth)
        r = rng.random()
        if not live or r < 0.2:
            n = rng.randint(1, 11)
            if not pool.manager.can_allocate(n):
                continue
            truth[next_id] = torch.empty(layers, 2, 0, heads, dim)
            write([next_id], pool.add_sequence(next_id, n), [n])
            next_id += 1
        elif r < 0.35:
            parent = rng.choice(live)
            pool.manager.fork(parent, next_id)
            truth[next_id] = truth[parent].clone()
            next_id += 1
            forks += 1
        elif r < 0.5:
            i, c = rng.choice(live), rng.randint(1, 5)
            if pool.manager.can_append(i, c):
                write([i], pool.extend(i, c), [c])
        elif r < 0.85:
            batch = rng.sample(live, rng.randint(1, len(live)))
            if pool.manager.can_append_batch(batch):
                write(batch, pool.append_token(batch), [1] * len(batch))
        else:
            i = rng.choice(live)
            pool.free(i)
            del truth[i]
            frees += 1
        ids = sorted(truth)
        assert pool.context_lens(ids).tolist() == [truth[i].shape[2] for i in ids]
        for layer in range(layers):
            for i, (k, v) in zip(ids, _gather(pool, layer, ids)):
                assert torch.equal(k, truth[i][layer, 0]), f"seq {i} layer {layer}: K pages differ"
                assert torch.equal(v, truth[i][layer, 1]), f"seq {i} layer {layer}: V pages differ"
    assert forks > 0 and frees > 0 and copies, "the sequence did not exercise fork / free / copy-on-write"
    for i in list(truth):
        pool.free(i)
    assert pool.num_free_blocks() == 40
