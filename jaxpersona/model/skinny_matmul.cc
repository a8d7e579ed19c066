// A float32 matmul against one layer of a stacked weight, read where it lies.
//
//   out[..., N] = x[..., K] @ w[layer][K, N]        x: any leading dims (M rows in all), w: [L, K, N]
//
// Why: a decode step multiplies a handful of rows (one token per sequence) by every weight of the model.
// XLA:CPU's layer scan copies each layer's slice out of the stacked [L, K, N] weights before its dot, and
// its dot kernel (as torch's) streams a weight at ~9 GB/s at 16 rows on a 2-core Xeon. This kernel reads
// the layer in place. K is cut into P contiguous parts (blocks of rows of w, P = K/128 capped to 1..8).
//  * Few rows (M < MANY_ROWS): a streaming path at ~16 GB/s. The caller and the XLA intra-op pool's workers
//    take parts from a counter; within a part, register tiles of 6 rows x 64 columns reuse a 16 x 64 block of
//    w from L1; each part has its own output buffer, and the parts' sums are added last.
//  * Many rows (a vmapped batch of decode steps): (row block, 64-column tile) work items; for each part in
//    order, the part's panel of w is packed contiguous (a strided panel thrashes L1's sets) and every 6-row
//    tile sums the part in registers, then adds it to the output: XLA's dot rate, no buffers.
//
// Numerics: every output element is ((part_0 + part_1) + part_2) + ..., each part a sum over its k in order
// (fp32 FMA from zero) on both paths; P depends on K alone, so a number is the same for any number of rows,
// any batch the row sits in and any thread count (the server's "alone or in any batch" invariant, and a
// vmapped sweep's rows equal one generation per grid point).
//
// Built at run time by jaxpersona.model.skinny (g++ -O3 -march=native); needs AVX-512F, else unused.
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>

#include "xla/ffi/api/ffi.h"

#ifdef __AVX512F__
#include <immintrin.h>

#include "kernel_items.h"
#endif

namespace ffi = xla::ffi;

extern "C" int jp_skinny_supported() {
#ifdef __AVX512F__
  return 1;
#else
  return 0;
#endif
}

#ifdef __AVX512F__
namespace {

constexpr int64_t KB = 16;  // rows of w per pass over a column tile (a 16 x 64 fp32 block: 4 KiB, in L1)
constexpr int RG = 6;       // rows of x per register tile (6 x 4 zmm accumulators)
constexpr int64_t MANY_ROWS = 32;  // from here on: column tiles x row blocks, parts in registers (Block)
constexpr int64_t RB = 240;         // rows per (row block, column tile) work item

template <bool MASK>
inline __m512 Load(__mmask16 m, const float* p) {
  return MASK ? _mm512_maskz_loadu_ps(m, p) : _mm512_loadu_ps(p);
}

// Rows r < ROWS of a 64-column output tile over k0 <= k < k1, with MASK (m[c] masks columns 16c..16c+15 of the
// last tile of a width that is not a multiple of 64; masked loads cost ~1/3 more, so only there):
//  * !PACKED (few rows): w is the weight itself (row stride N); the sum carries on from o unless `first`, and
//    o = the sum;
//  * PACKED (many rows): w is a packed panel (row k - k0 at w + 64 (k - k0), zero past N); the sum starts from
//    zero and o = it (`first`) or o + it (a later part of K).
template <int ROWS, bool MASK, bool PACKED>
inline void Tile(const float* x, int64_t K, const float* w, int64_t N, int64_t k0, int64_t k1, float* o,
                 const __mmask16* m, bool first) {
  __m512 a[ROWS][4];
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < 4; ++c)
      a[r][c] = PACKED || first ? _mm512_setzero_ps() : Load<MASK>(m[c], o + r * N + 16 * c);
  for (int64_t k = k0; k < k1; ++k) {
    __m512 wv[4];
    for (int c = 0; c < 4; ++c)
      wv[c] = PACKED ? _mm512_load_ps(w + (k - k0) * 64 + 16 * c) : Load<MASK>(m[c], w + k * N + 16 * c);
    for (int r = 0; r < ROWS; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * K + k]);
      for (int c = 0; c < 4; ++c) a[r][c] = _mm512_fmadd_ps(xv, wv[c], a[r][c]);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < 4; ++c) {
      const __m512 v = PACKED && !first ? _mm512_add_ps(Load<MASK>(m[c], o + r * N + 16 * c), a[r][c]) : a[r][c];
      if (MASK)
        _mm512_mask_storeu_ps(o + r * N + 16 * c, m[c], v);
      else
        _mm512_storeu_ps(o + r * N + 16 * c, v);
    }
}

