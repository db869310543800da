// Causal self-attention over consecutive positions on CPU, fused (XLA FFI handler), float32.
//
//   q [B, T, N, H], k, v [B, T, K, H] -> out [B, T, N, H], lse [B, K, T * G]   (G = N / K)
//   out[b, t, n] = softmax_s(q[b, t, n] . k[b, s, n / G] / sqrt(H)) v[b, s, n / G] over the keys s a
//   query sees: s <= t, and s > t - window when window > 0. lse: each row's log-sum-exp of the scaled
//   logits, rows t-major (row t * G + g is head kv * G + g at position t), for the backward pass.
//
// Why: in XLA the attention of a Mixtral-shaped forward is a chain of small batched matmuls with a
// 32-wide contraction, masks, an exp pass and layout transposes, ~1.7x PyTorch's fused CPU attention.
// Here a unit of work is one kv head of one sequence and a block of query positions (about 64 query
// rows with the G heads that share the kv head): it multiplies only the key panels the block can see,
// keeps its scores [rows, keys] in L2, takes the softmax in place and multiplies by V, all with the
// register tile of panel_matmul (6 rows x 16 columns). Each thread packs a kv head's K (transposed)
// and V into 16-column panels once and keeps them while it works on that head's blocks.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "xla/ffi/api/ffi.h"

#include "share.h"
#include "tile.h"

namespace ffi = xla::ffi;

