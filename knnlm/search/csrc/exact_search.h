// The parts of knnlm's exact CPU searches that do not depend on the instruction set of the candidate pass:
// per-query candidate buffers filtered against running thresholds, the threads, and the exact re-ranking.
//
// A kernel (amx_search.cpp, avx512_search.cpp, avx2_search.cpp) supplies pass 1 as a function
//   scan(q0, qn, u0, u1, cands)
// that computes approximate squared distances ||k̃||² − 2 q̃·k̃ for queries [q0, q0 + qn) of the call (qn a multiple
// of 32; rows at or past M are padding and must not be pushed) against keys [32 u0, 32 u1), and pushes those below
// each query's threshold into cands[r] (r relative to q0) with key indices relative to 32 u0. `search` runs it on
// every thread over a share of the keys, merges the threads' candidates, keeps the C best, re-ranks them with exact
// fp32 distances from the stored float16 keys and writes the k nearest, nearest first.
//
// Key stores are padded to whole units of 32 keys (norms +inf on padding rows: never selected).
//
// `search_pruned` is the same scan over keys projected onto m principal directions (m < d): the projected distance
// is a lower bound of the true one, so a key is only a candidate if that bound, less a proven bound on its rounding,
// is below the query's k-th exact distance so far; candidates get their exact distance at once (`Pruned`). No
// margin: a key is skipped only where it provably cannot be among the k nearest.

#pragma once

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <thread>
#include <vector>

namespace knnlm {
// Internal linkage: every kernel library compiles its own copy of these for its own instruction set, and exports
// none of them, so two libraries loaded in one process never bind to each other's (e.g. AVX-512 code from AVX2's).
namespace {

constexpr int64_t kUnit = 32;  // keys per unit of work; packed stores hold a whole number of units

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
// so a thread also skips keys another thread has already beaten. The buffer fills up to 2 keep, then the keep best
// are kept (nth_element) and thr drops to the worst of them.
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
  const Cand* begin() const { return buf.data(); }
  const Cand* end() const { return buf.data() + buf.size(); }
  void compact() {
    if (buf.size() < keep) return;
    std::nth_element(buf.begin(), buf.begin() + (keep - 1), buf.end(), closer<Cand>);
    buf.resize(keep);
    thr = buf[keep - 1].d;
    float cur = shared->load(std::memory_order_relaxed);
    while (thr < cur && !shared->compare_exchange_weak(cur, thr, std::memory_order_relaxed)) {
    }
    thr = std::min(thr, shared->load(std::memory_order_relaxed));
  }
  // The threshold to filter the next block against: this thread's own, or a smaller one found by another thread.
  inline float refresh() {
    thr = std::min(thr, shared->load(std::memory_order_relaxed));
    return thr;
  }
  inline void flush() {}  // approximate candidates are final as pushed (Pruned's wait for their exact distance)
  inline void push(float d, uint32_t i) {
    buf.push_back({d, i});
    if (buf.size() >= 2 * keep) compact();
  }
  // Push the keys of a block whose bit is set in `mask` (key j at index base + j, distance d[j]).
  inline void push_masked(uint32_t mask, const float* d, uint32_t base) {
    while (mask) {
      const int j = __builtin_ctz(mask);
      mask &= mask - 1;
      if (d[j] < thr) push(d[j], base + uint32_t(j));  // a push may have compacted and lowered thr
    }
  }
};

// Exact squared L2 distance between an fp32 query and a float16 key (dim values each).
inline float exact_sq_distance(const float* q, const uint16_t* key, int64_t dim) {
  int64_t j = 0;
  float s = 0.0f;
#if defined(__AVX512F__)
  __m512 acc = _mm512_setzero_ps();
  for (; j + 16 <= dim; j += 16) {
    __m512 kv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(key + j)));
    __m512 diff = _mm512_sub_ps(_mm512_loadu_ps(q + j), kv);
    acc = _mm512_fmadd_ps(diff, diff, acc);
  }
  s = _mm512_reduce_add_ps(acc);
