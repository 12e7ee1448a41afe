// Mamba-1 selective scan for training on the CPU: the forward and backward recurrences of
// mom.model.scan's "fast" path in one pass over the state each, fp32. The PyTorch form runs a few small
// tensor ops per time step (thousands of calls a layer, with (chunk, b, d, n) buffers written and read back);
// here every (sequence, channel) row keeps its n-wide state in registers and walks the time steps, rows split
// over the threads. Same algorithm: the forward keeps the state before every chunk of time steps, the backward
// recomputes a chunk's states from it and runs the adjoint recurrence G_t = C_t gy_t + exp(dt_{t+1} A) G_{t+1}
// in reverse time.
//
// Layouts: u, dt, gy (b, d, l) with any strides (the ops below ask u and dt to share theirs): Mamba's
// time-major activations come in as (b, d, l) views of (b, l, d) memory and y, sGB, gdtA are written in dt's
// layout, so no transposing copies; A (d, n); B, C time-major per sequence (b, l, n); states
// (chunks, b, d, n). The state size n is a multiple of 8 up to 64 (mom.model.scan pads others with zero
// lanes): the state of a row stays in registers.
//
// Also here: Mamba's causal depthwise conv + SiLU on time-major (b, l, c) activations, forward and backward
// (causal_conv1d_cpu_fwd/bwd), channels in vectors of 8.
#include "kernels.h"

#include <torch/library.h>

#include <type_traits>

