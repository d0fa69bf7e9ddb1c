// Low-latency runtime of moe_a2a._C: its own IPC-shared buffer (two alternating sets), the peer pointer
// table, a pinned host record for timeouts, and the launch wrappers for tensors.
#pragma once

#include <torch/extension.h>

namespace moe_a2a {

void register_low_latency(pybind11::module_& m);
// The combine wire formats' host entry points (wire_format.cpp).
void register_wire_format(pybind11::module_& m);

}  // namespace moe_a2a