#else  // AVX2 + FMA + F16C
  __m256 acc = _mm256_setzero_ps();
  for (; j + 8 <= dim; j += 8) {
    __m256 kv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(key + j)));
    __m256 diff = _mm256_sub_ps(_mm256_loadu_ps(q + j), kv);
    acc = _mm256_fmadd_ps(diff, diff, acc);
  }
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  s = _mm_cvtss_f32(h);
#endif
  for (; j < dim; ++j) {
    float kv = _cvtsh_ss(key[j]);
    float diff = q[j] - kv;
    s += diff * diff;
  }
  return s;
}

#if defined(__AVX512F__)
// The end of a tile, for one query and 32 keys: scores ||k̃||² − 2 q̃·k̃ from the keys' norms n0, n1 and the products
// a0, a1 (keys 0-15, 16-31), compared with the query's threshold while in registers; the few below it are pushed
// (keys first_key + j, relative to the thread's first key).
template <class Cands>
__attribute__((always_inline)) inline void test_scores(Cands& cq, __m512 a0, __m512 a1, __m512 n0, __m512 n1,
                                                       uint32_t first_key) {
  const __m512 two = _mm512_set1_ps(2.0f);
  const __m512 thr = _mm512_set1_ps(cq.refresh());
  const __m512 d0 = _mm512_fnmadd_ps(two, a0, n0);
  const __m512 d1 = _mm512_fnmadd_ps(two, a1, n1);
  const __mmask16 m0 = _mm512_cmp_ps_mask(d0, thr, _CMP_LT_OQ);
  const __mmask16 m1 = _mm512_cmp_ps_mask(d1, thr, _CMP_LT_OQ);
  if (m0 | m1) {
    alignas(64) float tmp[32];
    _mm512_store_ps(tmp, d0);
    _mm512_store_ps(tmp + 16, d1);
    cq.push_masked(uint32_t(m0) | (uint32_t(m1) << 16), tmp, first_key);
  }
}
#endif

// What makes a projected-distance bound safe for one query (all in double, see cpu_kernels.CpuExactSearch):
// a key whose computed ||ỹ_j||² − 2 ỹ_q·ỹ_j is at or above
//   (sqrt(thr (1 + rel)) + sqrt_slack)² + add_slack − qnorm2
// cannot have an exact distance below thr, the query's k-th exact distance so far.
// The staged scan's first stage tests the scores of the first m1 directions alone against the same bound with the
// query's first-m1 norm qnorm2_first: the first m1 coordinates of a difference are never longer than all m of them,
// and each rounding error of a part is at most that of the whole, so sqrt_slack and add_slack hold for the part too.
struct Bound {
  double qnorm2 = 0, sqrt_slack = 0, add_slack = 0, rel = 0, qnorm2_first = 0;
  double radius2(float thr) const {  // (sqrt(thr (1 + rel)) + sqrt_slack)² + add_slack
    const double r = std::sqrt(double(thr) * (1 + rel)) + sqrt_slack;
    return r * r + add_slack;
  }
  // the threshold of scores whose query part has squared norm `norm2` (qnorm2, or qnorm2_first for a first stage)
  float threshold(float thr, double norm2) const {
    if (!std::isfinite(thr)) return INFINITY;
    return std::nextafter(float(radius2(thr) - norm2), INFINITY);  // rounded up: never tighter than proven
  }
};