namespace {

using namespace mom_kernels;

// One (sequence, channel) row of the forward: NV vectors of 8 state lanes kept in registers over all steps.
// y[t] = <h_t, C_t>; states (when given) receives the state before every chunk, at stride `stride`.
template <int NV>
void forward_row(const float* u, int64_t us, const float* dt, int64_t ds, const float* a, const float* Bb,
                 const float* Cb, const float* h0, int64_t L, int64_t chunk, float* y, int64_t ys, float* last,
                 float* states, int64_t stride) {
  constexpr int N = NV * 8;
  __m256 h[NV], av[NV];
  for (int v = 0; v < NV; ++v) {
    h[v] = h0 ? _mm256_loadu_ps(h0 + 8 * v) : _mm256_setzero_ps();
    av[v] = _mm256_loadu_ps(a + 8 * v);
  }
  for (int64_t t = 0; t < L; ++t) {
    if (states && t % chunk == 0)
      for (int v = 0; v < NV; ++v) _mm256_storeu_ps(states + (t / chunk) * stride + 8 * v, h[v]);
    const __m256 dt8 = _mm256_set1_ps(dt[t * ds]), du8 = _mm256_set1_ps(dt[t * ds] * u[t * us]);
    __m256 acc = _mm256_setzero_ps();
    for (int v = 0; v < NV; ++v) {
      const __m256 dA = exp8(_mm256_mul_ps(dt8, av[v]));
      h[v] = _mm256_fmadd_ps(dA, h[v], _mm256_mul_ps(du8, _mm256_loadu_ps(Bb + t * N + 8 * v)));
      acc = _mm256_fmadd_ps(h[v], _mm256_loadu_ps(Cb + t * N + 8 * v), acc);
    }
    y[t * ys] = hsum8(acc);
  }
  for (int v = 0; v < NV; ++v) _mm256_storeu_ps(last + 8 * v, h[v]);
}

// One row of the backward (see selective_scan_cpu_bwd): per chunk, the states recomputed into hs/dAs (L1),
// then the adjoint in reverse time with G's carry (`next`) and the row's dA gradient in registers.
template <int NV>
void backward_row(const float* u, int64_t us, const float* dt, int64_t ds, const float* gy, int64_t gs, const float* a,
                  const float* Bb, const float* Cb,
                  const float* glast, const float* states, int64_t stride, int64_t L, int64_t chunk, float* hs,
                  float* dAs, float* sGB, float* gdtA, float* gA, float* gB, float* gC, float* gh0) {
  constexpr int N = NV * 8;
  __m256 next[NV], av[NV], gAv[NV];
  for (int v = 0; v < NV; ++v) {
    next[v] = glast ? _mm256_loadu_ps(glast + 8 * v) : _mm256_setzero_ps();  // dL/dh_{l-1} from outside
    av[v] = _mm256_loadu_ps(a + 8 * v);
    gAv[v] = _mm256_setzero_ps();
  }
  for (int64_t c = (L + chunk - 1) / chunk - 1; c >= 0; --c) {
    const int64_t s = c * chunk, T = std::min(chunk, L - s);
    // hs[0] = the state before the chunk, hs[1 + i] = h_{s+i}; dAs[i] = exp(dt_{s+i} A)
    std::memcpy(hs, states + c * stride, N * sizeof(float));
    for (int64_t i = 0; i < T; ++i) {
      const __m256 dt8 = _mm256_set1_ps(dt[(s + i) * ds]), du8 = _mm256_set1_ps(dt[(s + i) * ds] * u[(s + i) * us]);
      for (int v = 0; v < NV; ++v) {
        const __m256 dA = exp8(_mm256_mul_ps(dt8, av[v]));
        const __m256 hv = _mm256_fmadd_ps(dA, _mm256_loadu_ps(hs + i * N + 8 * v),
                                          _mm256_mul_ps(du8, _mm256_loadu_ps(Bb + (s + i) * N + 8 * v)));
        _mm256_storeu_ps(hs + (i + 1) * N + 8 * v, hv);
        _mm256_storeu_ps(dAs + i * N + 8 * v, dA);
      }
    }
    for (int64_t i = T - 1; i >= 0; --i) {
      const int64_t t = s + i;
      const __m256 gy8 = _mm256_set1_ps(gy[t * gs]), dtu8 = _mm256_set1_ps(dt[t * ds] * u[t * us]),
                   dt8 = _mm256_set1_ps(dt[t * ds]);
      __m256 sgb = _mm256_setzero_ps(), gda = _mm256_setzero_ps();
      for (int v = 0; v < NV; ++v) {
        const int64_t o = t * N + 8 * v;
        const __m256 G = _mm256_fmadd_ps(_mm256_loadu_ps(Cb + o), gy8, next[v]);  // dL/dh_t
        const __m256 dA = _mm256_loadu_ps(dAs + i * N + 8 * v);
        _mm256_storeu_ps(gC + o, _mm256_fmadd_ps(_mm256_loadu_ps(hs + (i + 1) * N + 8 * v), gy8, _mm256_loadu_ps(gC + o)));
        _mm256_storeu_ps(gB + o, _mm256_fmadd_ps(G, dtu8, _mm256_loadu_ps(gB + o)));
        sgb = _mm256_fmadd_ps(G, _mm256_loadu_ps(Bb + o), sgb);
        const __m256 X = _mm256_mul_ps(_mm256_mul_ps(G, dA), _mm256_loadu_ps(hs + i * N + 8 * v));  // grad wrt dt A
        gda = _mm256_fmadd_ps(X, av[v], gda);
        gAv[v] = _mm256_fmadd_ps(X, dt8, gAv[v]);
        next[v] = _mm256_mul_ps(dA, G);
      }
      sGB[t * ds] = hsum8(sgb);  // sGB and gdtA in dt's layout
      gdtA[t * ds] = hsum8(gda);
    }
  }
  for (int v = 0; v < NV; ++v) {
    _mm256_storeu_ps(gh0 + 8 * v, next[v]);
    _mm256_storeu_ps(gA + 8 * v, _mm256_add_ps(_mm256_loadu_ps(gA + 8 * v), gAv[v]));
  }
}

// Calls f(std::integral_constant<int, NV>) for N = 8 NV, NV = 1..8 (the state sizes the kernels take).
template <typename F>
void with_lanes(int64_t N, const F& f) {
  switch (N) {
    case 8: return f(std::integral_constant<int, 1>());
    case 16: return f(std::integral_constant<int, 2>());
    case 24: return f(std::integral_constant<int, 3>());
    case 32: return f(std::integral_constant<int, 4>());
    case 40: return f(std::integral_constant<int, 5>());
    case 48: return f(std::integral_constant<int, 6>());
    case 56: return f(std::integral_constant<int, 7>());
    case 64: return f(std::integral_constant<int, 8>());
    default: TORCH_CHECK(false, "selective_scan_cpu: the state size must be 8, 16, ..., 64 (pad it), got ", N);
  }
}

// rows [r0, r1) of the (b * d) rows in contiguous pieces, one per task (deterministic sums: the pieces do not
// depend on which thread runs them)
template <typename F>
void for_row_pieces(int64_t rows, int64_t pieces, const F& f) {
  at::parallel_for(0, pieces, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) f(p, rows * p / pieces, rows * (p + 1) / pieces);
  });
}

int64_t pieces_for(int64_t rows) { return std::max<int64_t>(1, std::min<int64_t>(rows, at::get_num_threads())); }

// u's layout: (b, d, l) channel-major or a view of time-major (b, l, d) memory (dense either way)
bool dense_layout(const at::Tensor& u) { return u.is_contiguous() || u.transpose(1, 2).is_contiguous(); }

void check_inputs(const at::Tensor& u, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& Bm,
                  const at::Tensor& Cm) {
  for (const at::Tensor* t : {&u, &dt, &A, &Bm, &Cm})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->device().is_cpu(), "selective_scan_cpu: fp32 CPU tensors expected");
  for (const at::Tensor* t : {&A, &Bm, &Cm})
    TORCH_CHECK(t->is_contiguous(), "selective_scan_cpu: A, B and C must be contiguous");
  TORCH_CHECK(u.dim() == 3 && dense_layout(u) && dt.strides() == u.strides(),
              "selective_scan_cpu: u and dt must share one dense (b, d, l) or time-major layout");
  TORCH_CHECK(u.dim() == 3 && dt.sizes() == u.sizes() && A.dim() == 2 && A.size(0) == u.size(1) && Bm.dim() == 3 &&
                  Bm.size(0) == u.size(0) && Bm.size(1) == u.size(2) && Bm.size(2) == A.size(1) && Cm.sizes() == Bm.sizes(),
              "selective_scan_cpu: expected u, dt (b, d, l), A (d, n), B, C (b, l, n)");
}

