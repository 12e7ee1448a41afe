// The kernels of kernels.h as torch ops `mom_infer::*`, one call per layer (the engine's per-op path; the
// native step in step.cpp calls the same loops without going through torch).

#include "kernels.h"

#include <torch/library.h>

using namespace mom_kernels;

namespace {

std::vector<int64_t> out_shape(const at::Tensor& x, int64_t N) {
  auto s = x.sizes().vec();
  s.back() = N;
  return s;
}

LinearWeights dense_weights(const at::Tensor& w, const std::optional<at::Tensor>& bias, Kind kind) {
  LinearWeights L;
  L.kind = kind;
  L.N = w.size(0);
  L.K = w.size(1);
  L.w = w.data_ptr();
  L.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  return L;
}

at::Tensor run_one(const at::Tensor& x_, const LinearWeights& L) {
  at::Tensor x = x_.contiguous();
  TORCH_CHECK(x.size(-1) == L.K, "mom_infer: weight has ", L.K, " inputs, the input ", x.size(-1));
  at::Tensor y = at::empty(out_shape(x, L.N), x.options());
  std::vector<LinearJob> jobs(1);
  jobs[0].L = &L;
  jobs[0].x = x.data_ptr<float>();
  jobs[0].M = x.numel() / std::max<int64_t>(L.K, 1);
  jobs[0].y = y.data_ptr<float>();
  if (jobs[0].M > 0) run_linears(jobs);
  return y;
}

at::Tensor ternary_linear(const at::Tensor& x, const at::Tensor& packed_, const at::Tensor& norm_w_, double eps,
                          const at::Tensor& gamma, const std::optional<at::Tensor>& bias_) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && norm_w_.scalar_type() == at::kFloat, "ternary_linear: fp32 input");
  TORCH_CHECK(packed_.scalar_type() == at::kByte && packed_.dim() == 2, "ternary_linear: packed weight must be uint8 2-D");
  at::Tensor packed = packed_.contiguous(), g = norm_w_.contiguous();
  std::optional<at::Tensor> bias = bias_.has_value() ? std::optional<at::Tensor>(bias_->contiguous()) : std::nullopt;
  LinearWeights L;
  L.kind = Kind::TERNARY;
  L.N = packed.size(0);
  L.K = x.size(-1);
  L.K4 = packed.size(1);
  TORCH_CHECK(L.K4 == (L.K + 3) / 4, "ternary_linear: packed weight has ", L.K4, " bytes a row for ", L.K, " inputs");
  L.w = packed.data_ptr();
  L.bias = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  L.gain = g.data_ptr<float>();
  L.eps = static_cast<float>(eps);
  L.gamma = gamma.item<float>();
  return run_one(x, L);
}

// y = x W^T (+ b) with fp32 or bf16 weights (kind), fp32 input and output
at::Tensor dense_linear(const at::Tensor& x, const at::Tensor& w_, const std::optional<at::Tensor>& bias, Kind kind,
                        const char* name) {
  const auto wtype = kind == Kind::F32 ? at::kFloat : at::kBFloat16;
  TORCH_CHECK(x.scalar_type() == at::kFloat && w_.scalar_type() == wtype, name, ": fp32 input, ", wtype, " weight");
  at::Tensor w = w_.contiguous();
  TORCH_CHECK(w.dim() == 2 && w.size(1) == x.size(-1), name, ": weight shape does not match the input");
  std::optional<at::Tensor> b = bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  return run_one(x, dense_weights(w, b, kind));
}

at::Tensor linear_f32(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  return dense_linear(x, w, bias, Kind::F32, "linear_f32");
}

at::Tensor linear_bf16w(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias) {
  return dense_linear(x, w, bias, Kind::BF16, "linear_bf16w");
}

// y = (x q^T) * scale (+ b): int8 weights with one fp32 scale per output row (weight-only quantisation)
at::Tensor linear_i8w(const at::Tensor& x, const at::Tensor& q_, const at::Tensor& scale_,
                      const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && q_.scalar_type() == at::kChar && scale_.scalar_type() == at::kFloat,
              "linear_i8w: fp32 input, int8 weight, fp32 scales");
  at::Tensor q = q_.contiguous(), scale = scale_.contiguous();
  TORCH_CHECK(q.dim() == 2 && q.size(1) == x.size(-1) && scale.numel() == q.size(0),
              "linear_i8w: weight (N, K) with N scales for an input of K");
  std::optional<at::Tensor> b = bias.has_value() ? std::optional<at::Tensor>(bias->contiguous()) : std::nullopt;
  LinearWeights L = dense_weights(q, b, Kind::INT8);
  L.gain = scale.data_ptr<float>();
  return run_one(x, L);
}

