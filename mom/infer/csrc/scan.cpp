// Mamba-1 selective scan for training on the CPU: the forward and backward recurrences of
// mom.model.scan's "fast" path in one pass over the state each, fp32. The PyTorch form runs a few small
// tensor ops per time step (thousands of calls a layer, with (chunk, b, d, n) buffers written and read back);
// here every (sequence, channel) row keeps its n-wide state in registers and walks the time steps, rows split
// over the threads. Same algorithm: the forward keeps the state before every chunk of time steps, the backward
// recomputes a chunk's states from it and runs the adjoint recurrence G_t = C_t gy_t + exp(dt_{t+1} A) G_{t+1}
// in reverse time.
//
// Layouts: u, dt (b, d, l); A (d, n); B, C time-major per sequence (b, l, n); states (chunks, b, d, n). The
// state size n is a multiple of 8 up to 64 (mom.model.scan pads others with zero lanes): the state of a row
// stays in registers.
#include "kernels.h"

#include <torch/library.h>

#include <type_traits>

namespace {

using namespace mom_kernels;

// One (sequence, channel) row of the forward: NV vectors of 8 state lanes kept in registers over all steps.
// y[t] = <h_t, C_t>; states (when given) receives the state before every chunk, at stride `stride`.
template <int NV>
void forward_row(const float* u, const float* dt, const float* a, const float* Bb, const float* Cb, const float* h0,
                 int64_t L, int64_t chunk, float* y, float* last, float* states, int64_t stride) {
  constexpr int N = NV * 8;
  __m256 h[NV], av[NV];
  for (int v = 0; v < NV; ++v) {
    h[v] = h0 ? _mm256_loadu_ps(h0 + 8 * v) : _mm256_setzero_ps();
    av[v] = _mm256_loadu_ps(a + 8 * v);
  }
  for (int64_t t = 0; t < L; ++t) {
    if (states && t % chunk == 0)
      for (int v = 0; v < NV; ++v) _mm256_storeu_ps(states + (t / chunk) * stride + 8 * v, h[v]);
    const __m256 dt8 = _mm256_set1_ps(dt[t]), du8 = _mm256_set1_ps(dt[t] * u[t]);
    __m256 acc = _mm256_setzero_ps();
    for (int v = 0; v < NV; ++v) {
      const __m256 dA = exp8(_mm256_mul_ps(dt8, av[v]));
      h[v] = _mm256_fmadd_ps(dA, h[v], _mm256_mul_ps(du8, _mm256_loadu_ps(Bb + t * N + 8 * v)));
      acc = _mm256_fmadd_ps(h[v], _mm256_loadu_ps(Cb + t * N + 8 * v), acc);
    }
    y[t] = hsum8(acc);
  }
  for (int v = 0; v < NV; ++v) _mm256_storeu_ps(last + 8 * v, h[v]);
}

// One row of the backward (see selective_scan_cpu_bwd): per chunk, the states recomputed into hs/dAs (L1),
// then the adjoint in reverse time with G's carry (`next`) and the row's dA gradient in registers.
template <int NV>
void backward_row(const float* u, const float* dt, const float* a, const float* Bb, const float* Cb, const float* gy,
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
      const __m256 dt8 = _mm256_set1_ps(dt[s + i]), du8 = _mm256_set1_ps(dt[s + i] * u[s + i]);
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
      const __m256 gy8 = _mm256_set1_ps(gy[t]), dtu8 = _mm256_set1_ps(dt[t] * u[t]), dt8 = _mm256_set1_ps(dt[t]);
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
      sGB[t] = hsum8(sgb);
      gdtA[t] = hsum8(gda);
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

void check_inputs(const at::Tensor& u, const at::Tensor& dt, const at::Tensor& A, const at::Tensor& Bm,
                  const at::Tensor& Cm) {
  for (const at::Tensor* t : {&u, &dt, &A, &Bm, &Cm})
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->device().is_cpu(),
                "selective_scan_cpu: fp32 contiguous CPU tensors expected");
  TORCH_CHECK(u.dim() == 3 && dt.sizes() == u.sizes() && A.dim() == 2 && A.size(0) == u.size(1) && Bm.dim() == 3 &&
                  Bm.size(0) == u.size(0) && Bm.size(1) == u.size(2) && Bm.size(2) == A.size(1) && Cm.sizes() == Bm.sizes(),
              "selective_scan_cpu: expected u, dt (b, d, l), A (d, n), B, C (b, l, n)");
}

// Forward. Returns y = <h_t, C_t> (b, d, l), the last state (b, d, n) and, when keep_states, the state before
// each chunk of `chunk` steps (chunks, b, d, n) for the backward (empty otherwise).
std::vector<at::Tensor> selective_scan_cpu_fwd(const at::Tensor& u, const at::Tensor& dt, const at::Tensor& A,
                                               const at::Tensor& Bm, const at::Tensor& Cm,
                                               const std::optional<at::Tensor>& h0, int64_t chunk, bool keep_states) {
  check_inputs(u, dt, A, Bm, Cm);
  TORCH_CHECK(chunk >= 1, "selective_scan_cpu: chunk >= 1");
  const int64_t Bn = u.size(0), D = u.size(1), L = u.size(2), N = A.size(1), rows = Bn * D;
  const int64_t chunks = (L + chunk - 1) / chunk;
  at::Tensor y = at::empty({Bn, D, L}, u.options());
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
        forward_row<decltype(nv)::value>(up + r * L, dtp + r * L, Ap + d * N, Bp + b * L * N, Cp + b * L * N,
                                         h0p ? h0p + r * N : nullptr, L, chunk, yp + r * L, lastp + r * N,
                                         sp ? sp + r * N : nullptr, rows * N);
      }
    });
  });
  return {y, last, states};
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
                                               const at::Tensor& gy_, const std::optional<at::Tensor>& glast,
                                               int64_t chunk) {
  check_inputs(u, dt, A, Bm, Cm);
  const at::Tensor gy = gy_.contiguous();
  TORCH_CHECK(gy.scalar_type() == at::kFloat && gy.sizes() == u.sizes(), "selective_scan_cpu: gy like u");
  const int64_t Bn = u.size(0), D = u.size(1), L = u.size(2), N = A.size(1), rows = Bn * D;
  const int64_t chunks = (L + chunk - 1) / chunk;
  TORCH_CHECK(states.is_contiguous() && states.dim() == 4 && states.size(0) == chunks,
              "selective_scan_cpu: states from the forward with the same chunk expected");
  const int64_t pieces = pieces_for(rows);
  at::Tensor sGB = at::empty({Bn, D, L}, u.options()), gdtA = at::empty({Bn, D, L}, u.options());
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
        backward_row<decltype(nv)::value>(up + r * L, dtp + r * L, Ap + d * N, Bp + b * L * N, Cp + b * L * N,
                                          gyp + r * L, glp ? glp + r * N : nullptr, sp + r * N, rows * N, L, chunk,
                                          hs.data(), dAs.data(), sGBp + r * L, gdtAp + r * L, gA_piece + d * N,
                                          gB_piece + b * L * N, gC_piece + b * L * N, gh0p + r * N);
      }
    });
  });
  return {sGB, gdtA, gAp.sum(0), gBp.sum(0), gCp.sum(0), gh0};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mom_infer, m) {
  m.def("selective_scan_cpu_fwd(Tensor u, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor? h0, int chunk, "
        "bool keep_states) -> Tensor[]");
  m.def("selective_scan_cpu_bwd(Tensor u, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor states, Tensor gy, "
        "Tensor? glast, int chunk) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(mom_infer, CPU, m) {
  m.impl("selective_scan_cpu_fwd", &selective_scan_cpu_fwd);
  m.impl("selective_scan_cpu_bwd", &selective_scan_cpu_bwd);
}