// The forward recurrence over every (sequence, channel) row of u, dt: (b, d, l) tensors with any strides (each
// its own). Returns y = <h_t, C_t> in dt's layout, the last state (b, d, n) and, when keep_states, the state
// before each chunk of `chunk` steps (chunks, b, d, n).
std::vector<at::Tensor> scan_rows(const at::Tensor& u, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& Bm,
                                  const at::Tensor& Cm, const std::optional<at::Tensor>& h0, int64_t chunk,
                                  bool keep_states) {
  TORCH_CHECK(chunk >= 1, "selective_scan_cpu: chunk >= 1");
  const int64_t Bn = u.size(0), D = u.size(1), L = u.size(2), N = A.size(1), rows = Bn * D;
  const int64_t chunks = (L + chunk - 1) / chunk;
  at::Tensor y = at::empty_strided(dt.sizes(), dt.strides(), dt.options());
  at::Tensor last = at::empty({Bn, D, N}, u.options());
  at::Tensor states = keep_states ? at::empty({chunks, Bn, D, N}, u.options()) : at::empty({0}, u.options());
  const float* h0p = h0.has_value() ? h0->data_ptr<float>() : nullptr;
  const float *up = u.data_ptr<float>(), *dtp = dt.data_ptr<float>(), *Ap = A.data_ptr<float>(),
              *Bp = Bm.data_ptr<float>(), *Cp = Cm.data_ptr<float>();
  float *yp = y.data_ptr<float>(), *lastp = last.data_ptr<float>(), *sp = keep_states ? states.data_ptr<float>() : nullptr;
  with_lanes(N, [&](auto nv) {
    for_row_pieces(rows, pieces_for(rows), [&](int64_t, int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / D, d = r % D;
        const int64_t ou = b * u.stride(0) + d * u.stride(1), od = b * dt.stride(0) + d * dt.stride(1);
        forward_row<decltype(nv)::value>(up + ou, u.stride(2), dtp + od, dt.stride(2), Ap + d * N, Bp + b * L * N,
                                         Cp + b * L * N, h0p ? h0p + r * N : nullptr, L, chunk, yp + od,
                                         dt.stride(2), lastp + r * N, sp ? sp + r * N : nullptr, rows * N);
      }
    });
  });
  return {y, last, states};
}

// The adjoint recurrence over every row, u, dt, gy (b, d, l) with any strides. Returns sGB, gdtA (in dt's
// layout), gA, gB, gC, gh0 (see selective_scan_cpu_bwd).
std::vector<at::Tensor> adjoint_rows(const at::Tensor& u, const at::Tensor& dt, const at::Tensor& gy, const at::Tensor& A,
                                     const at::Tensor& Bm, const at::Tensor& Cm, const at::Tensor& states,
                                     const std::optional<at::Tensor>& glast, int64_t chunk) {
  const int64_t Bn = u.size(0), D = u.size(1), L = u.size(2), N = A.size(1), rows = Bn * D;
  const int64_t chunks = (L + chunk - 1) / chunk;
  TORCH_CHECK(gy.scalar_type() == at::kFloat && gy.sizes() == u.sizes(), "selective_scan_cpu: gy like u");
  TORCH_CHECK(states.is_contiguous() && states.dim() == 4 && states.size(0) == chunks,
              "selective_scan_cpu: states from the forward with the same chunk expected");
  const int64_t pieces = pieces_for(rows);
  at::Tensor sGB = at::empty_strided(dt.sizes(), dt.strides(), dt.options());
  at::Tensor gdtA = at::empty_strided(dt.sizes(), dt.strides(), dt.options());
  at::Tensor gh0 = at::empty({Bn, D, N}, u.options());
  // sums over channels (gB, gC) and sequences (gA): one partial a piece, added up after
  at::Tensor gBp = at::zeros({pieces, Bn, L, N}, u.options()), gCp = at::zeros({pieces, Bn, L, N}, u.options());
  at::Tensor gAp = at::zeros({pieces, D, N}, u.options());
  const float* glp = glast.has_value() ? glast->data_ptr<float>() : nullptr;
  const float *up = u.data_ptr<float>(), *dtp = dt.data_ptr<float>(), *Ap = A.data_ptr<float>(),
              *Bp = Bm.data_ptr<float>(), *Cp = Cm.data_ptr<float>(), *sp = states.data_ptr<float>(),
              *gyp = gy.data_ptr<float>();
  float *sGBp = sGB.data_ptr<float>(), *gdtAp = gdtA.data_ptr<float>(), *gh0p = gh0.data_ptr<float>();
  with_lanes(N, [&](auto nv) {
    for_row_pieces(rows, pieces, [&](int64_t p, int64_t r0, int64_t r1) {
      std::vector<float> hs((chunk + 1) * N), dAs(chunk * N);
      float* gB_piece = gBp.data_ptr<float>() + p * Bn * L * N;
      float* gC_piece = gCp.data_ptr<float>() + p * Bn * L * N;
      float* gA_piece = gAp.data_ptr<float>() + p * D * N;
      for (int64_t r = r0; r < r1; ++r) {
        const int64_t b = r / D, d = r % D;
        const int64_t ou = b * u.stride(0) + d * u.stride(1), od = b * dt.stride(0) + d * dt.stride(1),
                      og = b * gy.stride(0) + d * gy.stride(1);
        backward_row<decltype(nv)::value>(up + ou, u.stride(2), dtp + od, dt.stride(2), gyp + og, gy.stride(2),
                                          Ap + d * N, Bp + b * L * N, Cp + b * L * N, glp ? glp + r * N : nullptr,
                                          sp + r * N, rows * N, L, chunk, hs.data(), dAs.data(), sGBp + od,
                                          gdtAp + od, gA_piece + d * N, gB_piece + b * L * N,
                                          gC_piece + b * L * N, gh0p + r * N);
      }
    });
  });
  return {sGB, gdtA, gAp.sum(0), gBp.sum(0), gCp.sum(0), gh0};
}

