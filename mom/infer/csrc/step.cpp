// The native decode step: the whole network for a set of token rows in one call, no Python in the loop.
//
// Python (mom/infer/native.py) describes the model once: linear layers (fp32, bf16 or packed ternary weights,
// referenced, never copied), norms, Mamba mixers, attention (plain GQA or mixture of attention heads),
// feed-forwards (MLP, top-k MoE, MH-MoE) and blocks (optionally routed by Mixture of Depths), in the order of
// mom.model. `step` then runs R rows, each a token of sequence seq[r] at position pos[r], against the static
// cache (mom/infer/cache.py: K/V buffers of the maximum length with a validity mask, Mamba conv/SSM states
// updated in place). A decode step is one row per sequence; a prefill is the prompt's tokens of one or more
// sequences (rows of one sequence in increasing position): linear layers see all rows at once (weights read
// once), the recurrences run row by row. Each row computes what mom.model computes for that token:
//   - a token that Mixture of Depths skips at an attention block costs nothing there (its key is invalid),
//   - MoE / MH-MoE / MoA run only the chosen experts, rows grouped by expert so each is read once,
//   - ties in top-k go to the lower index (mom.model.experts.stable_top_k).

#include "kernels.h"

#include <torch/custom_class.h>
#include <torch/library.h>

#include <chrono>
#include <limits>
#include <numeric>

using namespace mom_kernels;

namespace {

enum Act : int64_t { SILU = 0, GELU = 1, RELU = 2 };

struct Norm {
  at::Tensor w;
  float eps;
};

struct Mamba {
  int64_t in_proj, x_proj, dt_proj, out_proj, dt_norm, b_norm, c_norm;
  at::Tensor conv_w, conv_b, A, D;  // conv_w (Di, W), A (Di, N) = -exp(A_log)
  int64_t d_inner, d_state, dt_rank, d_conv;
};

struct Attention {
  std::vector<int64_t> q, o;  // one each, or one per expert (mixture of attention heads)
  int64_t k, v, router, top_k, heads, kv_heads, head_dim;
};

struct Expert {
  int64_t gate, up, down;
};

struct FeedForward {
  int64_t kind;  // 0 MLP, 1 top-k MoE, 2 MH-MoE
  std::vector<Expert> experts;
  int64_t act, router, top_k, head_proj, merge_proj, sub_dim;
  bool normalize;
};

struct Block {
  bool attention;
  int64_t mixer, ffn, in_norm, ff_norm, mod_router;  // mod_router -1: every token goes through
  bool raw_scale;  // a routed update is scaled by the raw router logit (else by its sigmoid)
};

// The rows of one call (or the subset a MoD router kept): sequence and position of each.
struct Rows {
  std::vector<int64_t> seq, pos;
  int64_t n() const { return static_cast<int64_t>(seq.size()); }
};

using Buf = std::vector<float>;

struct Program : torch::CustomClassHolder {
  std::vector<LinearWeights> lins;
  std::vector<std::vector<at::Tensor>> keep;  // tensors a linear layer points into
  std::vector<Norm> norms;
  std::vector<Mamba> mambas;
  std::vector<Attention> attns;
  std::vector<FeedForward> ffns;
  std::vector<Block> blocks;
  at::Tensor embed;
  int64_t final_norm = -1, lm_head = -1, hidden = 0;
  // the bound cache's state tensors, per block: attention (k, v, valid), Mamba (conv, ssm)
  std::vector<at::Tensor> state;
  std::vector<int64_t> state_at;
  int64_t bytes_read = 0;  // weight bytes the last call streamed (each linear layer once per call to it)
  // where the time goes, accumulated over calls until read: total, linear layers, attention, SSM update (ns),
  // calls of linear layers (each a parallel region when big enough)
  std::vector<int64_t> spent = std::vector<int64_t>(5, 0);
  static int64_t now_ns() {
    return std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now().time_since_epoch())
        .count();
  }

