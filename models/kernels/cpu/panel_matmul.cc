// Rows times a weight packed in 16-column panels, on CPU (XLA FFI handlers), dense or per expert group.
//
//   dense:    y[m, n] = sum_k x[m, k] w[k, n]          x: [M, K], packed w: [S, K, 16], y: [M, N]
//   grouped:  y[m, n] = sum_k x[m, k] w_g[k, n]        packed w: [G, S, K, 16], sizes: [G] int32;
//             rows are in group order (group g: the sizes[g] rows after groups 0..g-1); rows after the
//             last group are zero (as in jax.lax.ragged_dot).
//   Panel s holds columns 16s .. 16s+15, row after row; columns past N are zero. N <= 16 S.
//
// A raw weight ([K, N], [G, K, N]) is packed by the kernel into a buffer it keeps (see `scratch`).
//
// Why: XLA:CPU's general matmul repacks the weight on every call and ran the shapes of this project
// (K of a few hundred) at 60-90% of the rate NumPy's BLAS reaches on them; packing in XLA (a transpose
// into fresh memory) cost ~6 ms per expert weight. Here a tile of 6 rows x 16 columns (tile.h) keeps
// 12 vector accumulators in registers. Work is cut into units shared with XLA's intra-op thread pool
// (claimed from an atomic counter): for many rows, a block of kRowBlock rows of one group (in L2)
// against all the panels; for a decode step (a few rows) a chunk of a few panels, which then streams
// from memory once.

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

#include "share.h"
#include "tile.h"

namespace ffi = xla::ffi;

namespace {

using llmf::kPanel;
using llmf::kTileRows;

constexpr int64_t kRowBlock = 96;  // rows per unit: 96 x K floats stay in L2
// Below this many multiply-adds (or weight floats, for a few rows), waking a pool thread costs more
// than it saves.
constexpr int64_t kParallelWork = 1 << 17;

// One product, cut into units (run by llmf::ShareUnits, which keeps this alive while pool tasks may).
struct Work {
  const float* x;
  const float* w;  // packed [G, S, K, 16], or raw [G, K, N] when `packed` is the scratch to pack into
  float* packed;   // nullptr: w is packed already
  std::unique_ptr<float[]> own;  // the packing buffer, when this call has its own
  float* y;
  int64_t k, n, panels, block_rows, chunk_panels, chunks;
  bool by_chunk;
  std::vector<int64_t> row_start;   // [G + 1]: group g's rows are row_start[g] .. row_start[g + 1]
  std::vector<int64_t> unit_start;  // [G + 1]: group g's units are unit_start[g] .. unit_start[g + 1]
  // Raw weights: per (group, chunk) 0 = not packed, 1 = being packed, 2 = packed. The first unit that
  // needs a chunk packs it; another unit that needs it meanwhile waits for that running thread.
  std::unique_ptr<std::atomic<int>[]> state;

  // Group g's packed panels, with chunk `chunk` ready.
  const float* Panels(int64_t g, int64_t chunk) {
    if (packed == nullptr) return w + g * panels * k * kPanel;
    float* out = packed + g * panels * k * kPanel;
    std::atomic<int>& ready = state[g * chunks + chunk];
    int expected = 0;
    if (ready.compare_exchange_strong(expected, 1)) {
      const float* raw = w + g * k * n;
      for (int64_t s = chunk * chunk_panels; s < std::min(panels, (chunk + 1) * chunk_panels); ++s) {
        const int64_t cols = std::min(kPanel, n - s * kPanel);
        for (int64_t kk = 0; kk < k; ++kk) {
          float* dst = out + (s * k + kk) * kPanel;
          std::memcpy(dst, raw + kk * n + s * kPanel, cols * sizeof(float));
          std::fill(dst + cols, dst + kPanel, 0.0f);
        }
      }
      ready.store(2, std::memory_order_release);
    } else {
      while (ready.load(std::memory_order_acquire) != 2) {
      }
    }
    return out;
  }

