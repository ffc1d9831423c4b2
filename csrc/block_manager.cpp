#include "block_manager.h"

#include <algorithm>
#include <limits>

namespace omni_rt {

namespace {

std::string seq_str(int64_t seq_id) { return std::to_string(seq_id); }

}  // namespace

BlockManager::BlockManager(int64_t num_blocks, int64_t block_size)
    : num_blocks_(num_blocks), block_size_(block_size) {
  // Block ids travel as int32 in block tables, so the pool must fit int32.
  if (num_blocks < 0 || num_blocks > std::numeric_limits<int32_t>::max()) {
    throw InvalidArgument("num_blocks must be in [0, 2**31 - 1], got " + std::to_string(num_blocks));
  }
  if (block_size < 1 || block_size > (int64_t{1} << 30)) {
    throw InvalidArgument("block_size must be in [1, 2**30], got " + std::to_string(block_size));
  }
  free_.reserve(static_cast<size_t>(num_blocks));
  // Stack with block 0 on top: a fresh pool hands out 0, 1, 2, ... in order.
  for (int64_t b = num_blocks - 1; b >= 0; --b) free_.push_back(static_cast<int32_t>(b));
  ref_.assign(static_cast<size_t>(num_blocks), 0);
}

std::vector<int64_t> BlockManager::seq_ids() const {
  std::vector<int64_t> ids;
  ids.reserve(seqs_.size());
  for (const auto& kv : seqs_) ids.push_back(kv.first);
  std::sort(ids.begin(), ids.end());
  return ids;
}

int32_t BlockManager::ref_count(int64_t block) const {
  if (block < 0 || block >= num_blocks_) {
    throw InvalidArgument("block id " + std::to_string(block) + " out of range [0, " +
                          std::to_string(num_blocks_) + ")");
  }
  return ref_[static_cast<size_t>(block)];
}

BlockManager::Seq& BlockManager::get(int64_t seq_id) {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) {
    throw UnknownSequence("sequence " + seq_str(seq_id) + " is not allocated (never allocated or already freed)");
  }
  return it->second;
}

const BlockManager::Seq& BlockManager::get(int64_t seq_id) const {
  return const_cast<BlockManager*>(this)->get(seq_id);
}

int64_t BlockManager::blocks_for_tokens(int64_t num_tokens) const {
  if (num_tokens < 0) throw InvalidArgument("num_tokens must be >= 0, got " + std::to_string(num_tokens));
  return (num_tokens + block_size_ - 1) / block_size_;
}

bool BlockManager::can_allocate(int64_t num_tokens) const {
  return blocks_for_tokens(num_tokens) <= num_free_blocks();
}

int64_t BlockManager::blocks_to_append(const Seq& s, int64_t num_tokens) const {
  if (num_tokens < 0) throw InvalidArgument("num_tokens must be >= 0, got " + std::to_string(num_tokens));
  if (num_tokens == 0) return 0;
  // All holders of a block have the same number of tokens in it (a shared block is only ever written
  // after COW), so a shared partial last block always needs its own copy before this sequence writes.
  const bool cow = (s.num_tokens % block_size_ != 0) && ref_[static_cast<size_t>(s.blocks.back())] > 1;
  const int64_t grow = blocks_for_tokens(s.num_tokens + num_tokens) - static_cast<int64_t>(s.blocks.size());
  return grow + (cow ? 1 : 0);
}

int64_t BlockManager::blocks_to_append(int64_t seq_id, int64_t num_tokens) const {
  return blocks_to_append(get(seq_id), num_tokens);
}

bool BlockManager::can_append(int64_t seq_id, int64_t num_tokens) const {
  return blocks_to_append(seq_id, num_tokens) <= num_free_blocks();
}

void BlockManager::check_distinct(const std::vector<int64_t>& seq_ids) const {
  std::vector<int64_t> sorted(seq_ids);
  std::sort(sorted.begin(), sorted.end());
  auto dup = std::adjacent_find(sorted.begin(), sorted.end());
  if (dup != sorted.end()) {
    throw InvalidArgument("sequence " + seq_str(*dup) + " appears twice in one batch");
  }
}

int64_t BlockManager::blocks_to_append_batch(const std::vector<int64_t>& seq_ids) const {
  check_distinct(seq_ids);
  int64_t need = 0;
  // Sharers of one partial block in the batch: each COW lowers the block's ref count, and the last
  // holder writes in place, so k sharers of a block with ref count r take min(k, r - 1) new blocks.
  std::unordered_map<int32_t, int64_t> sharers;
  for (int64_t id : seq_ids) {
    const Seq& s = get(id);
    if (s.num_tokens % block_size_ == 0) {
      need += 1;
    } else {
      const int32_t last = s.blocks.back();
      if (ref_[static_cast<size_t>(last)] > 1) sharers[last] += 1;
    }
  }
  for (const auto& kv : sharers) {
    need += std::min<int64_t>(kv.second, ref_[static_cast<size_t>(kv.first)] - 1);
  }
  return need;
}