// Forward. Returns y = <h_t, C_t> (b, d, l, in u's layout), the last state (b, d, n) and, when keep_states, the
// state before each chunk of `chunk` steps (chunks, b, d, n) for the backward (empty otherwise).
std::vector<at::Tensor> selective_scan_cpu_fwd(const at::Tensor& u, const at::Tensor& dt, const at::Tensor& A,
                                               const at::Tensor& Bm, const at::Tensor& Cm,
                                               const std::optional<at::Tensor>& h0, int64_t chunk, bool keep_states) {
  check_inputs(u, dt, A, Bm, Cm);
  return scan_rows(u, dt, A, Bm, Cm, h0, chunk, keep_states);
}

// Backward of y = <h_t, C_t> (gy: (b, d, l)) and of the last state (glast, optional), from the forward's
// chunk states. Returns
//   sGB  (b, d, l) = sum_n G_t B_t            (grad wrt dt u, before the product rule)
//   gdtA (b, d, l) = sum_n G_t dA_t h_{t-1} A (grad wrt dt through exp(dt A))
//   gA   (d, n)    = sum_{b,t} G_t dA_t h_{t-1} dt_t
//   gB   (b, l, n) = sum_d G_t dt_t u_t,   gC (b, l, n) = sum_d h_t gy_t
//   gh0  (b, d, n) = dA_0 G_0               (grad wrt the initial state)
std::vector<at::Tensor> selective_scan_cpu_bwd(const at::Tensor& u, const at::Tensor& dt, const at::Tensor& A,
                                               const at::Tensor& Bm, const at::Tensor& Cm, const at::Tensor& states,
                                               const at::Tensor& gy, const std::optional<at::Tensor>& glast,
                                               int64_t chunk) {
  check_inputs(u, dt, A, Bm, Cm);
  return adjoint_rows(u, dt, gy, A, Bm, Cm, states, glast, chunk);
}

// ------------------------------------------------------------------------ causal depthwise conv + SiLU
// out[b, t, c] = silu(bias[c] + sum_k w[c, k] x[b, t - (K - 1) + k, c]), x = 0 before t = 0: F.conv1d with
// groups = channels and K - 1 zeros of left padding, on time-major activations. x: (b, l, c) with channels
// contiguous (rows may be strided: Mamba's u is half of in_proj's output rows). K <= 8.
// Threads own blocks of channels over the whole batch, so the weight and bias gradients are summed in one
// fixed order (b, then t from the end) whatever the number of threads.

constexpr int kMaxConvWidth = 8;

inline __m256i lane_mask(int64_t n) {  // the first n (< 8) lanes on
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

struct Lanes {  // 8 channels, or the last n < 8 of them through masked loads and stores
  __m256i mask;
  bool full;
  __m256 load(const float* p) const { return full ? _mm256_loadu_ps(p) : _mm256_maskload_ps(p, mask); }
  void store(float* p, __m256 v) const { full ? _mm256_storeu_ps(p, v) : _mm256_maskstore_ps(p, mask, v); }
};

inline __m256 sigmoid8(__m256 p) {
  const __m256 one = _mm256_set1_ps(1.0f);
  return _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), p))));
}

void check_conv(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat && x.device().is_cpu() &&
                  w.device().is_cpu(), "causal_conv1d_cpu: fp32 CPU tensors expected");
  TORCH_CHECK(x.dim() == 3 && x.stride(2) == 1 && x.stride(1) >= x.size(2) && x.stride(0) >= x.size(1) * x.stride(1),
              "causal_conv1d_cpu: x must be (b, l, c) with contiguous channels");
  TORCH_CHECK(w.dim() == 2 && w.is_contiguous() && w.size(0) == x.size(2) && w.size(1) >= 1 &&
                  w.size(1) <= kMaxConvWidth, "causal_conv1d_cpu: w must be (c, k) with k <= 8, contiguous");
  if (bias.has_value())
    TORCH_CHECK(bias->scalar_type() == at::kFloat && bias->is_contiguous() && bias->numel() == x.size(2),
                "causal_conv1d_cpu: bias must be (c,) fp32");
}

