// Host-callable entry points of the CUDA part of nattn._C. Plain C++ signatures: bindings.cpp is
// compiled by the host compiler and never sees CUDA headers.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "nattn/window.h"

namespace nattn::cuda {

// Number of visible CUDA devices; 0 (and a reason in *error) when there is no driver or device.
int device_count(std::string* error);

// Compute capability (major * 10 + minor) of a device, or -1 with a reason in *error.
int device_capability(int device, std::string* error);

// Evaluates key_window and query_window for every index of one axis ON THE DEVICE, so that
// tests can compare the device build of include/nattn/window.h with the host build.
// Output: for each index i, (first, count) of its key window then of its query window.
// Returns an empty string on success, else the CUDA error.
std::string axis_windows_on_device(const AxisParams& axis, std::vector<int64_t>* out);

}  // namespace nattn::cuda