  // ------------------------------------------------------------------------------------------ building
  int64_t add_linear(int64_t kind, int64_t in_features, at::Tensor weight, std::optional<at::Tensor> bias,
                     std::optional<at::Tensor> gain, double eps, double gamma) {
    LinearWeights L;
    L.kind = static_cast<Kind>(kind);
    weight = weight.contiguous();
    std::vector<at::Tensor> k{weight};
    L.N = weight.size(0);
    L.K = in_features;
    if (L.kind == Kind::TERNARY) {
      TORCH_CHECK(weight.scalar_type() == at::kByte && weight.size(1) == (in_features + 3) / 4, "packed weight shape");
      TORCH_CHECK(gain.has_value() && gain->scalar_type() == at::kFloat, "ternary layer needs its fp32 norm gain");
      L.K4 = weight.size(1);
      at::Tensor g = gain->contiguous();
      k.push_back(g);
      L.gain = g.data_ptr<float>();
      L.eps = static_cast<float>(eps);
      L.gamma = static_cast<float>(gamma);
    } else if (L.kind == Kind::INT8) {
      TORCH_CHECK(weight.scalar_type() == at::kChar && weight.size(1) == in_features, "int8 weight shape");
      TORCH_CHECK(gain.has_value() && gain->scalar_type() == at::kFloat && gain->numel() == L.N,
                  "int8 layer needs one fp32 scale per output row");
      at::Tensor sc = gain->contiguous();
      k.push_back(sc);
      L.gain = sc.data_ptr<float>();
    } else {
      TORCH_CHECK(weight.size(1) == in_features, "weight shape");
      TORCH_CHECK(weight.scalar_type() == (L.kind == Kind::F32 ? at::kFloat : at::kBFloat16), "weight dtype");
    }
    L.w = weight.data_ptr();
    if (bias.has_value()) {
      at::Tensor b = bias->contiguous();
      TORCH_CHECK(b.scalar_type() == at::kFloat, "bias must be fp32");
      k.push_back(b);
      L.bias = b.data_ptr<float>();
    }
    lins.push_back(L);
    keep.push_back(k);
    return static_cast<int64_t>(lins.size()) - 1;
  }

  int64_t add_norm(at::Tensor w, double eps) {
    TORCH_CHECK(w.scalar_type() == at::kFloat, "norm weight must be fp32");
    norms.push_back({w.contiguous(), static_cast<float>(eps)});
    return static_cast<int64_t>(norms.size()) - 1;
  }

  int64_t add_mamba(std::vector<int64_t> ids, at::Tensor conv_w, std::optional<at::Tensor> conv_b, at::Tensor A,
                    at::Tensor D, int64_t dt_rank, int64_t d_state) {
    TORCH_CHECK(ids.size() == 7, "add_mamba: 7 ids");
    Mamba m{ids[0], ids[1], ids[2], ids[3], ids[4], ids[5], ids[6], conv_w.contiguous(),
            conv_b.has_value() ? conv_b->contiguous() : at::Tensor(), A.contiguous(), D.contiguous(),
            conv_w.size(0), d_state, dt_rank, conv_w.size(1)};
    mambas.push_back(m);
    return static_cast<int64_t>(mambas.size()) - 1;
  }

  int64_t add_attention(std::vector<int64_t> q, std::vector<int64_t> o, int64_t k, int64_t v, int64_t router,
                        int64_t top_k, int64_t heads, int64_t kv_heads, int64_t head_dim) {
    attns.push_back({q, o, k, v, router, top_k, heads, kv_heads, head_dim});
    return static_cast<int64_t>(attns.size()) - 1;
  }

  int64_t add_ffn(int64_t kind, std::vector<int64_t> gate, std::vector<int64_t> up, std::vector<int64_t> down,
                  int64_t act, int64_t router, int64_t top_k, bool normalize, int64_t head_proj, int64_t merge_proj,
                  int64_t sub_dim) {
    FeedForward f{kind, {}, act, router, top_k, head_proj, merge_proj, sub_dim, normalize};
    for (size_t e = 0; e < gate.size(); ++e) f.experts.push_back({gate[e], up[e], down[e]});
    ffns.push_back(f);
    return static_cast<int64_t>(ffns.size()) - 1;
  }

  void add_block(bool attention, int64_t mixer, int64_t ffn, int64_t in_norm, int64_t ff_norm, int64_t mod_router,
                 bool raw_scale) {
    blocks.push_back({attention, mixer, ffn, in_norm, ff_norm, mod_router, raw_scale});
  }

  void set_output(at::Tensor embedding, int64_t norm, int64_t head) {
    TORCH_CHECK(embedding.scalar_type() == at::kFloat, "embedding must be fp32");
    embed = embedding.contiguous();
    hidden = embed.size(1);
    final_norm = norm;
    lm_head = head;
  }

  // ------------------------------------------------------------------------------------------ pieces
  struct Call {  // one linear layer on n rows
    int64_t id;
    const float* x;
    int64_t n;
    float* y;
  };

