// int8 x int8 matrix product for the CPU, called from XLA as an FFI custom call (models/backends/cpu_matmul.py).
//
// `y [M, N] = x [M, K] @ W.T` where W is int8 with a float32 scale per output and group of 32 inputs (llama.cpp's
// Q8_0, models/quant.py), stored packed: `w [L, N/16, K/4, 64]` holds W + 128 as unsigned bytes, sixteen outputs by
// four inputs per 64 bytes, and `s [L, N/16, K/32, 16]` the scales in the same order, for a stack of L layers of
// which the call reads layer `layer` (scanned layers pass the whole stack: XLA would copy a slice). The rows of x
// are quantized on entry in two int8 levels per group of 32: `q1` rounds x in steps of max|x| / 127, `q2` rounds
// what q1 left in steps 256 times finer (one level alone moved the quality guard's top-1 tokens,
// tests/test_quant.py). Each group's product `w.(256 q1 + q2)` is exact in int32 and is scaled into float32 once per
// group. Two builds of the same arithmetic (the same integers, so the same results), chosen by the host's
// instructions (`-march=native`):
// - AVX-512 VNNI: `vpdpbusd` multiplies the unsigned weights by each level's signed bytes (the +128 is taken back
//   by starting each level at -128 times its sum). A tile is 6 rows by 32 outputs: 12 int32 and 12 float32
//   accumulators stay in registers. Calls of up to 4 rows (decode) run `Vec`, 2 rows by 64 outputs, each level's
//   sums apart.
// - AVX2 (llama.cpp's other common x86 target): each activation's two levels are one int16, `256 q1 + q2`
//   (|.| <= 32639), and `vpmaddwd` multiplies it by the sign-extended weights (W + 128 with its top bit flipped),
//   summing pairs of inputs of one output; pairs are added once per group. A tile is 4 rows by 8 outputs.
// Tasks are blocks of outputs over every row, shared with XLA's intra-op pool (`parallel.h`).
//
// The same file holds the int4 product (`--quantization int4`, llama.cpp's Q4_1): W = d q + m with q in 0..15 and a
// float16 scale d and minimum m per output and group of 32 inputs, packed as `w [L, N/16, K/4, 32]` (the int8
// layout's 64 values per run as nibbles: byte b holds value b low and value b + 32 high) and `s`, `mn [L, N/16, K/32,
// 16]` float16. A group's product is `d (q.a) + m (sum of a)` for the activations `a = 256 q1 + q2`, so the weights
// need no sign and no correction. The AVX2 build multiplies them as its int8 (the AVX2 tile, nibbles zero-extended);
// the VNNI build unpacks a task's nibbles into bytes once and runs its int8 tile on them (1.3-2.2x the AVX2 tile on
// the same host, docs/PERFORMANCE.md). Both sum the same integers and scale them alike: the same results.
#include <immintrin.h>

#if !defined(__AVX2__) || !defined(__FMA__) || !defined(__F16C__)
#error "the int8 matmul kernel needs AVX2, FMA and F16C (the XLA reference serves other CPUs)"
#elif defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__)
#define SPARKLER_VNNI 1
#else
#define SPARKLER_VNNI 0
#endif

#include <algorithm>
#include <cstdint>
#include <vector>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kGroup = 32, kLanes = 16;
constexpr int64_t kMinShared = int64_t{1} << 18;  // operations (2 x M x N x K) worth waking XLA's other threads for

struct Shared {
  const uint8_t* w;
  const float* s;       // int8: the weights' scales
  const uint16_t* d;    // int4: the weights' float16 scales, and their minima `mn`, in the int8 scales' layout
  const uint16_t* mn;
  const int8_t* a;      // the quantized rows: int8 [2 levels, M, K] (the VNNI build), or int16 [M, K] (AVX2)
  const float* sa;      // the second level's scale per row and group [M, G]
  const int32_t* ca;    // VNNI: -128 x each level's group sums [2 levels, M, G]; AVX2: each group's sum [M, G]
  float* out;
  int64_t m, n, k, groups;
};

