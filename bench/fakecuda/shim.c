/* One pretend GPU (H200, sm_90) for the CUDA runtime calls torch makes while it traces fake CUDA tensors:
 * the autograd engine's device and stream queries, and the device properties. Built at run time by
 * bench/cuda_compile.py (cc -shared, SONAME libcuda.so.1) and LD_PRELOADed into its child process only.
 * It allocates nothing and launches nothing: any other CUDA call fails as it does with no GPU. */
#include <string.h>
#include <cuda_runtime_api.h>

#define SMS 132
#define SMEM_OPTIN 232448

cudaError_t cudaGetDeviceCount(int *count) { *count = 1; return cudaSuccess; }
cudaError_t cudaGetDevice(int *device) { *device = 0; return cudaSuccess; }
cudaError_t cudaSetDevice(int device) { return device == 0 ? cudaSuccess : cudaErrorInvalidDevice; }
cudaError_t cudaGetLastError(void) { return cudaSuccess; }
cudaError_t cudaPeekAtLastError(void) { return cudaSuccess; }

cudaError_t cudaDeviceGetStreamPriorityRange(int *least, int *greatest) {
  if (least) *least = 0;
  if (greatest) *greatest = -5;
  return cudaSuccess;
}

cudaError_t cudaStreamIsCapturing(cudaStream_t stream, enum cudaStreamCaptureStatus *status) {
  (void)stream;
  *status = cudaStreamCaptureStatusNone;
  return cudaSuccess;
}

cudaError_t cudaGetDeviceProperties(struct cudaDeviceProp *p, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  memset(p, 0, sizeof(*p));
  strcpy(p->name, "NVIDIA H200");
  p->major = 9;
  p->minor = 0;
  p->multiProcessorCount = SMS;
  p->totalGlobalMem = 150000000000ULL;
  p->sharedMemPerBlock = 49152;
  p->sharedMemPerBlockOptin = SMEM_OPTIN;
  p->sharedMemPerMultiprocessor = 233472;
  p->regsPerBlock = 65536;
  p->regsPerMultiprocessor = 65536;
  p->warpSize = 32;
  p->maxThreadsPerBlock = 1024;
  p->maxThreadsPerMultiProcessor = 2048;
  p->maxBlocksPerMultiProcessor = 32;
  p->maxThreadsDim[0] = 1024;
  p->maxThreadsDim[1] = 1024;
  p->maxThreadsDim[2] = 64;
  p->maxGridSize[0] = 2147483647;
  p->maxGridSize[1] = 65535;
  p->maxGridSize[2] = 65535;
  p->totalConstMem = 65536;
  p->memPitch = 2147483647;
  p->l2CacheSize = 50 * 1024 * 1024;
  p->memoryBusWidth = 6144;
  p->concurrentKernels = 1;
  p->unifiedAddressing = 1;
  p->managedMemory = 1;
  return cudaSuccess;
}

cudaError_t cudaDeviceGetAttribute(int *value, enum cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrComputeCapabilityMajor: *value = 9; return cudaSuccess;
    case cudaDevAttrComputeCapabilityMinor: *value = 0; return cudaSuccess;
    case cudaDevAttrMultiProcessorCount: *value = SMS; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = SMEM_OPTIN; return cudaSuccess;
    case cudaDevAttrWarpSize: *value = 32; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}

/* Driver API, which torch looks up by name in libcuda.so.1: no primary context is active, so the autograd
 * engine keeps no caller stream; cuInit reports that there is no device. */
int cuDevicePrimaryCtxGetState(int dev, unsigned int *flags, int *active) {
  (void)dev;
  if (flags) *flags = 0;
  if (active) *active = 0;
  return 0;
}
int cuInit(unsigned int flags) { (void)flags; return 100; /* CUDA_ERROR_NO_DEVICE */ }
