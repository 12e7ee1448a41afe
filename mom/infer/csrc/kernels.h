// MoM inference kernels for x86 CPUs (AVX2 + FMA floor): the raw loops shared by the torch ops
// (kernels.cpp) and the native decode step (step.cpp). Pointers in, pointers out, no allocation in the hot
// loops, threads through at::parallel_for (OpenMP).
//
// Ternary: BitLinear at inference from 2-bit weights. RMSNorm + per-token absmax int8 quantisation are
//   fused in and reproduce mom.model.bitlinear.quantize_input bit for bit (same fp32 operations in the same
//   order, including torch's 8-lane vector_norm reduction); the product is an exact int32 sum, so the output
//   equals BitLinear's (and PackedTernaryLinear's) to the last bit.
//   Weights: PackedTernaryLinear's layout, uint8 (N, ceil(K/4)), weight 4b+i in bits 2i..2i+1 of byte b as
//   the code w+1. A 32-byte load holds 128 weights; the activations are permuted once per token to match
//   (xp[128j + 32i + b] = x[128j + 4b + i]), so the codes are used as they are stored: u8 code x s8
//   activation through maddubs, and sum(w x) = sum(code x) - sum(x).
// Dense (fp32, bf16 or int8-per-row weights): y = x W^T (+ b) for few rows (decoding), fp32 FMA accumulation,
//   one weight row streamed at a time at batch 1 (four against each row of x in a prefill), every row summed
//   in the same order; output rows split over the threads. Built for memory bandwidth at batch 1. int8 rows
//   are w = q * scale[row] (weight-only: the activations stay fp32).
//
// Compiled with -ffp-contract=off: no multiply-add is fused unless written so (the quantiser must match
// torch's rounding exactly).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

namespace mom_kernels {

// ---------------------------------------------------------------------------------------------- helpers
inline float hsum8(__m256 v) {
  __m128 lo = _mm256_castps256_ps128(v), hi = _mm256_extractf128_ps(v, 1);
  lo = _mm_add_ps(lo, hi);
  lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
  lo = _mm_add_ss(lo, _mm_movehdup_ps(lo));
  return _mm_cvtss_f32(lo);
}

inline int32_t hsum8i(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4E));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xB1));
  return _mm_cvtsi128_si32(s);
}

// torch.linalg.vector_norm(x, 2) over a contiguous fp32 row, as ATen's AVX2 kernel sums it: 8 lanes of
// acc += x * x (multiply, then add: not fused), lanes added left to right, then the tail (fused), then sqrt.
inline float torch_norm2(const float* x, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 8 <= n; d += 8) {
    __m256 v = _mm256_loadu_ps(x + d);
    acc = _mm256_add_ps(acc, _mm256_mul_ps(v, v));
  }
  alignas(32) float buf[8];
  _mm256_store_ps(buf, acc);
  float s = buf[0];
  for (int j = 1; j < 8; ++j) s = s + buf[j];
  for (; d < n; ++d) s = std::fma(x[d], x[d], s);  // the scalar tail is contracted in ATen's build
  return std::sqrt(s);
}

// One token: int8 activations permuted for the kernel, their sum, and 1/s (see quantize_input).
struct QuantRow {
  float inv_s;
  int32_t sum;
};

