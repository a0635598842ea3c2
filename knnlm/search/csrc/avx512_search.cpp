// Exact k-nearest-neighbour search on CPUs with AVX-512 BF16 and no AMX (AMD Zen 4 and later, Intel Cooper Lake).
//
// The same two passes as amx_search.cpp, with VDPBF16PS (16 fp32 lanes, each += the product of a pair of bf16
// values, fp32 accumulation) in place of AMX tiles:
// Pass 1 (approximate): for a tile of Q queries x 32 keys, 2Q zmm accumulators hold q̃·k̃ over all dimensions; the
// keys of a pair of dimensions are one 64-byte load (16 keys x 2 dims), each query's pair is a 32-bit broadcast.
// The tile's ||k̃||² − 2 q̃·k̃ are compared with each query's running threshold while still in registers, and the few
// below it are pushed to the query's candidates (exact_search.h). Pass 2 re-ranks them exactly in fp32.
//
// Layouts (prepared by knnlm/search/cpu_kernels.py):
//   queries  (Mp, D) bf16 row-major, centered by the key mean; Mp % 32 == 0, D even
//   packed   (Np / 16, D / 2, 16 keys, 2) bf16: each group of 16 keys, dimension pair by dimension pair; Np % 32 == 0
//   norms    (Np,) fp32 squared norms of the centered bf16 keys, +inf for padding rows
//   qf32     (M, Dx) fp32 queries and keys16 (N, Dx) float16 keys, uncentered, for the exact distances
// Plain C ABI, called through ctypes; the signature is knnlm_amx_search's, so one Python wrapper serves both.

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "exact_search.h"

