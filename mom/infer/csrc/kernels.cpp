// MoM inference kernels for x86 CPUs (AVX2 + FMA floor), registered as torch ops `mom_infer::*`.
//
// ternary_linear: BitLinear at inference from 2-bit weights. RMSNorm + per-token absmax int8 quantisation
//   are fused in and reproduce mom.model.bitlinear.quantize_input bit for bit (same fp32 operations in the
//   same order, including torch's 8-lane vector_norm reduction); the product is an exact int32 sum, so the
//   output equals BitLinear's (and PackedTernaryLinear's) to the last bit.
//   Weights: PackedTernaryLinear's layout, uint8 (N, ceil(K/4)), weight 4b+i in bits 2i..2i+1 of byte b as
//   the code w+1. A 32-byte load holds 128 weights; the activations are permuted once per token to match
//   (xp[128j + 32i + b] = x[128j + 4b + i]), so the codes are used as they are stored: u8 code x s8 activation
//   through maddubs, and sum(w x) = sum(code x) - sum(x).
// linear_f32 / linear_bf16w: y = x W^T (+ b) for few rows (decoding), fp32 accumulation with FMA, 4 weight
//   rows at a time streamed once; output rows split over the threads. Built for memory bandwidth at batch 1.
//
// Compiled with -ffp-contract=off: no multiply-add is fused unless written so (the quantiser must match
// torch's rounding exactly).

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

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
                             float* tmp) {
  float nrm = torch_norm2(x, K);
  float ms = nrm * nrm;
  ms = ms / static_cast<float>(K);
  ms = ms + eps;
  float r = 1.0f / std::sqrt(ms);
  float amax = 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    float y = x[k] * g[k];
    tmp[k] = y;
    amax = std::max(amax, std::fabs(y));
  }
  float floor_ = (1.0f / r) * 1e-5f;  // python's 1e-5 / r is r.reciprocal() * 1e-5
  float scale_y = 127.0f / std::max(amax, floor_);
  int32_t sum = 0;
  for (int64_t k = 0; k < K; ++k) {
    float q = std::nearbyint(tmp[k] * scale_y);
    q = std::min(127.0f, std::max(-128.0f, q));
    xq[k] = static_cast<int8_t>(q);
    sum += static_cast<int32_t>(q);
  }
  // permute whole 128-weight blocks; the tail keeps the natural order
  int64_t nfull = K / 128;
  for (int64_t j = 0; j < nfull; ++j)
    for (int i = 0; i < 4; ++i)
      for (int b = 0; b < 32; ++b) xp[128 * j + 32 * i + b] = xq[128 * j + 4 * b + i];
  return {r / scale_y, sum};
}

// sum_k code_k * x_k over one packed row (K4 bytes) for R activation rows at once.
template <int R>
inline void code_dots(const uint8_t* w, int64_t K, int64_t K4, const int8_t* const* xp, const int8_t* const* xq,
                      int32_t* out) {
  const __m256i m3 = _mm256_set1_epi8(3);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_si256();
  int64_t nfull = K / 128;
  for (int64_t j = 0; j < nfull; ++j) {
    __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + 32 * j));
    __m256i c0 = _mm256_and_si256(v, m3);
    __m256i c1 = _mm256_and_si256(_mm256_srli_epi16(v, 2), m3);
    __m256i c2 = _mm256_and_si256(_mm256_srli_epi16(v, 4), m3);
    __m256i c3 = _mm256_and_si256(_mm256_srli_epi16(v, 6), m3);
    for (int r = 0; r < R; ++r) {
      const int8_t* x = xp[r] + 128 * j;
      __m256i p = _mm256_maddubs_epi16(c0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
      p = _mm256_add_epi16(p, _mm256_maddubs_epi16(c1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32))));
      p = _mm256_add_epi16(p, _mm256_maddubs_epi16(c2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 64))));
      p = _mm256_add_epi16(p, _mm256_maddubs_epi16(c3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 96))));
      acc[r] = _mm256_add_epi32(acc[r], _mm256_madd_epi16(p, ones));  // |p| <= 4 * 2 * 2 * 128: no overflow
    }
  }
  for (int r = 0; r < R; ++r) {
    int32_t s = hsum8i(acc[r]);
    for (int64_t b = 32 * nfull; b < K4; ++b) {
      uint8_t byte = w[b];
      for (int i = 0; i < 4; ++i) {
        int64_t k = 4 * b + i;
        if (k < K) s += static_cast<int32_t>((byte >> (2 * i)) & 3) * xq[r][k];
      }
    }
    out[r] = s;
  }
}