inline QuantRow quantize_row(const float* x, const float* g, int64_t K, float eps, int8_t* xq, int8_t* xp,
                             float* tmp, float nrm) {
  float ms = nrm * nrm;
  ms = ms / static_cast<float>(K);
  ms = ms + eps;
  float r = 1.0f / std::sqrt(ms);
  // 8 lanes at a time, then the tail: elementwise IEEE operations and an exact max, so the same bits
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 amax8 = _mm256_setzero_ps();
  int64_t k0 = 0;
  for (; k0 + 8 <= K; k0 += 8) {
    __m256 y = _mm256_mul_ps(_mm256_loadu_ps(x + k0), _mm256_loadu_ps(g + k0));
    _mm256_storeu_ps(tmp + k0, y);
    amax8 = _mm256_max_ps(amax8, _mm256_andnot_ps(sign, y));
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, amax8);
  float amax = 0.0f;
  for (int i = 0; i < 8; ++i) amax = std::max(amax, lanes[i]);
  for (int64_t k = k0; k < K; ++k) {
    float y = x[k] * g[k];
    tmp[k] = y;
    amax = std::max(amax, std::fabs(y));
  }
  float floor_ = (1.0f / r) * 1e-5f;  // python's 1e-5 / r is r.reciprocal() * 1e-5
  float scale_y = 127.0f / std::max(amax, floor_);
  int32_t sum = 0;
  const __m256 s8 = _mm256_set1_ps(scale_y), lo = _mm256_set1_ps(-128.0f), hi = _mm256_set1_ps(127.0f);
  __m256i sum8 = _mm256_setzero_si256();
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  k0 = 0;
  for (; k0 + 32 <= K; k0 += 32) {  // round, clamp, narrow 32 values to int8 (packs interleave lanes: reorder)
    __m256i q[4];
    for (int i = 0; i < 4; ++i) {
      __m256 v = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(tmp + k0 + 8 * i), s8),
                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      q[i] = _mm256_cvtps_epi32(_mm256_min_ps(hi, _mm256_max_ps(lo, v)));
      sum8 = _mm256_add_epi32(sum8, q[i]);
    }
    __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(xq + k0), _mm256_permutevar8x32_epi32(b, order));
  }
  sum = hsum8i(sum8);
  for (int64_t k = k0; k < K; ++k) {
    float q = std::nearbyint(tmp[k] * scale_y);
    q = std::min(127.0f, std::max(-128.0f, q));
    xq[k] = static_cast<int8_t>(q);
    sum += static_cast<int32_t>(q);
  }
  // permute in whole 128-weight blocks; xq is zero from K up to the next multiple of 128 (the caller's
  // buffer), so a partial last block is permuted like the others and its padding multiplies to nothing
  const int64_t nblocks = (K + 127) / 128;
  for (int64_t j = 0; j < nblocks; ++j)
    for (int i = 0; i < 4; ++i)
      for (int b = 0; b < 32; ++b) xp[128 * j + 32 * i + b] = xq[128 * j + 4 * b + i];
  return {r / scale_y, sum};
}

// 32 bytes of packed codes at p, the row's last `tail` bytes when tail < 32. Bytes after a row's end multiply
// zero activations (the padding of xp), so they may be read as they are when they are still inside the
// weight buffer (`inside`); else they are zeros from a local copy.
inline __m256i load_codes(const uint8_t* p, int64_t tail, bool inside = false) {
  if (tail == 32 || inside) return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  alignas(32) uint8_t buf[32] = {0};
  std::memcpy(buf, p, static_cast<size_t>(tail));
  return _mm256_load_si256(reinterpret_cast<const __m256i*>(buf));
}

// sum over one 128-weight block of code x activation, as int16 lanes: u8 code x s8 activation through
// maddubs (|lane| <= 4 * 2 * 2 * 128 = 2048, so 8 blocks add up in int16 before widening)
inline __m256i block_dot(__m256i v, const int8_t* x) {
  const __m256i m3 = _mm256_set1_epi8(3);
  __m256i p = _mm256_maddubs_epi16(_mm256_and_si256(v, m3), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
  p = _mm256_add_epi16(p, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 2), m3),
                                               _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32))));
  p = _mm256_add_epi16(p, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), m3),
                                               _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 64))));
  return _mm256_add_epi16(p, _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 6), m3),
                                                  _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 96))));
}

// Decoding streams each weight once from memory: while a tile of rows is summed, the next tile's bytes are
// prefetched (the hardware prefetcher alone lets a 4-row tile wait on DRAM at every row start).
constexpr int64_t kPrefetchRows = 4;

