// A float32 matmul for few rows against one layer of a stacked weight, read where it lies.
//
//   out[..., N] = x[..., K] @ w[layer][K, N]        x: any leading dims (M rows in all), w: [L, K, N]
//
// Why: a decode step multiplies a handful of rows (one token per sequence) by every weight of the model.
// XLA:CPU's layer scan copies each layer's slice out of the stacked [L, K, N] weights before its dot, and
// its dot kernel (as torch's) streams a weight at ~9 GB/s at 16 rows on a 2-core Xeon. This kernel reads
// the layer in place at ~16 GB/s: K is cut into P contiguous parts (blocks of rows of w, P = K/128 capped
// to 1..8), which the caller and the XLA intra-op pool's workers take from a counter; within a part,
// register tiles of 6 rows x 64 columns reuse a 16 x 64 block of w from L1; the parts' sums are added last.
//
// Numerics: every output element is ((part_0 + part_1) + part_2) + ..., each part a sum over its k in order
// (fp32 FMA); P depends on K alone, so a number is the same for any number of rows, any batch the row sits
// in and any thread count (the server's "alone or in any batch" invariant).
//
// Built at run time by jaxpersona.model.skinny (g++ -O3 -march=native); needs AVX-512F, else unused.
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>

#include "xla/ffi/api/ffi.h"

#ifdef __AVX512F__
#include <immintrin.h>
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

template <bool MASK>
inline __m512 Load(__mmask16 m, const float* p) {
  return MASK ? _mm512_maskz_loadu_ps(m, p) : _mm512_loadu_ps(p);
}

// o[r, 0:64] (+)= x[r, k0:k1] @ w[k0:k1, 0:64] for r < ROWS; with MASK, m[c] masks columns 16c..16c+15 (the
// last tile of a width that is not a multiple of 64; masked loads cost ~1/3 more, so only there).
template <int ROWS, bool MASK>
inline void Tile(const float* x, int64_t K, const float* w, int64_t N, int64_t k0, int64_t k1, float* o,
                 const __mmask16* m, bool first) {
  __m512 a[ROWS][4];
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < 4; ++c) a[r][c] = first ? _mm512_setzero_ps() : Load<MASK>(m[c], o + r * N + 16 * c);
  for (int64_t k = k0; k < k1; ++k) {
    const float* wk = w + k * N;
    const __m512 w0 = Load<MASK>(m[0], wk), w1 = Load<MASK>(m[1], wk + 16), w2 = Load<MASK>(m[2], wk + 32),
                 w3 = Load<MASK>(m[3], wk + 48);
    for (int r = 0; r < ROWS; ++r) {
      const __m512 xv = _mm512_set1_ps(x[r * K + k]);
      a[r][0] = _mm512_fmadd_ps(xv, w0, a[r][0]);
      a[r][1] = _mm512_fmadd_ps(xv, w1, a[r][1]);
      a[r][2] = _mm512_fmadd_ps(xv, w2, a[r][2]);
      a[r][3] = _mm512_fmadd_ps(xv, w3, a[r][3]);
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int c = 0; c < 4; ++c) {
      if (MASK)
        _mm512_mask_storeu_ps(o + r * N + 16 * c, m[c], a[r][c]);
      else
        _mm512_storeu_ps(o + r * N + 16 * c, a[r][c]);
    }
}

template <bool MASK>
void Rows(const float* x, int64_t K, const float* w, int64_t N, int64_t k0, int64_t k1, float* o, int64_t M,
          const __mmask16* m, bool first) {
  for (int64_t r0 = 0; r0 < M; r0 += RG) {
    const float* xr = x + r0 * K;
    float* orow = o + r0 * N;
    switch (M - r0 < RG ? M - r0 : RG) {
      case 6: Tile<6, MASK>(xr, K, w, N, k0, k1, orow, m, first); break;
      case 5: Tile<5, MASK>(xr, K, w, N, k0, k1, orow, m, first); break;
      case 4: Tile<4, MASK>(xr, K, w, N, k0, k1, orow, m, first); break;
      case 3: Tile<3, MASK>(xr, K, w, N, k0, k1, orow, m, first); break;
      case 2: Tile<2, MASK>(xr, K, w, N, k0, k1, orow, m, first); break;
      default: Tile<1, MASK>(xr, K, w, N, k0, k1, orow, m, first); break;
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
      if (j + 64 <= N)
        Rows<false>(x, K, w + j, N, k0, k1, o + j, M, m, first);
      else
        Rows<true>(x, K, w + j, N, k0, k1, o + j, M, m, first);
    }
  }
}

// Parts of K handed out by an atomic counter: the caller and any pool worker that wakes in time take the next
// part; each part has its own output buffer, so who computes which part does not change a number.
struct Job {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

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
  if (P == 1) {
    Part(xp, wl, o, M, K, N, 0, K);
    return ffi::Error::Success();
  }
  const int64_t step = ((K / P + KB - 1) / KB) * KB;
  std::unique_ptr<float[]> partial(new float[static_cast<size_t>((P - 1) * M * N)]);  // each part writes all of its
  float* pp = partial.get();
  auto job = std::make_shared<Job>();
  // part 0 goes to `o`, part p > 0 to partial[p - 1]
  auto work = [=](Job* j) {
    for (int64_t p; (p = j->next.fetch_add(1)) < P;) {
      const int64_t ka = p * step, kb = (p + 1) * step < K ? (p + 1) * step : K;
      Part(xp, wl, p == 0 ? o : pp + (p - 1) * M * N, M, K, N, ka < K ? ka : K, kb);
      j->done.fetch_add(1, std::memory_order_acq_rel);
    }
  };
  const int64_t helpers = pool.num_threads() < P - 1 ? pool.num_threads() : P - 1;
  for (int64_t t = 0; t < helpers; ++t) pool.Schedule([job, work]() { work(job.get()); });
  work(job.get());
  while (job->done.load(std::memory_order_acquire) < P) _mm_pause();
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
