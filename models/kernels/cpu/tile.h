// The register tile shared by the CPU kernels: R <= 6 rows of x times one 16-column panel.
//
//   y[r, c] = sum_k x[r * ldx + k] * panel[k * 16 + c],   r < R, c < cols (<= 16), k < k_dim
//
// 6 rows x 16 columns keep 12 vector accumulators in the 16 AVX2 registers; per k, one panel row (two
// vectors) and six broadcasts of x feed 12 FMAs. Written with GCC vector extensions (AVX2 with
// -march=native; two SSE/NEON registers per vector elsewhere).

#ifndef LLMF_TILE_H_
#define LLMF_TILE_H_

#include <cstdint>
#include <cstring>

namespace llmf {

constexpr int64_t kPanel = 16;
constexpr int kTileRows = 6;

// Eight floats, loaded from and stored to any float address.
typedef float Vec8 __attribute__((vector_size(32), aligned(4), may_alias));

template <int R>
inline void Tile(const float* x, int64_t ldx, int64_t k_dim, const float* panel, float* y, int64_t ldy,
                 int64_t cols) {
  Vec8 lo[R], hi[R];
  for (int r = 0; r < R; ++r) lo[r] = hi[r] = Vec8{};
  for (int64_t k = 0; k < k_dim; ++k) {
    const Vec8 w_lo = *reinterpret_cast<const Vec8*>(panel + k * kPanel);
    const Vec8 w_hi = *reinterpret_cast<const Vec8*>(panel + k * kPanel + 8);
    for (int r = 0; r < R; ++r) {
      const float xv = x[r * ldx + k];
      lo[r] += xv * w_lo;
      hi[r] += xv * w_hi;
    }
  }
  for (int r = 0; r < R; ++r) {
    if (cols == kPanel) {
      *reinterpret_cast<Vec8*>(y + r * ldy) = lo[r];
      *reinterpret_cast<Vec8*>(y + r * ldy + 8) = hi[r];
    } else {
      float out[kPanel];
      *reinterpret_cast<Vec8*>(out) = lo[r];
      *reinterpret_cast<Vec8*>(out + 8) = hi[r];
      std::memcpy(y + r * ldy, out, cols * sizeof(float));
    }
  }
}

// Tile for a runtime row count (1..6).
inline void Rows(int64_t rows, const float* x, int64_t ldx, int64_t k_dim, const float* panel, float* y,
                 int64_t ldy, int64_t cols) {
  switch (rows) {
    case 6: return Tile<6>(x, ldx, k_dim, panel, y, ldy, cols);
    case 5: return Tile<5>(x, ldx, k_dim, panel, y, ldy, cols);
    case 4: return Tile<4>(x, ldx, k_dim, panel, y, ldy, cols);
    case 3: return Tile<3>(x, ldx, k_dim, panel, y, ldy, cols);
    case 2: return Tile<2>(x, ldx, k_dim, panel, y, ldy, cols);
    default: return Tile<1>(x, ldx, k_dim, panel, y, ldy, cols);
  }
}

}  // namespace llmf

#endif  // LLMF_TILE_H_
