// PatchDDM's model input on the GPU, in one pass over the output.
//
// Grid: x = tiles of a (y, x) plane, y = z slices, z = (patch, channel) pairs (both strided
// when larger than the grid's limit). Each thread owns VEC consecutive x of kRowsPerThread
// rows, so a warp reads and writes contiguous runs along x and has several independent
// loads in flight. Writes are 16-byte vectors when out's rows are aligned; reads are 16-byte
// vectors when the source row is aligned too (for the crop: when the patch's x offset is a
// multiple of VEC), else VEC scalar loads that the L1 cache merges.
#include "assemble_input.h"

#include <algorithm>

#include "../coord_value.h"
#include "launch.cuh"

namespace patchddm::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kRowsPerThread = 4;
constexpr int64_t kMaxGridYZ = 65535;

template <typename T, int VEC>
struct alignas(sizeof(T) * VEC) Pack {
  T v[VEC];
};

// One x_t element converted to T through float (double for double): x_t may have another
// dtype than out. The switch is the same for every thread, so it does not diverge.
template <typename T>
__device__ __forceinline__ T load_converted(const void* data, DType dtype, int64_t i) {
  using A = acc_t<T>;
  switch (dtype) {
    case DType::Float32: return from_acc<T>(static_cast<A>(static_cast<const float*>(data)[i]));
    case DType::Float16: return from_acc<T>(static_cast<A>(to_acc(static_cast<const __half*>(data)[i])));
    case DType::BFloat16:
      return from_acc<T>(static_cast<A>(to_acc(static_cast<const __nv_bfloat16*>(data)[i])));
    case DType::Float64: return from_acc<T>(static_cast<A>(static_cast<const double*>(data)[i]));
  }
  return T{};
}