bool BlockManager::can_append_batch(const std::vector<int64_t>& seq_ids) const {
  return blocks_to_append_batch(seq_ids) <= num_free_blocks();
}

void BlockManager::require_free(int64_t need) const {
  if (need > num_free_blocks()) {
    throw OutOfBlocks("out of KV blocks: need " + std::to_string(need) + ", " +
                      std::to_string(num_free_blocks()) + " free of " + std::to_string(num_blocks_));
  }
}

int32_t BlockManager::take_block() {
  const int32_t b = free_.back();
  free_.pop_back();
  ref_[static_cast<size_t>(b)] = 1;
  return b;
}

void BlockManager::release_block(int32_t block, std::vector<int32_t>* freed) {
  if (--ref_[static_cast<size_t>(block)] == 0) {
    free_.push_back(block);
    if (freed != nullptr) freed->push_back(block);
  }
}

void BlockManager::append_unchecked(Seq& s, int64_t num_tokens, CopyPairs* copies) {
  s.last_start = s.num_tokens;
  s.last_count = num_tokens;
  if (num_tokens == 0) return;
  if (s.num_tokens % block_size_ != 0) {
    const int32_t src = s.blocks.back();
    if (ref_[static_cast<size_t>(src)] > 1) {
      const int32_t dst = take_block();
      release_block(src, nullptr);
      s.blocks.back() = dst;
      copies->emplace_back(src, dst);
    }
  }
  const int64_t total = blocks_for_tokens(s.num_tokens + num_tokens);
  while (static_cast<int64_t>(s.blocks.size()) < total) s.blocks.push_back(take_block());
  s.num_tokens += num_tokens;
}

void BlockManager::allocate(int64_t seq_id, int64_t num_tokens) {
  const int64_t need = blocks_for_tokens(num_tokens);
  if (has_seq(seq_id)) throw InvalidArgument("sequence " + seq_str(seq_id) + " is already allocated");
  require_free(need);
  Seq& s = seqs_[seq_id];
  s.blocks.reserve(static_cast<size_t>(need));
  CopyPairs unused;
  append_unchecked(s, num_tokens, &unused);
}

CopyPairs BlockManager::append(int64_t seq_id, int64_t num_tokens) {
  Seq& s = get(seq_id);
  require_free(blocks_to_append(s, num_tokens));
  CopyPairs copies;
  append_unchecked(s, num_tokens, &copies);
  return copies;
}

CopyPairs BlockManager::append_batch(const std::vector<int64_t>& seq_ids) {
  require_free(blocks_to_append_batch(seq_ids));  // also checks ids exist and are distinct
  CopyPairs copies;
  for (int64_t id : seq_ids) append_unchecked(seqs_.find(id)->second, 1, &copies);
  return copies;
}

void BlockManager::fork(int64_t parent_id, int64_t child_id) {
  const Seq& parent = get(parent_id);
  if (has_seq(child_id)) throw InvalidArgument("fork target sequence " + seq_str(child_id) + " is already allocated");
  Seq child;
  child.blocks = parent.blocks;
  child.num_tokens = parent.num_tokens;
  child.last_start = parent.num_tokens;
  child.last_count = 0;
  for (int32_t b : child.blocks) ref_[static_cast<size_t>(b)] += 1;
  seqs_.emplace(child_id, std::move(child));
}

std::vector<int32_t> BlockManager::free(int64_t seq_id) {
  auto it = seqs_.find(seq_id);
  if (it == seqs_.end()) {
    throw UnknownSequence("cannot free sequence " + seq_str(seq_id) +
                          ": not allocated (never allocated or already freed)");
  }
  std::vector<int32_t> freed;
  const auto& blocks = it->second.blocks;
  // Released last-to-first so the stack hands the table's first block out first again.
  for (auto b = blocks.rbegin(); b != blocks.rend(); ++b) release_block(*b, &freed);
  std::reverse(freed.begin(), freed.end());
  seqs_.erase(it);
  return freed;
}

std::vector<int32_t> BlockManager::truncate(int64_t seq_id, int64_t num_tokens) {
  Seq& s = get(seq_id);
  if (num_tokens < 0 || num_tokens > s.num_tokens) {
    throw InvalidArgument("truncate: num_tokens must be in [0, " + std::to_string(s.num_tokens) + "], got " +
                          std::to_string(num_tokens));
  }
  const auto keep = static_cast<size_t>(blocks_for_tokens(num_tokens));
  std::vector<int32_t> freed;
  while (s.blocks.size() > keep) {
    release_block(s.blocks.back(), &freed);
    s.blocks.pop_back();
  }
  std::reverse(freed.begin(), freed.end());
  s.num_tokens = num_tokens;
  s.last_start = num_tokens;
  s.last_count = 0;
  return freed;
}

const std::vector<int32_t>& BlockManager::block_table(int64_t seq_id) const { return get(seq_id).blocks; }

int64_t BlockManager::num_tokens(int64_t seq_id) const { return get(seq_id).num_tokens; }

