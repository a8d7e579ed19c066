// Grouped-query attention of a few new tokens over one layer of a stacked KV cache, read where it lies.
//
//   out[p, b, t, h*hd] = softmax_s(scale * q[p, b, t, h] . key_s) . value_s    (G = H / KV query heads a kv head)
//   q: [P, B, T, H, hd]   k, v: [P, L, B, KV, S, hd]   mask: [P, B, T, Pp + Sm]   (P: any leading dims, or none)
//   pk, pv: [L, B, KV, Pp, hd], a prompt prefix every point shares (a transformer.KVPrefix; Pp = 0: none),
//           or [P, L, B, KV, Pp, hd], each point its own (a sweep's steered prompts)
//
// Keys s < Pp are the prefix's slots, then the point's own slots s - Pp < Sm <= S (its slots >= Sm are not
// read). Why: in a decode step XLA:CPU copies each layer's [B, KV, S, hd] slice of the carried cache out of the
// stacked cache before its two attention products (~9% of a sampled 16x64 generation's op time, the products
// and the softmax another ~7%). This kernel reads the layer in place, and only the slots a row may attend. A
// work item is one (row, kv head) for every point: a shared prefix is read once per item, from cache.
//
// Numerics: a masked slot is skipped; that is what XLA's softmax does with it too (exp(finfo.min - max) is
// exactly 0). For each (row, head): scores s_i = (q . k_i) * scale (a dot of fixed order), m = max s_i,
// e_i = exp(s_i - m) (a vector polynomial, ~1 ulp), p_i = e_i / sum(e), out = sum_i p_i v_i in slot order. Every
// number depends only on its own row's query, keys, values and mask: the same for any batch, grid point or
// thread count. It differs from XLA's attention in the last bits. A row with no slot to attend gets zeros.
//
// Built with skinny_matmul.cc into one library (jaxpersona.model.skinny); needs AVX-512F.
#include <atomic>
#include <cmath>
#include <cstdint>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

#ifdef __AVX512F__
#include <immintrin.h>

#include "kernel_items.h"
#endif

namespace ffi = xla::ffi;

#ifdef __AVX512F__
namespace {

// exp(x) for x <= 0 (Cephes' expf polynomial, range-reduced by ln 2; ~1 ulp): 2^n * p(r), r = x - n ln 2.
inline __m512 Exp(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

struct Shape {
  int64_t P, L, B, KV, S, hd, T, G, Pp, Sm;  // Pp: prefix slots, Sm: own slots read; a mask row has Pp + Sm
};

// One (point, row, kv head): its G*T queries over the prefix's then the layer's own keys and values (pk, pv:
// [Pp, hd]; k, v: [S, hd]). `e` holds Pp + Sm floats.
void Item(const Shape& z, const float* q, const float* pk, const float* pv, const float* k, const float* v,
          const bool* mask, float scale, float* out, float* e) {
  const int64_t H = z.KV * z.G, C = z.hd / 16, W = z.Pp + z.Sm;
  for (int64_t t = 0; t < z.T; ++t) {
    const bool* m = mask + t * W;
    for (int64_t g = 0; g < z.G; ++g) {
      const float* qi = q + (t * H + g) * z.hd;  // q already offset to this kv head's first query head
      float* o = out + (t * H + g) * z.hd;
      float mx = -INFINITY;
      for (int64_t s = 0; s < W; ++s) {
        if (!m[s]) {
          e[s] = -INFINITY;
          continue;
        }
        const float* ks = s < z.Pp ? pk + s * z.hd : k + (s - z.Pp) * z.hd;
        if (t == 0 && g == 0) {  // this slot's values, on their way from memory while the keys are used
          const float* vs = s < z.Pp ? pv + s * z.hd : v + (s - z.Pp) * z.hd;
          for (int64_t c = 0; c < C; ++c) _mm_prefetch(reinterpret_cast<const char*>(vs + 16 * c), _MM_HINT_T0);
        }
        __m512 a = _mm512_mul_ps(_mm512_loadu_ps(qi), _mm512_loadu_ps(ks));
        for (int64_t c = 1; c < C; ++c) a = _mm512_fmadd_ps(_mm512_loadu_ps(qi + 16 * c), _mm512_loadu_ps(ks + 16 * c), a);
        const float sc = _mm512_reduce_add_ps(a) * scale;
        e[s] = sc;
        mx = sc > mx ? sc : mx;
      }
      if (mx == -INFINITY) {  // nothing to attend (a padding row)
        for (int64_t c = 0; c < C; ++c) _mm512_storeu_ps(o + 16 * c, _mm512_setzero_ps());
        continue;
      }
      const __m512 mv = _mm512_set1_ps(mx), ninf = _mm512_set1_ps(-INFINITY);
      __m512 sum = _mm512_setzero_ps();
      for (int64_t s = 0; s < W; s += 16) {
        const __mmask16 lanes = W - s >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << (W - s)) - 1);
        const __m512 x = _mm512_mask_loadu_ps(ninf, lanes, e + s);
        const __m512 ex = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, ninf, _CMP_NEQ_OQ), Exp(_mm512_sub_ps(x, mv)));
        _mm512_mask_storeu_ps(e + s, lanes, ex);
        sum = _mm512_add_ps(sum, ex);
      }
      const float total = _mm512_reduce_add_ps(sum);
      for (int64_t s = 0; s < W; ++s) e[s] /= total;  // the probabilities (masked slots stay 0)
      for (int64_t c = 0; c < C; ++c) {
        __m512 a = _mm512_setzero_ps();
        for (int64_t s = 0; s < W; ++s) {
          if (!m[s]) continue;
          const float* vs = s < z.Pp ? pv + s * z.hd : v + (s - z.Pp) * z.hd;
          a = _mm512_fmadd_ps(_mm512_set1_ps(e[s]), _mm512_loadu_ps(vs + 16 * c), a);
        }
        _mm512_storeu_ps(o + 16 * c, a);
      }
    }
  }
}

}  // namespace
#endif