template <typename T, int VEC>
__device__ __forceinline__ void store(T* dst, const Pack<T, VEC>& v) {
  if constexpr (VEC > 1) {
    *reinterpret_cast<Pack<T, VEC>*>(dst) = v;  // the host checked the alignment
  } else {
    *dst = v.v[0];
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kThreads)
    assemble_input_kernel(const AssembleParams p, int64_t tiles_x, bool volume_vec, bool x_t_vec) {
  using A = acc_t<T>;
  using P = Pack<T, VEC>;
  const int64_t d = p.patch[0], h = p.patch[1], w = p.patch[2];
  const int64_t C = p.channels, channels = C + 3 + p.extra;
  const int64_t tile_y = blockIdx.x / tiles_x, tile_x = blockIdx.x % tiles_x;
  const int64_t x0 = (tile_x * blockDim.x + threadIdx.x) * VEC;
  if (x0 >= w) return;
  const int64_t y_first = tile_y * blockDim.y * kRowsPerThread + threadIdx.y;
  const int64_t* vs = p.volume_stride;
  const int64_t* xs = p.x_t_stride;
  const int64_t* os = p.out_stride;

  for (int64_t bc = blockIdx.z; bc < p.batch * channels; bc += gridDim.z) {
    const int64_t b = bc / channels, c = bc % channels;
    int64_t o[3];
#pragma unroll
    for (int k = 0; k < 3; ++k) {
      o[k] = p.offsets_device != nullptr ? p.offsets_device[b * 3 + k] : p.inline_offsets[b][k];
    }
    for (int64_t z = blockIdx.y; z < d; z += gridDim.y) {
      T* dst = static_cast<T*>(p.out) + b * os[0] + c * os[1] + z * os[2] + x0 * os[4];
      if (c < C) {
        const T* src = static_cast<const T*>(p.volume) + (p.shared_volume ? 0 : b * vs[0]) + c * vs[1] +
                       (o[0] + z) * vs[2] + o[1] * vs[3] + (o[2] + x0) * vs[4];
        const bool vec = VEC > 1 && volume_vec && o[2] % VEC == 0;
#pragma unroll
        for (int r = 0; r < kRowsPerThread; ++r) {
          const int64_t y = y_first + r * static_cast<int64_t>(blockDim.y);
          if (y >= h) break;
          P v;
          if (vec) {
            v = *reinterpret_cast<const P*>(src + y * vs[3]);
          } else {
#pragma unroll
            for (int i = 0; i < VEC; ++i) v.v[i] = src[y * vs[3] + i * vs[4]];
          }
          store<T, VEC>(dst + y * os[3], v);
        }
      } else if (c < C + 3) {
        const int k = static_cast<int>(c - C);
        const int64_t n = p.coord[k];
#pragma unroll
        for (int r = 0; r < kRowsPerThread; ++r) {
          const int64_t y = y_first + r * static_cast<int64_t>(blockDim.y);
          if (y >= h) break;
          P v;
#pragma unroll
          for (int i = 0; i < VEC; ++i) {
            const int64_t j = k == 0 ? o[0] + z : (k == 1 ? o[1] + y : o[2] + x0 + i);
            v.v[i] = from_acc<T>(coord_value<A>(j, n));
          }
          store<T, VEC>(dst + y * os[3], v);
        }
      } else {
        const int64_t base = b * xs[0] + (c - C - 3) * xs[1] + z * xs[2] + x0 * xs[4];
#pragma unroll
        for (int r = 0; r < kRowsPerThread; ++r) {
          const int64_t y = y_first + r * static_cast<int64_t>(blockDim.y);
          if (y >= h) break;
          const int64_t at = base + y * xs[3];
          P v;
          if (VEC > 1 && x_t_vec) {
            v = *reinterpret_cast<const P*>(static_cast<const T*>(p.x_t) + at);
          } else {
#pragma unroll
            for (int i = 0; i < VEC; ++i) v.v[i] = load_converted<T>(p.x_t, p.x_t_dtype, at + i * xs[4]);
          }
          store<T, VEC>(dst + y * os[3], v);
        }
      }
    }
  }
}

// Whether a row of VEC elements at any (b, c, z, y) and x multiple of VEC starts 16-byte
// aligned: base aligned, unit x stride, all other strides multiples of VEC.
bool rows_vectorisable(const void* data, const int64_t* stride, int vec) {
  if (data == nullptr || !aligned16(data) || stride[4] != 1) return false;
  for (int k = 0; k < 4; ++k) {
    if (stride[k] % vec != 0) return false;
  }
  return true;
}

int64_t next_pow2(int64_t v) {
  int64_t p = 1;
  while (p < v) p *= 2;
  return p;
}

template <typename T, int VEC>
void launch(const AssembleParams& p, bool volume_vec, bool x_t_vec, cudaStream_t stream) {
  const int64_t d = p.patch[0], h = p.patch[1], w = p.patch[2];
  const int64_t x_threads = ceil_div(w, VEC);
  const int64_t tx = std::min<int64_t>(next_pow2(x_threads), kThreads);
  int64_t ty = kThreads / tx;
  while (ty > 1 && (ty / 2) * kRowsPerThread >= h) ty /= 2;  // no idle rows of threads
  const int64_t tiles_x = ceil_div(x_threads, tx);
  const int64_t tiles = tiles_x * ceil_div(h, ty * kRowsPerThread);
  if (tiles > INT32_MAX) throw std::runtime_error("patchddm: assemble_input: patch plane too large");
  const int64_t pairs = p.batch * (p.channels + 3 + p.extra);
  const dim3 grid(static_cast<unsigned>(tiles), static_cast<unsigned>(std::min(d, kMaxGridYZ)),
                  static_cast<unsigned>(std::min(pairs, kMaxGridYZ)));
  const dim3 block(static_cast<unsigned>(tx), static_cast<unsigned>(ty));
  assemble_input_kernel<T, VEC><<<grid, block, 0, stream>>>(p, tiles_x, volume_vec, x_t_vec);
  check_launch(VEC > 1 ? "assemble_input (vectorised)" : "assemble_input");
}

}  // namespace

void assemble_input(const AssembleParams& p, DType dtype, cudaStream_t stream) {
  if (p.batch == 0) return;
  dispatch_dtype(dtype, [&]<typename T>() {
    constexpr int kVec = 16 / sizeof(T);
    const bool vec_out = p.patch[2] % kVec == 0 && rows_vectorisable(p.out, p.out_stride, kVec);
    if (vec_out) {
      const bool volume_vec = rows_vectorisable(p.volume, p.volume_stride, kVec);
      const bool x_t_vec = p.x_t_dtype == dtype && rows_vectorisable(p.x_t, p.x_t_stride, kVec);
      launch<T, kVec>(p, volume_vec, x_t_vec, stream);
    } else {
      launch<T, 1>(p, false, false, stream);
    }
  });
}

}  // namespace patchddm::cuda