#if !SPARKLER_VNNI  // the AVX2 build's quantizer and tile (the VNNI build has its own)

float MaxOf(__m256 v) {
  __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  m = _mm_max_ps(m, _mm_movehl_ps(m, m));
  return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}

// A row `x [K]` quantized per group of 32 in the two levels of `models.quant.activations`, each input's two stored as
// one int16 `256 q1 + q2` in `q [K]`, the second level's scale per group in `scale [K/32]` and each group's sum of
// the int16 values in `sums [K/32]`. A NaN is not carried (it counts as 0 in the max; its levels are 0 and
// -127), as in the VNNI build.
void Quantize16(const float* x, int64_t K, int16_t* q, float* scale, int32_t* sums) {
  const int64_t groups = K / kGroup;
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i lim = _mm256_set1_epi32(127), neg = _mm256_set1_epi32(-127);
  for (int64_t g = 0; g < groups; ++g, x += kGroup, q += kGroup) {
    __m256 v[4], top = _mm256_setzero_ps();
    for (int i = 0; i < 4; ++i)  // `top` second: where one is NaN, maxps gives its second operand
      top = _mm256_max_ps(_mm256_andnot_ps(sign, v[i] = _mm256_loadu_ps(x + 8 * i)), top);
    const float big = MaxOf(top), step = big / 127.f;
    const __m256 inv = _mm256_set1_ps(big > 1e-30f ? 127.f / big : 0.f);  // quant.TINY: a tinier group is zeros
    const __m256 s = _mm256_set1_ps(step), inv2 = _mm256_mul_ps(inv, _mm256_set1_ps(256.f));
    __m256i both[4];
    for (int i = 0; i < 4; ++i) {
      const __m256i q1 = _mm256_cvtps_epi32(_mm256_mul_ps(v[i], inv));
      const __m256 r = _mm256_sub_ps(v[i], _mm256_mul_ps(_mm256_cvtepi32_ps(q1), s));
      const __m256i q2 = _mm256_max_epi32(neg, _mm256_min_epi32(lim, _mm256_cvtps_epi32(_mm256_mul_ps(r, inv2))));
      both[i] = _mm256_add_epi32(_mm256_slli_epi32(q1, 8), q2);
    }
    for (int i = 0; i < 2; ++i)  // int32 -> int16 (no value saturates), in order
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 16 * i),
                          _mm256_permute4x64_epi64(_mm256_packs_epi32(both[2 * i], both[2 * i + 1]), 0xD8));
    scale[g] = step / 256.f;
    const __m256i t = _mm256_add_epi32(_mm256_add_epi32(both[0], both[1]), _mm256_add_epi32(both[2], both[3]));
    __m128i u = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
    u = _mm_add_epi32(u, _mm_shuffle_epi32(u, 0x4E));
    sums[g] = _mm_cvtsi128_si32(_mm_add_epi32(u, _mm_shuffle_epi32(u, 0xB1)));
  }
}

// Four inputs of eight outputs (half `h` of a 16-output run at `wk`) as int16 pairs, outputs 0-3 in `w0` and 4-7 in
// `w1`: int8's packed W + 128 with its top bit flipped, sign-extended; int4's nibble h, zero-extended.
template <bool Four>
inline void Widen16(const uint8_t* wk, int64_t h, __m256i& w0, __m256i& w1) {
  __m128i b0 = _mm_loadu_si128((const __m128i*)wk), b1 = _mm_loadu_si128((const __m128i*)(wk + 16));
  if constexpr (Four) {
    const __m128i low = _mm_set1_epi8(0x0F);
    if (h) b0 = _mm_srli_epi16(b0, 4), b1 = _mm_srli_epi16(b1, 4);
    w0 = _mm256_cvtepu8_epi16(_mm_and_si128(b0, low)), w1 = _mm256_cvtepu8_epi16(_mm_and_si128(b1, low));
  } else {
    const __m128i flip = _mm_set1_epi8(-128);
    w0 = _mm256_cvtepi8_epi16(_mm_xor_si128(b0, flip)), w1 = _mm256_cvtepi8_epi16(_mm_xor_si128(b1, flip));
  }
}

