// Exact k-nearest-neighbour search on x86-64 CPUs with AVX2, FMA and F16C: the fallback for CPUs without AVX-512
// BF16 or AMX (Intel Haswell to Ice Lake, AMD Zen 1 to 3).
//
// The same two passes as amx_search.cpp. Pass 1 reads the same bf16 key store as the AVX-512 kernel and widens it to
// fp32 (a bf16 value is the top half of an fp32 one: a shift or a mask), so queries stay fp32 and the products are
// fp32 FMAs; a tile of Q queries x 16 keys keeps 2Q ymm accumulators, and the widened keys are shared by the Q
// queries. Distances ||k̃||² − 2 q·k̃ are filtered against each query's running threshold in registers, as in the
// other kernels; pass 2 (exact_search.h) re-ranks the candidates exactly in fp32 from the float16 keys.
//
// Layouts (prepared by knnlm/search/cpu_kernels.py):
//   queries  (Mp, D) fp32 row-major, centered by the key mean; Mp % 32 == 0, D even
//   packed   (Np / 16, D / 2, 16 keys, 2) bf16: each group of 16 keys, dimension pair by dimension pair; Np % 32 == 0
//   norms    (Np,) fp32 squared norms of the centered bf16 keys, +inf for padding rows
//   qf32     (M, Dx) fp32 queries and keys16 (N, Dx) float16 keys, uncentered, for the exact distances
// Plain C ABI, called through ctypes; the signature is knnlm_amx_search's, so one Python wrapper serves all kernels.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "exact_search.h"

namespace {


constexpr int Q = 4;  // queries per tile: 8 accumulators + 4 widened key vectors + 1 broadcast of 16 ymm registers

template <class Cands>  // knnlm::Candidates (approximate) or knnlm::Pruned (exact)
void scan_keys(const float* queries, int64_t q0, int64_t qn, int64_t M, int64_t D, const uint16_t* packed,
               const float* norms, int64_t u0, int64_t u1, int64_t chunk_units, Cands* cands) {
  const int64_t pairs = D / 2, group = 16 * D;  // bf16 values per group of 16 keys
  const __m256 two = _mm256_set1_ps(2.0f);
  const __m256i high = _mm256_set1_epi32(int32_t(0xFFFF0000u));
  const uint32_t base = uint32_t(32 * u0);
  for (int64_t c0 = u0; c0 < u1; c0 += chunk_units) {  // a chunk of keys that stays in L2
    const int64_t c1 = std::min(u1, c0 + chunk_units);
    for (int64_t qt = 0; qt < qn; qt += Q) {
      const int64_t rows = std::min<int64_t>(Q, M - (q0 + qt));
      if (rows <= 0) break;
      const float* qa = queries + (q0 + qt) * D;
      for (int64_t g = 2 * c0; g < 2 * c1; ++g) {  // groups of 16 keys
        const uint16_t* b = packed + g * group;
        __m256 acc[Q][2];
#pragma GCC unroll 4
        for (int r = 0; r < Q; ++r) acc[r][0] = acc[r][1] = _mm256_setzero_ps();
        for (int64_t p = 0; p < pairs; ++p) {
          // keys 0-7 and 8-15 of the group, dimensions 2p (low halves) and 2p + 1 (high halves), widened to fp32
          const __m256i v0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32 * p));
          const __m256i v1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 32 * p + 16));
          const __m256 e0 = _mm256_castsi256_ps(_mm256_slli_epi32(v0, 16));
          const __m256 o0 = _mm256_castsi256_ps(_mm256_and_si256(v0, high));
          const __m256 e1 = _mm256_castsi256_ps(_mm256_slli_epi32(v1, 16));
          const __m256 o1 = _mm256_castsi256_ps(_mm256_and_si256(v1, high));
#pragma GCC unroll 4
          for (int r = 0; r < Q; ++r) {
            const __m256 qe = _mm256_broadcast_ss(qa + r * D + 2 * p);
            const __m256 qo = _mm256_broadcast_ss(qa + r * D + 2 * p + 1);
            acc[r][0] = _mm256_fmadd_ps(qo, o0, _mm256_fmadd_ps(qe, e0, acc[r][0]));
            acc[r][1] = _mm256_fmadd_ps(qo, o1, _mm256_fmadd_ps(qe, e1, acc[r][1]));
          }
        }
        const __m256 n0 = _mm256_loadu_ps(norms + 16 * g);
        const __m256 n1 = _mm256_loadu_ps(norms + 16 * g + 8);
#pragma GCC unroll 4
        for (int r = 0; r < Q; ++r) {
          if (r >= rows) break;
          Cands& cq = cands[qt + r];
          const __m256 thr = _mm256_set1_ps(cq.refresh());
          const __m256 d0 = _mm256_fnmadd_ps(two, acc[r][0], n0);  // ||k̃||² − 2 q·k̃
          const __m256 d1 = _mm256_fnmadd_ps(two, acc[r][1], n1);
          const uint32_t m = uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(d0, thr, _CMP_LT_OQ))) |
                             (uint32_t(_mm256_movemask_ps(_mm256_cmp_ps(d1, thr, _CMP_LT_OQ))) << 8);
          if (m) {
            alignas(32) float tmp[16];
            _mm256_store_ps(tmp, d0);
            _mm256_store_ps(tmp + 8, d1);
            cq.push_masked(m, tmp, uint32_t(16 * g) - base);
          }
        }
      }
      for (int64_t r = 0; r < rows; ++r) cands[qt + r].flush();  // the chunk's keys waiting for exact distances
    }
  }
}

// No staged scan here (cpu_kernels.Kernel.staged is False): the pruned search scans all its directions at once.
template <class Cands>
void scan_staged(const float* queries, int64_t q0, int64_t qn, int64_t M, int64_t D, const uint16_t* packed,
                 const float* norms, const float* /*norms_first*/, int64_t /*first_pairs*/, int64_t u0, int64_t u1,
                 int64_t chunk, Cands* cands) {
  scan_keys(queries, q0, qn, M, D, packed, norms, u0, u1, chunk, cands);
}

}  // namespace

extern "C" {

// 1 where this CPU and OS run the kernel (AVX2, FMA and F16C), else 0: checked before the first search.
int knnlm_avx2_init() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") ? 1 : 0;
}

}  // extern "C"

KNNLM_ENTRY_POINTS(avx2, float)