inline int64_t grain_for(int64_t rows, int64_t bytes_per_row) {
  // below ~64 KiB of weights a second thread costs more than it saves
  if (rows * bytes_per_row < (64 << 10)) return rows;
  return std::max<int64_t>(4, (rows / at::get_num_threads() + 3) / 4 * 4);
}

// ---------------------------------------------------------------------------------------------- ternary
at::Tensor ternary_linear(const at::Tensor& x_, const at::Tensor& packed, const at::Tensor& norm_w, double eps,
                          const at::Tensor& gamma, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x_.scalar_type() == at::kFloat && norm_w.scalar_type() == at::kFloat, "ternary_linear: fp32 input");
  TORCH_CHECK(packed.scalar_type() == at::kByte && packed.dim() == 2, "ternary_linear: packed weight must be uint8 2-D");
  at::Tensor x = x_.contiguous();
  const int64_t K = x.size(-1), M = x.numel() / std::max<int64_t>(K, 1), N = packed.size(0), K4 = packed.size(1);
  TORCH_CHECK(K4 == (K + 3) / 4, "ternary_linear: packed weight has ", K4, " bytes a row for ", K, " inputs");
  at::Tensor pw = packed.contiguous(), g = norm_w.contiguous();
  const float gam = gamma.item<float>();
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = N;
  at::Tensor y = at::empty(out_sizes, x.options());
  if (M == 0) return y;
  const int64_t Kp = (K + 127) / 128 * 128;
  std::vector<int8_t> xq(M * Kp, 0), xp(M * Kp, 0);
  std::vector<float> tmp(K), scale(M);
  std::vector<int32_t> xsum(M);
  const float* xd = x.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    QuantRow q = quantize_row(xd + m * K, g.data_ptr<float>(), K, static_cast<float>(eps), xq.data() + m * Kp,
                              xp.data() + m * Kp, tmp.data());
    scale[m] = gam * q.inv_s;  // BitLinear: (x_int @ T^T) * (gamma * (1/s)) + bias
    xsum[m] = q.sum;
  }
  const uint8_t* wd = pw.data_ptr<uint8_t>();
  const float* bd = bias.has_value() ? bias->contiguous().data_ptr<float>() : nullptr;
  float* yd = y.data_ptr<float>();
  at::parallel_for(0, N, grain_for(N, K4), [&](int64_t n0, int64_t n1) {
    int32_t dots[4];
    for (int64_t n = n0; n < n1; ++n) {
      const uint8_t* w = wd + n * K4;
      for (int64_t m = 0; m < M; m += 4) {
        int R = static_cast<int>(std::min<int64_t>(4, M - m));
        const int8_t* xps[4];
        const int8_t* xqs[4];
        for (int r = 0; r < R; ++r) {
          xps[r] = xp.data() + (m + r) * Kp;
          xqs[r] = xq.data() + (m + r) * Kp;
        }
        switch (R) {
          case 4: code_dots<4>(w, K, K4, xps, xqs, dots); break;
          case 3: code_dots<3>(w, K, K4, xps, xqs, dots); break;
          case 2: code_dots<2>(w, K, K4, xps, xqs, dots); break;
          default: code_dots<1>(w, K, K4, xps, xqs, dots); break;
        }
        for (int r = 0; r < R; ++r) {
          float v = static_cast<float>(dots[r] - xsum[m + r]) * scale[m + r];
          if (bd) v = v + bd[n];
          yd[(m + r) * N + n] = v;
        }
      }
    }
  });
  return y;
}

// ---------------------------------------------------------------------------------------------- fp32 / bf16
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const uint16_t* p) {  // bf16 -> fp32: the bits shifted up
  __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}