// Bytes per 4 inputs of 16 outputs, and where half `h` (outputs 8 h .. 8 h + 8) of block nb's packed weights starts:
// int8's runs hold outputs 0-7 in their first 32 bytes and 8-15 in their last 32; int4's hold them in nibble h.
template <bool Four>
constexpr int64_t kRun16 = (Four ? 2 : 4) * kLanes;

template <bool Four>
const uint8_t* Half16(const Shared& s, int64_t nb, int64_t h) {
  return s.w + nb * s.k / 4 * kRun16<Four> + (Four ? 0 : h * 2 * kLanes);
}

// The AVX2 tile, for the AVX2 build's int8 and int4 (`Four`): rows m0..m0+MR of the outputs
// 8 h .. 8 h + 8 of block nb, over every group. `vpmaddwd` multiplies each row's int16 activations (`Quantize16`) by
// the weights widened to int16, summing pairs of inputs of one output; pairs are added once per group. int8: the
// packed W + 128 with its top bit flipped, sign-extended, each group's sum scaled by the weights' scale; int4: nibble
// h of each byte, zero-extended, each group's sum scaled by d, plus the group's sum of activations scaled by m.
// `wide`: this half's weights already widened (`Task16`, from `kWiden` rows on), else null.
template <int MR, bool Four>
void Tile16(const Shared& s, int64_t m0, int64_t nb, int64_t h, const int16_t* wide) {
  const int64_t G = s.groups, K = s.k;
  const int16_t* a = reinterpret_cast<const int16_t*>(s.a) + m0 * K;
  const uint8_t* w = Half16<Four>(s, nb, h);
  __m256 accf[MR];
  for (int m = 0; m < MR; ++m) accf[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i acc[MR][2];  // outputs 0-3 and 4-7, each as two sums of a pair of inputs
    for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_si256();
    for (int64_t kk = 0; kk < kGroup / 4; ++kk) {
      __m256i w0, w1;
      if (wide) {  // widened once for every tile of rows (`Task16`)
        const int16_t* wk = wide + (g * kGroup / 4 + kk) * 2 * kLanes;
        w0 = _mm256_loadu_si256((const __m256i*)wk), w1 = _mm256_loadu_si256((const __m256i*)(wk + kLanes));
      } else {
        Widen16<Four>(w + (g * kGroup / 4 + kk) * kRun16<Four>, h, w0, w1);
      }
      for (int m = 0; m < MR; ++m) {
        int64_t four;  // the row's four activations of these inputs, as int16
        __builtin_memcpy(&four, a + m * K + g * kGroup + kk * 4, 8);
        const __m256i am = _mm256_set1_epi64x(four);
        acc[m][0] = _mm256_add_epi32(acc[m][0], _mm256_madd_epi16(w0, am));
        acc[m][1] = _mm256_add_epi32(acc[m][1], _mm256_madd_epi16(w1, am));
      }
    }
    const int64_t at = (nb * G + g) * kLanes + h * 8;
    __m256 sw, mn;
    if constexpr (Four) {
      sw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(s.d + at)));
      mn = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)(s.mn + at)));
    } else {
      sw = _mm256_loadu_ps(s.s + at);
    }
    for (int m = 0; m < MR; ++m) {  // the pairs added (outputs 0 1 4 5 | 2 3 6 7), put in order
      const __m256i sum = _mm256_permute4x64_epi64(_mm256_hadd_epi32(acc[m][0], acc[m][1]), 0xD8);
      const float sa = s.sa[(m0 + m) * G + g];
      accf[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(sum), _mm256_mul_ps(sw, _mm256_set1_ps(sa)), accf[m]);
      if constexpr (Four) accf[m] = _mm256_fmadd_ps(mn, _mm256_set1_ps(sa * float(s.ca[(m0 + m) * G + g])), accf[m]);
    }
  }
  for (int m = 0; m < MR; ++m) _mm256_storeu_ps(s.out + (m0 + m) * s.n + nb * kLanes + h * 8, accf[m]);
}

