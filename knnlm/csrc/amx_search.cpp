// Exact k-nearest-neighbour search on CPUs with AMX (Intel Sapphire Rapids and later).
//
// Pass 1 (approximate): squared L2 distances between bf16 queries and bf16 keys from AMX tile products
// (TDPBF16PS, fp32 accumulation), computed block by block and filtered on the fly against each query's running
// threshold, so no distance matrix is ever written to memory. Each query keeps its C = k + margin best candidates.
// Pass 2 (exact): the candidates are re-ranked with fp32 distances computed from the stored float16 keys, and the
// k nearest are returned, nearest first.
//
// Layouts (prepared by knnlm/fastsearch.py):
//   queries  (Mp, D) bf16 row-major, centered by the key mean; Mp % 32 == 0, D % 32 == 0
//   packed   keys in AMX's VNNI tile layout: (Np / 16, D / 32, 16 pairs, 16 keys, 2) bf16; Np % 32 == 0
//   norms    (Np,) fp32 squared norms of the centered keys, +inf for padding rows
//   qf32     (M, Dx) fp32 queries and keys16 (N, Dx) float16 keys, uncentered, for the exact distances
// Plain C ABI, called through ctypes; threads are std::threads.

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

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

struct Cand {  // 8 bytes: candidate buffers of a query block stay small enough to live in cache
  float d;
  uint32_t i;  // key index relative to the thread's first key
};

struct Ranked {
  float d;
  int64_t i;
};

template <class T>
inline bool closer(const T& a, const T& b) { return a.d < b.d || (a.d == b.d && a.i < b.i); }

// One thread's `keep` smallest approximate distances seen so far for one query. Anything at or above `thr` cannot
// enter; `shared` is the smallest `thr` over all threads (each thread's keep-th best bounds the global keep-th best),
// so a thread also skips keys another thread has already beaten.
struct Candidates {
  std::vector<Cand> buf;
  size_t keep = 0;
  float thr = INFINITY;
  std::atomic<float>* shared = nullptr;
  void reset(size_t keep_, std::atomic<float>* shared_) {
    keep = keep_;
    buf.clear();
    buf.reserve(2 * keep_);
    thr = INFINITY;
    shared = shared_;
  }
  void compact() {
    if (buf.size() <= keep) return;
    std::nth_element(buf.begin(), buf.begin() + (keep - 1), buf.end(), closer<Cand>);
    buf.resize(keep);
    thr = buf[keep - 1].d;
    float cur = shared->load(std::memory_order_relaxed);
    while (thr < cur && !shared->compare_exchange_weak(cur, thr, std::memory_order_relaxed)) {
    }
    thr = std::min(thr, shared->load(std::memory_order_relaxed));
  }
  inline void push(float d, uint32_t i) {
    buf.push_back({d, i});
    if (buf.size() >= 2 * keep) compact();
  }
};

inline float exact_sq_distance(const float* q, const uint16_t* key, int64_t dim) {
  __m512 acc = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= dim; j += 16) {
    __m512 kv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(key + j)));
    __m512 diff = _mm512_sub_ps(_mm512_loadu_ps(q + j), kv);
    acc = _mm512_fmadd_ps(diff, diff, acc);
  }
  float s = _mm512_reduce_add_ps(acc);
  for (; j < dim; ++j) {
    float kv = _cvtsh_ss(key[j]);
    float diff = q[j] - kv;
    s += diff * diff;
  }
  return s;
}

// One thread's share of pass 1: queries [q0, q0 + qn) of the block against key pairs [p0, p1) (32 keys each).
void scan_keys(const uint16_t* queries, int64_t q0, int64_t qn, int64_t M, int64_t D, const uint16_t* packed,
               const float* norms, int64_t p0, int64_t p1, int64_t kchunk_pairs, Candidates* cands) {
  const int64_t nc = D / 32;  // 32-dimension chunks
  alignas(64) float out[32 * 32];
  const __m512 two = _mm512_set1_ps(2.0f);
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
        for (int64_t r = 0; r < rows; ++r) {
          Candidates& cq = cands[qp + r];
          cq.thr = std::min(cq.thr, cq.shared->load(std::memory_order_relaxed));
          const __m512 thr = _mm512_set1_ps(cq.thr);
          const __m512 d0 = _mm512_fnmadd_ps(two, _mm512_load_ps(out + r * 32), n0);  // ||k||² − 2 q·k
          const __m512 d1 = _mm512_fnmadd_ps(two, _mm512_load_ps(out + r * 32 + 16), n1);
          const __mmask16 m0 = _mm512_cmp_ps_mask(d0, thr, _CMP_LT_OQ);
          const __mmask16 m1 = _mm512_cmp_ps_mask(d1, thr, _CMP_LT_OQ);
          if (m0 | m1) {
            alignas(64) float tmp[32];
            _mm512_store_ps(tmp, d0);
            _mm512_store_ps(tmp + 16, d1);
            uint32_t m = uint32_t(m0) | (uint32_t(m1) << 16);
            while (m) {
              const int j = __builtin_ctz(m);
              m &= m - 1;
              if (tmp[j] < cq.thr) cq.push(tmp[j], uint32_t(k0 + j - base));
            }
          }
        }
      }
    }
  }
  _tile_release();
}

}  // namespace