inline float load1(const float* p) { return *p; }
inline float load1(const uint16_t* p) {
  uint32_t b = static_cast<uint32_t>(*p) << 16;
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

// y[m, n0:n0+4] = x[m] . W[n0:n0+4] for every m (4 weight rows streamed once, reused over the rows of x)
template <typename W>
inline void dots4(const W* w, int64_t K, const float* x, int64_t M, float* out /* M x 4 */) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 8 <= K; k += 8) {
      __m256 xv = _mm256_loadu_ps(xm + k);
      a0 = _mm256_fmadd_ps(load8(w + k), xv, a0);
      a1 = _mm256_fmadd_ps(load8(w + K + k), xv, a1);
      a2 = _mm256_fmadd_ps(load8(w + 2 * K + k), xv, a2);
      a3 = _mm256_fmadd_ps(load8(w + 3 * K + k), xv, a3);
    }
    float s[4] = {hsum8(a0), hsum8(a1), hsum8(a2), hsum8(a3)};
    for (; k < K; ++k)
      for (int r = 0; r < 4; ++r) s[r] += load1(w + r * K + k) * xm[k];
    for (int r = 0; r < 4; ++r) out[m * 4 + r] = s[r];
  }
}

template <typename W>
inline void dots1(const W* w, int64_t K, const float* x, int64_t M, float* out /* M */) {
  for (int64_t m = 0; m < M; ++m) {
    const float* xm = x + m * K;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k + 16 <= K; k += 16) {
      a0 = _mm256_fmadd_ps(load8(w + k), _mm256_loadu_ps(xm + k), a0);
      a1 = _mm256_fmadd_ps(load8(w + k + 8), _mm256_loadu_ps(xm + k + 8), a1);
    }
    for (; k + 8 <= K; k += 8) a0 = _mm256_fmadd_ps(load8(w + k), _mm256_loadu_ps(xm + k), a0);
    float s = hsum8(_mm256_add_ps(a0, a1));
    for (; k < K; ++k) s += load1(w + k) * xm[k];
    out[m] = s;
  }
}

template <typename W>
at::Tensor linear_rows(const at::Tensor& x_, const W* wd, int64_t N, int64_t K, const std::optional<at::Tensor>& bias) {
  at::Tensor x = x_.contiguous();
  const int64_t M = x.numel() / std::max<int64_t>(K, 1);
  auto out_sizes = x.sizes().vec();
  out_sizes.back() = N;
  at::Tensor y = at::empty(out_sizes, x.options());
  const float* xd = x.data_ptr<float>();
  const float* bd = bias.has_value() ? bias->contiguous().data_ptr<float>() : nullptr;
  float* yd = y.data_ptr<float>();
  const int64_t N4 = N / 4;
  at::parallel_for(0, N4 + (N % 4 ? 1 : 0), grain_for(N, K * sizeof(W)) / 4 + 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(M * 4);
    for (int64_t t = t0; t < t1; ++t) {
      if (t < N4) {
        dots4(wd + 4 * t * K, K, xd, M, buf.data());
        for (int64_t m = 0; m < M; ++m)
          for (int r = 0; r < 4; ++r) yd[m * N + 4 * t + r] = buf[m * 4 + r] + (bd ? bd[4 * t + r] : 0.0f);
      } else {
        for (int64_t n = 4 * N4; n < N; ++n) {
          dots1(wd + n * K, K, xd, M, buf.data());
          for (int64_t m = 0; m < M; ++m) yd[m * N + n] = buf[m] + (bd ? bd[n] : 0.0f);
        }
      }
    }
  });
  return y;
}

at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& w_, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w_.scalar_type() == at::kFloat, "linear_f32: fp32 tensors");
  at::Tensor w = w_.contiguous();
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(-1), "linear_f32: weight shape does not match the input");
  return linear_rows<float>(x, w.data_ptr<float>(), w.size(0), w.size(1), bias);
}

at::Tensor linear_bf16w(const at::Tensor& x, const at::Tensor& w_, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w_.scalar_type() == at::kBFloat16, "linear_bf16w: fp32 x, bf16 w");
  at::Tensor w = w_.contiguous();
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(-1), "linear_bf16w: weight shape does not match the input");
  return linear_rows<uint16_t>(x, reinterpret_cast<const uint16_t*>(w.data_ptr()), w.size(0), w.size(1), bias);
}