constexpr int64_t kMR16 = 4;  // the AVX2 tile's rows; a task is one 16-output block (two tiles of 8) over every row
using TileFn16 = void (*)(const Shared&, int64_t, int64_t, int64_t, const int16_t*);
template <bool Four>
constexpr TileFn16 kRows16[kMR16 + 1] = {nullptr, Tile16<1, Four>, Tile16<2, Four>, Tile16<3, Four>, Tile16<4, Four>};

// From `kWiden` rows on (a prefill's, a verify pass's), each half's weights are widened to int16 once (`wide`,
// K x 16 bytes: 24 KiB at K = 1536, within L2) and every tile of rows reads them there, instead of widening them
// again for each tile: up to 27% faster from 64 rows on (13% the median of 12 shapes), in the noise or slower below
// (docs/PERFORMANCE.md). The same integers are summed in the same order either way.
constexpr int64_t kWiden = 64;

template <bool Four>
void Task16(const Shared& s, int64_t nb) {
  thread_local std::vector<int16_t> buffer;
  const bool widen = s.m >= kWiden;
  if (widen) buffer.resize(s.k / 4 * 2 * kLanes);
  for (int64_t h = 0; h < 2; ++h) {
    if (widen) {
      const uint8_t* w = Half16<Four>(s, nb, h);
      for (int64_t kk = 0; kk < s.k / 4; ++kk) {
        __m256i w0, w1;
        Widen16<Four>(w + kk * kRun16<Four>, h, w0, w1);
        _mm256_storeu_si256((__m256i*)(buffer.data() + kk * 2 * kLanes), w0);
        _mm256_storeu_si256((__m256i*)(buffer.data() + kk * 2 * kLanes + kLanes), w1);
      }
    }
    for (int64_t m0 = 0; m0 < s.m; m0 += kMR16)
      kRows16<Four>[std::min(kMR16, s.m - m0)](s, m0, nb, h, widen ? buffer.data() : nullptr);
  }
}

#endif

#if SPARKLER_VNNI

constexpr int64_t kMR = 6, kNR = 2;  // a tile's rows and 16-output blocks; a task is kNR blocks over every row

// A group's sums into the float accumulators of rows m0..m0+MR and blocks nb..nb+NB: `sum(m, j)`, the group's integer
// sum of row m and block j, times the weights' scale and the row's second-level scale; int4 (`Four`): plus m times the
// group's sum of activations (256 x the first level's + the second's, taken back from -128 x each).
template <int MR, int NB, bool Four, typename Sum>
inline void Scale(const Shared& s, int64_t m0, int64_t nb, int64_t g, Sum sum, __m512 (&accf)[MR][NB]) {
  const int64_t G = s.groups, M = s.m;
  float rest[MR];
  if constexpr (Four)
    for (int m = 0; m < MR; ++m) {
      const int32_t* ca = s.ca + (m0 + m) * G + g;
      rest[m] = s.sa[(m0 + m) * G + g] * float(256 * (ca[0] / -128) + ca[M * G] / -128);
    }
  for (int j = 0; j < NB; ++j) {
    const int64_t at = ((nb + j) * G + g) * kLanes;
    __m512 sw, mn;
    if constexpr (Four) {
      sw = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(s.d + at)));
      mn = _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i*)(s.mn + at)));
    } else {
      sw = _mm512_loadu_ps(s.s + at);
    }
    for (int m = 0; m < MR; ++m) {
      const float sa = s.sa[(m0 + m) * G + g];
      accf[m][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(sum(m, j)), _mm512_mul_ps(sw, _mm512_set1_ps(sa)), accf[m][j]);
      if constexpr (Four) accf[m][j] = _mm512_fmadd_ps(mn, _mm512_set1_ps(rest[m]), accf[m][j]);
    }
  }
}

