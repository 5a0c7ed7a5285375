// Device queries and a device-side evaluation of the window math (include/nattn/window.h).
#include "cuda/common/launch.h"
#include "cuda/cuda_api.h"

namespace nattn::cuda {

int device_count(std::string* error) {
  int n = 0;
  const cudaError_t status = cudaGetDeviceCount(&n);
  if (status != cudaSuccess) {
    *error = cudaGetErrorString(status);
    cudaGetLastError();  // clear the sticky "no driver" state so later queries report afresh
    return 0;
  }
  return n;
}

int device_capability(int device, std::string* error) {
  int major = 0, minor = 0;
  cudaError_t status = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device);
  if (status == cudaSuccess) {
    status = cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device);
  }
  if (status != cudaSuccess) {
    *error = cudaGetErrorString(status);
    cudaGetLastError();
    return -1;
  }
  return major * 10 + minor;
}

namespace {
__global__ void axis_windows_kernel(AxisParams axis, int64_t* out) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= axis.length) return;
  const IndexRange keys = key_window(axis, i);
  const IndexRange queries = query_window(axis, i);
  out[4 * i + 0] = keys.first;
  out[4 * i + 1] = keys.count;
  out[4 * i + 2] = queries.first;
  out[4 * i + 3] = queries.count;
}
}  // namespace

std::string axis_windows_on_device(const AxisParams& axis, std::vector<int64_t>* out) {
  const size_t bytes = sizeof(int64_t) * 4 * static_cast<size_t>(axis.length);
  int64_t* device_out = nullptr;
  cudaError_t status = cudaMalloc(&device_out, bytes);
  if (status != cudaSuccess) return cudaGetErrorString(status);
  const int threads = 128;
  const int blocks = static_cast<int>((axis.length + threads - 1) / threads);
  status = launch_kernel(axis_windows_kernel, dim3(blocks), dim3(threads), 0, nullptr, axis,
                         device_out);
  out->assign(4 * static_cast<size_t>(axis.length), 0);
  if (status == cudaSuccess) {
    status = cudaMemcpy(out->data(), device_out, bytes, cudaMemcpyDeviceToHost);
  }
  cudaFree(device_out);
  return status == cudaSuccess ? std::string() : std::string(cudaGetErrorString(status));
}

}  // namespace nattn::cuda