// y = x W^T for several weights sharing the input (q/k/v, gate/up): one pass over the threads, no copies
std::vector<at::Tensor> linear_multi_f32(const at::Tensor& x_, at::TensorList ws) {
  at::Tensor x = x_.contiguous();
  const int64_t K = x.size(-1), M = x.numel() / std::max<int64_t>(K, 1);
  std::vector<at::Tensor> outs;
  std::vector<int64_t> tiles_before{0};
  for (const auto& w : ws) {
    TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.dim() == 2 && w.size(1) == K,
                "linear_multi_f32: contiguous fp32 (N, K) weights");
    auto sz = x.sizes().vec();
    sz.back() = w.size(0);
    outs.push_back(at::empty(sz, x.options()));
    tiles_before.push_back(tiles_before.back() + (w.size(0) + 3) / 4);
  }
  const int64_t total = tiles_before.back();
  const float* xd = x.data_ptr<float>();
  at::parallel_for(0, total, grain_for(total * 4, K * 4) / 4 + 1, [&](int64_t t0, int64_t t1) {
    std::vector<float> buf(M * 4);
    for (int64_t t = t0; t < t1; ++t) {
      size_t j = std::upper_bound(tiles_before.begin(), tiles_before.end(), t) - tiles_before.begin() - 1;
      const float* wd = ws[j].data_ptr<float>();
      float* yd = outs[j].data_ptr<float>();
      const int64_t N = ws[j].size(0), n0 = 4 * (t - tiles_before[j]);
      if (n0 + 4 <= N) {
        dots4(wd + n0 * K, K, xd, M, buf.data());
        for (int64_t m = 0; m < M; ++m)
          for (int r = 0; r < 4; ++r) yd[m * N + n0 + r] = buf[m * 4 + r];
      } else {
        for (int64_t n = n0; n < N; ++n) {
          dots1(wd + n * K, K, xd, M, buf.data());
          for (int64_t m = 0; m < M; ++m) yd[m * N + n] = buf[m];
        }
      }
    }
  });
  return outs;
}

// ---------------------------------------------------------------------------------------------- small fused ops
// RMSNorm over the last dim in fp32 (one op instead of torch's five at decode)
at::Tensor rms_norm(const at::Tensor& x_, const at::Tensor& w, double eps) {
  TORCH_CHECK(x_.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "rms_norm: fp32");
  at::Tensor x = x_.contiguous();
  const int64_t K = x.size(-1), M = x.numel() / std::max<int64_t>(K, 1);
  at::Tensor y = at::empty_like(x);
  const float *xd = x.data_ptr<float>(), *wd = w.data_ptr<float>();
  float* yd = y.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    const float* r = xd + m * K;
    double ss = 0.0;
    for (int64_t k = 0; k < K; ++k) ss += static_cast<double>(r[k]) * r[k];
    const float inv = 1.0f / std::sqrt(static_cast<float>(ss / K) + static_cast<float>(eps));
    for (int64_t k = 0; k < K; ++k) yd[m * K + k] = wd[k] * (r[k] * inv);
  }
  return y;
}

// Mamba decode step after in_proj: causal conv over [state, u] (state shifted in place) and SiLU.
// xz: (B, 2D) = [u | z]; conv_state: (B, D, W-1); w: (D, W); returns (B, D).
at::Tensor mamba_conv_step(const at::Tensor& xz_, at::Tensor conv_state, const at::Tensor& w_,
                           const std::optional<at::Tensor>& bias) {
  at::Tensor xz = xz_.contiguous(), w = w_.contiguous();
  TORCH_CHECK(conv_state.is_contiguous() && conv_state.scalar_type() == at::kFloat, "mamba_conv_step: fp32 state");
  const int64_t B = conv_state.size(0), D = conv_state.size(1), W1 = conv_state.size(2);
  at::Tensor out = at::empty({B, D}, xz.options());
  const float *xd = xz.data_ptr<float>(), *wd = w.data_ptr<float>();
  const float* bd = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  float *sd = conv_state.data_ptr<float>(), *od = out.data_ptr<float>();
  for (int64_t b = 0; b < B; ++b)
    for (int64_t d = 0; d < D; ++d) {
      float* st = sd + (b * D + d) * W1;
      const float u = xd[b * 2 * D + d];
      const float* wr = wd + d * (W1 + 1);
      float acc = 0.0f;
      for (int64_t j = 0; j < W1; ++j) acc += st[j] * wr[j];
      acc += u * wr[W1];
      if (bd) acc += bd[d];
      for (int64_t j = 0; j + 1 < W1; ++j) st[j] = st[j + 1];
      if (W1 > 0) st[W1 - 1] = u;
      od[b * D + d] = acc / (1.0f + std::exp(-acc));
    }
  return out;
}