// One thread's k nearest keys so far for one query, by exact distance (the pruned search's candidates). `thr` is
// the k-th exact distance (or a smaller one another thread found: `shared`); `refresh` turns it into the threshold
// of the projected scores, recomputed only when thr moves. Survivors of that test get their exact distance here.
struct Pruned : Candidates {
  float scored_for = NAN, score_thr = INFINITY, first_thr = INFINITY;
  Bound bound;
  const float* q = nullptr;       // the fp32 query (uncentered)
  const uint16_t* keys = nullptr;  // float16 keys, row of the thread's first key
  int64_t dim = 0;
  void reset(size_t keep_, std::atomic<float>* shared_, const Bound& b, const float* q_, const uint16_t* keys_,
             int64_t dim_) {
    Candidates::reset(keep_, shared_);
    scored_for = NAN;
    score_thr = first_thr = INFINITY;
    nwaiting = 0;
    bound = b;
    q = q_;
    keys = keys_;
    dim = dim_;
  }
  inline float refresh() {
    thr = std::min(thr, shared->load(std::memory_order_relaxed));
    if (!(thr == scored_for)) {
      scored_for = thr;
      score_thr = bound.threshold(thr, bound.qnorm2);
      first_thr = bound.threshold(thr, bound.qnorm2_first);
    }
    return score_thr;
  }
  // The threshold of the first stage's scores (the first m1 directions), after the same refresh.
  inline float refresh_first() {
    refresh();
    return first_thr;
  }
  // Keys that passed the projected test wait here for their exact distance: each row is a fetch from a store far
  // larger than the caches, so the scan asks for it at once (prefetch) and computes the distance only at the end of
  // its pass over a chunk of keys (`flush`), by when the fetch has overlapped the products. A waiting key only delays
  // the drop of thr (more keys pass meanwhile), never skips one.
  static constexpr size_t kWait = 64;
  uint32_t waiting[kWait];
  size_t nwaiting = 0;
  inline void push_masked(uint32_t mask, const float* /*scores*/, uint32_t base) {
    while (mask) {
      const uint32_t i = base + uint32_t(__builtin_ctz(mask));
      mask &= mask - 1;
      const char* row = reinterpret_cast<const char*>(keys + int64_t(i) * dim);
      for (int64_t b = 0; b < dim * 2; b += 64) _mm_prefetch(row + b, _MM_HINT_T0);
      waiting[nwaiting++] = i;
      if (nwaiting == kWait) flush();
    }
  }
  inline void flush() {
    for (size_t n = 0; n < nwaiting; ++n) {
      const uint32_t i = waiting[n];
      const float d = exact_sq_distance(q, keys + int64_t(i) * dim, dim);
      if (d < thr) {
        buf.push_back({d, i});
        if (buf.size() >= 2 * keep || (buf.size() == keep && thr == INFINITY)) compact();  // the first k: thr finite
      }
    }
    nwaiting = 0;
  }
};

