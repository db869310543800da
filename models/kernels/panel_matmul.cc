// A few rows times a weight packed in 16-column panels, for the CPU decode step (XLA FFI handler).
//
//   y[m, n] = sum_k x[m, k] * w[k, n],   x: [M, K],   packed w: [S, K, 16] (panel s holds columns
//   16s .. 16s+15 of w, row after row; columns past N are zero),   y: [M, N], N <= 16 S.
//
// Why: a decode step multiplies a handful of rows (batch x beams) by every weight, and the weights
// come from memory each step. XLA:CPU's general matmul repacks the weight on every call, which made a
// 4-row step ~3x a 1-row step. A panel is contiguous, so it streams from memory once; the rows then
// meet it from registers (4 rows x 16 columns = 8 vector accumulators) in blocks of 4 rows.
// Panels are shared out to the intra-op thread pool in chunks claimed from an atomic counter.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kPanel = 16;
// Below this many weight floats per call, waking a pool thread costs more than it saves.
constexpr int64_t kParallelFloats = 1 << 17;
constexpr int64_t kChunkPanels = 4;

// Eight floats (one AVX register; two SSE/NEON ones), loaded from any float address.
typedef float Vec8 __attribute__((vector_size(32), aligned(4), may_alias));

// R rows (R <= 4) of x times one panel, written to y (ldy floats per row), `cols` valid columns.
template <int R>
void RowsTimesPanel(const float* x, int64_t k_dim, const float* panel, float* y, int64_t ldy, int64_t cols) {
  Vec8 lo[R], hi[R];
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = Vec8{};
  for (int64_t k = 0; k < k_dim; ++k) {
    const Vec8 w_lo = *reinterpret_cast<const Vec8*>(panel + k * kPanel);
    const Vec8 w_hi = *reinterpret_cast<const Vec8*>(panel + k * kPanel + 8);
    for (int r = 0; r < R; ++r) {
      const float xv = x[r * k_dim + k];
      lo[r] += xv * w_lo;
      hi[r] += xv * w_hi;
    }
  }
  for (int r = 0; r < R; ++r) {
    float out[kPanel];
    *reinterpret_cast<Vec8*>(out) = lo[r];
    *reinterpret_cast<Vec8*>(out + 8) = hi[r];
    std::memcpy(y + r * ldy, out, cols * sizeof(float));
  }
}

void Panels(const float* x, int64_t m_dim, int64_t k_dim, const float* w, float* y, int64_t n_dim,
            int64_t first, int64_t last) {
  for (int64_t s = first; s < last; ++s) {
    const float* panel = w + s * k_dim * kPanel;
    const int64_t col = s * kPanel, cols = std::min(kPanel, n_dim - col);
    for (int64_t r = 0; r < m_dim; r += 4) {
      const float* xr = x + r * k_dim;
      float* yr = y + r * n_dim + col;
      switch (std::min<int64_t>(4, m_dim - r)) {
        case 4: RowsTimesPanel<4>(xr, k_dim, panel, yr, n_dim, cols); break;
        case 3: RowsTimesPanel<3>(xr, k_dim, panel, yr, n_dim, cols); break;
        case 2: RowsTimesPanel<2>(xr, k_dim, panel, yr, n_dim, cols); break;
        default: RowsTimesPanel<1>(xr, k_dim, panel, yr, n_dim, cols); break;
      }
    }
  }
}

// Work shared between the caller and pool tasks. Tasks hold it by shared_ptr: one that starts after
// the caller has returned finds no chunk left and touches only this state, never the buffers.
struct Work {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> active{0};
};

void Claim(Work& work, int64_t num_panels, const float* x, int64_t m, int64_t k, const float* w, float* y,
           int64_t n) {
  work.active.fetch_add(1);
  for (int64_t c; (c = work.next.fetch_add(kChunkPanels)) < num_panels;) {
    Panels(x, m, k, w, y, n, c, std::min(num_panels, c + kChunkPanels));
  }
  work.active.fetch_sub(1);
}

ffi::Error PanelMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                           ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), yd = y->dimensions();
  if (xd.size() != 2 || wd.size() != 3 || yd.size() != 2 || wd[2] != kPanel || wd[1] != xd[1] ||
      yd[0] != xd[0] || yd[1] > wd[0] * kPanel || yd[1] <= (wd[0] - 1) * kPanel) {
    return ffi::Error::InvalidArgument("panel_matmul: expected x [M, K], w [ceil(N/16), K, 16], y [M, N]");
  }
  const int64_t m = xd[0], k = xd[1], n = yd[1], num_panels = wd[0];
  const float* xp = x.typed_data();
  const float* wp = w.typed_data();
  float* yp = y->typed_data();
  const int64_t helpers = num_panels * k * kPanel >= kParallelFloats
                              ? std::min<int64_t>(pool.num_threads() - 1, num_panels / kChunkPanels - 1) : 0;
  auto work = std::make_shared<Work>();
  for (int64_t i = 0; i < helpers; ++i) {
    pool.Schedule([work, num_panels, xp, m, k, wp, yp, n] { Claim(*work, num_panels, xp, m, k, wp, yp, n); });
  }
  Claim(*work, num_panels, xp, m, k, wp, yp, n);
  // Every chunk is claimed; wait for helpers still computing theirs (a helper that starts now claims none).
  while (work->active.load() != 0) {
  }
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmfPanelMatmul, PanelMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