int64_t BlockManager::num_last_tokens(int64_t seq_id) const { return get(seq_id).last_count; }

std::vector<int64_t> BlockManager::slot_mapping(int64_t seq_id) const {
  const Seq& s = get(seq_id);
  std::vector<int64_t> slots;
  slots.reserve(static_cast<size_t>(s.last_count));
  for (int64_t p = s.last_start; p < s.last_start + s.last_count; ++p) {
    slots.push_back(int64_t{s.blocks[static_cast<size_t>(p / block_size_)]} * block_size_ + p % block_size_);
  }
  return slots;
}

void BlockManager::fill_block_tables(const std::vector<int64_t>& seq_ids, const View2D<int32_t>& out,
                                     int32_t pad) const {
  const int64_t n = static_cast<int64_t>(seq_ids.size());
  if (n > out.rows) {
    throw InvalidArgument("block table buffer has " + std::to_string(out.rows) + " rows for " +
                          std::to_string(n) + " sequences");
  }
  std::vector<const Seq*> seqs;
  seqs.reserve(seq_ids.size());
  for (int64_t id : seq_ids) {
    const Seq& s = get(id);
    if (static_cast<int64_t>(s.blocks.size()) > out.cols) {
      throw InvalidArgument("block table of sequence " + seq_str(id) + " has " + std::to_string(s.blocks.size()) +
                            " blocks, the buffer only " + std::to_string(out.cols) + " columns");
    }
    seqs.push_back(&s);
  }
  for (int64_t r = 0; r < out.rows; ++r) {
    const std::vector<int32_t>* blocks = r < n ? &seqs[static_cast<size_t>(r)]->blocks : nullptr;
    const int64_t len = blocks != nullptr ? static_cast<int64_t>(blocks->size()) : 0;
    if (out.col_stride == 1) {  // the usual C-contiguous row: bulk copy + fill
      int32_t* row = out.data + r * out.row_stride;
      if (len > 0) std::copy(blocks->begin(), blocks->end(), row);
      std::fill(row + len, row + out.cols, pad);
      continue;
    }
    for (int64_t c = 0; c < len; ++c) out.at(r, c) = (*blocks)[static_cast<size_t>(c)];
    for (int64_t c = len; c < out.cols; ++c) out.at(r, c) = pad;
  }
}

template <typename T>
int64_t BlockManager::fill_slot_mapping(const std::vector<int64_t>& seq_ids, const View1D<T>& out, T pad) const {
  if (static_cast<uint64_t>(num_blocks_) * static_cast<uint64_t>(block_size_) >
      static_cast<uint64_t>(std::numeric_limits<T>::max())) {
    throw InvalidArgument("slot ids of this pool (" + std::to_string(num_blocks_) + " blocks x " +
                          std::to_string(block_size_) + ") overflow the slot buffer's integer type");
  }
  int64_t total = 0;
  std::vector<const Seq*> seqs;
  seqs.reserve(seq_ids.size());
  for (int64_t id : seq_ids) {
    seqs.push_back(&get(id));
    total += seqs.back()->last_count;
  }
  if (total > out.size) {
    throw InvalidArgument("slot buffer has " + std::to_string(out.size) + " entries for " +
                          std::to_string(total) + " slots");
  }
  int64_t i = 0;
  for (const Seq* s : seqs) {
    for (int64_t p = s->last_start; p < s->last_start + s->last_count; ++p) {
      out.at(i++) = static_cast<T>(int64_t{s->blocks[static_cast<size_t>(p / block_size_)]} * block_size_ +
                                   p % block_size_);
    }
  }
  for (int64_t j = i; j < out.size; ++j) out.at(j) = pad;
  return total;
}

template int64_t BlockManager::fill_slot_mapping<int32_t>(const std::vector<int64_t>&, const View1D<int32_t>&,
                                                          int32_t) const;
template int64_t BlockManager::fill_slot_mapping<int64_t>(const std::vector<int64_t>&, const View1D<int64_t>&,
                                                          int64_t) const;

void BlockManager::fill_context_lens(const std::vector<int64_t>& seq_ids, const View1D<int32_t>& out,
                                     int32_t pad) const {
  const int64_t n = static_cast<int64_t>(seq_ids.size());
  if (n > out.size) {
    throw InvalidArgument("context length buffer has " + std::to_string(out.size) + " entries for " +
                          std::to_string(n) + " sequences");
  }
  std::vector<int64_t> lens;
  lens.reserve(seq_ids.size());
  for (int64_t id : seq_ids) {
    const int64_t len = get(id).num_tokens;
    if (len > std::numeric_limits<int32_t>::max()) {
      throw InvalidArgument("sequence " + seq_str(id) + " is longer than int32 context lengths can hold");
    }
    lens.push_back(len);
  }
  for (int64_t i = 0; i < out.size; ++i) out.at(i) = i < n ? static_cast<int32_t>(lens[static_cast<size_t>(i)]) : pad;
}

}  // namespace omni_rt