// y = x W^T for several weights sharing the input (q/k/v, gate/up): one pass over the threads, no copies
std::vector<at::Tensor> linear_multi_f32(const at::Tensor& x_, at::TensorList ws) {
  at::Tensor x = x_.contiguous();
  const int64_t K = x.size(-1), M = x.numel() / std::max<int64_t>(K, 1);
  std::vector<LinearWeights> Ls;
  std::vector<at::Tensor> outs;
  for (const auto& w : ws) {
    TORCH_CHECK(w.scalar_type() == at::kFloat && w.is_contiguous() && w.dim() == 2 && w.size(1) == K,
                "linear_multi_f32: contiguous fp32 (N, K) weights");
    Ls.push_back(dense_weights(w, std::nullopt, Kind::F32));
    outs.push_back(at::empty(out_shape(x, w.size(0)), x.options()));
  }
  std::vector<LinearJob> jobs(Ls.size());
  for (size_t i = 0; i < Ls.size(); ++i) {
    jobs[i].L = &Ls[i];
    jobs[i].x = x.data_ptr<float>();
    jobs[i].M = M;
    jobs[i].y = outs[i].data_ptr<float>();
  }
  if (M > 0) run_linears(jobs);
  return outs;
}

// RMSNorm over the last dim in fp32 (one op instead of torch's five at decode)
at::Tensor rms_norm(const at::Tensor& x_, const at::Tensor& w, double eps) {
  TORCH_CHECK(x_.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat, "rms_norm: fp32");
  at::Tensor x = x_.contiguous();
  const int64_t K = x.size(-1), M = x.numel() / std::max<int64_t>(K, 1);
  at::Tensor y = at::empty_like(x);
  for (int64_t m = 0; m < M; ++m)
    rms_norm_row(x.data_ptr<float>() + m * K, w.data_ptr<float>(), K, static_cast<float>(eps), y.data_ptr<float>() + m * K);
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
  const float* bd = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  for (int64_t b = 0; b < B; ++b)
    conv_step_row(xz.data_ptr<float>() + b * 2 * D, conv_state.data_ptr<float>() + b * D * W1, w.data_ptr<float>(), bd,
                  D, W1, out.data_ptr<float>() + b * D);
  return out;
}

// Mamba recurrent update, in place on ssm (B, D, N). u, dt: (B, D); Bm, Cm: (B, N); z: second half of xz (B, 2D).
at::Tensor mamba_ssm_step(at::Tensor ssm, const at::Tensor& u_, const at::Tensor& dt_, const at::Tensor& A_,
                          const at::Tensor& Bm_, const at::Tensor& Cm_, const at::Tensor& Dv_, const at::Tensor& xz_) {
  at::Tensor u = u_.contiguous(), dt = dt_.contiguous(), A = A_.contiguous(), Bm = Bm_.contiguous(),
             Cm = Cm_.contiguous(), Dv = Dv_.contiguous(), xz = xz_.contiguous();
  TORCH_CHECK(ssm.is_contiguous() && ssm.scalar_type() == at::kFloat, "mamba_ssm_step: fp32 state");
  const int64_t B = ssm.size(0), D = ssm.size(1), N = ssm.size(2);
  at::Tensor y = at::empty({B, D}, u.options());
  for (int64_t b = 0; b < B; ++b)
    ssm_step_row(ssm.data_ptr<float>() + b * D * N, u.data_ptr<float>() + b * D, dt.data_ptr<float>() + b * D,
                 A.data_ptr<float>(), Bm.data_ptr<float>() + b * N, Cm.data_ptr<float>() + b * N, Dv.data_ptr<float>(),
                 xz.data_ptr<float>() + b * 2 * D + D, 0, D, N, y.data_ptr<float>() + b * D);
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mom_infer, m) {
  m.def("linear_multi_f32(Tensor x, Tensor[] weights) -> Tensor[]");
  m.def("rms_norm(Tensor x, Tensor weight, float eps) -> Tensor");
  m.def("mamba_conv_step(Tensor xz, Tensor(a!) conv_state, Tensor weight, Tensor? bias) -> Tensor");
  m.def("mamba_ssm_step(Tensor(a!) ssm, Tensor u, Tensor dt, Tensor A, Tensor B, Tensor C, Tensor D, Tensor xz) -> Tensor");
  m.def("ternary_linear(Tensor x, Tensor packed, Tensor norm_weight, float eps, Tensor gamma, Tensor? bias) -> Tensor");
  m.def("linear_f32(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("linear_bf16w(Tensor x, Tensor weight, Tensor? bias) -> Tensor");
  m.def("linear_i8w(Tensor x, Tensor weight, Tensor scale, Tensor? bias) -> Tensor");
}

TORCH_LIBRARY_IMPL(mom_infer, CPU, m) {
  m.impl("ternary_linear", &ternary_linear);
  m.impl("linear_f32", &linear_f32);
  m.impl("linear_bf16w", &linear_bf16w);
  m.impl("linear_i8w", &linear_i8w);
  m.impl("linear_multi_f32", &linear_multi_f32);
  m.impl("rms_norm", &rms_norm);
  m.impl("mamba_conv_step", &mamba_conv_step);
  m.impl("mamba_ssm_step", &mamba_ssm_step);
}