// Both passes for M queries against Np (padded) keys; see the top of this file. qf32 (M, Dx) fp32 queries and
// keys16 (N, Dx) float16 keys are the uncentered values the exact distances are computed from. `init(c, t, r)` resets
// thread t's candidates c of query r of the block; `rerank`: candidates hold approximate distances to be replaced by
// exact ones (`Candidates`), else they are exact already (`Pruned`).
template <class Cands, class Scan, class Init>
void run(Scan&& scan, Init&& init, bool rerank, int64_t M, int64_t Np, const float* qf32, const uint16_t* keys16,
         int64_t Dx, int64_t k, int64_t C, int nthreads, int64_t qblock, float* out_d, int64_t* out_i) {
  nthreads = std::max(1, nthreads);
  qblock = std::max<int64_t>(kUnit, qblock / kUnit * kUnit);
  const int64_t units = Np / kUnit;
  std::vector<std::vector<Cands>> cands(nthreads, std::vector<Cands>(qblock));
  std::vector<std::atomic<float>> shared(qblock);
  for (int64_t q0 = 0; q0 < M; q0 += qblock) {
    const int64_t qn = std::min(qblock, M - q0);
    const int64_t qn_tiles = (qn + kUnit - 1) / kUnit * kUnit;
    for (int64_t r = 0; r < qn; ++r) shared[r].store(INFINITY);
    // Pass 1: the keys are split between threads; each thread keeps its own candidates for every query.
    std::vector<std::thread> pool;
    for (int t = 0; t < nthreads; ++t) {
      pool.emplace_back([&, t] {
        const int64_t u0 = units * t / nthreads, u1 = units * (t + 1) / nthreads;
        for (int64_t r = 0; r < qn; ++r) init(cands[t][r], kUnit * u0, q0 + r, &shared[r]);
        scan(q0, qn_tiles, u0, u1, cands[t].data());
        for (int64_t r = 0; r < qn; ++r) cands[t][r].flush();  // scans flush per chunk; nothing may stay behind
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
            const int64_t base = kUnit * (units * u / nthreads);
            for (const Cand& c : cands[u][r]) all.push_back({c.d, base + c.i});
          }
          if (int64_t(all.size()) > C) {
            std::nth_element(all.begin(), all.begin() + (C - 1), all.end(), closer<Ranked>);
            all.resize(C);
          }
          const float* q = qf32 + (q0 + r) * Dx;
          const size_t ahead = 16;  // candidates are scattered over the store: fetch rows before they are needed
          for (size_t j = 0; rerank && j < all.size(); ++j) {
            if (j + ahead < all.size()) {
              const char* row = reinterpret_cast<const char*>(keys16 + all[j + ahead].i * Dx);
              for (int64_t b = 0; b < Dx * 2; b += 64) _mm_prefetch(row + b, _MM_HINT_T0);
            }
            all[j].d = exact_sq_distance(q, keys16 + all[j].i * Dx, Dx);
          }
          const int64_t kk = std::min<int64_t>(k, int64_t(all.size()));
          if (kk < int64_t(all.size())) std::nth_element(all.begin(), all.begin() + (kk - 1), all.end(), closer<Ranked>);
          std::sort(all.begin(), all.begin() + kk, closer<Ranked>);  // faster than partial_sort's heap for large k
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

// The two passes with `C` approximate candidates per query re-ranked exactly (the margin search).
template <class Scan>
void search(Scan&& scan, int64_t M, int64_t Np, const float* qf32, const uint16_t* keys16, int64_t Dx, int64_t k,
            int64_t C, int nthreads, int64_t qblock, float* out_d, int64_t* out_i) {
  auto init = [&](Candidates& c, int64_t, int64_t, std::atomic<float>* shared) { c.reset(size_t(C), shared); };
  run<Candidates>(scan, init, true, M, Np, qf32, keys16, Dx, k, C, nthreads, qblock, out_d, out_i);
}

// The pruned search: the scan's products are of projected keys and queries; qnorm2 (M,) holds each projected bf16
// query's ||ỹ_q||² and sqrt_slack/add_slack (M,) its rounding bounds (cpu_kernels.CpuExactSearch derives them);
// rel bounds the relative error of the fp32 exact distances and the basis's departure from orthonormality;
// qnorm2_first (M,), or null: the norms of the queries' first m1 coordinates, for a staged scan.
// start (M,), or null: an upper bound of each query's k-th exact distance known in advance (e.g. the k-th of k
// keys found by an approximate index); keys at or below it are tested, so it must not be below the true k-th.
template <class Scan>
void search_pruned(Scan&& scan, int64_t M, int64_t Np, const float* qf32, const uint16_t* keys16, int64_t Dx,
                   int64_t k, const double* qnorm2, const double* sqrt_slack, const double* add_slack, double rel,
                   const double* qnorm2_first, const float* start, int nthreads, int64_t qblock, float* out_d,
                   int64_t* out_i) {
  auto init = [&](Pruned& c, int64_t first_key, int64_t query, std::atomic<float>* shared) {
    Bound b{qnorm2[query], sqrt_slack[query], add_slack[query], rel, qnorm2_first ? qnorm2_first[query] : 0.0};
    c.reset(size_t(k), shared, b, qf32 + query * Dx, keys16 + first_key * Dx, Dx);
    if (start) c.thr = std::nextafter(start[query], INFINITY);  // a key exactly at the bound still enters
  };
  run<Pruned>(scan, init, false, M, Np, qf32, keys16, Dx, k, k, nthreads, qblock, out_d, out_i);
}

}  // namespace
}  // namespace knnlm

// Each kernel file ends with KNNLM_ENTRY_POINTS(name, query type), after its pass 1
//   scan_keys(queries, q0, qn, M, D, packed, norms, u0, u1, chunk_units, cands)
// (chunk_units: how many units of kUnit keys a thread scans at a time, from `kchunk` keys) and its staged variant
//   scan_staged(queries, q0, qn, M, D, packed, norms, norms_first, first_pairs, u0, u1, chunk_units, cands)
// for the pruned search: the scores of the first 2 first_pairs directions (key norms norms_first) are tested against
// each query's `refresh_first()` threshold, and only the (query, 32 keys) whose part passes get the rest of the
// products (a kernel without one forwards to scan_keys; cpu_kernels.Kernel.staged says which). It defines the library's
// C entry points, whose arguments are cpu_kernels.py's SEARCH_ARGTYPES and PRUNED_ARGTYPES (tests/test_knn.py
// compares them): knnlm_<name>_search, the margin search, and knnlm_<name>_pruned, the pruned one (`packed`, `norms`
// and `queries` hold the keys and queries projected onto D principal directions; qf32/keys16 the full vectors the
// exact distances are computed from). N is unused: the re-ranking reads keys16 only at candidates' indices, all < N
// (padding rows have norm +inf).
#define KNNLM_ENTRY_POINTS(NAME, QUERY)                                                                               \
  extern "C" void knnlm_##NAME##_search(const QUERY* queries, int64_t M, int64_t D, const uint16_t* packed,          \
                                        const float* norms, int64_t Np, const float* qf32, const uint16_t* keys16,   \
                                        int64_t N, int64_t Dx, int64_t k, int64_t C, int nthreads, int64_t qblock,   \
                                        int64_t kchunk, float* out_d, int64_t* out_i) {                              \
    (void)N;                                                                                                          \
    const int64_t chunk_units = std::max<int64_t>(1, kchunk / knnlm::kUnit);                                          \
    auto scan = [&](int64_t q0, int64_t qn, int64_t u0, int64_t u1, auto* cands) {                                    \
      scan_keys(queries, q0, qn, M, D, packed, norms, u0, u1, chunk_units, cands);                                    \
    };                                                                                                                \
    knnlm::search(scan, M, Np, qf32, keys16, Dx, k, C, nthreads, qblock, out_d, out_i);                               \
  }                                                                                                                   \
  extern "C" void knnlm_##NAME##_pruned(const QUERY* queries, int64_t M, int64_t D, const uint16_t* packed,          \
                                        const float* norms, int64_t Np, const float* qf32, const uint16_t* keys16,   \
                                        int64_t N, int64_t Dx, int64_t k, const double* qnorm2,                      \
                                        const double* sqrt_slack, const double* add_slack, double rel,               \
                                        const float* norms_first, int64_t first_pairs, const double* qnorm2_first,   \
                                        const float* start, int nthreads, int64_t qblock, int64_t kchunk,            \
                                        float* out_d, int64_t* out_i) {                                              \
    (void)N;                                                                                                          \
    const int64_t chunk_units = std::max<int64_t>(1, kchunk / knnlm::kUnit);                                          \
    auto scan = [&](int64_t q0, int64_t qn, int64_t u0, int64_t u1, auto* cands) {                                    \
      if (first_pairs > 0)                                                                                            \
        scan_staged(queries, q0, qn, M, D, packed, norms, norms_first, first_pairs, u0, u1, chunk_units, cands);     \
      else                                                                                                            \
        scan_keys(queries, q0, qn, M, D, packed, norms, u0, u1, chunk_units, cands);                                  \
    };                                                                                                                \
    knnlm::search_pruned(scan, M, Np, qf32, keys16, Dx, k, qnorm2, sqrt_slack, add_slack, rel,                        \
                         first_pairs > 0 ? qnorm2_first : nullptr, start, nthreads, qblock, out_d, out_i);           \
  }