namespace {


constexpr int Q = 8;  // queries per tile: 16 accumulators + 2 key vectors + 1 broadcast of 32 zmm registers

inline __m512bh as_bf16(__m512i x) { return (__m512bh)x; }

inline __m512i broadcast_pair(const uint16_t* p) {  // two bf16 values as one 32-bit lane, in all 16 lanes
  int32_t v;
  std::memcpy(&v, p, 4);
  return _mm512_set1_epi32(v);
}

// acc[r] += the products of query r of the tile (rows of qa, D bf16 values apart) with the 32 keys of groups b0, b1
// over dimension pairs [p0, p1): the keys of a pair are one load each, shared by the tile's Q queries.
// (forced inline: a call would keep acc in memory, and the staged scan measured 10-22 % slower on Zen 4)
__attribute__((always_inline)) inline void tile_products(__m512 (&acc)[Q][2], const uint16_t* qa, int64_t D,
                                                         const uint16_t* b0, const uint16_t* b1, int64_t p0,
                                                         int64_t p1) {
  for (int64_t p = p0; p < p1; ++p) {
    const __m512bh k0 = as_bf16(_mm512_loadu_si512(b0 + 32 * p));
    const __m512bh k1 = as_bf16(_mm512_loadu_si512(b1 + 32 * p));
#pragma GCC unroll 8
    for (int r = 0; r < Q; ++r) {
      const __m512bh qv = as_bf16(broadcast_pair(qa + r * D + 2 * p));
      acc[r][0] = _mm512_dpbf16_ps(acc[r][0], qv, k0);
      acc[r][1] = _mm512_dpbf16_ps(acc[r][1], qv, k1);
    }
  }
}

// The loops of a scan: queries [q0, q0 + qn) against keys [32 u0, 32 u1), one chunk of keys (chunk_units x 32) at a
// time so that a chunk stays in L2 while every tile of Q queries passes over it; tile(qt, rows, u) handles queries
// qt.. (rows of them, relative to q0) against the unit of 32 keys u; each query's waiting keys are flushed at the end
// of its tile's pass over a chunk.
template <class Cands, class Tile>
__attribute__((always_inline)) inline void for_each_tile(int64_t q0, int64_t qn, int64_t M, int64_t u0, int64_t u1,
                                                         int64_t chunk_units, Cands* cands, Tile&& tile) {
  for (int64_t c0 = u0; c0 < u1; c0 += chunk_units) {
    const int64_t c1 = std::min(u1, c0 + chunk_units);
    for (int64_t qt = 0; qt < qn; qt += Q) {
      const int64_t rows = std::min<int64_t>(Q, M - (q0 + qt));
      if (rows <= 0) break;
      for (int64_t u = c0; u < c1; ++u) tile(qt, rows, u);
      for (int64_t r = 0; r < rows; ++r) cands[qt + r].flush();  // the chunk's keys waiting for exact distances
    }
  }
}

// Queries [q0, q0 + qn) against keys [32 u0, 32 u1), one chunk of keys (chunk_units x 32) at a time so that a chunk
// stays in L2 while every query tile of the block passes over it.
template <class Cands>  // knnlm::Candidates (approximate) or knnlm::Pruned (exact)
void scan_keys(const uint16_t* queries, int64_t q0, int64_t qn, int64_t M, int64_t D, const uint16_t* packed,
               const float* norms, int64_t u0, int64_t u1, int64_t chunk_units, Cands* cands) {
  const int64_t group = 16 * D;  // bf16 values per group of 16 keys
  const uint32_t base = uint32_t(32 * u0);
  for_each_tile(q0, qn, M, u0, u1, chunk_units, cands, [=](int64_t qt, int64_t rows, int64_t u) {
    const uint16_t* qa = queries + (q0 + qt) * D;
    const uint16_t* b0 = packed + 2 * u * group;
    __m512 acc[Q][2];
#pragma GCC unroll 8
    for (int r = 0; r < Q; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    tile_products(acc, qa, D, b0, b0 + group, 0, D / 2);
    const __m512 n0 = _mm512_loadu_ps(norms + 32 * u);
    const __m512 n1 = _mm512_loadu_ps(norms + 32 * u + 16);
#pragma GCC unroll 8
    for (int r = 0; r < Q; ++r) {
      if (r >= rows) break;
      knnlm::test_scores(cands[qt + r], acc[r][0], acc[r][1], n0, n1, uint32_t(32 * u) - base);
    }
  });
}

// The pruned search's staged scan (exact_search.h): per tile of Q queries x 32 keys, the products of the first
// first_pairs dimension pairs for all Q queries (as scan_keys), then each query's scores of that part are tested
// against its first-stage threshold. If more than kDense queries have a key below it, the whole tile carries on
// through the remaining pairs as in scan_keys; else only those queries do, one at a time (the tile's 32 keys are in
// L1 by then), with eight accumulators so that the products' latency does not bound them.
constexpr int kDense = 4;

template <class Cands>
void scan_staged(const uint16_t* queries, int64_t q0, int64_t qn, int64_t M, int64_t D, const uint16_t* packed,
                 const float* norms, const float* norms_first, int64_t first_pairs, int64_t u0, int64_t u1,
                 int64_t chunk_units, Cands* cands) {
  const int64_t pairs = D / 2, group = 16 * D;
  const __m512 two = _mm512_set1_ps(2.0f);
  const uint32_t base = uint32_t(32 * u0);
  alignas(64) float part[Q][32];  // the first stage's products of the queries that go on alone
  for_each_tile(q0, qn, M, u0, u1, chunk_units, cands, [&](int64_t qt, int64_t rows, int64_t u) {
    const uint16_t* qa = queries + (q0 + qt) * D;
    const uint16_t* b0 = packed + 2 * u * group;
    const uint16_t* b1 = b0 + group;
    __m512 acc[Q][2];
#pragma GCC unroll 8
    for (int r = 0; r < Q; ++r) acc[r][0] = acc[r][1] = _mm512_setzero_ps();
    tile_products(acc, qa, D, b0, b1, 0, first_pairs);
    const __m512 f0 = _mm512_loadu_ps(norms_first + 32 * u);
    const __m512 f1 = _mm512_loadu_ps(norms_first + 32 * u + 16);
    uint32_t alive = 0;
#pragma GCC unroll 8
    for (int r = 0; r < Q; ++r) {
      if (r >= rows) break;
      const __m512 thr = _mm512_set1_ps(cands[qt + r].refresh_first());
      const __mmask16 m0 = _mm512_cmp_ps_mask(_mm512_fnmadd_ps(two, acc[r][0], f0), thr, _CMP_LT_OQ);
      const __mmask16 m1 = _mm512_cmp_ps_mask(_mm512_fnmadd_ps(two, acc[r][1], f1), thr, _CMP_LT_OQ);
      alive |= uint32_t((m0 | m1) != 0) << r;
    }
    if (!alive) return;
    const __m512 n0 = _mm512_loadu_ps(norms + 32 * u);
    const __m512 n1 = _mm512_loadu_ps(norms + 32 * u + 16);
    const uint32_t first_key = uint32_t(32 * u) - base;
    if (__builtin_popcount(alive) > kDense) {  // the tile goes on as a whole
      tile_products(acc, qa, D, b0, b1, first_pairs, pairs);
#pragma GCC unroll 8
      for (int r = 0; r < Q; ++r)
        if ((alive >> r) & 1) knnlm::test_scores(cands[qt + r], acc[r][0], acc[r][1], n0, n1, first_key);
      return;
    }
#pragma GCC unroll 8
    for (int r = 0; r < Q; ++r) {
      if ((alive >> r) & 1) {
        _mm512_store_ps(part[r], acc[r][0]);
        _mm512_store_ps(part[r] + 16, acc[r][1]);
      }
    }
    while (alive) {  // a few queries go on alone
      const int r = __builtin_ctz(alive);
      alive &= alive - 1;
      const uint16_t* qr = qa + r * D;
      __m512 a[4][2];
      a[0][0] = _mm512_load_ps(part[r]);
      a[0][1] = _mm512_load_ps(part[r] + 16);
      for (int j = 1; j < 4; ++j) a[j][0] = a[j][1] = _mm512_setzero_ps();
      int64_t p = first_pairs;
      for (; p + 3 < pairs; p += 4) {
#pragma GCC unroll 4
        for (int j = 0; j < 4; ++j) {
          const __m512bh qv = as_bf16(broadcast_pair(qr + 2 * (p + j)));
          a[j][0] = _mm512_dpbf16_ps(a[j][0], qv, as_bf16(_mm512_loadu_si512(b0 + 32 * (p + j))));
          a[j][1] = _mm512_dpbf16_ps(a[j][1], qv, as_bf16(_mm512_loadu_si512(b1 + 32 * (p + j))));
        }
      }
      for (; p < pairs; ++p) {
        const __m512bh qv = as_bf16(broadcast_pair(qr + 2 * p));
        a[0][0] = _mm512_dpbf16_ps(a[0][0], qv, as_bf16(_mm512_loadu_si512(b0 + 32 * p)));
        a[0][1] = _mm512_dpbf16_ps(a[0][1], qv, as_bf16(_mm512_loadu_si512(b1 + 32 * p)));
      }
      const __m512 s0 = _mm512_add_ps(_mm512_add_ps(a[0][0], a[1][0]), _mm512_add_ps(a[2][0], a[3][0]));
      const __m512 s1 = _mm512_add_ps(_mm512_add_ps(a[0][1], a[1][1]), _mm512_add_ps(a[2][1], a[3][1]));
      knnlm::test_scores(cands[qt + r], s0, s1, n0, n1, first_key);
    }
  });
}

}  // namespace

extern "C" {

// 1 where this CPU and OS run the kernel (AVX-512 F and BF16 state enabled), else 0: checked before the first search.
int knnlm_avx512_init() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bf16") ? 1 : 0;
}

}  // extern "C"

KNNLM_ENTRY_POINTS(avx512, uint16_t)