// Exact int32 sums of R dot products over nblocks 128-weight blocks: add_block(j, p16) adds block j's int16
// lanes (block_dot) into p16[0..R); 8 blocks add up in int16 (|lane| <= 8 * 2048 < 2^15), then widen.
template <int R, typename AddBlock>
inline void sum_blocks(int64_t nblocks, const AddBlock& add_block, int32_t* out) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
  for (int64_t j0 = 0; j0 < nblocks; j0 += 8) {
    __m256i p16[R];
    for (int r = 0; r < R; ++r) p16[r] = _mm256_setzero_si256();
    for (int64_t j = j0; j < std::min<int64_t>(nblocks, j0 + 8); ++j) add_block(j, p16);
    for (int r = 0; r < R; ++r) acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(p16[r], ones));
  }
  for (int r = 0; r < R; ++r) out[r] = hsum8i(acc[r]);
}

// sum_k code_k * x_k for R packed rows (w, w + K4, ..., w + (R-1) K4) against one activation row xp
// (permuted, zero-padded to whole blocks): each activation block is loaded once for the R rows.
// `inside`: the buffer holds at least one more row after these (a tail may read into it).
template <int R>
inline void code_dots_rows(const uint8_t* w, int64_t K, int64_t K4, const int8_t* xp, int32_t* out, bool prefetch,
                           bool inside) {
  sum_blocks<R>((K + 127) / 128, [&](int64_t j, __m256i* p16) {
    const int64_t tail = std::min<int64_t>(32, K4 - 32 * j);
    for (int r = 0; r < R; ++r) {
      const uint8_t* wr = w + r * K4 + 32 * j;
      if (prefetch) _mm_prefetch(reinterpret_cast<const char*>(wr + kPrefetchRows * K4), _MM_HINT_T0);
      p16[r] = _mm256_add_epi16(p16[r], block_dot(load_codes(wr, tail, inside), xp + 128 * j));
    }
  }, out);
}

// one packed row against R activation rows (prefill): each weight load serves R tokens
template <int R>
inline void code_dots(const uint8_t* w, int64_t K, int64_t K4, const int8_t* const* xp, int32_t* out) {
  sum_blocks<R>((K + 127) / 128, [&](int64_t j, __m256i* p16) {
    const __m256i v = load_codes(w + 32 * j, std::min<int64_t>(32, K4 - 32 * j));
    for (int r = 0; r < R; ++r) p16[r] = _mm256_add_epi16(p16[r], block_dot(v, xp[r] + 128 * j));
  }, out);
}