// Tile() over M rows in 6-row register tiles; first prefetches the next block of w (next_rows rows of 64
// columns at `next`), on its way from memory while this one is used.
template <bool MASK, bool PACKED>
void Rows(const float* x, int64_t K, const float* w, int64_t N, int64_t k0, int64_t k1, float* o, int64_t M,
          const __mmask16* m, bool first, const float* next = nullptr, int64_t next_rows = 0) {
  for (int64_t k = 0; k < next_rows; ++k)
    for (int c = 0; c < 64; c += 16) _mm_prefetch(reinterpret_cast<const char*>(next + k * N + c), _MM_HINT_T0);
  for (int64_t r0 = 0; r0 < M; r0 += RG) {
    const float* xr = x + r0 * K;
    float* orow = o + r0 * N;
    switch (M - r0 < RG ? M - r0 : RG) {
      case 6: Tile<6, MASK, PACKED>(xr, K, w, N, k0, k1, orow, m, first); break;
      case 5: Tile<5, MASK, PACKED>(xr, K, w, N, k0, k1, orow, m, first); break;
      case 4: Tile<4, MASK, PACKED>(xr, K, w, N, k0, k1, orow, m, first); break;
      case 3: Tile<3, MASK, PACKED>(xr, K, w, N, k0, k1, orow, m, first); break;
      case 2: Tile<2, MASK, PACKED>(xr, K, w, N, k0, k1, orow, m, first); break;
      default: Tile<1, MASK, PACKED>(xr, K, w, N, k0, k1, orow, m, first); break;
    }
  }
}

// o[M, N] = x[M, ka:kb] @ w[ka:kb, N] (x row stride K, w row stride N).
void Part(const float* x, const float* w, float* o, int64_t M, int64_t K, int64_t N, int64_t ka, int64_t kb) {
  if (ka >= kb) {
    std::memset(o, 0, sizeof(float) * M * N);
    return;
  }
  for (int64_t k0 = ka; k0 < kb; k0 += KB) {
    const int64_t k1 = k0 + KB < kb ? k0 + KB : kb;
    const bool first = k0 == ka;
    for (int64_t j = 0; j < N; j += 64) {
      __mmask16 m[4];
      for (int c = 0; c < 4; ++c) {
        const int64_t left = N - j - 16 * c;
        m[c] = left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
      }
      // this k-block's next column tile (a tail tile's prefetch may touch the next row's first lines: harmless)
      const float* next = w + k0 * N + j + 64;
      const int64_t next_rows = j + 64 < N && M >= 4 ? k1 - k0 : 0;  // 1-3 rows: the hardware prefetcher keeps up
      if (j + 64 <= N)
        Rows<false, false>(x, K, w + j, N, k0, k1, o + j, M, m, first, next, next_rows);
      else
        Rows<true, false>(x, K, w + j, N, k0, k1, o + j, M, m, first, next, next_rows);
    }
  }
}

// The many-row path: o[r0:r1, j:j+64] over all P parts (of `step` rows of w each) in order, each part's sum held
// in registers and added to o as the part ends -- the same numbers as Part() into separate buffers added in
// order (a part's sum is the same sequence of FMAs from zero; a sum stored and reloaded is exact). `pack` holds
// step x 64 floats (64-byte aligned): each part's panel of w is copied there first, contiguous (a strided panel
// thrashes L1's sets), and every row tile reuses it from cache.
void Block(const float* x, const float* w, float* o, int64_t K, int64_t N, int64_t P, int64_t step, int64_t r0,
           int64_t r1, int64_t j, float* pack) {
  __mmask16 m[4];
  for (int c = 0; c < 4; ++c) {
    const int64_t left = N - j - 16 * c;
    m[c] = left >= 16 ? __mmask16(0xFFFF) : left <= 0 ? __mmask16(0) : __mmask16((1u << left) - 1);
  }
  for (int64_t p = 0; p < P; ++p) {
    const int64_t ka = p * step < K ? p * step : K, kb = (p + 1) * step < K ? (p + 1) * step : K;
    if (ka >= kb) {  // an empty part adds +0.0 (as Part() writes zeros): o + 0 == o except -0 -> +0
      if (p == 0) {
        for (int64_t r = r0; r < r1; ++r)
          for (int c = 0; c < 4; ++c) _mm512_mask_storeu_ps(o + r * N + j + 16 * c, m[c], _mm512_setzero_ps());
      } else {
        for (int64_t r = r0; r < r1; ++r)
          for (int c = 0; c < 4; ++c) {
            float* q = o + r * N + j + 16 * c;
            _mm512_mask_storeu_ps(q, m[c], _mm512_add_ps(_mm512_maskz_loadu_ps(m[c], q), _mm512_setzero_ps()));
          }
      }
      continue;
    }
    for (int64_t k = ka; k < kb; ++k)
      for (int c = 0; c < 4; ++c)
        _mm512_store_ps(pack + (k - ka) * 64 + 16 * c, _mm512_maskz_loadu_ps(m[c], w + k * N + j + 16 * c));
    if (j + 64 <= N)
      Rows<false, true>(x + r0 * K, K, pack, N, ka, kb, o + r0 * N + j, r1 - r0, m, p == 0);
    else
      Rows<true, true>(x + r0 * K, K, pack, N, ka, kb, o + r0 * N + j, r1 - r0, m, p == 0);
  }
}

}  // namespace
#endif