// Mamba recurrent update, in place on ssm (B, D, N): dt = softplus(dt), h = exp(dt A) h + dt u B,
// y = (h . C + D u) * silu(z). u, dt: (B, D); Bm, Cm: (B, N); z: the second half of xz (B, 2D).
at::Tensor mamba_ssm_step(at::Tensor ssm, const at::Tensor& u_, const at::Tensor& dt_, const at::Tensor& A_,
                          const at::Tensor& Bm_, const at::Tensor& Cm_, const at::Tensor& Dv_, const at::Tensor& xz_) {
  at::Tensor u = u_.contiguous(), dt = dt_.contiguous(), A = A_.contiguous(), Bm = Bm_.contiguous(),
             Cm = Cm_.contiguous(), Dv = Dv_.contiguous(), xz = xz_.contiguous();
  TORCH_CHECK(ssm.is_contiguous() && ssm.scalar_type() == at::kFloat, "mamba_ssm_step: fp32 state");
  const int64_t B = ssm.size(0), D = ssm.size(1), N = ssm.size(2);
  at::Tensor y = at::empty({B, D}, u.options());
  float *hd = ssm.data_ptr<float>(), *yd = y.data_ptr<float>();
  const float *ud = u.data_ptr<float>(), *dtd = dt.data_ptr<float>(), *Ad = A.data_ptr<float>(),
              *Bd = Bm.data_ptr<float>(), *Cd = Cm.data_ptr<float>(), *Dd = Dv.data_ptr<float>(),
              *xzd = xz.data_ptr<float>();
  at::parallel_for(0, B * D, B * D >= 4096 ? (B * D) / 2 : B * D, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / D, d = i % D;
      float dtv = dtd[i];
      dtv = dtv > 20.0f ? dtv : std::log1p(std::exp(dtv));
      const float du = dtv * ud[i];
      float* h = hd + i * N;
      const float *a = Ad + d * N, *bb = Bd + b * N, *cc = Cd + b * N;
      float acc = 0.0f;
      for (int64_t n = 0; n < N; ++n) {
        h[n] = h[n] * std::exp(dtv * a[n]) + du * bb[n];
        acc += h[n] * cc[n];
      }
      const float z = xzd[b * 2 * D + D + d];
      yd[i] = (acc + Dd[d] * ud[i]) * (z / (1.0f + std::exp(-z)));
    }
  });
  return y;
}

}  // namespace

TORCH_LIBRARY(mom_infer, m) {
  m.def("linear_multi_f32(Tensor x, Tensor[] weights) -> Tensor[]");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("mamba_conv_step(Tensor xz, Tensor(a!) conv_state, Tensor weight, Tensor? bias) -> Tensor");
  m.def("mamba_ssm_step(Tensor(a!) ssm, Tensor u, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor D, Tensor xz) -> Tensor");
  m.def("ternary_linear(Tensor x, Tensor packed, Tensor norm_weight, float eps, Tensor gamma, Tensor? bias) -> Tensor");
  m.def("linear_f32(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("linear_bf16w(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(mom_infer, CPU, m) {
  m.impl("ternary_linear", &ternary_linear);
  m.impl("linear_f32", &linear_f32);
  m.impl("linear_bf16w", &linear_bf16w);
  m.impl("linear_multi_f32", &linear_multi_f32);
  m.impl("rms_norm", &rms_norm);
  m.impl("mamba_conv_step", &mamba_conv_step);
  m.impl("mamba_ssm_step", &mamba_ssm_step);
}