// ---------------------------------------------------------------------------------------------- fp32 / bf16
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {  // bf16 -> fp32: the bits shifted up
  __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
inline __m256 load8(const int8_t* p) {  // int8 -> fp32 (the row's scale is applied to the sum)
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline float load1(const float* p) { return *p; }
inline float load1(const int8_t* p) { return static_cast<float>(*p); }
inline float load1(const uint16_t* p) {
  uint32_t b = static_cast<uint32_t>(*p) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// y = x . w for R weight rows and one row of x. Every dense row is summed in this one order, whatever R and
// however many rows x has (so a row's output never depends on its batch): 2 accumulators over k = 16i + 8j,
// an 8-wide remainder into the first, a0 + a1, the 8 lanes, then the scalar tail. One row at a time (R = 1)
// is one sequential stream per thread, which reads cache- and DRAM-resident weights fastest at batch 1;
// R = 4 shares each load of x between four rows (prefill: 8 accumulators, x in a register).
template <int R, typename W>
inline void dense_rows(const W* w, int64_t K, const float* x, float* out /* R */) {
  __m256 a[R][2];
  for (int r = 0; r < R; ++r) a[r][0] = a[r][1] = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16)
    for (int q = 0; q < 2; ++q) {
      const __m256 xv = _mm256_loadu_ps(x + k + 8 * q);
      for (int r = 0; r < R; ++r) a[r][q] = _mm256_fmadd_ps(load8(w + r * K + k + 8 * q), xv, a[r][q]);
    }
  if (k + 8 <= K) {
    const __m256 xv = _mm256_loadu_ps(x + k);
    for (int r = 0; r < R; ++r) a[r][0] = _mm256_fmadd_ps(load8(w + r * K + k), xv, a[r][0]);
    k += 8;
  }
  for (int r = 0; r < R; ++r) {
    float s = hsum8(_mm256_add_ps(a[r][0], a[r][1]));
    for (int64_t kk = k; kk < K; ++kk) s += load1(w + r * K + kk) * x[kk];
    out[r] = s;
  }
}

// ---------------------------------------------------------------------------------------------- linear jobs
// One linear layer applied to M rows: the unit of work the runner below schedules. Several jobs (q/k/v,
// gate/up, every expert of a token) share one parallel region: one fork/join instead of one each.
enum class Kind : int { F32 = 0, BF16 = 1, TERNARY = 2, INT8 = 3 };

struct LinearWeights {
  Kind kind = Kind::F32;
  int64_t N = 0, K = 0, K4 = 0;
  const void* w = nullptr;        // fp32 / bf16 / int8 (N, K) or packed uint8 (N, K4)
  const float* bias = nullptr;    // (N) or null
  const float* gain = nullptr;    // ternary: the input RMSNorm gain (K); int8: the rows' scales (N)
  float eps = 0.f, gamma = 1.f;   // ternary: its eps, the weight scale
};

struct LinearJob {
  const LinearWeights* L;
  const float* x;  // (M, K)
  int64_t M;
  float* y;        // (M, N)
  // ternary scratch, filled by prepare()
  std::vector<int8_t> xq, xp;
  std::vector<float> scale;
  std::vector<int32_t> xsum;
  int64_t Kp = 0;
};

// torch's norm for rows shorter than 8 (its scalar path): the engine asks ATen itself, so the bits agree.
inline float norm2_any(const float* x, int64_t K) {
  if (K >= 8) return torch_norm2(x, K);
  at::Tensor t = at::from_blob(const_cast<float*>(x), {1, K}, at::kFloat);
  return at::linalg_vector_norm(t, 2, at::IntArrayRef{-1}, true).item<float>();
}

inline void prepare(LinearJob& j) {
  const LinearWeights& L = *j.L;
  if (L.kind != Kind::TERNARY) return;
  const int64_t K = L.K;
  j.Kp = (K + 127) / 128 * 128;
  j.xq.assign(j.M * j.Kp, 0);
  j.xp.assign(j.M * j.Kp, 0);
  j.scale.resize(j.M);
  j.xsum.resize(j.M);
  std::vector<float> tmp(K);
  for (int64_t m = 0; m < j.M; ++m) {
    QuantRow q = quantize_row(j.x + m * K, L.gain, K, L.eps, j.xq.data() + m * j.Kp, j.xp.data() + m * j.Kp,
                              tmp.data(), norm2_any(j.x + m * K, K));
    j.scale[m] = L.gamma * q.inv_s;  // BitLinear: (x_int @ T^T) * (gamma * (1/s)) + bias
    j.xsum[m] = q.sum;
  }
}

// output rows n0 .. n1 (n1 - n0 <= 4) of one dense job; int8 sums are scaled by their row's scale
template <typename W>
inline void dense_tile(const LinearWeights& L, const W* wd, const LinearJob& j, int64_t n0, int64_t n1) {
  const int64_t N = L.N, K = L.K, M = j.M;
  const float* rs = L.kind == Kind::INT8 ? L.gain : nullptr;
  auto out = [&](int64_t m, int64_t n, float v) {
    if (rs) v = v * rs[n];
    j.y[m * N + n] = L.bias ? v + L.bias[n] : v;
  };
  float s[4];
  if (M > 1 && n1 - n0 == 4) {  // prefill: four weight rows (in L1) against every row of x
    for (int64_t m = 0; m < M; ++m) {
      dense_rows<4>(wd + n0 * K, K, j.x + m * K, s);
      for (int r = 0; r < 4; ++r) out(m, n0 + r, s[r]);
    }
    return;
  }
  for (int64_t n = n0; n < n1; ++n)  // decoding (and a prefill's last rows): one weight row after the other
    for (int64_t m = 0; m < M; ++m) {
      dense_rows<1>(wd + n * K, K, j.x + m * K, s);
      out(m, n, s[0]);
    }
}

// output rows n0 .. n1 (n1 - n0 <= 4) of one job
inline void run_tile(const LinearJob& j, int64_t n0, int64_t n1) {
  const LinearWeights& L = *j.L;
  const int64_t N = L.N, K = L.K, M = j.M;
  if (L.kind == Kind::TERNARY) {
    const uint8_t* wd = static_cast<const uint8_t*>(L.w);
    int32_t dots[4];
    if (M < 4) {  // decoding: four weight rows share each activation load; the next four are prefetched
      const bool more = n1 < N;  // rows follow this tile in the buffer
      for (int64_t m = 0; m < M; ++m) {
        const int8_t* xp = j.xp.data() + m * j.Kp;
        switch (n1 - n0) {
          case 4: code_dots_rows<4>(wd + n0 * L.K4, K, L.K4, xp, dots, more, more); break;
          case 3: code_dots_rows<3>(wd + n0 * L.K4, K, L.K4, xp, dots, false, false); break;
          case 2: code_dots_rows<2>(wd + n0 * L.K4, K, L.K4, xp, dots, false, false); break;
          default: code_dots_rows<1>(wd + n0 * L.K4, K, L.K4, xp, dots, false, false); break;
        }
        for (int64_t r = 0; r < n1 - n0; ++r) {
          float v = static_cast<float>(dots[r] - j.xsum[m]) * j.scale[m];
          if (L.bias) v = v + L.bias[n0 + r];
          j.y[m * N + n0 + r] = v;
        }
      }
      return;
    }
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* w = wd + n * L.K4;
      for (int64_t m = 0; m < M; m += 4) {
        int R = static_cast<int>(std::min<int64_t>(4, M - m));
        const int8_t* xps[4];
        for (int r = 0; r < R; ++r) xps[r] = j.xp.data() + (m + r) * j.Kp;
        switch (R) {
          case 4: code_dots<4>(w, K, L.K4, xps, dots); break;
          case 3: code_dots<3>(w, K, L.K4, xps, dots); break;
          case 2: code_dots<2>(w, K, L.K4, xps, dots); break;
          default: code_dots<1>(w, K, L.K4, xps, dots); break;
        }
        for (int r = 0; r < R; ++r) {
          float v = static_cast<float>(dots[r] - j.xsum[m + r]) * j.scale[m + r];
          if (L.bias) v = v + L.bias[n];
          j.y[(m + r) * N + n] = v;
        }
      }
    }
    return;
  }
  switch (L.kind) {
    case Kind::F32: dense_tile(L, static_cast<const float*>(L.w), j, n0, n1); break;
    case Kind::BF16: dense_tile(L, static_cast<const uint16_t*>(L.w), j, n0, n1); break;
    default: dense_tile(L, static_cast<const int8_t*>(L.w), j, n0, n1); break;
  }
}

inline int64_t weight_bytes(const LinearWeights& L) {
  if (L.kind == Kind::TERNARY) return L.N * L.K4;
  return L.N * L.K * (L.kind == Kind::F32 ? 4 : L.kind == Kind::BF16 ? 2 : 1) + (L.kind == Kind::INT8 ? 4 * L.N : 0);
}

// Run every job. Tiles of 4 output rows of all jobs form one range, cut into one contiguous piece per thread
// of about equal work (weight bytes x rows of x; one parallel region for all the jobs). A thread reads the
// same rows at every call (its piece first), then helps with what is left of the others' pieces, so a thread
// that starts late or runs slower holds no one up. Measured 1.2-1.5x faster at batch 1 on this project's
// 2-core machine than threads taking chunks of the whole range from one shared counter, whose rows change
// hands from call to call (docs/benchmarks.md).
inline void run_linears(std::vector<LinearJob>& jobs) {
  std::vector<int64_t> before{0};
  std::vector<double> cost_before{0.0};  // work (weight bytes x rows) of the jobs before each job
  int64_t bytes = 0;
  for (auto& j : jobs) {
    prepare(j);
    before.push_back(before.back() + (j.L->N + 3) / 4);
    // a prefill's jobs see different numbers of rows (each expert its tokens): weight the bytes by them
    cost_before.push_back(cost_before.back() + static_cast<double>(weight_bytes(*j.L)) * std::max<int64_t>(1, j.M));
    bytes += weight_bytes(*j.L) * std::max<int64_t>(1, j.M / 4);
  }
  const int64_t total = before.back();
  if (total == 0) return;
  auto run = [&](int64_t t0, int64_t t1) {
    size_t jn = std::upper_bound(before.begin(), before.end(), t0) - before.begin() - 1;
    for (int64_t t = t0; t < t1; ++t) {
      while (t >= before[jn + 1]) ++jn;
      const LinearJob& j = jobs[jn];
      const int64_t n0 = 4 * (t - before[jn]);
      run_tile(j, n0, std::min<int64_t>(n0 + 4, j.L->N));
    }
  };
  const int64_t threads = at::get_num_threads();
  if (threads == 1 || bytes < (64 << 10) || at::in_parallel_region()) {  // a second thread would cost more
    run(0, total);
    return;
  }
  // the first tile of the piece that starts at `share` of the work
  auto tile_at = [&](double share) -> int64_t {
    const double c = share * cost_before.back();
    size_t jn = std::upper_bound(cost_before.begin(), cost_before.end(), c) - cost_before.begin() - 1;
    if (jn >= jobs.size()) return total;
    const int64_t tiles = before[jn + 1] - before[jn];
    const double per_tile = (cost_before[jn + 1] - cost_before[jn]) / static_cast<double>(tiles);
    const int64_t inside = static_cast<int64_t>((c - cost_before[jn]) / per_tile + 0.5);
    return before[jn] + std::min(tiles, inside);
  };
  struct alignas(64) Piece {  // one thread's tiles, taken in chunks from the front: by it, then by any thread done
    std::atomic<int64_t> next{0};
    int64_t end = 0, chunk = 1;
  };
  std::unique_ptr<Piece[]> pieces(new Piece[threads]);
  for (int64_t p = 0; p < threads; ++p) {
    const int64_t t0 = p == 0 ? 0 : tile_at(static_cast<double>(p) / threads);
    pieces[p].next.store(t0, std::memory_order_relaxed);
    pieces[p].end = p + 1 == threads ? total : tile_at(static_cast<double>(p + 1) / threads);
    pieces[p].chunk = std::max<int64_t>(1, (pieces[p].end - t0) / 8);
  }
  at::parallel_for(0, threads, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t q = 0; q < threads; ++q) {  // its own piece, then what the others have left
        Piece& c = pieces[(p + q) % threads];
        for (int64_t t0; (t0 = c.next.fetch_add(c.chunk)) < c.end;) run(t0, std::min(c.end, t0 + c.chunk));
      }
  });
}

