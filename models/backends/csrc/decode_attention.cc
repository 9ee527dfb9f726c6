// Paged decode attention for the CPU, called from XLA as an FFI custom call (models/backends/cpu_attention.py).
//
// Each row has `S` pre-scaled queries per head, `q [B, S, h, d]` (S = 1 for a decode step; a verify pass scores a
// row's last token and its draft, S = K + 1). Query `i` of row `b` attends over the first `lengths[b, i]` keys of
// its sequence, stored in the pool pages `table[b, :]` of `k`/`v [kvh, pages, page_size, d]` (float32): the
// chunk's own keys are already in the pool, so its causal mask is that length. Each (row, KV head) pair is one
// task: the scores of its `S * h / kvh` queries over every key (one pass over K, each key read once for all of
// them), their softmax, then the weighted sum of values (one pass over V). Tasks are shared with XLA's intra-op
// pool (`parallel.h`).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMinShared = 8192;  // keys scored (over rows, queries, KV heads) worth waking XLA's other threads

constexpr int64_t kLanes = 16;  // query vectors scored together (one AVX-512 register of float32)
typedef float Lanes __attribute__((vector_size(kLanes * sizeof(float))));

struct Shared {
  const float *q, *k, *v;
  const int32_t *table, *lengths;
  float* out;
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

void Task(const Shared& s, int64_t task) {
  thread_local std::vector<float> qt, scores, top, total;
  thread_local std::vector<int32_t> lens;
  thread_local std::vector<int64_t> at, slots;
  const int64_t b = task / s.kv_heads, kh = task % s.kv_heads, g = s.heads / s.kv_heads, d = s.dim;
  // This task's query vectors are lanes: (query i, head j) is lane i * g + j, padded to a multiple of kLanes.
  const int64_t nq = s.queries, n = nq * g, np = (n + kLanes - 1) / kLanes * kLanes;
  lens.assign(np, 0);  // each lane's keys (its query's causal length); padding lanes score nothing
  at.resize(n);        // each lane's offset in q and out
  int64_t len = 1;
  for (int64_t c = 0; c < n; ++c) {
    lens[c] = std::min<int64_t>(std::max<int32_t>(s.lengths[b * nq + c / g], 1), s.width * s.page_size);
    len = std::max<int64_t>(len, lens[c]);
    at[c] = ((b * nq + c / g) * s.heads + kh * g + c % g) * d;
  }
  const int32_t* row = s.table + b * s.width;
  slots.resize(len);  // each key's offset in k and v
  for (int64_t t = 0; t < len; ++t)
    slots[t] = (kh * s.pages * s.page_size + row[t / s.page_size] * s.page_size + t % s.page_size) * d;
  scores.assign(len * np, 0.f);  // [len, np]: one pass over the keys
  if (n < kLanes) {  // a decode step's few heads: each score a dot product along d
    for (int64_t t = 0; t < len; ++t) {
      const float* key = s.k + slots[t];
      for (int64_t c = 0; c < n; ++c) {
        const float* q = s.q + at[c];
        float acc = 0.f;
        for (int64_t e = 0; e < d; ++e) acc += q[e] * key[e];
        scores[t * np + c] = acc;
      }
    }
  } else {  // many queries: kLanes of them at once, four keys per pass over the transposed queries
    qt.assign(d * np, 0.f);
    for (int64_t c = 0; c < n; ++c)
      for (int64_t e = 0; e < d; ++e) qt[e * np + c] = s.q[at[c] + e];
    for (int64_t t = 0; t < len; t += 4) {
      const float* k0 = s.k + slots[t];
      const float* k1 = s.k + slots[std::min(t + 1, len - 1)];
      const float* k2 = s.k + slots[std::min(t + 2, len - 1)];
      const float* k3 = s.k + slots[std::min(t + 3, len - 1)];
      for (int64_t c0 = 0; c0 < np; c0 += kLanes) {
        Lanes a0 = {}, a1 = {}, a2 = {}, a3 = {};
        for (int64_t e = 0; e < d; ++e) {
          const Lanes q = Load(qt.data() + e * np + c0);
          a0 += q * k0[e], a1 += q * k1[e], a2 += q * k2[e], a3 += q * k3[e];
        }
        const Lanes rows[4] = {a0, a1, a2, a3};
        for (int64_t i = 0; i < 4 && t + i < len; ++i) std::memcpy(&scores[(t + i) * np + c0], &rows[i], sizeof a0);
      }
    }
  }
  top.assign(scores.begin(), scores.begin() + np);  // softmax per lane over its own keys
  for (int64_t t = 1; t < len; ++t) {
    const float* sc = scores.data() + t * np;
    for (int64_t c = 0; c < np; ++c) top[c] = t < lens[c] ? std::max(top[c], sc[c]) : top[c];
  }
  total.assign(np, 0.f);
  for (int64_t t = 0; t < len; ++t) {
    float* sc = scores.data() + t * np;
    for (int64_t c = 0; c < np; ++c) {
      const float p = t < lens[c] ? Exp(sc[c] - top[c]) : 0.f;
      sc[c] = p;
      total[c] += p;
    }
  }
  // Weighted values: four lanes at a time (the padding lanes' weights are 0), kLanes values of d per register.
  for (int64_t c = 0; c < n; c += 4) {
    const int64_t m = std::min<int64_t>(4, n - c);
    const int64_t upto = *std::max_element(lens.begin() + c, lens.begin() + c + m);
    const float* w = scores.data() + c;
    if (d % kLanes == 0) {
      for (int64_t e0 = 0; e0 < d; e0 += kLanes) {
        Lanes o0 = {}, o1 = {}, o2 = {}, o3 = {};
        for (int64_t t = 0; t < upto; ++t) {
          const Lanes v = Load(s.v + slots[t] + e0);
          const float* wt = w + t * np;
          o0 += wt[0] * v, o1 += wt[1] * v, o2 += wt[2] * v, o3 += wt[3] * v;
        }
        const Lanes outs[4] = {o0, o1, o2, o3};
        for (int64_t i = 0; i < m; ++i) {
          const Lanes x = outs[i] * (1.f / total[c + i]);
          std::memcpy(s.out + at[c + i] + e0, &x, sizeof x);
        }
      }
    } else {
      for (int64_t i = 0; i < m; ++i) {
        float* o = s.out + at[c + i];
        std::fill(o, o + d, 0.f);
        for (int64_t t = 0; t < upto; ++t)
          for (int64_t e = 0; e < d; ++e) o[e] += w[t * np + i] * s.v[slots[t] + e];
        for (int64_t e = 0; e < d; ++e) o[e] /= total[c + i];
      }
    }
  }
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::S32> lengths,
                           ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), td = table.dimensions(), ld = lengths.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || td.size() != 2 || ld.size() != 2 || qd[3] != kd[3] || qd[2] % kd[0] != 0 ||
      ld[0] != qd[0] || ld[1] != qd[1])
    return ffi::Error::InvalidArgument(
        "decode_attention: shapes do not match q [B,S,h,d], kv [kvh,P,ps,d], lengths [B,S]");
  Shared s;
  s.q = q.typed_data(), s.k = k.typed_data(), s.v = v.typed_data();
  s.table = table.typed_data(), s.lengths = lengths.typed_data(), s.out = out->typed_data();
  s.rows = qd[0], s.queries = qd[1], s.heads = qd[2], s.dim = qd[3];
  s.kv_heads = kd[0], s.pages = kd[1], s.page_size = kd[2], s.width = td[1];
  int64_t keys = 0;  // work in keys read: below kMinShared the wake-up of a helper costs more than it saves
  for (int64_t i = 0; i < s.rows * s.queries; ++i) keys += std::min<int64_t>(s.lengths[i], s.width * s.page_size);
  keys *= s.kv_heads;
  sparkler::RunTasks(pool, s.rows * s.kv_heads, keys >= kMinShared, [&s](int64_t t) { Task(s, t); });
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
                                  .Ret<ffi::Buffer<ffi::F32>>());
