// Paged-KV block manager: the host-side bookkeeping of which KV page (block) holds which token.
//
// Pure C++17 with no Python or torch headers; csrc/bindings.cpp exposes it as omni_rt._C.BlockManager.
// omni_rt/engine/block_manager.py::PyBlockManager is the executable specification: both must hand out
// the same block ids for the same operation sequence (the tests replay random operations on both).
//
// Model: a sequence (int64 id) owns a block table; token position p lives in slot
// table[p / block_size] * block_size + p % block_size. Blocks are ref-counted so a fork shares the
// parent's blocks; a write into a shared, partially filled last block first moves the writer onto a fresh
// block and reports the (src, dst) pair whose page contents the caller must copy (copy-on-write).
// Every mutating operation either succeeds completely or throws with the state unchanged.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <utility>
#include <vector>

namespace omni_rt {

// Not enough free blocks for a request; bound to Python's OutOfBlocksError (a MemoryError).
class OutOfBlocks : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Sequence id not allocated (never, or already freed); bound to Python's KeyError.
class UnknownSequence : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// Bad argument (negative count, duplicate id, buffer too small); bound to Python's ValueError.
class InvalidArgument : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

using CopyPairs = std::vector<std::pair<int32_t, int32_t>>;

// A strided 2-D view of caller memory (strides in elements), so buffers need not be contiguous.
template <typename T>
struct View2D {
  T* data;
  int64_t rows, cols, row_stride, col_stride;
  T& at(int64_t r, int64_t c) const { return data[r * row_stride + c * col_stride]; }
};

template <typename T>
struct View1D {
  T* data;
  int64_t size, stride;
  T& at(int64_t i) const { return data[i * stride]; }
};

class BlockManager {
 public:
  BlockManager(int64_t num_blocks, int64_t block_size);

  int64_t num_blocks() const { return num_blocks_; }
  int64_t block_size() const { return block_size_; }
  int64_t num_free_blocks() const { return static_cast<int64_t>(free_.size()); }
  int64_t num_used_blocks() const { return num_blocks_ - num_free_blocks(); }
  int64_t num_seqs() const { return static_cast<int64_t>(seqs_.size()); }
  bool has_seq(int64_t seq_id) const { return seqs_.count(seq_id) != 0; }
  std::vector<int64_t> seq_ids() const;  // sorted ascending
  int32_t ref_count(int64_t block) const;

  // Blocks needed to hold num_tokens tokens in a new sequence.
  int64_t blocks_for_tokens(int64_t num_tokens) const;
  bool can_allocate(int64_t num_tokens) const;
  // Blocks an append of num_tokens to seq_id would take (new blocks + a copy-on-write block).
  int64_t blocks_to_append(int64_t seq_id, int64_t num_tokens) const;
  bool can_append(int64_t seq_id, int64_t num_tokens) const;
  // Blocks a one-token append to each of seq_ids (distinct) would take, counting COW sharing exactly.
  int64_t blocks_to_append_batch(const std::vector<int64_t>& seq_ids) const;
  bool can_append_batch(const std::vector<int64_t>& seq_ids) const;

  // New sequence holding num_tokens tokens (its last step = those tokens).
  void allocate(int64_t seq_id, int64_t num_tokens);
  // Append num_tokens tokens to seq_id; returns COW pairs to copy before writing the new tokens' KV.
  CopyPairs append(int64_t seq_id, int64_t num_tokens);
  // Append one token to each of seq_ids (distinct), all or nothing; COW pairs in batch order.
  CopyPairs append_batch(const std::vector<int64_t>& seq_ids);
  // child shares all of parent's blocks (ref counts + 1); the child's last step is empty.
  void fork(int64_t parent_id, int64_t child_id);
  // Drop seq_id; returns the blocks whose ref count reached zero (now free), in table order.
  std::vector<int32_t> free(int64_t seq_id);
  // Shrink seq_id to its first num_tokens tokens (the undo of appends: a failed engine step is rolled back);
  // releases the blocks past them last-to-first and leaves an empty last step. Returns the freed blocks.
  std::vector<int32_t> truncate(int64_t seq_id, int64_t num_tokens);

  const std::vector<int32_t>& block_table(int64_t seq_id) const;
  int64_t num_tokens(int64_t seq_id) const;
  // Slots of the tokens appended by the last allocate/append of seq_id.
  std::vector<int64_t> slot_mapping(int64_t seq_id) const;
  int64_t num_last_tokens(int64_t seq_id) const;

  // Row i of out = block table of seq_ids[i] padded with pad; rows past seq_ids.size() are all pad.
  void fill_block_tables(const std::vector<int64_t>& seq_ids, const View2D<int32_t>& out, int32_t pad) const;
  // Concatenated last-step slot mappings of seq_ids; returns the count written, the rest of out = pad.
  template <typename T>
  int64_t fill_slot_mapping(const std::vector<int64_t>& seq_ids, const View1D<T>& out, T pad) const;
  // out[i] = num_tokens(seq_ids[i]); the rest of out = pad.
  void fill_context_lens(const std::vector<int64_t>& seq_ids, const View1D<int32_t>& out, int32_t pad) const;

 private:
  struct Seq {
    std::vector<int32_t> blocks;
    int64_t num_tokens = 0;
    int64_t last_start = 0;  // position of the first token of the last step
    int64_t last_count = 0;
  };

  Seq& get(int64_t seq_id);
  const Seq& get(int64_t seq_id) const;
  int64_t blocks_to_append(const Seq& s, int64_t num_tokens) const;
  void require_free(int64_t need) const;
  int32_t take_block();
  void release_block(int32_t block, std::vector<int32_t>* freed);
  void append_unchecked(Seq& s, int64_t num_tokens, CopyPairs* copies);
  void check_distinct(const std::vector<int64_t>& seq_ids) const;

  int64_t num_blocks_;
  int64_t block_size_;
  std::vector<int32_t> free_;  // stack: back() is handed out next
  std::vector<int32_t> ref_;
  std::unordered_map<int64_t, Seq> seqs_;
};

}  // namespace omni_rt
