// Helpers shared by the binding translation units (bindings*.cpp).
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>

#include "nattn/params.h"

// An axis from Python, validated; std::invalid_argument (-> ValueError) naming the rule.
nattn::AxisParams make_axis(int64_t length, int64_t kernel_size, int64_t stride,
                            int64_t dilation, bool is_causal);

// Pointer and size checks every kernel relies on; std::invalid_argument on failure.
void check_common(const nattn::AttentionParams& p, bool backward);

// Registers DType and AttentionParams (module-local in nattn._emu, so both modules can be loaded).
void register_params(pybind11::module_& m, bool module_local);