// Rows m0..m0+MR of the output blocks nb..nb+NR (16 outputs each), over every group; `w`: block nb's weights as
// unsigned bytes in the int8 layout (`[K/4, 64]` a block). int8: the packed W + 128, each level's sum started at -128
// times the level's sum of activations (`ca`), each group's sum scaled by the weights' scale. int4 (`Four`): the
// 4-bit values unpacked by `Task4`, each group's sum scaled by d, plus the group's sum of activations scaled by m.
template <int MR, int NR, bool Four>
void Tile(const Shared& s, int64_t m0, int64_t nb, const uint8_t* w) {
  const int64_t G = s.groups, K = s.k, M = s.m;
  __m512 accf[MR][NR];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) accf[m][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i acc[MR][NR];
    for (int level = 0; level < 2; ++level) {  // the group's sum: 256 x the first level's + the second's
      for (int m = 0; m < MR; ++m) {
        const __m512i c = _mm512_set1_epi32(Four ? 0 : s.ca[(level * M + m0 + m) * G + g]);
        for (int j = 0; j < NR; ++j)
          acc[m][j] = level == 0 ? c : _mm512_add_epi32(_mm512_slli_epi32(acc[m][j], 8), c);
      }
      const int8_t* a = s.a + level * M * K + m0 * K + g * kGroup;
      for (int64_t kk = 0; kk < kGroup / 4; ++kk) {
        __m512i b[NR];
        for (int j = 0; j < NR; ++j) b[j] = _mm512_loadu_si512(w + (j * K + g * kGroup + kk * 4) * kLanes);
        for (int m = 0; m < MR; ++m) {
          int32_t four;
          __builtin_memcpy(&four, a + m * K + kk * 4, 4);
          const __m512i am = _mm512_set1_epi32(four);
          for (int j = 0; j < NR; ++j) acc[m][j] = _mm512_dpbusd_epi32(acc[m][j], b[j], am);
        }
      }
    }
    Scale<MR, NR, Four>(s, m0, nb, g, [&](int m, int j) { return acc[m][j]; }, accf);
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NR; ++j) _mm512_storeu_ps(s.out + (m0 + m) * s.n + (nb + j) * kLanes, accf[m][j]);
}

using TileFn = void (*)(const Shared&, int64_t, int64_t, const uint8_t*);
template <int NR, bool Four>
constexpr TileFn kRows[kMR + 1] = {nullptr, Tile<1, NR, Four>, Tile<2, NR, Four>, Tile<3, NR, Four>,
                                   Tile<4, NR, Four>, Tile<5, NR, Four>, Tile<6, NR, Four>};

template <bool Four>
void Rows(const Shared& s, int64_t nb, const uint8_t* w) {
  const TileFn* rows = s.n / kLanes - nb >= kNR ? kRows<kNR, Four> : kRows<1, Four>;
  for (int64_t m0 = 0; m0 < s.m; m0 += kMR) rows[std::min(kMR, s.m - m0)](s, m0, nb, w);
}

void Task(const Shared& s, int64_t task) { Rows<false>(s, task * kNR, s.w + task * kNR * s.k * kLanes); }

// A run's 32 bytes of 4-bit values as the int8 layout's 64 (value b is byte b's low nibble, b + 32 its high one).
inline __m512i Unpack(const uint8_t* run) {
  const __m256i b = _mm256_loadu_si256((const __m256i*)run);
  return _mm512_and_si512(_mm512_inserti64x4(_mm512_castsi256_si512(b), _mm256_srli_epi16(b, 4), 1),
                          _mm512_set1_epi8(0x0F));
}

// int4 on the VNNI build: the task's blocks' 4-bit values unpacked into the int8 layout (a run's 32 bytes hold value
// b in byte b's low nibble and b + 32 in its high one: the low nibbles are the run's first 32 bytes, the high its
// last), once for every tile of rows, and multiplied as int8's are, with no -128 to take back.
void Task4(const Shared& s, int64_t task) {
  thread_local std::vector<uint8_t> u;
  const int64_t nb = task * kNR, runs = std::min(kNR, s.n / kLanes - nb) * s.k / 4;
  u.resize(runs * 4 * kLanes);
  const uint8_t* w = s.w + nb * s.k / 4 * 2 * kLanes;
  for (int64_t r = 0; r < runs; ++r) _mm512_storeu_si512(u.data() + r * 4 * kLanes, Unpack(w + r * 2 * kLanes));
  Rows<true>(s, nb, u.data());
}