// the blocks of 8 channels [0, blocks) in one contiguous piece per thread
template <typename F>
void for_channel_blocks(int64_t C, const F& f) {
  const int64_t blocks = (C + 7) / 8;
  const int64_t pieces = std::max<int64_t>(1, std::min<int64_t>(blocks, at::get_num_threads()));
  at::parallel_for(0, pieces, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t blk = blocks * p / pieces; blk < blocks * (p + 1) / pieces; ++blk) {
        const int64_t c = blk * 8, n = std::min<int64_t>(8, C - c);
        f(c, Lanes{lane_mask(n), n == 8});
      }
  });
}

// the weights of 8 channels as K vectors (w is (c, k): lane j of wv[k] = w[c + j, k])
inline void load_conv_weights(const float* w, int64_t K, int64_t c, int64_t n, __m256* wv) {
  for (int64_t k = 0; k < K; ++k) {
    alignas(32) float t[8] = {0};
    for (int64_t j = 0; j < n; ++j) t[j] = w[(c + j) * K + k];
    wv[k] = _mm256_load_ps(t);
  }
}

// the pre-activation at time t of 8 channels: bias + sum_k w_k x[t - (K - 1) + k]
inline __m256 conv_pre(const float* xb, int64_t sx, int64_t t, int64_t K, const __m256* wv, __m256 b8, const Lanes& ln) {
  __m256 p = b8;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t s = t - (K - 1) + k;
    if (s >= 0) p = _mm256_fmadd_ps(wv[k], ln.load(xb + s * sx), p);
  }
  return p;
}

at::Tensor causal_conv1d_cpu_fwd(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  check_conv(x, w, bias);
  const int64_t Bn = x.size(0), L = x.size(1), C = x.size(2), K = w.size(1);
  at::Tensor out = at::empty({Bn, L, C}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>(), *bp = bias ? bias->data_ptr<float>() : nullptr;
  float* op = out.data_ptr<float>();
  const int64_t sxb = x.stride(0), sxt = x.stride(1);
  for_channel_blocks(C, [&](int64_t c, const Lanes& ln) {
    __m256 wv[kMaxConvWidth];
    load_conv_weights(wp, K, c, std::min<int64_t>(8, C - c), wv);
    const __m256 b8 = bp ? ln.load(bp + c) : _mm256_setzero_ps();
    for (int64_t b = 0; b < Bn; ++b) {
      const float* xb = xp + b * sxb + c;
      float* ob = op + b * L * C + c;
      for (int64_t t = 0; t < L; ++t) {
        const __m256 p = conv_pre(xb, sxt, t, K, wv, b8, ln);
        ln.store(ob + t * C, _mm256_mul_ps(p, sigmoid8(p)));
      }
    }
  });
  return out;
}

// Backward from gout (b, l, c): returns gx (b, l, c) contiguous, gw (c, k), gbias (c,) (empty without a bias).
// The pre-activations are recomputed from x (K multiply-adds each), not kept from the forward.
std::vector<at::Tensor> causal_conv1d_cpu_bwd(const at::Tensor& x, const at::Tensor& w,
                                              const std::optional<at::Tensor>& bias, const at::Tensor& gout_) {
  check_conv(x, w, bias);
  const at::Tensor gout = gout_.contiguous();
  TORCH_CHECK(gout.scalar_type() == at::kFloat && gout.sizes() == x.sizes(), "causal_conv1d_cpu: gout like x");
  const int64_t Bn = x.size(0), L = x.size(1), C = x.size(2), K = w.size(1);
  at::Tensor gx = at::empty({Bn, L, C}, x.options()), gw = at::empty({C, K}, x.options());
  at::Tensor gb = bias ? at::empty({C}, x.options()) : at::empty({0}, x.options());
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>(), *bp = bias ? bias->data_ptr<float>() : nullptr,
              *gp = gout.data_ptr<float>();
  float *gxp = gx.data_ptr<float>(), *gwp = gw.data_ptr<float>(), *gbp = bias ? gb.data_ptr<float>() : nullptr;
  const int64_t sxb = x.stride(0), sxt = x.stride(1);
  for_channel_blocks(C, [&](int64_t c, const Lanes& ln) {
    const int64_t n = std::min<int64_t>(8, C - c);
    const __m256 one = _mm256_set1_ps(1.0f);
    __m256 wv[kMaxConvWidth], gwv[kMaxConvWidth], win[kMaxConvWidth];
    load_conv_weights(wp, K, c, n, wv);
    for (int64_t k = 0; k < K; ++k) gwv[k] = _mm256_setzero_ps();
    __m256 gbv = _mm256_setzero_ps();
    const __m256 b8 = bp ? ln.load(bp + c) : _mm256_setzero_ps();
    for (int64_t b = 0; b < Bn; ++b) {
      const float* xb = xp + b * sxb + c;
      const float* gob = gp + b * L * C + c;
      float* gxb = gxp + b * L * C + c;
      for (int64_t k = 0; k < K; ++k) win[k] = _mm256_setzero_ps();  // win[j]: the pre-activation grad at t + j
      for (int64_t t = L - 1; t >= 0; --t) {
        const __m256 p = conv_pre(xb, sxt, t, K, wv, b8, ln), s = sigmoid8(p);
        // d silu(p) / dp = s (1 + p (1 - s))
        const __m256 g = _mm256_mul_ps(ln.load(gob + t * C),
                                       _mm256_mul_ps(s, _mm256_fmadd_ps(p, _mm256_sub_ps(one, s), one)));
        for (int64_t j = K - 1; j > 0; --j) win[j] = win[j - 1];
        win[0] = g;
        gbv = _mm256_add_ps(gbv, g);
        for (int64_t k = 0; k < K; ++k) {
          const int64_t s_in = t - (K - 1) + k;
          if (s_in >= 0) gwv[k] = _mm256_fmadd_ps(g, ln.load(xb + s_in * sxt), gwv[k]);
        }
        // x[t] feeds the outputs t .. t + K - 1 through w[K - 1] .. w[0]
        __m256 acc = _mm256_setzero_ps();
        for (int64_t j = 0; j < K; ++j) acc = _mm256_fmadd_ps(wv[K - 1 - j], win[j], acc);
        ln.store(gxb + t * C, acc);
      }
    }
    alignas(32) float t8[8];
    for (int64_t k = 0; k < K; ++k) {
      _mm256_store_ps(t8, gwv[k]);
      for (int64_t j = 0; j < n; ++j) gwp[(c + j) * K + k] = t8[j];
    }
    if (gbp) ln.store(gbp + c, gbv);
  });
  return {gx, gw, gb};
}

// ------------------------------------------------------------------------ time-major scan with its epilogues
// Mamba's CPU training path: u, delta, z are (b, l, d) with channels contiguous (views of in_proj's and the
// conv's rows), and what the scan does around the recurrence runs here in one vectorised pass each, 8 channels
// at a time, instead of a dozen torch ops over the whole activation:
//   before: dt = softplus(delta + bias)                         (kept for the backward)
//   after:  y_pre = <h_t, C_t> + D u,  out = y_pre * silu(z)    (y_pre kept when there is a z)
// The backward's passes: gy = gout * silu(z), gz, gD before the adjoint recurrence; gu, gdelta, gbias after.
// softplus'(pre) = sigmoid(pre) = 1 - exp(-dt): no pre-activation kept. Per-channel sums (gD, gbias) are owned by
// one thread each (blocks of channels), in a fixed order.

// the (b, l) rows of a time-major (b, l, d) tensor with contiguous channels and rows at stride rs
struct TimeMajor {
  float* p;
  int64_t sb, st;
  float* at(int64_t b, int64_t t, int64_t c) const { return p + b * sb + t * st + c; }
};

inline TimeMajor tm_of(const at::Tensor& x) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.dim() == 3 && x.stride(2) == 1,
              "selective_scan_cpu_tm: fp32 (b, l, d) tensors with contiguous channels expected");
  return {x.data_ptr<float>(), x.stride(0), x.stride(1)};
}

