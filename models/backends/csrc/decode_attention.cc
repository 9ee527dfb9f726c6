// Paged decode attention for the CPU, called from XLA as an FFI custom call (models/backends/cpu_attention.py).
//
// Each row has `S` pre-scaled queries per head, `q [B, S, h, d]` (S = 1 for a decode step; a verify pass scores a
// row's last token and its draft, S = K + 1). Query `i` of row `b` attends over the first `lengths[b, i]` keys of
// its sequence, stored in the pool pages `table[b, :]` of `k`/`v [kvh, pages, page_size, d]` (float32): the
// chunk's own keys are already in the pool, so its causal mask is that length. Each (row, KV head) pair is one
// task: one pass over the row's pages, each key and value read once for all of the group's `S * h / kvh` queries
// (see `Task`). Tasks are shared with XLA's intra-op pool (`parallel.h`); when there are fewer than two per thread
// (one row of SmolLM2's 3 KV heads on 2 cores), each task's pages are split into parts that run as tasks of their own,
// their sums merged by their maxima at the end (`Merge`). Beside each output vector it writes the log
// of its softmax's normaliser, `lse [B, S, h]`, so that a caller can merge it with attention over other keys (a
// prefill chunk's earlier positions read here, its own keys in XLA: `models.backends.paged.prefill`).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMinShared = 1024;  // keys scored (over rows, queries, KV heads) worth waking XLA's other threads
constexpr int64_t kMinPart = 8;       // pages in a part of a task split between threads (`DecodeAttention`)

constexpr int64_t kAhead = 4;  // pages prefetched ahead
constexpr float kFloor = -1e30f;  // a running maximum below every score (a lane's before its first key)
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;  // query vectors scored together: one register of float32
#else
constexpr int64_t kLanes = 8;  // (an AVX2 register: GCC spills wider vectors there, several times slower)
#endif
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t Ints __attribute__((vector_size(kLanes * sizeof(int32_t))));

struct Shared {
  const float *q, *k, *v;
  const int32_t *table, *lengths;
  float *out, *lse;
  float* partial;  // with parts > 1: each (task, part, lane)'s weighted values, running maximum and sum [d + 2]
  int64_t parts;
  int64_t rows, queries, heads, kv_heads, pages, page_size, dim, width;
};