// ---------------------------------------------------------------------------------------------- small ops
// RMSNorm of one fp32 row (double accumulation), y = w * (x * rsqrt(mean x^2 + eps))
inline void rms_norm_row(const float* x, const float* w, int64_t K, float eps, float* y) {
  double ss = 0.0;
  for (int64_t k = 0; k < K; ++k) ss += static_cast<double>(x[k]) * x[k];
  const float inv = 1.0f / std::sqrt(static_cast<float>(ss / K) + eps);
  for (int64_t k = 0; k < K; ++k) y[k] = w[k] * (x[k] * inv);
}

// exp of 8 floats (Cephes-style: 2^n times a degree-6 polynomial on [-ln2/2, ln2/2], ~1 ulp), written with
// explicit FMAs (the file is built with -ffp-contract=off)
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 p = _mm256_set1_ps(1.9875691500e-4f);
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
  p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
  p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

// natural log of 8 positive normal floats (Cephes logf: the mantissa in [sqrt(1/2), sqrt(2)) and a degree-9
// polynomial, ~1 ulp)
inline __m256 log8(__m256 x) {
  const __m256i bits = _mm256_castps_si256(x);
  __m256 e = _mm256_cvtepi32_ps(_mm256_sub_epi32(_mm256_srli_epi32(bits, 23), _mm256_set1_epi32(126)));
  __m256 m = _mm256_castsi256_ps(_mm256_or_si256(_mm256_and_si256(bits, _mm256_set1_epi32(0x807FFFFF)),
                                                 _mm256_set1_epi32(0x3F000000)));  // x = m 2^e, m in [0.5, 1)
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 small = _mm256_cmp_ps(m, _mm256_set1_ps(0.707106781186547524f), _CMP_LT_OQ);
  e = _mm256_sub_ps(e, _mm256_and_ps(small, one));
  m = _mm256_sub_ps(_mm256_add_ps(m, _mm256_and_ps(small, m)), one);  // 2m - 1 or m - 1
  const __m256 z = _mm256_mul_ps(m, m);
  __m256 y = _mm256_set1_ps(7.0376836292e-2f);
  for (float c : {-1.1514610310e-1f, 1.1676998740e-1f, -1.2420140846e-1f, 1.4249322787e-1f, -1.6668057665e-1f,
                  2.0000714765e-1f, -2.4999993993e-1f, 3.3333331174e-1f})
    y = _mm256_fmadd_ps(y, m, _mm256_set1_ps(c));
  y = _mm256_mul_ps(_mm256_mul_ps(y, m), z);
  y = _mm256_fmadd_ps(e, _mm256_set1_ps(-2.12194440e-4f), y);
  y = _mm256_fnmadd_ps(_mm256_set1_ps(0.5f), z, y);
  return _mm256_fmadd_ps(e, _mm256_set1_ps(0.693359375f), _mm256_add_ps(m, y));
}