inline __m256 silu8(__m256 v) { return _mm256_mul_ps(v, sigmoid8(v)); }

// Forward. u, delta, z: (b, l, d), channels contiguous; A (d, n); B, C (b, l, n) contiguous. Returns
// [out (b, l, d), last (b, d, n), states, dt (b, l, d), y_pre (b, l, d), empty without z].
std::vector<at::Tensor> selective_scan_cpu_tm_fwd(const at::Tensor& u, const at::Tensor& delta,
                                                  const std::optional<at::Tensor>& delta_bias, const at::Tensor& A,
                                                  const at::Tensor& Bm, const at::Tensor& Cm,
                                                  const std::optional<at::Tensor>& Dv, const std::optional<at::Tensor>& z,
                                                  const std::optional<at::Tensor>& h0, bool softplus, int64_t chunk,
                                                  bool keep_states) {
  const TimeMajor U = tm_of(u), DL = tm_of(delta);
  const int64_t Bn = u.size(0), L = u.size(1), D = u.size(2), N = A.size(1);
  TORCH_CHECK(delta.sizes() == u.sizes() && (!z || z->sizes() == u.sizes()), "selective_scan_cpu_tm: delta, z like u");
  TORCH_CHECK(A.is_contiguous() && Bm.is_contiguous() && Cm.is_contiguous() && A.size(0) == D && Bm.size(0) == Bn &&
                  Bm.size(1) == L && Bm.size(2) == N && Cm.sizes() == Bm.sizes() && N % 8 == 0 && N <= 64,
              "selective_scan_cpu_tm: A (d, n), B, C (b, l, n) contiguous, n a multiple of 8 up to 64");
  for (const auto* t : {&delta_bias, &Dv})
    if (t->has_value()) TORCH_CHECK((*t)->is_contiguous() && (*t)->numel() == D, "selective_scan_cpu_tm: (d,) vectors");
  TORCH_CHECK(!h0 || (h0->is_contiguous() && h0->numel() == Bn * D * N), "selective_scan_cpu_tm: h0 (b, d, n)");
  const auto opts = u.options();
  at::Tensor dt = at::empty({Bn, L, D}, opts);
  const float* bias = delta_bias ? delta_bias->data_ptr<float>() : nullptr;
  float* dtp = dt.data_ptr<float>();
  for_channel_blocks(D, [&](int64_t c, const Lanes& ln) {  // dt = softplus(delta + bias)
    const __m256 b8 = bias ? ln.load(bias + c) : _mm256_setzero_ps();
    for (int64_t b = 0; b < Bn; ++b)
      for (int64_t t = 0; t < L; ++t) {
        const __m256 p = _mm256_add_ps(ln.load(DL.at(b, t, c)), b8);
        ln.store(dtp + (b * L + t) * D + c, softplus ? softplus8(p) : p);
      }
  });
  // the recurrence on (b, d, l) views: y comes back in dt's (b, l, d) memory
  auto rec = scan_rows(u.transpose(1, 2), dt.transpose(1, 2), A, Bm, Cm, h0, chunk, keep_states);
  const at::Tensor y = rec[0].transpose(1, 2), last = rec[1], states = rec[2];
  float* yp = y.data_ptr<float>();
  at::Tensor y_pre = z ? at::empty({Bn, L, D}, opts) : at::empty({0}, opts);
  at::Tensor out = z ? at::empty({Bn, L, D}, opts) : y;
  const float* Dp = Dv ? Dv->data_ptr<float>() : nullptr;
  const TimeMajor Z = z ? tm_of(*z) : TimeMajor{nullptr, 0, 0};
  float *outp = out.data_ptr<float>(), *ypp = z ? y_pre.data_ptr<float>() : nullptr;
  if (Dp || z)
    for_channel_blocks(D, [&](int64_t c, const Lanes& ln) {  // y_pre = y + D u; out = y_pre silu(z)
      const __m256 d8 = Dp ? ln.load(Dp + c) : _mm256_setzero_ps();
      for (int64_t b = 0; b < Bn; ++b)
        for (int64_t t = 0; t < L; ++t) {
          const int64_t o = (b * L + t) * D + c;
          __m256 v = ln.load(yp + o);
          if (Dp) v = _mm256_fmadd_ps(d8, ln.load(U.at(b, t, c)), v);
          if (z) {
            ln.store(ypp + o, v);
            v = _mm256_mul_ps(v, silu8(ln.load(Z.at(b, t, c))));
          }
          ln.store(outp + o, v);
        }
    });
  return {out, last, states, dt, y_pre};
}