namespace {

using llmf::kPanel;
using llmf::Vec8;

constexpr int64_t kUnitRows = 64;  // query rows (positions x G) per unit

typedef int32_t VecI8 __attribute__((vector_size(32)));

// exp(x) for x <= 0 (logits minus their row maximum), 8 at a time: 2^n * p(r), x = n ln2 + r,
// |r| <= ln2 / 2, p a degree-6 Taylor polynomial (relative error < 2e-7). Below -87 gives 0.
inline Vec8 ExpNonPositive(Vec8 x) {
  const Vec8 lo = Vec8{} - 87.0f;
  x = x < lo ? lo : x;
  const Vec8 round = Vec8{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const Vec8 t = x * 1.44269504f + round;
  const Vec8 n = t - round;
  const Vec8 r = x - n * 0.693359375f + n * 2.12194440e-4f;  // ln2 in two parts, exact n * hi
  Vec8 p = Vec8{} + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const VecI8 bits = (__builtin_convertvector(n, VecI8) + 127) << 23;
  Vec8 scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  const VecI8 keep = x > lo;
  Vec8 out = p * scale;
  VecI8 out_bits;
  std::memcpy(&out_bits, &out, sizeof(out));
  out_bits &= keep;
  std::memcpy(&out, &out_bits, sizeof(out));
  return out;
}

struct Problem {
  const float *q, *k, *v;
  float *out, *lse;
  int64_t b, t, n, kv, h, g, window, positions, blocks, key_panels, h_panels;
};

// One thread's buffers: a kv head's packed K^T [key panels, H, 16] and V [H panels, keys, 16], the
// unit's scaled queries [rows, H], scores [rows, keys] and output [rows, H panels * 16].
struct Scratch {
  int64_t packed = -1;  // the (sequence, kv head) whose K and V are packed
  std::vector<float> kt, vp, qs, s, o;
};

void PackHead(const Problem& p, int64_t bh, Scratch& s) {
  const int64_t b = bh / p.kv, kv = bh % p.kv, padded = p.key_panels * kPanel;
  s.kt.assign(p.key_panels * p.h * kPanel, 0.0f);
  s.vp.assign(p.h_panels * padded * kPanel, 0.0f);
  for (int64_t j = 0; j < p.t; ++j) {
    const float* kr = p.k + ((b * p.t + j) * p.kv + kv) * p.h;
    const float* vr = p.v + ((b * p.t + j) * p.kv + kv) * p.h;
    float* kcol = s.kt.data() + (j / kPanel) * p.h * kPanel + j % kPanel;
    for (int64_t d = 0; d < p.h; ++d) kcol[d * kPanel] = kr[d];
    for (int64_t d = 0; d < p.h; ++d) s.vp[((d / kPanel) * padded + j) * kPanel + d % kPanel] = vr[d];
  }
  s.packed = bh;
}

void RunUnit(const Problem& p, int64_t unit, Scratch& s) {
  const int64_t bh = unit / p.blocks, b = bh / p.kv, kv = bh % p.kv;
  const int64_t t0 = unit % p.blocks * p.positions, t1 = std::min(p.t, t0 + p.positions);
  if (s.packed != bh) PackHead(p, bh, s);
  const int64_t rows = (t1 - t0) * p.g;
  // Keys the block can see, from a panel boundary: [first_panel * 16, t1).
  const int64_t first_key = p.window ? std::max<int64_t>(0, t0 - p.window + 1) : 0;
  const int64_t first_panel = first_key / kPanel, panels = (t1 - 1) / kPanel + 1 - first_panel;
  const int64_t width = panels * kPanel, o_width = p.h_panels * kPanel;
  s.qs.resize(rows * p.h);
  s.s.resize(rows * width);
  s.o.resize(rows * o_width);
  const float scale = 1.0f / std::sqrt(static_cast<float>(p.h));
  for (int64_t r = 0; r < rows; ++r) {  // row r: position t0 + r / G, head kv * G + r % G
    const float* qr = p.q + ((b * p.t + t0 + r / p.g) * p.n + kv * p.g + r % p.g) * p.h;
    for (int64_t d = 0; d < p.h; ++d) s.qs[r * p.h + d] = qr[d] * scale;
  }
  for (int64_t c = 0; c < panels; ++c) {
    const float* panel = s.kt.data() + (first_panel + c) * p.h * kPanel;
    for (int64_t r = 0; r < rows; r += llmf::kTileRows) {
      llmf::Rows(std::min<int64_t>(llmf::kTileRows, rows - r), s.qs.data() + r * p.h, p.h, p.h, panel,
                 s.s.data() + r * width + c * kPanel, width, kPanel);
    }
  }
  // Softmax in place: keys outside [lo, t] become exact zeros.
  const int64_t base = first_panel * kPanel;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t t = t0 + r / p.g, lo = p.window ? std::max<int64_t>(0, t - p.window + 1) : 0;
    float* row = s.s.data() + r * width;
    float peak = -INFINITY;
    for (int64_t j = lo - base; j <= t - base; ++j) peak = std::max(peak, row[j]);
    Vec8 sum8{};
    const VecI8 lane = {0, 1, 2, 3, 4, 5, 6, 7};
    for (int64_t j = 0; j < width; j += 8) {
      Vec8 x = *reinterpret_cast<const Vec8*>(row + j) - peak;
      const VecI8 index = lane + static_cast<int32_t>(j + base);
      const VecI8 valid = (index >= static_cast<int32_t>(lo)) & (index <= static_cast<int32_t>(t));
      Vec8 e = ExpNonPositive(x);
      VecI8 e_bits;
      std::memcpy(&e_bits, &e, sizeof(e));
      e_bits &= valid;
      std::memcpy(&e, &e_bits, sizeof(e));
      *reinterpret_cast<Vec8*>(row + j) = e;
      sum8 += e;
    }
    float total = 0;
    for (int i = 0; i < 8; ++i) total += sum8[i];
    // Normalised before P V, as the jnp path does, so both round alike.
    const float inv = 1.0f / total;
    for (int64_t j = 0; j < width; ++j) row[j] *= inv;
    p.lse[(b * p.kv + kv) * p.t * p.g + t0 * p.g + r] = peak + std::log(total);
  }
  for (int64_t c = 0; c < p.h_panels; ++c) {
    const float* panel = s.vp.data() + (c * p.key_panels * kPanel + base) * kPanel;
    for (int64_t r = 0; r < rows; r += llmf::kTileRows) {
      llmf::Rows(std::min<int64_t>(llmf::kTileRows, rows - r), s.s.data() + r * width, width, width, panel,
                 s.o.data() + r * o_width + c * kPanel, o_width, kPanel);
    }
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* out = p.out + ((b * p.t + t0 + r / p.g) * p.n + kv * p.g + r % p.g) * p.h;
    std::memcpy(out, s.o.data() + r * o_width, p.h * sizeof(float));
  }
}

ffi::Error CausalAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                               ffi::Buffer<ffi::F32> v, int64_t window, ffi::ResultBuffer<ffi::F32> out,
                               ffi::ResultBuffer<ffi::F32> lse) {
  const auto qd = q.dimensions(), kd = k.dimensions(), vd = v.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || vd.size() != 4 || kd[0] != qd[0] || kd[1] != qd[1] ||
      kd[3] != qd[3] || vd[0] != kd[0] || vd[1] != kd[1] || vd[2] != kd[2] || vd[3] != kd[3] ||
      kd[2] == 0 || qd[2] % kd[2] != 0 || window < 0) {
    return ffi::Error::InvalidArgument(
        "cpu_attention: expected q [B, T, N, H], k and v [B, T, K, H] with N % K == 0, window >= 0");
  }
  Problem p;
  p.q = q.typed_data();
  p.k = k.typed_data();
  p.v = v.typed_data();
  p.out = out->typed_data();
  p.lse = lse->typed_data();
  p.b = qd[0];
  p.t = qd[1];
  p.n = qd[2];
  p.kv = kd[2];
  p.h = qd[3];
  p.g = p.n / p.kv;
  p.window = window;
  p.positions = std::max<int64_t>(1, kUnitRows / p.g);
  p.blocks = (p.t + p.positions - 1) / p.positions;
  p.key_panels = (p.t + kPanel - 1) / kPanel;
  p.h_panels = (p.h + kPanel - 1) / kPanel;
  const int64_t units = p.b * p.kv * p.blocks;
  const int64_t helpers = std::min<int64_t>(pool.num_threads() - 1, units - 1);
  llmf::ShareUnits(pool, units, helpers, [p] {
    return [p, scratch = Scratch()](int64_t unit) mutable { RunUnit(p, unit, scratch); };
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmfCausalAttention, CausalAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("window")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
