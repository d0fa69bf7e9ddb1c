// Lamport all-reduce runtime of moe_a2a._C (class AllReduceWorkspace): one rank's three IPC-shared Lamport
// buffers, the peers' mappings, the device flags and the pinned error record; launch wrapper for tensors.
#pragma once

#include <torch/extension.h>

namespace moe_a2a {

void register_allreduce(pybind11::module_& m);

}  // namespace moe_a2a