static ffi::Error SkinnyMatmulImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> w,
                                   ffi::Buffer<ffi::S32> layer, ffi::ResultBuffer<ffi::F32> out) {
#ifndef __AVX512F__
  return ffi::Error::Internal("jaxpersona skinny_matmul was built without AVX-512F");
#else
  const auto wd = w.dimensions();
  const auto xd = x.dimensions();
  if (wd.size() != 3 || xd.size() < 1) return ffi::Error::InvalidArgument("skinny_matmul: w must be [L, K, N]");
  const int64_t L = wd[0], K = wd[1], N = wd[2];
  if (xd.back() != K) return ffi::Error::InvalidArgument("skinny_matmul: x's last dim must equal w's K");
  if (layer.element_count() != 1) return ffi::Error::InvalidArgument("skinny_matmul: layer must be a scalar");
  const int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= L) return ffi::Error::InvalidArgument("skinny_matmul: layer index out of range");
  const int64_t M = K ? x.element_count() / K : 0;
  float* o = out->typed_data();
  if (M == 0 || N == 0) return ffi::Error::Success();
  const float* xp = x.typed_data();
  const float* wl = w.typed_data() + l * K * N;
  // P parts of K (a function of K alone, so the sums' order never depends on threads or rows)
  const int64_t P = K >= 256 ? (K / 128 < 8 ? K / 128 : 8) : 1;
  const int64_t step = ((K / P + KB - 1) / KB) * KB;
  if (M >= MANY_ROWS) {  // (row block, column tile) items, every part of K in order within one: no buffers
    const int64_t tiles = (N + 63) / 64, blocks = (M + RB - 1) / RB, items = tiles * blocks;
    struct Free {
      void operator()(float* f) const { std::free(f); }
    };
    jaxpersona::ForItems(pool, items, [=]() {
      return [=, pack = std::unique_ptr<float, Free>()](int64_t i) mutable {
        if (!pack) pack.reset(static_cast<float*>(std::aligned_alloc(64, sizeof(float) * step * 64)));  // step x 64
        const int64_t b = i / tiles, t = i % tiles, r0 = b * RB, r1 = r0 + RB < M ? r0 + RB : M;
        Block(xp, wl, o, K, N, P, step, r0, r1, t * 64, pack.get());
      };
    });
    return ffi::Error::Success();
  }
  if (P == 1) {
    Part(xp, wl, o, M, K, N, 0, K);
    return ffi::Error::Success();
  }
  std::unique_ptr<float[]> partial(new float[static_cast<size_t>((P - 1) * M * N)]);  // each part writes all of its
  float* pp = partial.get();
  // parts of K handed out to the caller and the pool's workers; part 0 goes to `o`, part p > 0 to partial[p - 1]
  jaxpersona::ForItems(pool, P, [=]() {
    return [=](int64_t p) {
      const int64_t ka = p * step, kb = (p + 1) * step < K ? (p + 1) * step : K;
      Part(xp, wl, p == 0 ? o : pp + (p - 1) * M * N, M, K, N, ka < K ? ka : K, kb);
    };
  });
  const int64_t n = M * N;
  for (int64_t p = 1; p < P; ++p) {  // o = ((part0 + part1) + part2) + ...
    const float* q = pp + (p - 1) * n;
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) _mm512_storeu_ps(o + i, _mm512_add_ps(_mm512_loadu_ps(o + i), _mm512_loadu_ps(q + i)));
    for (; i < n; ++i) o[i] += q[i];
  }
  return ffi::Error::Success();
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpSkinnyMatmul, SkinnyMatmulImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()  // x [..., K]
                                  .Arg<ffi::Buffer<ffi::F32>>()  // w [L, K, N]
                                  .Arg<ffi::Buffer<ffi::S32>>()  // layer []
                                  .Ret<ffi::Buffer<ffi::F32>>()  // out [..., N]
);

