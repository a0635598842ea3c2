// Exact k-nearest-neighbour search on CPUs with AMX (Intel Sapphire Rapids and later).
//
// Pass 1 (approximate): squared L2 distances between bf16 queries and bf16 keys from AMX tile products
// (TDPBF16PS, fp32 accumulation), computed block by block and filtered on the fly against each query's running
// threshold, so no distance matrix is ever written to memory. Each query keeps its C = k + margin best candidates.
// Pass 2 (exact): the candidates are re-ranked with fp32 distances computed from the stored float16 keys, and the
// k nearest are returned, nearest first.
//
// Layouts (prepared by knnlm/search/cpu_kernels.py):
//   queries  (Mp, D) bf16 row-major, centered by the key mean; Mp % 32 == 0, D % 32 == 0
//   packed   keys in AMX's VNNI tile layout: (Np / 16, D / 32, 16 pairs, 16 keys, 2) bf16; Np % 32 == 0
//   norms    (Np,) fp32 squared norms of the centered keys, +inf for padding rows
//   qf32     (M, Dx) fp32 queries and keys16 (N, Dx) float16 keys, uncentered, for the exact distances
// Plain C ABI, called through ctypes; threads, candidate buffers and pass 2 are shared with the AVX-512 and AVX2
// kernels (exact_search.h).

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <cstdint>

#include "exact_search.h"

namespace {

struct TileConfig {
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

void configure_tiles() {
  TileConfig cfg = {};
  cfg.palette_id = 1;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;  // every tile is 16 rows x 64 bytes (16 fp32 or 32 bf16)
    cfg.rows[t] = 16;
  }
  _tile_loadconfig(&cfg);
}

// One thread's share of pass 1: queries [q0, q0 + qn) of the block against key pairs [p0, p1) (32 keys each).
template <class Cands>  // knnlm::Candidates (approximate) or knnlm::Pruned (exact)
void scan_keys(const uint16_t* queries, int64_t q0, int64_t qn, int64_t M, int64_t D, const uint16_t* packed,
               const float* norms, int64_t p0, int64_t p1, int64_t kchunk_pairs, Cands* cands) {
  const int64_t nc = D / 32;  // 32-dimension chunks
  alignas(64) float out[32 * 32];
  configure_tiles();
  for (int64_t c0 = p0; c0 < p1; c0 += kchunk_pairs) {  // a chunk of keys that stays in L2
    const int64_t c1 = std::min(p1, c0 + kchunk_pairs);
    for (int64_t qp = 0; qp < qn; qp += 32) {
      const uint16_t* qa = queries + (q0 + qp) * D;
      const uint16_t* qb = qa + 16 * D;
      for (int64_t p = c0; p < c1; ++p) {
        const uint16_t* b0 = packed + (2 * p) * nc * 512;
        const uint16_t* b1 = b0 + nc * 512;
        _tile_zero(0);
        _tile_zero(1);
        _tile_zero(2);
        _tile_zero(3);
        for (int64_t c = 0; c < nc; ++c) {
          _tile_loadd(4, qa + c * 32, D * 2);
          _tile_loadd(5, qb + c * 32, D * 2);
          _tile_loadd(6, b0 + c * 512, 64);
          _tile_loadd(7, b1 + c * 512, 64);
          _tile_dpbf16ps(0, 4, 6);
          _tile_dpbf16ps(1, 4, 7);
          _tile_dpbf16ps(2, 5, 6);
          _tile_dpbf16ps(3, 5, 7);
        }
        _tile_stored(0, out, 128);
        _tile_stored(1, out + 16, 128);
        _tile_stored(2, out + 16 * 32, 128);
        _tile_stored(3, out + 16 * 32 + 16, 128);
        const int64_t k0 = 32 * p, base = 32 * p0;
        const __m512 n0 = _mm512_loadu_ps(norms + k0);
        const __m512 n1 = _mm512_loadu_ps(norms + k0 + 16);
        const int64_t rows = std::min<int64_t>(32, M - (q0 + qp));
        for (int64_t r = 0; r < rows; ++r)
          knnlm::test_scores(cands[qp + r], _mm512_load_ps(out + r * 32), _mm512_load_ps(out + r * 32 + 16), n0, n1,
                             uint32_t(k0 - base));
      }
      const int64_t rows = std::min<int64_t>(32, M - (q0 + qp));
      for (int64_t r = 0; r < rows; ++r) cands[qp + r].flush();  // the chunk's keys waiting for exact distances
    }
  }
  _tile_release();
}

// No staged scan here (cpu_kernels.Kernel.staged is False): the pruned search scans all its directions at once.
template <class Cands>
void scan_staged(const uint16_t* queries, int64_t q0, int64_t qn, int64_t M, int64_t D, const uint16_t* packed,
                 const float* norms, const float* /*norms_first*/, int64_t /*first_pairs*/, int64_t u0, int64_t u1,
                 int64_t chunk, Cands* cands) {
  scan_keys(queries, q0, qn, M, D, packed, norms, u0, u1, chunk, cands);
}

}  // namespace

extern "C" {

// Ask Linux for permission to use AMX tile data (once per process). Returns 1 on success.
int knnlm_amx_init() {
  const long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : 0;
}

}  // extern "C"

KNNLM_ENTRY_POINTS(amx, uint16_t)