// Calls of up to kVecMost rows (decode steps of a few streams): rows m0..m0+MR (up to two) of kVecBlocks blocks. Each
// run of a block's weights is loaded (and, int4, unpacked) in registers once for both levels, and the levels sum
// apart, so the blocks give 2 x kVecBlocks x MR independent `vpdpbusd` chains. The tile above re-reads a task's
// unpacked weights for each level, and at one row it waits on two chains' latency: one stream's decode 1.25x
// (docs/PERFORMANCE.md). The integers: `(c1 + P1) << 8` plus `c2 + P2` is the tile's `((c1 + P1) << 8) + c2 + P2`, and
// both scale their sums by `Scale`, so a row gets the same bits either way.
constexpr int64_t kVecRows = 2, kVecBlocks = 4, kVecMost = 4;  // a tile's rows and blocks; the calls' most rows

template <int MR, int NB, bool Four>
void Vec(const Shared& s, int64_t m0, int64_t nb) {
  const int64_t G = s.groups, K = s.k, M = s.m;
  const int64_t run = (Four ? 2 : 4) * kLanes, block = K / 4 * run;  // bytes per 4 inputs of a block, per block
  const uint8_t* w = s.w + nb * block;
  __m512 accf[MR][NB];
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NB; ++j) accf[m][j] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m512i acc[2][MR][NB];
    for (int level = 0; level < 2; ++level)
      for (int m = 0; m < MR; ++m) {
        const __m512i c = _mm512_set1_epi32(Four ? 0 : s.ca[(level * M + m0 + m) * G + g]);
        for (int j = 0; j < NB; ++j) acc[level][m][j] = c;
      }
    for (int64_t kk = 0; kk < kGroup / 4; ++kk) {
      __m512i am[2][MR];
      for (int level = 0; level < 2; ++level)
        for (int m = 0; m < MR; ++m) {
          int32_t four;
          __builtin_memcpy(&four, s.a + level * M * K + (m0 + m) * K + g * kGroup + kk * 4, 4);
          am[level][m] = _mm512_set1_epi32(four);
        }
      const uint8_t* wr = w + (g * kGroup / 4 + kk) * run;
      for (int j = 0; j < NB; ++j) {
        const __m512i b = Four ? Unpack(wr + j * block) : _mm512_loadu_si512(wr + j * block);
        for (int m = 0; m < MR; ++m) {
          acc[0][m][j] = _mm512_dpbusd_epi32(acc[0][m][j], b, am[0][m]);
          acc[1][m][j] = _mm512_dpbusd_epi32(acc[1][m][j], b, am[1][m]);
        }
      }
    }
    Scale<MR, NB, Four>(
        s, m0, nb, g, [&](int m, int j) { return _mm512_add_epi32(_mm512_slli_epi32(acc[0][m][j], 8), acc[1][m][j]); },
        accf);
  }
  for (int m = 0; m < MR; ++m)
    for (int j = 0; j < NB; ++j) _mm512_storeu_ps(s.out + (m0 + m) * s.n + (nb + j) * kLanes, accf[m][j]);
}

using VecFn = void (*)(const Shared&, int64_t, int64_t);
template <bool Four>
constexpr VecFn kVec[kVecRows][kVecBlocks] = {
    {Vec<1, 1, Four>, Vec<1, 2, Four>, Vec<1, 3, Four>, Vec<1, 4, Four>},
    {Vec<2, 1, Four>, Vec<2, 2, Four>, Vec<2, 3, Four>, Vec<2, 4, Four>}};

