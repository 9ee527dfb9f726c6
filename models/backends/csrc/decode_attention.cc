// Paged decode attention for the CPU, called from XLA as an FFI custom call (models/backends/cpu_attention.py).
//
// One pre-scaled query per row and head, `q [B, h, d]`, attends over the first `lengths[b]` keys of its sequence,
// stored in the pool pages `table[b, :]` of `k`/`v [kvh, pages, page_size, d]` (float32). Each (row, KV head) pair
// is one task: the scores of its `h / kvh` query heads over every key (one pass over K), their softmax, then the
// weighted sum of values (one pass over V). Tasks are shared with XLA's intra-op pool (`parallel.h`).
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kMinShared = 8192;  // keys (over rows and KV heads) worth waking XLA's other threads for

struct Shared {
  const float *q, *k, *v;
  const int32_t *table, *lengths;
  float* out;
  int64_t rows, heads, kv_heads, pages, page_size, dim, width;
};

void Task(const Shared& s, int64_t task) {
  thread_local std::vector<float> scores;
  const int64_t b = task / s.kv_heads, kh = task % s.kv_heads, g = s.heads / s.kv_heads, d = s.dim;
  const int64_t len = std::min<int64_t>(std::max<int32_t>(s.lengths[b], 1), s.width * s.page_size);
  scores.resize(g * len);
  const float* q = s.q + (b * s.heads + kh * g) * d;
  const int32_t* row = s.table + b * s.width;
  const int64_t head = kh * s.pages * s.page_size * d;
  for (int64_t t = 0; t < len; ++t) {  // scores: one pass over the keys
    const float* key = s.k + head + (row[t / s.page_size] * s.page_size + t % s.page_size) * d;
    for (int64_t j = 0; j < g; ++j) {
      float acc = 0.f;
      for (int64_t i = 0; i < d; ++i) acc += q[j * d + i] * key[i];
      scores[j * len + t] = acc;
    }
  }
  float* out = s.out + (b * s.heads + kh * g) * d;
  for (int64_t j = 0; j < g; ++j) {  // softmax per query head
    float* sc = scores.data() + j * len;
    const float top = *std::max_element(sc, sc + len);
    float total = 0.f;
    for (int64_t t = 0; t < len; ++t) total += (sc[t] = std::exp(sc[t] - top));
    for (int64_t t = 0; t < len; ++t) sc[t] /= total;
    std::fill(out + j * d, out + (j + 1) * d, 0.f);
  }
  for (int64_t t = 0; t < len; ++t) {  // weighted values: one pass over V
    const float* val = s.v + head + (row[t / s.page_size] * s.page_size + t % s.page_size) * d;
    for (int64_t j = 0; j < g; ++j) {
      const float w = scores[j * len + t];
      float* o = out + j * d;
      for (int64_t i = 0; i < d; ++i) o[i] += w * val[i];
    }
  }
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                           ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> table, ffi::Buffer<ffi::S32> lengths,
                           ffi::ResultBuffer<ffi::F32> out) {
  auto qd = q.dimensions(), kd = k.dimensions(), td = table.dimensions();
  if (qd.size() != 3 || kd.size() != 4 || td.size() != 2 || qd[2] != kd[3] || qd[1] % kd[0] != 0)
    return ffi::Error::InvalidArgument("decode_attention: shapes do not match q [B,h,d], kv [kvh,P,ps,d]");
  Shared s;
  s.q = q.typed_data(), s.k = k.typed_data(), s.v = v.typed_data();
  s.table = table.typed_data(), s.lengths = lengths.typed_data(), s.out = out->typed_data();
  s.rows = qd[0], s.heads = qd[1], s.dim = qd[2];
  s.kv_heads = kd[0], s.pages = kd[1], s.page_size = kd[2], s.width = td[1];
  int64_t keys = 0;  // work in keys read: below kMinShared the wake-up of a helper costs more than it saves
  for (int64_t b = 0; b < s.rows; ++b) keys += std::min<int64_t>(s.lengths[b], s.width * s.page_size);
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