static ffi::Error CacheAttentionImpl(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                                     ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> pk, ffi::Buffer<ffi::F32> pv,
                                     ffi::Buffer<ffi::S32> layer, ffi::Buffer<ffi::PRED> mask,
                                     ffi::Buffer<ffi::F32> scale, ffi::ResultBuffer<ffi::F32> out) {
#ifndef __AVX512F__
  return ffi::Error::Internal("jaxpersona cache_attention was built without AVX-512F");
#else
  // any leading dims on q, k/v and mask, the same on all (their product is P); on the prefix none (shared by
  // every point) or the same
  const auto qd = q.dimensions(), kd = k.dimensions(), md = mask.dimensions(), vd = v.dimensions();
  const auto pd = pk.dimensions(), pvd = pv.dimensions();
  const size_t lead = qd.size() >= 4 ? qd.size() - 4 : 0;
  const bool own_prefix = lead > 0 && pd.size() == lead + 5;  // one prefix per point
  const size_t plead = own_prefix ? lead : 0;
  bool fits = qd.size() >= 4 && kd.size() == lead + 5 && vd.size() == lead + 5 && md.size() == lead + 3 &&
              pd.size() == plead + 5 && pvd.size() == pd.size();
  int64_t P = 1;
  for (size_t i = 0; fits && i < lead; ++i) {
    fits = kd[i] == qd[i] && md[i] == qd[i] && (!own_prefix || pd[i] == qd[i]);
    P *= qd[i];
  }
  for (size_t i = 0; fits && i < kd.size(); ++i) fits = vd[i] == kd[i];
  for (size_t i = 0; fits && i < pd.size(); ++i) fits = pvd[i] == pd[i];
  for (size_t i = 0; fits && i < 5; ++i) fits = i == 3 || pd[plead + i] == kd[lead + i];
  if (!fits)
    return ffi::Error::InvalidArgument(
        "cache_attention: q [..,B,T,H,hd], k/v [..,L,B,KV,S,hd], prefix k/v [(..),L,B,KV,Pp,hd], mask [..,B,T,Pp+Sm]");
  Shape z{P, kd[lead], kd[lead + 1], kd[lead + 2], kd[lead + 3], kd[lead + 4], qd[lead + 1], 0, pd[plead + 3], 0};
  z.Sm = md[lead + 2] - z.Pp;
  const int64_t H = qd[lead + 2];
  if (qd[lead] != z.B || qd[lead + 3] != z.hd || md[lead] != z.B || md[lead + 1] != z.T || z.KV == 0 || H % z.KV ||
      z.hd % 16 || z.Sm < 0 || z.Sm > z.S)
    return ffi::Error::InvalidArgument("cache_attention: shapes do not fit");
  z.G = H / z.KV;
  if (layer.element_count() != 1 || scale.element_count() != 1)
    return ffi::Error::InvalidArgument("cache_attention: layer and scale must be scalars");
  const int64_t l = layer.typed_data()[0];
  if (l < 0 || l >= z.L) return ffi::Error::InvalidArgument("cache_attention: layer index out of range");
  const float sc = scale.typed_data()[0];
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const float *pkp = pk.typed_data(), *pvp = pv.typed_data();
  const bool* mp = mask.typed_data();
  float* op = out->typed_data();
  const int64_t items = z.B * z.KV, W = z.Pp + z.Sm;
  if (items == 0 || z.P == 0 || z.T == 0) return ffi::Error::Success();
  jaxpersona::ForItems(pool, items, [=]() {
    return [=, e = std::vector<float>(static_cast<size_t>(W > 0 ? W : 1))](int64_t i) mutable {
      const int64_t kv = i % z.KV, b = i / z.KV;  // (row, kv head), every point
      for (int64_t p = 0; p < z.P; ++p) {
        const int64_t own = (((p * z.L + l) * z.B + b) * z.KV + kv) * z.S * z.hd;
        const int64_t prefix = ((((own_prefix ? p : 0) * z.L + l) * z.B + b) * z.KV + kv) * z.Pp * z.hd;
        const int64_t row = (p * z.B + b) * z.T * H * z.hd + kv * z.G * z.hd;  // first query of this kv group
        Item(z, qp + row, pkp + prefix, pvp + prefix, kp + own, vp + own, mp + (p * z.B + b) * z.T * W, sc, op + row,
             e.data());
      }
    };
  });
  return ffi::Error::Success();
#endif
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(JpCacheAttention, CacheAttentionImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q [..., B, T, H, hd]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k [..., L, B, KV, S, hd]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v [..., L, B, KV, S, hd]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // prefix k [(...), L, B, KV, Pp, hd]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // prefix v [(...), L, B, KV, Pp, hd]
                                  .Arg<ffi::Buffer<ffi::S32>>()   // layer []
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask [..., B, T, Pp + Sm]
                                  .Arg<ffi::Buffer<ffi::F32>>()   // scale []
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out [..., B, T, H * hd]
);