// softplus as torch computes it (threshold 20): x above 20, else log1p(exp(x)); log1p(v) = log(u) v / (u - 1)
// with u = 1 + v keeps full precision for small v (and is v itself when u rounds to 1)
inline __m256 softplus8(__m256 x) {
  const __m256 one = _mm256_set1_ps(1.0f);
  const __m256 v = exp8(_mm256_min_ps(x, _mm256_set1_ps(20.0f)));
  const __m256 u = _mm256_add_ps(one, v), um1 = _mm256_sub_ps(u, one);
  const __m256 exact = _mm256_cmp_ps(um1, _mm256_setzero_ps(), _CMP_EQ_OQ);
  const __m256 lp = _mm256_blendv_ps(_mm256_div_ps(_mm256_mul_ps(log8(u), v), um1), v, exact);
  return _mm256_blendv_ps(lp, x, _mm256_cmp_ps(x, _mm256_set1_ps(20.0f), _CMP_GT_OQ));
}

// out[i] = silu(a[i]) * b[i] (b null: silu alone), 8 at a time; the tail goes through the same 8-lane code,
// so an element's value does not depend on where it sits in the array (batched rows = one by one)
inline void silu_mul(const float* a, const float* b, float* out, int64_t n) {
  const __m256 one = _mm256_set1_ps(1.0f), zero = _mm256_setzero_ps();
  auto silu8 = [&](__m256 v) { return _mm256_div_ps(v, _mm256_add_ps(one, exp8(_mm256_sub_ps(zero, v)))); };
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 s = silu8(_mm256_loadu_ps(a + i));
    if (b) s = _mm256_mul_ps(s, _mm256_loadu_ps(b + i));
    _mm256_storeu_ps(out + i, s);
  }
  if (i == n) return;
  alignas(32) float ta[8] = {0}, tb[8] = {0};
  std::memcpy(ta, a + i, (n - i) * sizeof(float));
  if (b) std::memcpy(tb, b + i, (n - i) * sizeof(float));
  __m256 s = silu8(_mm256_load_ps(ta));
  if (b) s = _mm256_mul_ps(s, _mm256_load_ps(tb));
  _mm256_store_ps(ta, s);
  std::memcpy(out + i, ta, (n - i) * sizeof(float));
}

