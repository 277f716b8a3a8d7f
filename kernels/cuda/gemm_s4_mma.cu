// W4A4 GEMM on native int4 tensor cores: mma.sync.aligned.m16n8k64 (sm_80 / sm_86 / sm_87, Jetson Orin).
// It also compiles for sm_90, where ptxas emulates the int4 MMA with int8 IMMA: right answers, not fast.
//
// A: packed int4 activations uint8 [M, ceil(K/2)], signed (s4) or unsigned (u4) nibbles.
// B: packed signed int4 weights uint8 [N, ceil(K/2)] (per output channel, K-contiguous = mma "col").
// Nibble order (kernels/packing.py): element 2i in bits 0-3, 2i+1 in bits 4-7 of byte i, so a little-endian
// 32-bit word holds 8 consecutive K elements, lowest K in the lowest bits: exactly the PTX fragment order.
// An odd K has a zero pad nibble in both operands, so it adds nothing.
//
// Epilogue (same as kernels/gemm_w4a8.py:epilogue_ref, each step rounded in float32, no FMA):
//   out[m, n] = float(acc[m, n] - zcorr[n]) * (x_step * w_step[n]) + bias[n]
// mode 0: float32 out, 1: float16 out, 2: int32 acc - zcorr, 3: int8 codes
//   clamp(rint(out / q_step) + q_zp, q_min, q_max) (round half to even, correctly rounded division).
//
// Tiling: CTA 64 x 64 outputs, 4 warps (2 x 2), warp tile 32 x 32 = 2 x 4 mma tiles of 16 x 8; K staged in
// shared memory 128 nibbles (64 bytes) at a time, rows padded to 80 bytes so the fragment reads of a warp
// hit 32 distinct banks. Build with -DQDETR_NO_TORCH to compile the kernel without the PyTorch binding.

#include <cstdint>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