// A call's tasks: kVecBlocks blocks each for up to kVecMost rows (`Vec`), else kNR blocks over every row (`Tile`).
int64_t Tasks(int64_t blocks, int64_t m) {
  const int64_t per = m <= kVecMost ? kVecBlocks : kNR;
  return (blocks + per - 1) / per;
}

template <bool Four>
void Run(const Shared& s, int64_t task) {
  if (s.m <= kVecMost) {
    const int64_t nb = task * kVecBlocks;
    for (int64_t m0 = 0; m0 < s.m; m0 += kVecRows)
      kVec<Four>[std::min(kVecRows, s.m - m0) - 1][std::min(kVecBlocks, s.n / kLanes - nb) - 1](s, m0, nb);
    return;
  }
  if constexpr (Four) return Task4(s, task);
  return Task(s, task);
}

void Store(int8_t* q, int32_t* corr, __m512i lo, __m512i hi) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q), _mm512_cvtepi32_epi8(lo));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(q + kLanes), _mm512_cvtepi32_epi8(hi));
  *corr = -128 * _mm512_reduce_add_epi32(_mm512_add_epi32(lo, hi));
}

// Row m of x quantized per group of 32 (`models.quant.activations`): `q1 = rint(x * 127 / max|x|)`, then
// `q2 = rint((x - q1 * step) * 256 / step)` clipped to +-127 (the remainder is at most half a step), the second
// level's scale `step / 256` and -128 x each level's sum. A NaN is not carried (it counts as 0 in the max, its first
// level is 0 and its second -127): XLA's float product would propagate it.
void Quantize(const float* x, int64_t m, int64_t M, int64_t K, int8_t* a, float* sa, int32_t* ca) {
  const int64_t groups = K / kGroup;
  int8_t *q = a + m * K, *q2 = a + (M + m) * K;
  float* scale = sa + m * groups;
  int32_t *corr = ca + m * groups, *corr2 = ca + (M + m) * groups;
  const __m512i lim = _mm512_set1_epi32(127), neg = _mm512_set1_epi32(-127);
  for (int64_t g = 0; g < groups; ++g, x += kGroup, q += kGroup, q2 += kGroup) {
    const __m512 lo = _mm512_loadu_ps(x), hi = _mm512_loadu_ps(x + kLanes);
    auto mag = [](__m512 v) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(v, v, _CMP_ORD_Q), _mm512_abs_ps(v)); };
    const float top = _mm512_reduce_max_ps(_mm512_max_ps(mag(lo), mag(hi)));
    const float step = top / 127.f;
    const __m512 inv = _mm512_set1_ps(top > 1e-30f ? 127.f / top : 0.f);  // quant.TINY: a tinier group is zeros
    const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv)), qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
    Store(q, corr + g, qlo, qhi);
    scale[g] = step / 256.f;
    const __m512 s = _mm512_set1_ps(step), inv2 = _mm512_mul_ps(inv, _mm512_set1_ps(256.f));
    auto rest = [&](__m512 v, __m512i q) {
      const __m512 r = _mm512_sub_ps(v, _mm512_mul_ps(_mm512_cvtepi32_ps(q), s));
      return _mm512_max_epi32(neg, _mm512_min_epi32(lim, _mm512_cvtps_epi32(_mm512_mul_ps(r, inv2))));
    };
    Store(q2, corr2 + g, rest(lo, qlo), rest(hi, qhi));
  }
}

#else  // AVX2

int64_t Tasks(int64_t blocks, int64_t) { return blocks; }

template <bool Four>
void Run(const Shared& s, int64_t nb) { Task16<Four>(s, nb); }

// Row m of x quantized per group of 32 as the VNNI build does, each input's two levels stored as one int16
// `256 q1 + q2`, and each group's sum of them in `ca` (int4's tile reads it; int8's takes the weights signed).
void Quantize(const float* x, int64_t m, int64_t M, int64_t K, int8_t* a, float* sa, int32_t* ca) {
  const int64_t groups = K / kGroup;
  Quantize16(x, K, reinterpret_cast<int16_t*>(a) + m * K, sa + m * groups, ca + m * groups);
}

#endif