// Mamba's causal depthwise conv for one token of one sequence: u (D) against state (D, W-1), shifted in
// place; out = silu(conv + bias). w: (D, W).
inline void conv_step_row(const float* u, float* state, const float* w, const float* bias, int64_t D, int64_t W1,
                          float* out) {
  for (int64_t d = 0; d < D; ++d) {
    float* st = state + d * W1;
    const float* wr = w + d * (W1 + 1);
    float acc = 0.0f;
    for (int64_t j = 0; j < W1; ++j) acc += st[j] * wr[j];
    acc += u[d] * wr[W1];
    if (bias) acc += bias[d];
    for (int64_t j = 0; j + 1 < W1; ++j) st[j] = st[j + 1];
    if (W1 > 0) st[W1 - 1] = u[d];
    out[d] = acc;
  }
  silu_mul(out, nullptr, out, D);
}

// Mamba's recurrent update for one token, channels d0..d1 of one sequence: dt = softplus(dt),
// h = exp(dt A) h + dt u B, y = (h . C + D u) * silu(z).  h: (D, N) state, A: (D, N).
inline void ssm_step_row(float* h, const float* u, const float* dt, const float* A, const float* Bv, const float* Cv,
                         const float* Dv, const float* z, int64_t d0, int64_t d1, int64_t N, float* y) {
  const int64_t N8 = N / 8 * 8;
  alignas(32) float sp[8];
  for (int64_t d = d0; d < d1; ++d) {
    if ((d - d0) % 8 == 0) {  // softplus(dt) of the next 8 channels (a partial group zero-padded)
      const int64_t c = std::min<int64_t>(8, d1 - d);
      std::fill(sp, sp + 8, 0.0f);
      std::memcpy(sp, dt + d, c * sizeof(float));
      _mm256_store_ps(sp, softplus8(_mm256_load_ps(sp)));
    }
    const float dtv = sp[(d - d0) % 8];
    const float du = dtv * u[d];
    float* hd = h + d * N;
    const float* a = A + d * N;
    __m256 acc8 = _mm256_setzero_ps();
    const __m256 dt8 = _mm256_set1_ps(dtv), du8 = _mm256_set1_ps(du);
    for (int64_t n = 0; n < N8; n += 8) {
      __m256 hv = _mm256_loadu_ps(hd + n);
      hv = _mm256_add_ps(_mm256_mul_ps(hv, exp8(_mm256_mul_ps(dt8, _mm256_loadu_ps(a + n)))),
                         _mm256_mul_ps(du8, _mm256_loadu_ps(Bv + n)));
      _mm256_storeu_ps(hd + n, hv);
      acc8 = _mm256_add_ps(acc8, _mm256_mul_ps(hv, _mm256_loadu_ps(Cv + n)));
    }
    float acc = hsum8(acc8);
    for (int64_t n = N8; n < N; ++n) {
      hd[n] = hd[n] * std::exp(dtv * a[n]) + du * Bv[n];
      acc += hd[n] * Cv[n];
    }
    y[d] = acc + Dv[d] * u[d];
  }
  silu_mul(z + d0, y + d0, y + d0, d1 - d0);  // y = (h . C + D u) * silu(z)
}

// the same over all channels, split over the threads when there are enough
inline void ssm_step(float* h, const float* u, const float* dt, const float* A, const float* Bv, const float* Cv,
                     const float* Dv, const float* z, int64_t D, int64_t N, float* y) {
  const int64_t grain = D * N >= 8192 ? (D + at::get_num_threads() - 1) / at::get_num_threads() : D;
  at::parallel_for(0, D, grain, [&](int64_t d0, int64_t d1) { ssm_step_row(h, u, dt, A, Bv, Cv, Dv, z, d0, d1, N, y); });
}

}  // namespace mom_kernels