extern "C" {

// Ask Linux for permission to use AMX tile data (once per process). Returns 1 on success.
int knnlm_amx_init() {
  const long ARCH_REQ_XCOMP_PERM = 0x1023, XFEATURE_XTILEDATA = 18;
  return syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0 ? 1 : 0;
}

void knnlm_amx_search(const uint16_t* queries, int64_t M, int64_t D, const uint16_t* packed, const float* norms,
                      int64_t Np, const float* qf32, const uint16_t* keys16, int64_t N, int64_t Dx, int64_t k,
                      int64_t C, int nthreads, int64_t qblock, int64_t kchunk, float* out_d, int64_t* out_i) {
  nthreads = std::max(1, nthreads);
  qblock = std::max<int64_t>(32, qblock / 32 * 32);
  const int64_t pairs = Np / 32, kchunk_pairs = std::max<int64_t>(1, kchunk / 32);
  std::vector<std::vector<Candidates>> cands(nthreads, std::vector<Candidates>(qblock));
  std::vector<std::atomic<float>> shared(qblock);
  for (int64_t q0 = 0; q0 < M; q0 += qblock) {
    const int64_t qn = std::min(qblock, M - q0);
    const int64_t qn_tiles = (qn + 31) / 32 * 32;
    for (int64_t r = 0; r < qn; ++r) shared[r].store(INFINITY);
    // Pass 1: the keys are split between threads; each thread keeps its own candidates for every query.
    std::vector<std::thread> pool;
    for (int t = 0; t < nthreads; ++t) {
      pool.emplace_back([&, t] {
        for (int64_t r = 0; r < qn; ++r) cands[t][r].reset(size_t(C), &shared[r]);
        const int64_t p0 = pairs * t / nthreads, p1 = pairs * (t + 1) / nthreads;
        scan_keys(queries, q0, qn_tiles, M, D, packed, norms, p0, p1, kchunk_pairs, cands[t].data());
      });
    }
    for (auto& th : pool) th.join();
    pool.clear();
    // Pass 2: merge the threads' candidates, keep the C best, re-rank them exactly, return the k nearest.
    for (int t = 0; t < nthreads; ++t) {
      pool.emplace_back([&, t] {
        std::vector<Ranked> all;
        for (int64_t r = t; r < qn; r += nthreads) {
          all.clear();
          for (int u = 0; u < nthreads; ++u) {
            const int64_t base = 32 * (pairs * u / nthreads);
            for (const Cand& c : cands[u][r].buf) all.push_back({c.d, base + c.i});
          }
          if (int64_t(all.size()) > C) {
            std::nth_element(all.begin(), all.begin() + (C - 1), all.end(), closer<Ranked>);
            all.resize(C);
          }
          const float* q = qf32 + (q0 + r) * Dx;
          const int64_t ahead = 16;  // candidates are scattered over the store: fetch rows before they are needed
          for (size_t j = 0; j < all.size(); ++j) {
            if (j + ahead < all.size()) {
              const char* row = reinterpret_cast<const char*>(keys16 + all[j + ahead].i * Dx);
              for (int64_t b = 0; b < Dx * 2; b += 64) _mm_prefetch(row + b, _MM_HINT_T0);
            }
            all[j].d = exact_sq_distance(q, keys16 + all[j].i * Dx, Dx);
          }
          const int64_t kk = std::min<int64_t>(k, int64_t(all.size()));
          std::partial_sort(all.begin(), all.begin() + kk, all.end(), closer<Ranked>);
          float* od = out_d + (q0 + r) * k;
          int64_t* oi = out_i + (q0 + r) * k;
          for (int64_t j = 0; j < k; ++j) {
            od[j] = j < kk ? all[j].d : INFINITY;
            oi[j] = j < kk ? all[j].i : -1;
          }
        }
      });
    }
    for (auto& th : pool) th.join();
  }
}

}  // extern "C"