// The rows of x quantized as this build's tiles read them (`Quantize`), in the calling thread's scratch: the helpers
// read it while the caller waits for them.
void QuantizeRows(const float* x, int64_t M, int64_t K, Shared& sh) {
  thread_local std::vector<int8_t> a;  // two int8 levels (VNNI), or one int16 (AVX2): 2 M K bytes either way
  thread_local std::vector<float> sa;
  thread_local std::vector<int32_t> ca;
  a.resize(2 * M * K), sa.resize(M * K / kGroup), ca.resize(2 * M * K / kGroup);
  for (int64_t m = 0; m < M; ++m) Quantize(x + m * K, m, M, K, a.data(), sa.data(), ca.data());
  sh.a = a.data(), sh.sa = sa.data(), sh.ca = ca.data();
}

ffi::Error Int8Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w,
                      ffi::Buffer<ffi::F32> s, ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions(), wd = w.dimensions(), sd = s.dimensions();
  if (xd.size() != 2 || wd.size() != 4 || sd.size() != 4 || xd[1] % kGroup != 0 || wd[2] * 4 != xd[1] ||
      wd[3] != 4 * kLanes || sd[0] != wd[0] || sd[1] != wd[1] || sd[2] * kGroup != xd[1] || sd[3] != kLanes)
    return ffi::Error::InvalidArgument(
        "int8_matmul: shapes do not match x [M,K], w [L,N/16,K/4,64], s [L,N/16,K/32,16]");
  const int64_t M = xd[0], K = xd[1], G = K / kGroup, N = wd[1] * kLanes, l = *layer.typed_data();
  if (l < 0 || l >= wd[0]) return ffi::Error::InvalidArgument("int8_matmul: layer index out of the stack");
  Shared sh;
  sh.w = w.typed_data() + l * N * K, sh.s = s.typed_data() + l * N * G;
  sh.out = out->typed_data(), sh.m = M, sh.n = N, sh.k = K, sh.groups = G;
  QuantizeRows(x.typed_data(), M, K, sh);
  sparkler::RunTasks(pool, Tasks(wd[1], M), 2 * M * N * K >= kMinShared, [&sh](int64_t t) { Run<false>(sh, t); });
  return ffi::Error::Success();
}

ffi::Error Int4Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> w, ffi::Buffer<ffi::F16> s,
                      ffi::Buffer<ffi::F16> mn, ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> out) {
  auto xd = x.dimensions(), wd = w.dimensions(), sd = s.dimensions(), md = mn.dimensions();
  if (xd.size() != 2 || wd.size() != 4 || sd.size() != 4 || md.size() != 4 || xd[1] % kGroup != 0 ||
      wd[2] * 4 != xd[1] || wd[3] != 2 * kLanes || sd[0] != wd[0] || sd[1] != wd[1] || sd[2] * kGroup != xd[1] ||
      sd[3] != kLanes || md[0] != sd[0] || md[1] != sd[1] || md[2] != sd[2] || md[3] != sd[3])
    return ffi::Error::InvalidArgument(
        "int4_matmul: shapes do not match x [M,K], w [L,N/16,K/4,32], s and mn [L,N/16,K/32,16]");
  const int64_t M = xd[0], K = xd[1], G = K / kGroup, N = wd[1] * kLanes, l = *layer.typed_data();
  if (l < 0 || l >= wd[0]) return ffi::Error::InvalidArgument("int4_matmul: layer index out of the stack");
  Shared sh;
  sh.w = w.typed_data() + l * N * K / 2, sh.d = s.typed_data() + l * N * G, sh.mn = mn.typed_data() + l * N * G;
  sh.out = out->typed_data(), sh.m = M, sh.n = N, sh.k = K, sh.groups = G;
  QuantizeRows(x.typed_data(), M, K, sh);
  sparkler::RunTasks(pool, Tasks(wd[1], M), 2 * M * N * K >= kMinShared, [&sh](int64_t t) { Run<true>(sh, t); });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparklerInt8Matmul, Int8Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(SparklerInt4Matmul, Int4Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::F16>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