  void linears(const std::vector<Call>& calls) {
    std::vector<LinearJob> jobs;
    jobs.reserve(calls.size());
    for (const auto& c : calls) {
      if (c.n == 0) continue;
      LinearJob j;
      j.L = &lins[c.id];
      bytes_read += weight_bytes(*j.L);
      j.x = c.x;
      j.M = c.n;
      j.y = c.y;
      jobs.push_back(std::move(j));
    }
    if (jobs.empty()) return;
    const int64_t t0 = now_ns();
    run_linears(jobs);
    spent[1] += now_ns() - t0;
    spent[4] += 1;
  }

  Buf linear(int64_t id, const float* x, int64_t n) {
    Buf y(n * lins[id].N);
    linears({{id, x, n, y.data()}});
    return y;
  }

  Buf norm(int64_t id, const float* x, int64_t n, int64_t K, int64_t stride) {
    const Norm& nm = norms[id];
    Buf y(n * K);
    for (int64_t i = 0; i < n; ++i) rms_norm_row(x + i * stride, nm.w.data_ptr<float>(), K, nm.eps, y.data() + i * K);
    return y;
  }

  static void stable_top_k(const float* v, int64_t E, int64_t k, int64_t* idx) {
    std::vector<int64_t> order(E);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return v[a] > v[b]; });
    std::copy(order.begin(), order.begin() + k, idx);
  }

  // Items sorted by expert: item order[j] sits at slot j, expert e holds slots start[e] .. start[e + 1] (items
  // in their own order), so each expert runs once on a contiguous block and its weights are read once.
  struct Grouping {
    std::vector<int64_t> order, start;
    Grouping(const std::vector<int64_t>& expert, int64_t E) : order(expert.size()), start(E + 1, 0) {
      for (int64_t e : expert) ++start[e + 1];
      for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
      std::vector<int64_t> next(start.begin(), start.end() - 1);
      for (size_t i = 0; i < expert.size(); ++i) order[next[expert[i]]++] = static_cast<int64_t>(i);
    }
    int64_t count(int64_t e) const { return start[e + 1] - start[e]; }
    Buf gather(const float* x, int64_t width, const std::vector<int64_t>& rows) const {  // item i reads row rows[i]
      Buf out(order.size() * width);
      for (size_t j = 0; j < order.size(); ++j)
        std::memcpy(&out[j * width], x + rows[order[j]] * width, width * sizeof(float));
      return out;
    }
    Buf scatter(const Buf& ys, int64_t width) const {  // back to item order
      Buf out(order.size() * width);
      for (size_t j = 0; j < order.size(); ++j)
        std::memcpy(&out[order[j] * width], &ys[j * width], width * sizeof(float));
      return out;
    }
  };

  // Item i (a row and a slot) goes through the SwiGLU expert experts[expert[i]]; returns the items' outputs.
  Buf run_experts(const std::vector<Expert>& experts, int64_t act, const float* x, int64_t width,
                  const std::vector<int64_t>& rows, const std::vector<int64_t>& expert) {
    const int64_t items = static_cast<int64_t>(rows.size()), E = static_cast<int64_t>(experts.size());
    const Grouping gr(expert, E);
    const int64_t ff = lins[experts[0].gate].N, out_w = lins[experts[0].down].N;
    Buf xin = gr.gather(x, width, rows), g(items * ff), u(items * ff), ys(items * out_w);
    std::vector<Call> calls;
    for (int64_t e = 0; e < E; ++e) {
      if (!gr.count(e)) continue;
      calls.push_back({experts[e].gate, &xin[gr.start[e] * width], gr.count(e), &g[gr.start[e] * ff]});
      calls.push_back({experts[e].up, &xin[gr.start[e] * width], gr.count(e), &u[gr.start[e] * ff]});
    }
    linears(calls);
    if (act == SILU) {
      silu_mul(g.data(), u.data(), g.data(), items * ff);
    } else {
      for (int64_t i = 0; i < items * ff; ++i) {
        float a = g[i];
        if (act == GELU) a = 0.5f * a * (1.0f + std::erf(a * static_cast<float>(M_SQRT1_2)));
        else a = a > 0.f ? a : 0.f;
        g[i] = a * u[i];
      }
    }
    calls.clear();
    for (int64_t e = 0; e < E; ++e)
      if (gr.count(e)) calls.push_back({experts[e].down, &g[gr.start[e] * ff], gr.count(e), &ys[gr.start[e] * out_w]});
    linears(calls);
    return gr.scatter(ys, out_w);
  }

  // out[i] = sum over slots s (in order) of w[i k + s] y[i k + s]: the gated mixture of a row's k expert outputs
  static Buf mix_slots(const Buf& y, const std::vector<float>& w, int64_t n, int64_t k, int64_t width) {
    Buf out(n * width);
    for (int64_t i = 0; i < n; ++i)
      for (int64_t c = 0; c < width; ++c) {
        float acc = y[(i * k) * width + c] * w[i * k];
        for (int64_t s = 1; s < k; ++s) acc = acc + y[(i * k + s) * width + c] * w[i * k + s];
        out[i * width + c] = acc;
      }
    return out;
  }

  // top-k softmax routing of n rows of width `width` through a MoE; returns (n, width)
  Buf moe(const FeedForward& f, const float* x, int64_t n, int64_t width) {
    const int64_t E = static_cast<int64_t>(f.experts.size()), k = f.top_k;
    Buf logits = linear(f.router, x, n);
    std::vector<int64_t> rows(n * k), expert(n * k);
    std::vector<float> weight(n * k);
    std::vector<float> probs(E);
    for (int64_t i = 0; i < n; ++i) {
      const float* l = &logits[i * E];
      float mx = -std::numeric_limits<float>::infinity();
      for (int64_t e = 0; e < E; ++e) mx = std::max(mx, l[e]);
      float s = 0.f;
      for (int64_t e = 0; e < E; ++e) s += (probs[e] = std::exp(l[e] - mx));
      for (int64_t e = 0; e < E; ++e) probs[e] = probs[e] / s;
      stable_top_k(probs.data(), E, k, &expert[i * k]);
      float tot = 0.f;
      for (int64_t s2 = 0; s2 < k; ++s2) {
        rows[i * k + s2] = i;
        weight[i * k + s2] = probs[expert[i * k + s2]];
        tot += weight[i * k + s2];
      }
      if (f.normalize)
        for (int64_t s2 = 0; s2 < k; ++s2) weight[i * k + s2] = weight[i * k + s2] / tot;
    }
    return mix_slots(run_experts(f.experts, f.act, x, width, rows, expert), weight, n, k, width);
  }

  Buf feed_forward(const FeedForward& f, const float* x, int64_t n) {
    const int64_t d = hidden;
    if (f.kind == 0) {  // dense MLP: the one "expert" takes every row
      std::vector<int64_t> every(n);
      std::iota(every.begin(), every.end(), 0);
      return run_experts(f.experts, f.act, x, d, every, std::vector<int64_t>(n, 0));
    }
    if (f.kind == 1) return moe(f, x, n, d);
    Buf sub = linear(f.head_proj, x, n);  // (n, d) = (n * heads, sub_dim): sub-tokens of a token adjacent
    Buf y = moe(f, sub.data(), n * (d / f.sub_dim), f.sub_dim);
    return linear(f.merge_proj, y.data(), n);
  }

  // softmax(q . K / sqrt(hd)) V over the valid keys 0..p of sequence b, KV head h (own key always seen)
  static void attend(const float* q, int64_t b, int64_t p, int64_t h, const at::Tensor& K, const at::Tensor& V,
                     const bool* valid, float* o, std::vector<float>& sc) {
    const int64_t Hkv = K.size(1), L = K.size(2), hd = K.size(3);
    const float* kb = K.data_ptr<float>() + ((b * Hkv + h) * L) * hd;
    const float* vb = V.data_ptr<float>() + ((b * Hkv + h) * L) * hd;
    const bool* ok = valid + b * L;
    const float scale = 1.0f / std::sqrt(static_cast<float>(hd));
    const float ninf = -std::numeric_limits<float>::infinity();
    sc.resize((p + 8) / 8 * 8);
    float mx = ninf;
    for (int64_t t = 0; t <= p; ++t) {
      if (!ok[t] && t != p) {
        sc[t] = ninf;
        continue;
      }
      const float* kt = kb + t * hd;
      __m256 acc = _mm256_setzero_ps();
      int64_t j = 0;
      for (; j + 8 <= hd; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + j), _mm256_loadu_ps(kt + j), acc);
      float s = hsum8(acc);
      for (; j < hd; ++j) s += q[j] * kt[j];
      sc[t] = s * scale;
      mx = std::max(mx, sc[t]);
    }
    for (int64_t t = p + 1; t < static_cast<int64_t>(sc.size()); ++t) sc[t] = ninf;
    __m256 tot8 = _mm256_setzero_ps();
    const __m256 mx8 = _mm256_set1_ps(mx);
    for (int64_t t = 0; t <= p; t += 8) {  // exp(-inf - mx) underflows to 0 in exp8's clamp: masked keys drop out
      __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(&sc[t]), mx8));
      e = _mm256_and_ps(e, _mm256_cmp_ps(_mm256_loadu_ps(&sc[t]), _mm256_set1_ps(ninf), _CMP_NEQ_OQ));
      _mm256_storeu_ps(&sc[t], e);
      tot8 = _mm256_add_ps(tot8, e);
    }
    const float inv = 1.0f / hsum8(tot8);
    std::fill(o, o + hd, 0.f);
    for (int64_t t = 0; t <= p; ++t) {
      if (sc[t] == 0.f) continue;
      const float w = sc[t] * inv;
      const float* vt = vb + t * hd;
      for (int64_t j = 0; j < hd; ++j) o[j] += w * vt[j];
    }
  }

  // Heads of several rows against the cache: tasks (query, row, KV head, output), split over the threads when
  // the contexts are long enough to pay for it
  struct Head {
    const float* q;
    int64_t row, kv;
    float* o;
  };

  static void attend_all(const std::vector<Head>& heads, const Rows& rows, const at::Tensor& K, const at::Tensor& V,
                         const bool* ok) {
    int64_t work = 0;
    for (const auto& h : heads) work += rows.pos[h.row] + 1;
    work *= K.size(3);
    const int64_t n = static_cast<int64_t>(heads.size());
    at::parallel_for(0, n, work < (1 << 16) ? n : 1, [&](int64_t i0, int64_t i1) {
      std::vector<float> sc;
      for (int64_t i = i0; i < i1; ++i) {
        const Head& h = heads[i];
        attend(h.q, rows.seq[h.row], rows.pos[h.row], h.kv, K, V, ok, h.o, sc);
      }
    });
  }

  Buf attention(const Attention& a, const float* xn, const Rows& rows, int64_t layer) {
    const int64_t n = rows.n(), hd = a.head_dim, Hkv = a.kv_heads, width = Hkv * hd, d = hidden;
    at::Tensor &K = state[state_at[layer]], &V = state[state_at[layer] + 1], &valid = state[state_at[layer] + 2];
    const int64_t L = K.size(2);
    Buf kb(n * width), vb(n * width);
    linears({{a.k, xn, n, kb.data()}, {a.v, xn, n, vb.data()}});
    float *Kd = K.data_ptr<float>(), *Vd = V.data_ptr<float>();
    bool* ok = valid.data_ptr<bool>();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t b = rows.seq[i], p = rows.pos[i];
      for (int64_t h = 0; h < Hkv; ++h) {
        std::memcpy(Kd + ((b * Hkv + h) * L + p) * hd, &kb[i * width + h * hd], hd * sizeof(float));
        std::memcpy(Vd + ((b * Hkv + h) * L + p) * hd, &vb[i * width + h * hd], hd * sizeof(float));
      }
      ok[b * L + p] = true;
    }
    std::vector<Head> heads;
    if (a.router < 0) {  // grouped-query attention: query head j meets KV head j / (H / Hkv)
      const int64_t H = a.heads, group = H / Hkv;
      Buf q = linear(a.q[0], xn, n), o(n * H * hd);
      for (int64_t i = 0; i < n; ++i)
        for (int64_t j = 0; j < H; ++j) heads.push_back({&q[(i * H + j) * hd], i, j / group, &o[(i * H + j) * hd]});
      {
        const int64_t t0 = now_ns();
        attend_all(heads, rows, K, V, ok);
        spent[2] += now_ns() - t0;
      }
      return linear(a.o[0], o.data(), n);
    }
    // mixture of attention heads: each chosen expert's query heads meet KV heads 0..Hkv-1 in order
    const int64_t E = static_cast<int64_t>(a.q.size()), k = a.top_k;
    Buf logits = linear(a.router, xn, n);
    std::vector<int64_t> items(n * k), expert(n * k);
    std::vector<float> gate(n * k);
    for (int64_t i = 0; i < n; ++i) {
      const float* l = &logits[i * E];
      stable_top_k(l, E, k, &expert[i * k]);
      float mx = l[expert[i * k]], tot = 0.f;
      for (int64_t s = 0; s < k; ++s) tot += (gate[i * k + s] = std::exp(l[expert[i * k + s]] - mx));
      for (int64_t s = 0; s < k; ++s) gate[i * k + s] = gate[i * k + s] / tot;
      for (int64_t s = 0; s < k; ++s) items[i * k + s] = i;
    }
    Buf q = grouped(a.q, xn, d, items, expert, width), o(n * k * width);
    for (int64_t it = 0; it < n * k; ++it)
      for (int64_t h = 0; h < Hkv; ++h) heads.push_back({&q[it * width + h * hd], items[it], h, &o[it * width + h * hd]});
    {
      const int64_t t0 = now_ns();
      attend_all(heads, rows, K, V, ok);
      spent[2] += now_ns() - t0;
    }
    std::vector<int64_t> self(n * k);
    std::iota(self.begin(), self.end(), 0);
    return mix_slots(grouped(a.o, o.data(), width, self, expert, d), gate, n, k, d);
  }

  // item i: linear ids[expert[i]] applied to row rows[i] of x (width in -> out_w); one read of each weight
  Buf grouped(const std::vector<int64_t>& ids, const float* x, int64_t width, const std::vector<int64_t>& rows,
              const std::vector<int64_t>& expert, int64_t out_w) {
    const Grouping gr(expert, static_cast<int64_t>(ids.size()));
    Buf xin = gr.gather(x, width, rows), ys(rows.size() * out_w);
    std::vector<Call> calls;
    for (size_t e = 0; e < ids.size(); ++e)
      if (gr.count(e)) calls.push_back({ids[e], &xin[gr.start[e] * width], gr.count(e), &ys[gr.start[e] * out_w]});
    linears(calls);
    return gr.scatter(ys, out_w);
  }

  Buf mamba(const Mamba& m, const float* xn, const Rows& rows, int64_t layer) {
    const int64_t n = rows.n(), Di = m.d_inner, N = m.d_state, r = m.dt_rank, W1 = m.d_conv - 1;
    at::Tensor &conv = state[state_at[layer]], &ssm = state[state_at[layer] + 1];
    Buf xz = linear(m.in_proj, xn, n), u(n * Di);
    const float* cb = m.conv_b.defined() ? m.conv_b.data_ptr<float>() : nullptr;
    for (int64_t i = 0; i < n; ++i)
      conv_step_row(&xz[i * 2 * Di], conv.data_ptr<float>() + rows.seq[i] * Di * W1, m.conv_w.data_ptr<float>(), cb, Di,
                    W1, &u[i * Di]);
    Buf dbc = linear(m.x_proj, u.data(), n);
    const int64_t w = r + 2 * N;
    Buf dtn = norm(m.dt_norm, dbc.data(), n, r, w), Bn = norm(m.b_norm, dbc.data() + r, n, N, w),
        Cn = norm(m.c_norm, dbc.data() + r + N, n, N, w);
    Buf dt = linear(m.dt_proj, dtn.data(), n), y(n * Di);
    const int64_t t0 = now_ns();
    for (int64_t i = 0; i < n; ++i)
      ssm_step(ssm.data_ptr<float>() + rows.seq[i] * Di * N, &u[i * Di], &dt[i * Di], m.A.data_ptr<float>(), &Bn[i * N],
               &Cn[i * N], m.D.data_ptr<float>(), &xz[i * 2 * Di + Di], Di, N, &y[i * Di]);
    spent[3] += now_ns() - t0;
    return linear(m.out_proj, y.data(), n);
  }

  // x (n, d) through one block, in place
  void block(const Block& bl, int64_t layer, Buf& x, const Rows& rows) {
    const int64_t d = hidden, n = rows.n();
    auto mix = [&](const float* xn, const Rows& r) {
      return bl.attention ? attention(attns[bl.mixer], xn, r, layer) : mamba(mambas[bl.mixer], xn, r, layer);
    };
    if (bl.mod_router < 0) {
      Buf xn = norm(bl.in_norm, x.data(), n, d, d), m = mix(xn.data(), rows);
      for (int64_t i = 0; i < n * d; ++i) x[i] = x[i] + m[i];
      Buf hn = norm(bl.ff_norm, x.data(), n, d, d), f = feed_forward(ffns[bl.ffn], hn.data(), n);
      for (int64_t i = 0; i < n * d; ++i) x[i] = x[i] + f[i];
      return;
    }
    if (!bl.attention) {  // Mamba block: the mixer sees every token, MoD routes the feed-forward
      Buf xn = norm(bl.in_norm, x.data(), n, d, d), m = mix(xn.data(), rows);
      for (int64_t i = 0; i < n * d; ++i) x[i] = x[i] + m[i];
    }
    Buf logit = linear(bl.mod_router, x.data(), n);
    std::vector<int64_t> sel;
    Rows sub;
    for (int64_t i = 0; i < n; ++i) {
      if (logit[i] > 0.f) {
        sel.push_back(i);
        sub.seq.push_back(rows.seq[i]);
        sub.pos.push_back(rows.pos[i]);
      } else if (bl.attention) {  // skipped: not a key for anyone
        at::Tensor& valid = state[state_at[layer] + 2];
        valid.data_ptr<bool>()[rows.seq[i] * valid.size(1) + rows.pos[i]] = false;
      }
    }
    const int64_t s = sub.n();
    if (s == 0) return;
    Buf xs(s * d);
    for (int64_t j = 0; j < s; ++j) std::memcpy(&xs[j * d], &x[sel[j] * d], d * sizeof(float));
    Buf upd(s * d);
    if (bl.attention) {
      Buf xn = norm(bl.in_norm, xs.data(), s, d, d), m = mix(xn.data(), sub), h(s * d);
      for (int64_t i = 0; i < s * d; ++i) h[i] = xs[i] + m[i];
      Buf hn = norm(bl.ff_norm, h.data(), s, d, d), f = feed_forward(ffns[bl.ffn], hn.data(), s);
      for (int64_t i = 0; i < s * d; ++i) upd[i] = h[i] - xs[i] + f[i];
    } else {
      Buf hn = norm(bl.ff_norm, xs.data(), s, d, d);
      upd = feed_forward(ffns[bl.ffn], hn.data(), s);
    }
    for (int64_t j = 0; j < s; ++j) {
      const float w = bl.raw_scale ? logit[sel[j]] : 1.0f / (1.0f + std::exp(-logit[sel[j]]));
      for (int64_t c = 0; c < d; ++c) x[sel[j] * d + c] = xs[j * d + c] + upd[j * d + c] * w;
    }
  }

  // ------------------------------------------------------------------------------------------ the step
  // rows (tokens, sequences, positions) through the network; logits of the rows in `out`
  // The cache the steps run against (kept until the next bind): its tensors are updated in place, so one
  // bind serves every step of a generation and no tensor list crosses from Python a token.
  void bind(std::vector<at::Tensor> st) {
    std::vector<int64_t> at;
    int64_t at_ = 0;
    for (const auto& b : blocks) {
      at.push_back(at_);
      at_ += b.attention ? 3 : 2;
    }
    TORCH_CHECK(at_ == static_cast<int64_t>(st.size()), "bind: ", st.size(), " state tensors for ", at_);
    for (const auto& t : st) TORCH_CHECK(t.is_contiguous(), "bind: state tensors must be contiguous");
    state = std::move(st);
    state_at = std::move(at);
  }

  at::Tensor forward(const int64_t* tk, const Rows& rows, const std::vector<int64_t>& out) {
    TORCH_CHECK(embed.defined(), "step: the program has no output layer (set_output)");
    TORCH_CHECK(!state_at.empty() || blocks.empty(), "step: no cache bound (bind)");
    const int64_t n = rows.n(), d = hidden, V = embed.size(0);
    const int64_t t_start = now_ns();
    bytes_read = 0;
    Buf x(n * d);
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK(tk[i] >= 0 && tk[i] < V, "step: token id ", tk[i], " outside the vocabulary of ", V);
      std::memcpy(&x[i * d], embed.data_ptr<float>() + tk[i] * d, d * sizeof(float));
    }
    for (size_t l = 0; l < blocks.size(); ++l) block(blocks[l], static_cast<int64_t>(l), x, rows);
    const int64_t no = static_cast<int64_t>(out.size());
    Buf last(no * d);
    for (int64_t j = 0; j < no; ++j) std::memcpy(&last[j * d], &x[out[j] * d], d * sizeof(float));
    Buf xn = norm(final_norm, last.data(), no, d, d);
    at::Tensor logits = at::empty({no, lins[lm_head].N}, at::kFloat);
    linears({{lm_head, xn.data(), no, logits.data_ptr<float>()}});
    spent[0] += now_ns() - t_start;
    return logits;
  }

  static std::vector<int64_t> longs(const at::Tensor& t) {
    at::Tensor c = t.contiguous().to(at::kLong);
    return std::vector<int64_t>(c.data_ptr<int64_t>(), c.data_ptr<int64_t>() + c.numel());
  }

  // any rows: prefill (a prompt's tokens), or several sequences at different positions
  at::Tensor step(at::Tensor tokens, at::Tensor seq, at::Tensor pos, at::Tensor out_rows) {
    std::vector<int64_t> tk = longs(tokens);
    Rows rows{longs(seq), longs(pos)};
    TORCH_CHECK(rows.n() == static_cast<int64_t>(tk.size()) && rows.pos.size() == tk.size(),
                "step: tokens, seq and pos differ in length");
    return forward(tk.data(), rows, longs(out_rows));
  }

  // one new token for each of the B sequences, all at position `pos`: logits (B, V)
  at::Tensor decode(at::Tensor tokens, int64_t pos) {
    std::vector<int64_t> tk = longs(tokens);
    const int64_t B = static_cast<int64_t>(tk.size());
    Rows rows;
    for (int64_t b = 0; b < B; ++b) {
      rows.seq.push_back(b);
      rows.pos.push_back(pos);
    }
    return forward(tk.data(), rows, rows.seq);
  }

  // Given tokens (n, B) fed one decode call each from position pos (teacher forcing: token i of every
  // sequence at pos + i) in one native loop; returns the logits (B, V) after the last. What llama-bench's
  // test_gen times, and a way to stream known tokens through the state without a Python call each.
  at::Tensor decode_tokens(at::Tensor tokens, int64_t pos) {
    TORCH_CHECK(tokens.dim() == 2 && tokens.size(0) > 0, "decode_tokens: tokens (n, B), n > 0");
    std::vector<int64_t> tk = longs(tokens);
    const int64_t n = tokens.size(0), B = tokens.size(1);
    Rows rows;
    rows.seq.resize(B);
    std::iota(rows.seq.begin(), rows.seq.end(), 0);
    at::Tensor logits;
    for (int64_t i = 0; i < n; ++i) {
      rows.pos.assign(B, pos + i);
      logits = forward(tk.data() + i * B, rows, rows.seq);
    }
    return logits;
  }

  // Greedy decoding without Python between tokens: `first` (B,) are the tokens chosen after the prompt (at
  // position pos), then up to `steps` more, each the argmax of its row's logits (ties to the lower id, as
  // torch.argmax). With eos >= 0 a sequence that has emitted eos continues with `pad` and the loop ends once
  // every sequence has: the same tokens as mom.infer.generate's loop. Returns (B, k) tokens, k <= steps.
  at::Tensor greedy(at::Tensor first, int64_t pos, int64_t steps, int64_t eos, int64_t pad) {
    std::vector<int64_t> cur = longs(first);
    const int64_t B = static_cast<int64_t>(cur.size());
    std::vector<char> done(B, 0);
    auto all_done = [&] {
      if (eos < 0) return false;
      for (int64_t b = 0; b < B; ++b)
        if (!done[b]) return false;
      return true;
    };
    for (int64_t b = 0; b < B; ++b) done[b] = eos >= 0 && cur[b] == eos;
    std::vector<int64_t> out;
    Rows rows;
    rows.seq.resize(B);
    std::iota(rows.seq.begin(), rows.seq.end(), 0);
    int64_t k = 0;
    for (; k < steps && !all_done(); ++k) {
      rows.pos.assign(B, pos + k);
      at::Tensor logits = forward(cur.data(), rows, rows.seq);
      const int64_t V = logits.size(1);
      const float* l = logits.data_ptr<float>();
      for (int64_t b = 0; b < B; ++b) {
        int64_t best = 0;
        for (int64_t v = 1; v < V; ++v)
          if (l[b * V + v] > l[b * V + best]) best = v;
        cur[b] = done[b] ? pad : best;
        done[b] = done[b] || (eos >= 0 && cur[b] == eos);
      }
      out.insert(out.end(), cur.begin(), cur.end());
    }
    at::Tensor res = at::empty({k, B}, at::kLong);
    std::copy(out.begin(), out.end(), res.data_ptr<int64_t>());
    return res.t().contiguous();
  }
};

}  // namespace

TORCH_LIBRARY_FRAGMENT(mom_infer, m) {
  m.class_<Program>("Program")
      .def(torch::init<>())
      .def("add_linear", &Program::add_linear)
      .def("add_norm", &Program::add_norm)
      .def("add_mamba", &Program::add_mamba)
      .def("add_attention", &Program::add_attention)
      .def("add_ffn", &Program::add_ffn)
      .def("add_block", &Program::add_block)
      .def("set_output", &Program::set_output)
      .def("bind", &Program::bind)
      .def("step", &Program::step)
      .def("decode", &Program::decode)
      .def("greedy", &Program::greedy)
      .def("decode_tokens", &Program::decode_tokens)
      .def("weight_bytes_read", [](const c10::intrusive_ptr<Program>& self) { return self->bytes_read; })
      .def("time_spent", [](const c10::intrusive_ptr<Program>& self) {  // read and reset
        std::vector<int64_t> out = self->spent;
        std::fill(self->spent.begin(), self->spent.end(), 0);
        return out;
      });
}