// Backward of selective_scan_cpu_tm_fwd from gout (b, l, d) and glast (b, d, n, optional). Returns
// [gu, gdelta (b, l, d), gA (d, n), gB, gC (b, l, n), gD (d) or empty, gz (b, l, d) or empty, gbias (d) or
// empty, gh0 (b, d, n)].
std::vector<at::Tensor> selective_scan_cpu_tm_bwd(const at::Tensor& u, const at::Tensor& dt, const at::Tensor& A,
                                                  const at::Tensor& Bm, const at::Tensor& Cm,
                                                  const std::optional<at::Tensor>& Dv, const std::optional<at::Tensor>& z,
                                                  const std::optional<at::Tensor>& y_pre, const at::Tensor& states,
                                                  const at::Tensor& gout_, const std::optional<at::Tensor>& glast,
                                                  bool softplus, bool has_bias, int64_t chunk) {
  const TimeMajor U = tm_of(u);
  const at::Tensor gout = gout_.stride(2) == 1 ? gout_ : gout_.contiguous();
  const TimeMajor G = tm_of(gout);
  const int64_t Bn = u.size(0), L = u.size(1), D = u.size(2);
  TORCH_CHECK(dt.is_contiguous() && dt.sizes() == u.sizes() && gout.sizes() == u.sizes() && (!z || y_pre),
              "selective_scan_cpu_tm: dt (b, l, d) from the forward, gout like u, y_pre with z");
  const auto opts = u.options();
  const float* Dp = Dv ? Dv->data_ptr<float>() : nullptr;
  const TimeMajor Z = z ? tm_of(*z) : TimeMajor{nullptr, 0, 0};
  const float* ypp = z ? y_pre->data_ptr<float>() : nullptr;
  // before the recurrence: gy = gout silu(z) (the gradient of y_pre), gz, gD = sum gy u
  at::Tensor gy = z ? at::empty({Bn, L, D}, opts) : gout;
  at::Tensor gz = z ? at::empty({Bn, L, D}, opts) : at::empty({0}, opts);
  at::Tensor gD = Dp ? at::empty({D}, opts) : at::empty({0}, opts);
  const TimeMajor GY = tm_of(gy);
  float *gzp = z ? gz.data_ptr<float>() : nullptr, *gDp = Dp ? gD.data_ptr<float>() : nullptr;
  const __m256 one = _mm256_set1_ps(1.0f);
  if (z || Dp)
    for_channel_blocks(D, [&](int64_t c, const Lanes& ln) {
      __m256 gd = _mm256_setzero_ps();
      for (int64_t b = 0; b < Bn; ++b)
        for (int64_t t = 0; t < L; ++t) {
          __m256 g = ln.load(G.at(b, t, c));
          if (z) {
            const int64_t o = (b * L + t) * D + c;
            const __m256 zv = ln.load(Z.at(b, t, c)), s = sigmoid8(zv);
            // d silu(z) / dz = s (1 + z (1 - s))
            const __m256 dsilu = _mm256_mul_ps(s, _mm256_fmadd_ps(zv, _mm256_sub_ps(one, s), one));
            ln.store(gzp + o, _mm256_mul_ps(_mm256_mul_ps(g, ln.load(ypp + o)), dsilu));
            g = _mm256_mul_ps(g, _mm256_mul_ps(zv, s));
            ln.store(GY.at(b, t, c), g);
          }
          if (Dp) gd = _mm256_fmadd_ps(g, ln.load(U.at(b, t, c)), gd);
        }
      if (Dp) ln.store(gDp + c, gd);
    });
  // the adjoint recurrence on (b, d, l) views: sGB, gdtA come back in dt's (b, l, d) memory
  auto adj = adjoint_rows(u.transpose(1, 2), dt.transpose(1, 2), gy.transpose(1, 2), A, Bm, Cm, states, glast, chunk);
  const float *sGBp = adj[0].data_ptr<float>(), *gdtAp = adj[1].data_ptr<float>(), *dtp = dt.data_ptr<float>();
  // after: gu = sGB dt + gy D; gdelta = (gdtA + sGB u) softplus'(pre); gbias = sum gdelta
  at::Tensor gu = at::empty({Bn, L, D}, opts), gdelta = at::empty({Bn, L, D}, opts);
  at::Tensor gbias = has_bias ? at::empty({D}, opts) : at::empty({0}, opts);
  float *gup = gu.data_ptr<float>(), *gdp = gdelta.data_ptr<float>(), *gbp = has_bias ? gbias.data_ptr<float>() : nullptr;
  for_channel_blocks(D, [&](int64_t c, const Lanes& ln) {
    const __m256 d8 = Dp ? ln.load(Dp + c) : _mm256_setzero_ps();
    __m256 gb = _mm256_setzero_ps();
    for (int64_t b = 0; b < Bn; ++b)
      for (int64_t t = 0; t < L; ++t) {
        const int64_t o = (b * L + t) * D + c;
        const __m256 sgb = ln.load(sGBp + o), dtv = ln.load(dtp + o);
        __m256 gu8 = _mm256_mul_ps(sgb, dtv);
        if (Dp) gu8 = _mm256_fmadd_ps(ln.load(GY.at(b, t, c)), d8, gu8);
        ln.store(gup + o, gu8);
        __m256 gdt = _mm256_fmadd_ps(sgb, ln.load(U.at(b, t, c)), ln.load(gdtAp + o));
        if (softplus) gdt = _mm256_mul_ps(gdt, _mm256_sub_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), dtv))));
        ln.store(gdp + o, gdt);
        gb = _mm256_add_ps(gb, gdt);
      }
    if (gbp) ln.store(gbp + c, gb);
  });
  return {gu, gdelta, adj[2], adj[3], adj[4], gD, gz, gbias, adj[5]};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mom_infer, m) {
  m.def("selective_scan_cpu_fwd(Tensor u, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? h0, int chunk, "
        "bool keep_states) -> Tensor[]");
  m.def("selective_scan_cpu_bwd(Tensor u, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor states, Tensor gy, "
        "Tensor? glast, int chunk) -> Tensor[]");
  m.def("causal_conv1d_cpu_fwd(Tensor x, Tensor w, Tensor? bias) -> Tensor");
  m.def("selective_scan_cpu_tm_fwd(Tensor u, Tensor delta, Tensor? delta_bias, Tensor A, Tensor B, Tensor C, "
        "Tensor? D, Tensor? z, Tensor? h0, bool softplus, int chunk, bool keep_states) -> Tensor[]");
  m.def("selective_scan_cpu_tm_bwd(Tensor u, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? D, Tensor? z, "
        "Tensor? y_pre, Tensor states, Tensor gout, Tensor? glast, bool softplus, bool has_bias, int chunk) -> Tensor[]");
  m.def("causal_conv1d_cpu_bwd(Tensor x, Tensor w, Tensor? bias, Tensor gout) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(mom_infer, CPU, m) {
  m.impl("selective_scan_cpu_fwd", &selective_scan_cpu_fwd);
  m.impl("selective_scan_cpu_bwd", &selective_scan_cpu_bwd);
  m.impl("causal_conv1d_cpu_fwd", &causal_conv1d_cpu_fwd);
  m.impl("selective_scan_cpu_tm_fwd", &selective_scan_cpu_tm_fwd);
  m.impl("selective_scan_cpu_tm_bwd", &selective_scan_cpu_tm_bwd);
  m.impl("causal_conv1d_cpu_bwd", &causal_conv1d_cpu_bwd);
}