// exp(x) for the softmax's x <= 0, within float32 rounding, in plain arithmetic so that the compiler vectorises it
// (std::exp does not vectorise without -ffast-math): Cephes' expf, x = n ln2 + r with |r| <= ln2 / 2, a degree-6
// polynomial in r, times 2^n built in the exponent bits. Below -87 it gives 2^-126 (a weight of ~1e-38).
inline float Exp(float x) {
  x = std::max(x, -87.0f);
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline Lanes Load(const float* p) {
  Lanes x;
  std::memcpy(&x, p, sizeof x);
  return x;
}

inline void Store(float* p, Lanes x) { std::memcpy(p, &x, sizeof x); }

// `Exp` on kLanes values at once (the same arithmetic).
inline Lanes ExpLanes(Lanes x) {
  const Lanes low = Lanes{} - 87.0f;
  x = x > low ? x : low;
  const Lanes t = x * 1.44269504088896341f + 0.5f;
  Lanes n = __builtin_convertvector(__builtin_convertvector(t, Ints), Lanes);  // toward zero, then floor:
  n = t < n ? n - 1.0f : n;
  const Lanes r = x - n * 0.693359375f + n * 2.12194440e-4f;
  Lanes p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const Ints bits = (__builtin_convertvector(n, Ints) + 127) << 23;
  Lanes scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// Where lane `c` (query c / g, head c % g of KV head `kh`'s group) of row `b` has its output vector in `out`.
inline int64_t LaneAt(const Shared& s, int64_t b, int64_t kh, int64_t c) {
  const int64_t g = s.heads / s.kv_heads;
  return ((b * s.queries + c / g) * s.heads + kh * g + c % g) * s.dim;
}

// A lane's output from its weighted values, maximum and sum: the values over the sum, and the log-normaliser (none
// for a lane that reached no key: zeros and kFloor).
inline void Finish(const Shared& s, int64_t at, const float* acc, float top, float total) {
  const float inv = total > 0.f ? 1.f / total : 0.f;
  for (int64_t e = 0; e < s.dim; ++e) s.out[at + e] = acc[e] * inv;
  s.lse[at / s.dim] = total > 0.f ? top + std::log(total) : kFloor;
}

// Folds a page of `cnt` keys from position `t0` into the lanes' running sums, kLanes lanes at a time: each lane's
// maximum over the keys it reaches, the factor its sums shrink by, the keys' weights (in place of their scores in
// `scores [cnt, np]`), then the weighted values four lanes at a time, kLanes values of d per register (padding
// lanes reach no key: weight 0).
void FoldWide(float* scores, const float* reach, float* top, float* total, float* rescale, float* acc,
              const float* vp, int64_t t0, int64_t cnt, int64_t n, int64_t np, int64_t d) {
  for (int64_t c0 = 0; c0 < np; c0 += kLanes) {
    const Lanes lens = Load(reach + c0), old = Load(top + c0);
    Lanes m = old;
    for (int64_t j = 0; j < cnt; ++j) {
      const Lanes sc = Load(scores + j * np + c0);
      const Lanes at = Lanes{} + static_cast<float>(t0 + j);
      m = ((at < lens) & (sc > m)) ? sc : m;
    }
    const Lanes shrink = ExpLanes(old - m);  // a lane's first page: ~0 (its sums are still 0)
    Lanes sum = Load(total + c0) * shrink;
    for (int64_t j = 0; j < cnt; ++j) {
      const Lanes at = Lanes{} + static_cast<float>(t0 + j);
      const Lanes w = at < lens ? ExpLanes(Load(scores + j * np + c0) - m) : Lanes{};
      Store(scores + j * np + c0, w);
      sum += w;
    }
    Store(top + c0, m), Store(total + c0, sum), Store(rescale + c0, shrink);
  }
  for (int64_t c = 0; c < n; c += 4) {
    const float* w = scores + c;
    float* a = acc + c * d;
    if (d % kLanes == 0) {
      for (int64_t e0 = 0; e0 < d; e0 += kLanes) {
        Lanes o0 = Load(a + e0) * rescale[c], o1 = Load(a + d + e0) * rescale[c + 1];
        Lanes o2 = Load(a + 2 * d + e0) * rescale[c + 2], o3 = Load(a + 3 * d + e0) * rescale[c + 3];
        for (int64_t j = 0; j < cnt; ++j) {
          const Lanes v = Load(vp + j * d + e0);
          const float* wt = w + j * np;
          o0 += wt[0] * v, o1 += wt[1] * v, o2 += wt[2] * v, o3 += wt[3] * v;
        }
        Store(a + e0, o0), Store(a + d + e0, o1), Store(a + 2 * d + e0, o2), Store(a + 3 * d + e0, o3);
      }
    } else {
      for (int64_t i = 0; i < 4; ++i) {
        float* o = a + i * d;
        for (int64_t e = 0; e < d; ++e) o[e] *= rescale[c + i];
        for (int64_t j = 0; j < cnt; ++j)
          for (int64_t e = 0; e < d; ++e) o[e] += w[j * np + i] * vp[j * d + e];
      }
    }
  }
}

// One (row, KV head) task: its lanes are the `S * h / kvh` queries of that head group. The row's pages are read once,
// in order, one page at a time while the next one is prefetched (pages are scattered over the pool, where the
// hardware prefetcher stops at each 4 KiB boundary): a page's keys are scored for every lane, then folded into each
// lane's running maximum, sum and weighted values (the online softmax of flash decoding), so each value is read
// right after its key, and the task's working set is one page and the lanes' accumulators.
void Task(const Shared& s, int64_t task, int64_t part) {
  thread_local std::vector<float> qt, scores, acc, top, total, reach, rescale;
  thread_local std::vector<int32_t> lens;
  thread_local std::vector<int64_t> at;
  const int64_t b = task / s.kv_heads, kh = task % s.kv_heads, g = s.heads / s.kv_heads, d = s.dim;
  const int64_t ps = s.page_size, span = ps * d;
  // This task's query vectors are lanes: (query i, head j) is lane i * g + j, padded to a multiple of kLanes.
  const int64_t nq = s.queries, n = nq * g, np = (n + kLanes - 1) / kLanes * kLanes;
  lens.assign(np, 0);  // each lane's keys (its query's causal length); padding lanes score nothing
  at.resize(n);        // each lane's offset in q and out
  int64_t len = 0;  // a query of length 0 attends to nothing: its output is 0, its log-normaliser kFloor
  for (int64_t c = 0; c < n; ++c) {
    lens[c] = std::min<int64_t>(std::max<int32_t>(s.lengths[b * nq + c / g], 0), s.width * ps);
    len = std::max<int64_t>(len, lens[c]);
    at[c] = LaneAt(s, b, kh, c);
  }
  if (len == 0 && s.parts == 1) {  // nothing to attend (a prefill chunk's earlier positions, at its prompt's start)
    for (int64_t c = 0; c < n; ++c) std::fill(s.out + at[c], s.out + at[c] + d, 0.f), s.lse[at[c] / d] = kFloor;
    return;
  }
  const bool wide = n >= kLanes;  // many lanes: kLanes of them scored at once over the transposed queries
  if (wide) {  // the queries transposed, each lane's length as a float, the factor a page shrinks its sums by
    qt.assign(d * np, 0.f), reach.assign(np, 0.f), rescale.assign(np, 0.f);
    for (int64_t c = 0; c < n; ++c) {
      for (int64_t e = 0; e < d; ++e) qt[e * np + c] = s.q[at[c] + e];
      reach[c] = static_cast<float>(lens[c]);
    }
  }
  scores.assign(ps * np, 0.f);  // one page's scores [ps, np]
  acc.assign(np * d, 0.f);      // each lane's weighted values, its running maximum and sum
  top.assign(np, kFloor);
  total.assign(np, 0.f);
  const int32_t* row = s.table + b * s.width;
  const float* k = s.k + kh * s.pages * span;
  const float* v = s.v + kh * s.pages * span;
  const int64_t pages = (len + ps - 1) / ps, first = pages * part / s.parts, last = pages * (part + 1) / s.parts;
  for (int64_t p = first; p < last; ++p) {
    const float* kp = k + row[p] * span;
    const float* vp = v + row[p] * span;
    for (int64_t f = p == first ? 1 : kAhead; f <= kAhead && p + f < last; ++f) {
      const float* kn = k + row[p + f] * span;
      const float* vn = v + row[p + f] * span;
      for (int64_t o = 0; o < span; o += 64 / sizeof(float)) __builtin_prefetch(kn + o), __builtin_prefetch(vn + o);
    }
    const int64_t t0 = p * ps, cnt = std::min(ps, len - t0);
    if (!wide) {  // a decode step's few heads: each score a dot product along d
      for (int64_t j = 0; j < cnt; ++j)
        for (int64_t c = 0; c < n; ++c) {
          const float *q = s.q + at[c], *key = kp + j * d;
          float a = 0.f;
          for (int64_t e = 0; e < d; ++e) a += q[e] * key[e];
          scores[j * np + c] = a;
        }
    } else {  // kLanes lanes at once, four keys per pass over the transposed queries
      for (int64_t j = 0; j < cnt; j += 4) {
        const float* k0 = kp + j * d;
        const float* k1 = kp + std::min(j + 1, cnt - 1) * d;
        const float* k2 = kp + std::min(j + 2, cnt - 1) * d;
        const float* k3 = kp + std::min(j + 3, cnt - 1) * d;
        for (int64_t c0 = 0; c0 < np; c0 += kLanes) {
          Lanes a0 = {}, a1 = {}, a2 = {}, a3 = {};
          for (int64_t e = 0; e < d; ++e) {
            const Lanes q = Load(qt.data() + e * np + c0);
            a0 += q * k0[e], a1 += q * k1[e], a2 += q * k2[e], a3 += q * k3[e];
          }
          const Lanes rows[4] = {a0, a1, a2, a3};
          for (int64_t i = 0; i < 4 && j + i < cnt; ++i) std::memcpy(&scores[(j + i) * np + c0], &rows[i], sizeof a0);
        }
      }
    }
    if (wide) {
      FoldWide(scores.data(), reach.data(), top.data(), total.data(), rescale.data(), acc.data(), vp, t0, cnt, n,
               np, d);
      continue;
    }
    for (int64_t c = 0; c < n; ++c) {  // fold the page into each lane that reaches it (a decode step's few)
      const int64_t live = std::min<int64_t>(cnt, lens[c] - t0);
      if (live <= 0) continue;
      float m = top[c];
      for (int64_t j = 0; j < live; ++j) m = std::max(m, scores[j * np + c]);
      const float rescale = Exp(top[c] - m);  // a lane's first page: ~0 (its sums are still 0)
      top[c] = m;
      float* a = acc.data() + c * d;
      for (int64_t e = 0; e < d; ++e) a[e] *= rescale;
      float sum = 0.f;
      for (int64_t j = 0; j < live; ++j) {
        const float w = Exp(scores[j * np + c] - m);
        const float* value = vp + j * d;
        sum += w;
        for (int64_t e = 0; e < d; ++e) a[e] += w * value[e];
      }
      total[c] = total[c] * rescale + sum;
    }
  }
  if (s.parts > 1) {  // this part's sums, for `Merge`
    for (int64_t c = 0; c < n; ++c) {
      float* out = s.partial + ((task * s.parts + part) * n + c) * (d + 2);
      std::copy(acc.data() + c * d, acc.data() + (c + 1) * d, out);
      out[d] = top[c], out[d + 1] = total[c];
    }
    return;
  }
  for (int64_t c = 0; c < n; ++c) Finish(s, at[c], acc.data() + c * d, top[c], total[c]);
}

// A split task's output from its parts' sums: each part's scaled by its maximum's distance from the largest.
void Merge(const Shared& s, int64_t task) {
  const int64_t b = task / s.kv_heads, kh = task % s.kv_heads, g = s.heads / s.kv_heads, d = s.dim;
  const int64_t n = s.queries * g;
  std::vector<float> acc(d);
  for (int64_t c = 0; c < n; ++c) {
    const float* parts = s.partial + task * s.parts * n * (d + 2);
    float m = kFloor;
    for (int64_t i = 0; i < s.parts; ++i) m = std::max(m, parts[(i * n + c) * (d + 2) + d]);
    std::fill(acc.begin(), acc.end(), 0.f);
    float total = 0.f;
    for (int64_t i = 0; i < s.parts; ++i) {
      const float* part = parts + (i * n + c) * (d + 2);
      if (part[d + 1] <= 0.f) continue;  // a part past this lane's keys
      const float w = std::exp(part[d] - m);
      for (int64_t e = 0; e < d; ++e) acc[e] += w * part[e];
      total += w * part[d + 1];
    }
    Finish(s, LaneAt(s, b, kh, c), acc.data(), m, total);
  }
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::S32> lengths,
                           ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  auto qd = q.dimensions(), kd = k.dimensions(), td = table.dimensions(), ld = lengths.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || td.size() != 2 || ld.size() != 2 || qd[3] != kd[3] || qd[2] % kd[0] != 0 ||
      ld[0] != qd[0] || ld[1] != qd[1])
    return ffi::Error::InvalidArgument(
        "decode_attention: shapes do not match q [B,S,h,d], kv [kvh,P,ps,d], lengths [B,S]");
  Shared s;
  s.q = q.typed_data(), s.k = k.typed_data(), s.v = v.typed_data();
  s.table = table.typed_data(), s.lengths = lengths.typed_data();
  s.out = out->typed_data(), s.lse = lse->typed_data();
  s.rows = qd[0], s.queries = qd[1], s.heads = qd[2], s.dim = qd[3];
  s.kv_heads = kd[0], s.pages = kd[1], s.page_size = kd[2], s.width = td[1];
  int64_t keys = 0;  // work in keys read: below kMinShared the wake-up of a helper costs more than it saves
  for (int64_t i = 0; i < s.rows * s.queries; ++i) keys += std::min<int64_t>(s.lengths[i], s.width * s.page_size);
  keys *= s.kv_heads;
  const bool share = keys >= kMinShared;
  const int64_t tasks = s.rows * s.kv_heads, threads = share ? pool.num_threads() : 1;
  // Fewer than two tasks a thread: each task's pages in parts of at least kMinPart, two tasks' worth a thread.
  const int64_t most = std::max<int64_t>(1, keys / s.kv_heads / (s.rows * s.queries) / s.page_size / kMinPart);
  s.parts = share && tasks < 2 * threads ? std::min<int64_t>((2 * threads + tasks - 1) / tasks, most) : 1;
  std::vector<float> partial(s.parts > 1 ? tasks * s.parts * s.queries * (s.heads / s.kv_heads) * (s.dim + 2) : 0);
  s.partial = partial.data();
  const int64_t parts = s.parts;
  sparkler::RunTasks(pool, tasks * parts, share, [&s, parts](int64_t t) { Task(s, t / parts, t % parts); });
  if (parts > 1)
    for (int64_t t = 0; t < tasks; ++t) Merge(s, t);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparklerDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