namespace qdetr {

constexpr int kBM = 64;
constexpr int kBN = 64;
constexpr int kBKB = 64;              // bytes of K per stage (128 int4 values, two k64 mma steps)
constexpr int kRow = kBKB + 16;       // padded shared-memory row in bytes (keeps 16-byte alignment)
constexpr int kWarpsN = 2;
constexpr int kThreads = 128;

struct Epilogue {
  const int32_t* zcorr;   // [N]
  const float* w_step;    // [N]
  const float* bias;      // [N] or nullptr
  float x_step;
  float q_step;
  int q_zp, q_min, q_max;
};

template <bool kASigned>
__device__ __forceinline__ void mma_k64(int32_t c[4], const uint32_t a[4], const uint32_t b[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  if constexpr (kASigned) {
    asm volatile(
        "mma.sync.aligned.m16n8k64.row.col.s32.s4.s4.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k64.row.col.s32.u4.s4.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+r"(c[0]), "+r"(c[1]), "+r"(c[2]), "+r"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
  }
#elif defined(__CUDA_ARCH__)
  __trap();  // no int4 mma.sync before sm_80: fail loudly rather than return zeros
#endif
}

// Copy a [64 rows, 64 bytes] tile of a row-major byte matrix into shared memory, zero outside
// [rows, kbytes). kVec: the row stride and base are 16-byte aligned, so whole chunks load as uint4.
template <bool kVec>
__device__ __forceinline__ void load_tile(uint8_t* smem, const uint8_t* g, int64_t ld, int row0, int rows,
                                          int kb0, int kbytes) {
  for (int chunk = threadIdx.x; chunk < kBM * (kBKB / 16); chunk += kThreads) {
    const int r = chunk / (kBKB / 16);
    const int cb = (chunk % (kBKB / 16)) * 16;
    const int gr = row0 + r;
    const int gk = kb0 + cb;
    uint4 v = make_uint4(0u, 0u, 0u, 0u);
    if (gr < rows) {
      const uint8_t* src = g + static_cast<int64_t>(gr) * ld + gk;
      if (kVec && gk + 16 <= kbytes) {
        v = *reinterpret_cast<const uint4*>(src);
      } else {
        uint32_t w[4] = {0u, 0u, 0u, 0u};  // little-endian: byte i goes to bits 8*(i%4) of word i/4
#pragma unroll
        for (int i = 0; i < 16; ++i) {
          if (gk + i < kbytes) w[i / 4] |= static_cast<uint32_t>(src[i]) << (8 * (i % 4));
        }
        v = make_uint4(w[0], w[1], w[2], w[3]);
      }
    }
    *reinterpret_cast<uint4*>(smem + r * kRow + cb) = v;
  }
}

__device__ __forceinline__ float dequant(int32_t acc, int n, const Epilogue& ep) {
  const float scale = __fmul_rn(ep.x_step, ep.w_step[n]);
  float v = __fmul_rn(static_cast<float>(acc - ep.zcorr[n]), scale);  // int -> float rounds to nearest
  if (ep.bias != nullptr) v = __fadd_rn(v, ep.bias[n]);
  return v;
}

__device__ __forceinline__ int8_t quantize(float v, const Epilogue& ep) {
  float y = __fdiv_rn(v, ep.q_step);
  y = fminf(fmaxf(y, -16777216.0f), 16777216.0f);
  float q = __fadd_rn(rintf(y), static_cast<float>(ep.q_zp));  // rintf: round half to even
  q = fminf(fmaxf(q, static_cast<float>(ep.q_min)), static_cast<float>(ep.q_max));
  return static_cast<int8_t>(q);
}

template <int kMode>
__device__ __forceinline__ void store_one(void* out, int64_t idx, int32_t acc, int n, const Epilogue& ep) {
  if constexpr (kMode == 2) {
    static_cast<int32_t*>(out)[idx] = acc - ep.zcorr[n];
  } else {
    const float v = dequant(acc, n, ep);
    if constexpr (kMode == 0) static_cast<float*>(out)[idx] = v;
    if constexpr (kMode == 1) static_cast<__half*>(out)[idx] = __float2half_rn(v);
    if constexpr (kMode == 3) static_cast<int8_t*>(out)[idx] = quantize(v, ep);
  }
}

template <bool kASigned, bool kVec, int kMode>
__global__ void __launch_bounds__(kThreads) gemm_s4_mma_kernel(const uint8_t* __restrict__ a,
                                                               const uint8_t* __restrict__ b, void* out,
                                                               int M, int N, int KB, Epilogue ep) {
  __shared__ __align__(16) uint8_t sa[kBM * kRow];
  __shared__ __align__(16) uint8_t sb[kBN * kRow];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;  // groupID, threadID_in_group
  const int wm = (warp / kWarpsN) * 32, wn = (warp % kWarpsN) * 32;
  const int m0 = blockIdx.y * kBM, n0 = blockIdx.x * kBN;
  int32_t acc[2][4][4] = {};

  for (int kb0 = 0; kb0 < KB; kb0 += kBKB) {
    load_tile<kVec>(sa, a, KB, m0, M, kb0, KB);
    load_tile<kVec>(sb, b, KB, n0, N, kb0, KB);
    __syncthreads();
#pragma unroll
    for (int ks = 0; ks < kBKB; ks += 32) {  // one k64 step = 32 bytes
      uint32_t af[2][4], bf[4][2];
#pragma unroll
      for (int mi = 0; mi < 2; ++mi) {
        const uint8_t* p = sa + (wm + mi * 16 + g) * kRow + ks + t * 4;
        af[mi][0] = *reinterpret_cast<const uint32_t*>(p);
        af[mi][1] = *reinterpret_cast<const uint32_t*>(p + 8 * kRow);
        af[mi][2] = *reinterpret_cast<const uint32_t*>(p + 16);
        af[mi][3] = *reinterpret_cast<const uint32_t*>(p + 8 * kRow + 16);
      }
#pragma unroll
      for (int ni = 0; ni < 4; ++ni) {
        const uint8_t* p = sb + (wn + ni * 8 + g) * kRow + ks + t * 4;
        bf[ni][0] = *reinterpret_cast<const uint32_t*>(p);
        bf[ni][1] = *reinterpret_cast<const uint32_t*>(p + 16);
      }
#pragma unroll
      for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) mma_k64<kASigned>(acc[mi][ni], af[mi], bf[ni]);
    }
    __syncthreads();
  }

#pragma unroll
  for (int mi = 0; mi < 2; ++mi)
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int m = m0 + wm + mi * 16 + g + (i / 2) * 8;  // c0,c1: row g; c2,c3: row g + 8
        const int n = n0 + wn + ni * 8 + t * 2 + (i % 2);
        if (m < M && n < N) store_one<kMode>(out, static_cast<int64_t>(m) * N + n, acc[mi][ni][i], n, ep);
      }
}

template <bool kASigned, bool kVec>
cudaError_t launch_mode(const uint8_t* a, const uint8_t* b, void* out, int M, int N, int KB, int mode,
                        const Epilogue& ep, cudaStream_t stream) {
  const dim3 grid((N + kBN - 1) / kBN, (M + kBM - 1) / kBM);
  switch (mode) {
    case 0: gemm_s4_mma_kernel<kASigned, kVec, 0><<<grid, kThreads, 0, stream>>>(a, b, out, M, N, KB, ep); break;
    case 1: gemm_s4_mma_kernel<kASigned, kVec, 1><<<grid, kThreads, 0, stream>>>(a, b, out, M, N, KB, ep); break;
    case 2: gemm_s4_mma_kernel<kASigned, kVec, 2><<<grid, kThreads, 0, stream>>>(a, b, out, M, N, KB, ep); break;
    case 3: gemm_s4_mma_kernel<kASigned, kVec, 3><<<grid, kThreads, 0, stream>>>(a, b, out, M, N, KB, ep); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

// Host launcher (no PyTorch types): a [M, KB] and b [N, KB] contiguous uint8, out [M, N] contiguous.
cudaError_t gemm_s4_mma(const uint8_t* a, const uint8_t* b, void* out, int M, int N, int KB, bool a_signed,
                        int mode, const Epilogue& ep, cudaStream_t stream) {
  const bool vec = (KB % 16 == 0) && (reinterpret_cast<uintptr_t>(a) % 16 == 0) &&
                   (reinterpret_cast<uintptr_t>(b) % 16 == 0);
  if (a_signed) {
    return vec ? launch_mode<true, true>(a, b, out, M, N, KB, mode, ep, stream)
               : launch_mode<true, false>(a, b, out, M, N, KB, mode, ep, stream);
  }
  return vec ? launch_mode<false, true>(a, b, out, M, N, KB, mode, ep, stream)
             : launch_mode<false, false>(a, b, out, M, N, KB, mode, ep, stream);
}

}  // namespace qdetr

#ifndef QDETR_NO_TORCH
// PyTorch binding through the dispatcher (no pybind11, light headers): torch.ops.qdetr_mma.w4a4_gemm.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

// mode: 0 float32, 1 float16, 2 int32 acc - zcorr, 3 int8 codes of (q_step, q_zp, q_min, q_max).
at::Tensor w4a4_gemm(const at::Tensor& a, const at::Tensor& b, bool a_signed, const at::Tensor& w_step,
                     const at::Tensor& zcorr, double x_step, const c10::optional<at::Tensor>& bias, int64_t mode,
                     double q_step, int64_t q_zp, int64_t q_min, int64_t q_max) {
  TORCH_CHECK(a.is_cuda() && b.is_cuda(), "w4a4_gemm: CUDA tensors required");
  TORCH_CHECK(a.scalar_type() == at::kByte && b.scalar_type() == at::kByte, "packed uint8 operands required");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1), "a [M, KB] and b [N, KB] required");
  TORCH_CHECK(mode >= 0 && mode <= 3, "mode must be 0..3");
  const c10::cuda::CUDAGuard guard(a.device());
  const at::Tensor ac = a.contiguous(), bc = b.contiguous();
  const at::Tensor ws = w_step.to(at::kFloat).contiguous(), zc = zcorr.to(at::kInt).contiguous();
  at::Tensor bs;
  if (bias.has_value()) bs = bias->to(at::kFloat).contiguous();
  const int M = static_cast<int>(ac.size(0)), N = static_cast<int>(bc.size(0)), KB = static_cast<int>(ac.size(1));
  TORCH_CHECK(ws.numel() == N && zc.numel() == N, "w_step and zcorr must have N elements");
  const at::ScalarType types[] = {at::kFloat, at::kHalf, at::kInt, at::kChar};
  at::Tensor out = at::empty({M, N}, ac.options().dtype(types[mode]));
  if (M == 0 || N == 0) return out;
  const qdetr::Epilogue ep{zc.data_ptr<int32_t>(), ws.data_ptr<float>(),
                           bias.has_value() ? bs.data_ptr<float>() : nullptr, static_cast<float>(x_step),
                           static_cast<float>(q_step), static_cast<int>(q_zp), static_cast<int>(q_min),
                           static_cast<int>(q_max)};
  const cudaError_t err = qdetr::gemm_s4_mma(ac.data_ptr<uint8_t>(), bc.data_ptr<uint8_t>(), out.data_ptr(), M, N,
                                             KB, a_signed, static_cast<int>(mode), ep,
                                             c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "w4a4_gemm launch failed: ", cudaGetErrorString(err));
  return out;
}

TORCH_LIBRARY(qdetr_mma, m) {
  m.def("w4a4_gemm(Tensor a, Tensor b, bool a_signed, Tensor w_step, Tensor zcorr, float x_step, Tensor? bias, "
        "int mode, float q_step, int q_zp, int q_min, int q_max) -> Tensor");
}

TORCH_LIBRARY_IMPL(qdetr_mma, CUDA, m) { m.impl("w4a4_gemm", &w4a4_gemm); }
#endif  // QDETR_NO_TORCH
