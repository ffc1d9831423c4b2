// omni_rt._C: pybind11 bindings of the paged-KV block manager (no torch headers: ints, lists, buffers).
//
// Buffers (numpy arrays, memoryviews, anything with the buffer protocol) are written in place through
// their strides, so the engine fills a reusable host array and copies it to the device in one transfer.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>

#include "block_manager.h"

namespace py = pybind11;
using omni_rt::BlockManager;
using omni_rt::InvalidArgument;

namespace {

// True when the buffer's items are signed integers of sizeof(T) bytes (format "i", "l" or "q").
template <typename T>
bool is_signed_int(const py::buffer_info& info) {
  std::string fmt = info.format;
  while (!fmt.empty() && std::string("@=<>!").find(fmt.front()) != std::string::npos) fmt.erase(0, 1);
  return fmt.size() == 1 && std::string("bhilq").find(fmt[0]) != std::string::npos &&
         info.itemsize == static_cast<py::ssize_t>(sizeof(T));
}

py::buffer_info writable(const py::buffer& buf, const char* name) {
  py::buffer_info info;
  try {
    info = buf.request(true);
  } catch (py::error_already_set&) {
    throw InvalidArgument(std::string(name) + " must be a writable buffer (e.g. a numpy array)");
  }
  return info;
}

int64_t element_stride(const py::buffer_info& info, int dim, const char* name) {
  const py::ssize_t s = info.strides[static_cast<size_t>(dim)];
  if (s % info.itemsize != 0) throw InvalidArgument(std::string(name) + " has a stride that is not a whole element");
  return static_cast<int64_t>(s / info.itemsize);
}

template <typename T>
omni_rt::View1D<T> view1d(const py::buffer_info& info, const char* name) {
  if (info.ndim != 1) throw InvalidArgument(std::string(name) + " must be 1-D, got ndim=" + std::to_string(info.ndim));
  return {static_cast<T*>(info.ptr), static_cast<int64_t>(info.shape[0]), element_stride(info, 0, name)};
}

std::string format_error(const char* name, const char* want, const py::buffer_info& info) {
  return std::string(name) + " must hold " + want + ", got buffer format '" + info.format + "' with itemsize " +
         std::to_string(info.itemsize);
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "omni_rt C++ extension: the paged-KV block manager (see omni_rt/engine/block_manager.py).";

  // A MemoryError subclass, so callers may catch either; omni_rt.engine.block_manager re-exports it.
  static py::exception<omni_rt::OutOfBlocks> out_of_blocks(m, "OutOfBlocksError", PyExc_MemoryError);
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const omni_rt::OutOfBlocks& e) {
      py::set_error(out_of_blocks, e.what());
    } catch (const omni_rt::UnknownSequence& e) {
      py::set_error(PyExc_KeyError, e.what());
    }
  });

  py::class_<BlockManager>(m, "BlockManager",
                           "Paged-KV block manager; the same interface and semantics as "
                           "omni_rt.engine.block_manager.PyBlockManager (the specification).")
      .def(py::init<int64_t, int64_t>(), py::arg("num_blocks"), py::arg("block_size"))
      .def_property_readonly("num_blocks", &BlockManager::num_blocks)
      .def_property_readonly("block_size", &BlockManager::block_size)
      .def("num_free_blocks", &BlockManager::num_free_blocks)
      .def("num_used_blocks", &BlockManager::num_used_blocks)
      .def("num_seqs", &BlockManager::num_seqs)
      .def("has_seq", &BlockManager::has_seq, py::arg("seq_id"))
      .def("seq_ids", &BlockManager::seq_ids)
      .def("ref_count", &BlockManager::ref_count, py::arg("block"))
      .def("blocks_for_tokens", &BlockManager::blocks_for_tokens, py::arg("num_tokens"))
      .def("can_allocate", &BlockManager::can_allocate, py::arg("num_tokens"))
      .def("blocks_to_append", py::overload_cast<int64_t, int64_t>(&BlockManager::blocks_to_append, py::const_),
           py::arg("seq_id"), py::arg("num_tokens") = 1)
      .def("can_append", &BlockManager::can_append, py::arg("seq_id"), py::arg("num_tokens") = 1)
      .def("blocks_to_append_batch", &BlockManager::blocks_to_append_batch, py::arg("seq_ids"))
      .def("can_append_batch", &BlockManager::can_append_batch, py::arg("seq_ids"))
      .def("allocate", &BlockManager::allocate, py::arg("seq_id"), py::arg("num_tokens"))
      .def("append", &BlockManager::append, py::arg("seq_id"), py::arg("num_tokens") = 1)
      .def("append_batch", &BlockManager::append_batch, py::arg("seq_ids"))
      .def("fork", &BlockManager::fork, py::arg("parent_id"), py::arg("child_id"))
      .def("free", &BlockManager::free, py::arg("seq_id"))
      .def("truncate", &BlockManager::truncate, py::arg("seq_id"), py::arg("num_tokens"))
      .def("block_table", &BlockManager::block_table, py::arg("seq_id"))
      .def("num_tokens", &BlockManager::num_tokens, py::arg("seq_id"))
      .def("num_last_tokens", &BlockManager::num_last_tokens, py::arg("seq_id"))
      .def("slot_mapping", &BlockManager::slot_mapping, py::arg("seq_id"))
      .def(
          "fill_block_tables",
          [](const BlockManager& self, const std::vector<int64_t>& seq_ids, const py::buffer& out, int32_t pad) {
            const py::buffer_info info = writable(out, "out");
            if (info.ndim != 2) throw InvalidArgument("out must be 2-D (batch, max_blocks), got ndim=" + std::to_string(info.ndim));
            if (!is_signed_int<int32_t>(info)) throw InvalidArgument(format_error("out", "int32", info));
            omni_rt::View2D<int32_t> v{static_cast<int32_t*>(info.ptr), static_cast<int64_t>(info.shape[0]),
                                       static_cast<int64_t>(info.shape[1]), element_stride(info, 0, "out"),
                                       element_stride(info, 1, "out")};
            self.fill_block_tables(seq_ids, v, pad);
          },
          py::arg("seq_ids"), py::arg("out"), py::arg("pad") = -1)
      .def(
          "fill_slot_mapping",
          [](const BlockManager& self, const std::vector<int64_t>& seq_ids, const py::buffer& out, int64_t pad) {
            const py::buffer_info info = writable(out, "out");
            if (is_signed_int<int64_t>(info)) return self.fill_slot_mapping<int64_t>(seq_ids, view1d<int64_t>(info, "out"), pad);
            if (is_signed_int<int32_t>(info)) {
              return self.fill_slot_mapping<int32_t>(seq_ids, view1d<int32_t>(info, "out"), static_cast<int32_t>(pad));
            }
            throw InvalidArgument(format_error("out", "int64 or int32", info));
          },
          py::arg("seq_ids"), py::arg("out"), py::arg("pad") = -1)
      .def(
          "fill_context_lens",
          [](const BlockManager& self, const std::vector<int64_t>& seq_ids, const py::buffer& out, int32_t pad) {
            const py::buffer_info info = writable(out, "out");
            if (!is_signed_int<int32_t>(info)) throw InvalidArgument(format_error("out", "int32", info));
            self.fill_context_lens(seq_ids, view1d<int32_t>(info, "out"), pad);
          },
          py::arg("seq_ids"), py::arg("out"), py::arg("pad") = 0)
      .def("__repr__", [](const BlockManager& self) {
        return "omni_rt._C.BlockManager(num_blocks=" + std::to_string(self.num_blocks()) +
               ", block_size=" + std::to_string(self.block_size()) + ", free=" +
               std::to_string(self.num_free_blocks()) + ", seqs=" + std::to_string(self.num_seqs()) + ")";
      });
}