  void RunUnit(int64_t unit) {
    const int64_t g = std::upper_bound(unit_start.begin(), unit_start.end(), unit) - unit_start.begin() - 1;
    const int64_t local = unit - unit_start[g];
    // Few rows: a unit is one chunk of panels. Many rows: a block of rows against every chunk.
    const int64_t block = by_chunk ? 0 : local;
    const int64_t first_chunk = by_chunk ? local : 0, last_chunk = by_chunk ? local + 1 : chunks;
    const int64_t first_row = row_start[g] + block * block_rows;
    const int64_t last_row = std::min(row_start[g + 1], first_row + block_rows);
    for (int64_t chunk = first_chunk; chunk < last_chunk; ++chunk) {
      const float* wg = Panels(g, chunk);
      for (int64_t s = chunk * chunk_panels; s < std::min(panels, (chunk + 1) * chunk_panels); ++s) {
        const float* panel = wg + s * k * kPanel;
        const int64_t col = s * kPanel, cols = std::min(kPanel, n - col);
        for (int64_t r = first_row; r < last_row; r += kTileRows) {
          llmf::Rows(std::min<int64_t>(kTileRows, last_row - r), x + r * k, k, k, panel, y + r * n + col, n, cols);
        }
      }
    }
  }
};

// Raw weights are packed into this buffer of the calling thread, kept between calls: a fresh one
// each call would be fresh pages from the OS, and faulting them in cost as much as the packing. A
// weight larger than kKeptFloats is packed into a buffer of its own call instead, so what is kept
// stays bounded.
constexpr size_t kKeptFloats = size_t{1} << 24;  // 64 MB
thread_local std::vector<float> scratch;

// x [M, K] times w (packed [G, S, K, 16], or raw [G, K, N] if `raw`) per group of rows -> y [M, N].
ffi::Error Run(ffi::ThreadPool& pool, const float* x, int64_t m, int64_t k, const float* w, bool raw,
               int64_t panels, float* y, int64_t n, std::vector<int64_t> row_start) {
  auto work = std::make_shared<Work>();
  const int64_t groups = static_cast<int64_t>(row_start.size()) - 1;
  work->x = x;
  work->w = w;
  work->y = y;
  work->k = k;
  work->n = n;
  work->panels = panels;
  // Up to a block of rows per group (decoding): one block, and the weight is the cost, so units of a
  // few panels each. Many rows: units of kRowBlock rows against the whole weight, packed (if raw) in
  // chunks of 128 KB.
  work->by_chunk = row_start.back() <= kRowBlock * groups;
  work->block_rows = work->by_chunk ? std::max<int64_t>(1, row_start.back()) : kRowBlock;
  work->chunk_panels = work->by_chunk ? 4 : std::max<int64_t>(1, (1 << 15) / (k * kPanel));
  work->chunks = (panels + work->chunk_panels - 1) / work->chunk_panels;
  work->packed = nullptr;
  if (raw) {
    const size_t floats = groups * panels * k * kPanel;
    if (floats > kKeptFloats) {
      work->own.reset(new float[floats]);
      work->packed = work->own.get();
    } else {
      if (scratch.size() < floats) scratch.resize(floats);
      work->packed = scratch.data();
    }
    work->state.reset(new std::atomic<int>[groups * work->chunks]);
    for (int64_t i = 0; i < groups * work->chunks; ++i) work->state[i].store(0);
  }
  work->unit_start.assign(1, 0);
  for (int64_t g = 0; g < groups; ++g) {
    const int64_t blocks = (row_start[g + 1] - row_start[g] + work->block_rows - 1) / work->block_rows;
    work->unit_start.push_back(work->unit_start.back() + (work->by_chunk ? work->chunks : blocks));
  }
  work->row_start = std::move(row_start);
  const int64_t units = work->unit_start.back();
  const int64_t weight = groups * panels * k * kPanel, macs = work->row_start.back() * k * panels * kPanel;
  const int64_t helpers = std::max(weight, macs / 16) >= kParallelWork
                              ? std::min<int64_t>(pool.num_threads() - 1, units - 1) : 0;
  if (work->row_start.back() < m) {  // rows after the last group
    std::memset(y + work->row_start.back() * n, 0, (m - work->row_start.back()) * n * sizeof(float));
  }
  llmf::ShareUnits(pool, units, helpers, [work] { return [w = work.get()](int64_t unit) { w->RunUnit(unit); }; });
  return ffi::Error::Success();
}

// The weight's layout from its dims (after the group dim, if any): packed [S, K, 16] or raw [K, N].
// False if they do not fit x [M, K] and y [M, N].
bool WeightLayout(ffi::Span<const int64_t> wd, int64_t lead, int64_t k, int64_t n, bool& raw, int64_t& panels) {
  const int64_t rank = static_cast<int64_t>(wd.size()) - lead;
  raw = rank == 2;
  panels = (n + kPanel - 1) / kPanel;
  if (raw) return wd[lead] == k && wd[lead + 1] == n;
  return rank == 3 && wd[lead] == panels && wd[lead + 1] == k && wd[lead + 2] == kPanel;
}

ffi::Error PanelMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                           ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), yd = y->dimensions();
  bool raw;
  int64_t panels;
  if (xd.size() != 2 || yd.size() != 2 || yd[0] != xd[0] || !WeightLayout(w.dimensions(), 0, xd[1], yd[1], raw, panels)) {
    return ffi::Error::InvalidArgument("panel_matmul: expected x [M, K], w [K, N] or packed [ceil(N/16), K, 16], y [M, N]");
  }
  return Run(pool, x.typed_data(), xd[0], xd[1], w.typed_data(), raw, panels, y->typed_data(), yd[1], {0, xd[0]});
}

ffi::Error GroupedPanelMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                                  ffi::Buffer<ffi::S32> sizes, ffi::ResultBuffer<ffi::F32> y) {
  const auto xd = x.dimensions(), wd = w.dimensions(), sd = sizes.dimensions(), yd = y->dimensions();
  bool raw;
  int64_t panels;
  if (xd.size() != 2 || yd.size() != 2 || sd.size() != 1 || wd.size() < 1 || sd[0] != wd[0] || yd[0] != xd[0] ||
      !WeightLayout(wd, 1, xd[1], yd[1], raw, panels)) {
    return ffi::Error::InvalidArgument(
        "grouped_panel_matmul: expected x [M, K], w [G, K, N] or packed [G, ceil(N/16), K, 16], sizes [G], y [M, N]");
  }
  std::vector<int64_t> row_start{0};
  for (int64_t g = 0; g < sd[0]; ++g) {
    const int64_t size = sizes.typed_data()[g];
    if (size < 0 || row_start.back() + size > xd[0]) {
      return ffi::Error::InvalidArgument("grouped_panel_matmul: group sizes must be >= 0 and sum to <= M");
    }
    row_start.push_back(row_start.back() + size);
  }
  return Run(pool, x.typed_data(), xd[0], xd[1], w.typed_data(), raw, panels, y->typed_data(), yd[1],
             std::move(row_start));
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmfPanelMatmul, PanelMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(LlmfGroupedPanelMatmul, GroupedPanelMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
