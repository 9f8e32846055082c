// tuneforge's CUDA kernels: the row-wise and elementwise ops of a training step that candle
// would otherwise compose from several broadcasting kernels, each with its backward.
//
// - tf_norm_fwd / tf_norm_grad: layer norm (centred) and RMS norm (not), optional weight and
//   bias; one warp per row, statistics in f32 (f64 for f64).
// - tf_softmax_fwd / tf_softmax_grad: softmax of `scale · x + bias` over the last dimension,
//   the bias (an attention mask) indexed by batch and query without being expanded.
// - tf_gelu_fwd / tf_gelu_grad: GELU, erf form.
// - tf_dropout: inverted dropout whose mask is a hash of a seed and the element's index —
//   the same hash as the CPU's (`fused::kept`), so both draw the same mask.
// - tf_bias_add: `x + b` with `b` repeated over the rows.
// - tf_swiglu / tf_swiglu_grad_gate / tf_swiglu_grad_up: `silu(g) · u` (Llama's MLP) and the
//   gradients of its two inputs.
// - tf_rope: rotary position embeddings of rows (the halves layout), or their inverse (the
//   backward).
// - tf_xent_fwd / tf_xent_grad: cross-entropy of rows of logits against u32 targets, and its
//   gradient (softmax − one-hot) · dy, one warp per row.
// - tf_sum_squares: Σ g² of one gradient added into its slot of a vector (the global
//   gradient norm: one launch per parameter, one read-back per step).
// - tf_embedding_grad: the gradient of an embedding lookup, each looked-up row's gradient
//   added into its table row with atomic adds (one warp per row).
// - tf_adam_moments / tf_adam_apply: one parameter's AdamW update in place, in two passes
//   (the moments from the gradient, then the parameter from the moments), f32 state.
//
// Entry points are `extern "C"` and named `<kernel>_<dtype>` (f32, f64, f16, bf16), as
// candle's `kernel_name` spells them. Launch shapes come from `layers/kernel_calls.rs`: row
// kernels take blocks of (32, ROWS) threads, elementwise ones a grid-stride loop.
//
// `TUNEFORGE_EMULATE` compiles this file as host C++ against `emulate.h`, which runs the
// kernels on CPU threads (the tests check them there; a GPU checks them in `gpu-check`).

#ifdef TUNEFORGE_EMULATE
#include "emulate.h"
#else
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>
#endif

// The accumulation type of each storage type.
template <typename T> struct Acc { typedef float type; };
template <> struct Acc<double> { typedef double type; };

__device__ __forceinline__ float get(const float* p, long long i) { return p[i]; }
__device__ __forceinline__ double get(const double* p, long long i) { return p[i]; }
__device__ __forceinline__ float get(const __half* p, long long i) { return __half2float(p[i]); }
__device__ __forceinline__ float get(const __nv_bfloat16* p, long long i) { return __bfloat162float(p[i]); }

__device__ __forceinline__ void put(float* p, long long i, float v) { p[i] = v; }
__device__ __forceinline__ void put(double* p, long long i, double v) { p[i] = v; }
__device__ __forceinline__ void put(__half* p, long long i, float v) { p[i] = __float2half(v); }
__device__ __forceinline__ void put(__nv_bfloat16* p, long long i, float v) { p[i] = __float2bfloat16(v); }

template <typename A> __device__ __forceinline__ A warp_sum(A v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

template <typename A> __device__ __forceinline__ A warp_max(A v) {
    for (int o = 16; o > 0; o >>= 1) {
        A u = __shfl_xor_sync(0xffffffffu, v, o);
        v = u > v ? u : v;
    }
    return v;
}

// The row this warp works on (blocks of (32, ROWS) threads), or -1 past the last.
__device__ __forceinline__ long long warp_row(long long rows) {
    long long row = (long long)blockIdx.x * blockDim.y + threadIdx.y;
    return row < rows ? row : -1;
}

// ------------------------------------------------------------------ layer norm / RMS norm

// Mean (0 unless centred) and 1 / sqrt(var + eps) of row `x` of width `w`.
template <typename T, typename A>
__device__ __forceinline__ void row_stats(const T* x, int w, int center, A eps, A* mean, A* rstd) {
    int lane = threadIdx.x;
    A m = 0;
    if (center) {
        A s = 0;
        for (int i = lane; i < w; i += 32) s += get(x, i);
        m = warp_sum(s) / (A)w;
    }
    A ss = 0;
    for (int i = lane; i < w; i += 32) {
        A d = get(x, i) - m;
        ss += d * d;
    }
    *mean = m;
    *rstd = (A)1 / sqrt(warp_sum(ss) / (A)w + eps);
}

// y = (x - mean) · rstd [· g] [+ b]; `g` and `b` may be null.
template <typename T>
__device__ void norm_fwd(const T* x, const T* g, const T* b, T* y, long long rows, int w, int center, double eps) {
    typedef typename Acc<T>::type A;
    long long row = warp_row(rows);
    if (row < 0) return;
    const T* xr = x + row * w;
    T* yr = y + row * w;
    A mean, rstd;
    row_stats<T, A>(xr, w, center, (A)eps, &mean, &rstd);
    for (int i = threadIdx.x; i < w; i += 32) {
        A v = (get(xr, i) - mean) * rstd;
        if (g) v = v * get(g, i);
        if (b) v = v + get(b, i);
        put(yr, i, v);
    }
}

// The input gradient: with gd = dy [· g] and x̂ the normalised row,
// dx = rstd · (gd - mean(gd) - x̂ · mean(gd · x̂)), the mean(gd) term only when centred.
template <typename T>
__device__ void norm_grad(const T* x, const T* g, const T* dy, T* dx, long long rows, int w, int center, double eps) {
    typedef typename Acc<T>::type A;
    long long row = warp_row(rows);
    if (row < 0) return;
    const T* xr = x + row * w;
    const T* dyr = dy + row * w;
    T* dxr = dx + row * w;
    A mean, rstd;
    row_stats<T, A>(xr, w, center, (A)eps, &mean, &rstd);
    A sum_g = 0, sum_gx = 0;
    for (int i = threadIdx.x; i < w; i += 32) {
        A gd = g ? get(dyr, i) * get(g, i) : get(dyr, i);
        sum_g += gd;
        sum_gx += gd * (get(xr, i) - mean) * rstd;
    }
    A mg = center ? warp_sum(sum_g) / (A)w : (A)0;
    A mgx = warp_sum(sum_gx) / (A)w;
    for (int i = threadIdx.x; i < w; i += 32) {
        A gd = g ? get(dyr, i) * get(g, i) : get(dyr, i);
        put(dxr, i, rstd * (gd - mg - (get(xr, i) - mean) * rstd * mgx));
    }
}

// ------------------------------------------------------------------ softmax

// y = softmax(scale · x + bias) per row of width `w`. Rows are (batch, head, query) of
// `heads × queries` per batch; the bias (may be null) has rows (batch or 0, query or 0):
// `bias_batches` and `bias_queries` are 1 where it varies along that axis.
template <typename T>
__device__ void softmax_fwd(const T* x, const T* bias, T* y, long long rows, int w, double scale, long long heads,
                            long long queries, int bias_batches, int bias_queries) {
    typedef typename Acc<T>::type A;
    long long row = warp_row(rows);
    if (row < 0) return;
    const T* xr = x + row * w;
    T* yr = y + row * w;
    const T* br = 0;
    if (bias) {
        long long batch = row / (heads * queries), query = row % queries;
        br = bias + ((bias_batches ? batch : 0) * (bias_queries ? queries : 1) + (bias_queries ? query : 0)) * w;
    }
    A s = (A)scale;
    A m = -INFINITY;
    for (int i = threadIdx.x; i < w; i += 32) {
        A v = get(xr, i) * s + (br ? get(br, i) : (A)0);
        m = v > m ? v : m;
    }
    m = warp_max(m);
    A sum = 0;
    for (int i = threadIdx.x; i < w; i += 32) sum += exp(get(xr, i) * s + (br ? get(br, i) : (A)0) - m);
    A inv = (A)1 / warp_sum(sum);
    for (int i = threadIdx.x; i < w; i += 32) put(yr, i, exp(get(xr, i) * s + (br ? get(br, i) : (A)0) - m) * inv);
}

// dx = scale · y · (dy - Σ dy·y) per row.
template <typename T>
__device__ void softmax_grad(const T* y, const T* dy, T* dx, long long rows, int w, double scale) {
    typedef typename Acc<T>::type A;
    long long row = warp_row(rows);
    if (row < 0) return;
    const T* yr = y + row * w;
    const T* dyr = dy + row * w;
    T* dxr = dx + row * w;
    A dot = 0;
    for (int i = threadIdx.x; i < w; i += 32) dot += get(yr, i) * get(dyr, i);
    dot = warp_sum(dot);
    for (int i = threadIdx.x; i < w; i += 32) put(dxr, i, (A)scale * get(yr, i) * (get(dyr, i) - dot));
}

// ------------------------------------------------------------------ cross-entropy

// The max and Σ exp(x − max) of row `x` of width `w`.
template <typename T, typename A>
__device__ __forceinline__ void row_lse(const T* x, int w, A* max, A* sum) {
    A m = -INFINITY;
    for (int i = threadIdx.x; i < w; i += 32) {
        A v = get(x, i);
        m = v > m ? v : m;
    }
    m = warp_max(m);
    A s = 0;
    for (int i = threadIdx.x; i < w; i += 32) s += exp(get(x, i) - m);
    *max = m;
    *sum = warp_sum(s);
}

// y[row] = log Σ exp(x) − x[t[row]]; NaN for a target outside the row.
template <typename T>
__device__ void xent_fwd(const T* x, const unsigned int* t, T* y, long long rows, int w) {
    typedef typename Acc<T>::type A;
    long long row = warp_row(rows);
    if (row < 0) return;
    const T* xr = x + row * w;
    A m, s;
    row_lse<T, A>(xr, w, &m, &s);
    if (threadIdx.x == 0) {
        unsigned int target = t[row];
        put(y, row, target < (unsigned int)w ? log(s) + m - get(xr, (long long)target) : (A)NAN);
    }
}

// dx = (softmax(x) − one-hot(t)) · dy[row].
template <typename T>
__device__ void xent_grad(const T* x, const unsigned int* t, const T* dy, T* dx, long long rows, int w) {
    typedef typename Acc<T>::type A;
    long long row = warp_row(rows);
    if (row < 0) return;
    const T* xr = x + row * w;
    T* dxr = dx + row * w;
    A m, s;
    row_lse<T, A>(xr, w, &m, &s);
    A g = get(dy, row), inv = (A)1 / s;
    long long target = t[row];
    for (int i = threadIdx.x; i < w; i += 32) put(dxr, i, g * (exp(get(xr, i) - m) * inv - (i == target ? (A)1 : (A)0)));
}

// ------------------------------------------------------------------ elementwise

#define GRID_STRIDE(i, n) \
    for (long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x; i < (n); i += (long long)gridDim.x * blockDim.x)

// GELU, erf form: x · Φ(x).
template <typename T> __device__ void gelu_fwd(const T* x, T* y, long long n) {
    typedef typename Acc<T>::type A;
    GRID_STRIDE(i, n) {
        A v = get(x, i);
        put(y, i, (A)0.5 * v * ((A)1 + erf(v * (A)0.70710678118654752440)));
    }
}

// dx = dy · (Φ(x) + x φ(x)).
template <typename T> __device__ void gelu_grad(const T* x, const T* dy, T* dx, long long n) {
    typedef typename Acc<T>::type A;
    GRID_STRIDE(i, n) {
        A v = get(x, i);
        A cdf = (A)0.5 * ((A)1 + erf(v * (A)0.70710678118654752440));
        A pdf = (A)0.39894228040143267794 * exp((A)-0.5 * v * v);
        put(dx, i, get(dy, i) * (cdf + v * pdf));
    }
}

// Whether element `key` of the mask drawn with `seed` is kept (splitmix64's finaliser of
// seed + key · golden, top 32 bits against `threshold`); the CPU's `fused::kept`.
__device__ __forceinline__ bool kept(unsigned long long seed, unsigned long long threshold, unsigned long long key) {
    unsigned long long z = seed + key * 0x9E3779B97F4A7C15ull;
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    z ^= z >> 31;
    return (z >> 32) >= threshold;
}

// y = kept ? x · scale : 0 (also the backward, on the gradient).
template <typename T>
__device__ void dropout(const T* x, T* y, long long n, unsigned long long seed, unsigned long long threshold,
                        double scale) {
    typedef typename Acc<T>::type A;
    GRID_STRIDE(i, n) { put(y, i, kept(seed, threshold, (unsigned long long)i) ? get(x, i) * (A)scale : (A)0); }
}

// y = x + b, `b` of width `w` repeated over the rows.
template <typename T> __device__ void bias_add(const T* x, const T* b, T* y, long long n, int w) {
    GRID_STRIDE(i, n) { put(y, i, get(x, i) + get(b, i % w)); }
}

// ------------------------------------------------------------------ SwiGLU

template <typename A> __device__ __forceinline__ A sigmoid_of(A v) { return (A)1 / ((A)1 + exp(-v)); }

// y = silu(g) · u = g σ(g) u.
template <typename T> __device__ void swiglu(const T* g, const T* u, T* y, long long n) {
    typedef typename Acc<T>::type A;
    GRID_STRIDE(i, n) {
        A v = get(g, i);
        put(y, i, v * sigmoid_of(v) * get(u, i));
    }
}

// dg = dy · u · σ(g) (1 + g (1 − σ(g))).
template <typename T> __device__ void swiglu_grad_gate(const T* g, const T* u, const T* dy, T* dg, long long n) {
    typedef typename Acc<T>::type A;
    GRID_STRIDE(i, n) {
        A v = get(g, i), s = sigmoid_of(v);
        put(dg, i, get(dy, i) * get(u, i) * s * ((A)1 + v * ((A)1 - s)));
    }
}

// du = dy · silu(g).
template <typename T> __device__ void swiglu_grad_up(const T* g, const T* dy, T* du, long long n) {
    typedef typename Acc<T>::type A;
    GRID_STRIDE(i, n) {
        A v = get(g, i);
        put(du, i, get(dy, i) * v * sigmoid_of(v));
    }
}

// ------------------------------------------------------------------ rotary embeddings

// Rows of width 2·half at positions row % positions: y₁ = x₁·cos − x₂·sin, y₂ = x₁·sin + x₂·cos
// over the pairs (i, i + half), `cos`/`sin` of [positions, half]; `inverse` rotates back
// (sin negated: the backward). One thread per pair.
template <typename T>
__device__ void rope(const T* x, const T* cos_, const T* sin_, T* y, long long pairs, int half, long long positions,
                     int inverse) {
    typedef typename Acc<T>::type A;
    GRID_STRIDE(k, pairs) {
        long long row = k / half;
        int i = (int)(k % half);
        long long at = (row % positions) * half + i;
        A c = get(cos_, at), s = inverse ? -get(sin_, at) : get(sin_, at);
        long long a = row * 2 * half + i;
        A x1 = get(x, a), x2 = get(x, a + half);
        put(y, a, x1 * c - x2 * s);
        put(y, a + half, x1 * s + x2 * c);
    }
}

// ------------------------------------------------------------------ sum of squares

// out[slot] += Σ g[i]² over n elements, in the accumulation type: each warp sums its share of
// a grid-stride loop (a grid of at most a few hundred blocks, so few atomic adds meet).
template <typename T> __device__ void sum_squares(const T* g, typename Acc<T>::type* out, long long n, long long slot) {
    typedef typename Acc<T>::type A;
    A acc = 0;
    GRID_STRIDE(i, n) {
        A v = get(g, i);
        acc += v * v;
    }
    acc = warp_sum(acc);
    if (threadIdx.x % 32 == 0) atomicAdd(out + slot, acc);
}

// ------------------------------------------------------------------ embedding gradient

// dw[ids[r]] += dy[r] for each of `rows` rows of width `w`, into a zeroed table of `vocab`
// rows in the accumulation type: rows that look up the same id meet in atomic adds (candle's
// index_add walks every id in turn in one block). Ids outside the table add nothing.
template <typename T>
__device__ void embedding_grad(const unsigned int* ids, const T* dy, typename Acc<T>::type* dw, long long rows, int w,
                               long long vocab) {
    long long row = (long long)blockIdx.x * blockDim.y + threadIdx.y;
    if (row >= rows) return;
    long long id = ids[row];
    if (id >= vocab) return;
    const T* src = dy + row * w;
    typename Acc<T>::type* dst = dw + id * w;
    for (int i = threadIdx.x; i < w; i += 32) atomicAdd(dst + i, get(src, i));
}

// ------------------------------------------------------------------ AdamW

// The moments of one parameter, in place: `mv` holds its m (first n) then its v (next n),
// f32 whatever the gradient's type; the gradient is scaled by `gscale` (clipping) first.
// The arithmetic is the CPU optimizer's, in f32.
template <typename T>
__device__ void adam_moments(const T* g, float* mv, long long n, double beta1, double beta2, double gscale) {
    float b1 = (float)beta1, b2 = (float)beta2, s = (float)gscale;
    GRID_STRIDE(i, n) {
        float gi = (float)get(g, i) * s;
        mv[i] = b1 * mv[i] + (1.0f - b1) * gi;
        mv[n + i] = b2 * mv[n + i] + (1.0f - b2) * gi * gi;
    }
}

// p ← p · decay − lr · (m / bias1) / (√(v / bias2) + eps), in place, in f32.
template <typename T>
__device__ void adam_apply(T* p, const float* mv, long long n, double decay, double lr, double bias1, double bias2,
                           double eps) {
    float d = (float)decay, l = (float)lr, c1 = (float)bias1, c2 = (float)bias2, e = (float)eps;
    GRID_STRIDE(i, n) {
        float v = (float)get(p, i) * d - l * (mv[i] / c1) / (sqrt(mv[n + i] / c2) + e);
        put(p, i, v);
    }
}

// ------------------------------------------------------------------ entry points

#define ENTRY_POINTS(T, NAME)                                                                                         \
    extern "C" __global__ void tf_norm_fwd_##NAME(const T* x, const T* g, const T* b, T* y, long long rows, int w,   \
                                                  int center, double eps) {                                          \
        norm_fwd<T>(x, g, b, y, rows, w, center, eps);                                                               \
    }                                                                                                                 \
    extern "C" __global__ void tf_norm_grad_##NAME(const T* x, const T* g, const T* dy, T* dx, long long rows, int w, \
                                                   int center, double eps) {                                         \
        norm_grad<T>(x, g, dy, dx, rows, w, center, eps);                                                            \
    }                                                                                                                 \
    extern "C" __global__ void tf_softmax_fwd_##NAME(const T* x, const T* bias, T* y, long long rows, int w,          \
                                                     double scale, long long heads, long long queries,               \
                                                     int bias_batches, int bias_queries) {                           \
        softmax_fwd<T>(x, bias, y, rows, w, scale, heads, queries, bias_batches, bias_queries);                      \
    }                                                                                                                 \
    extern "C" __global__ void tf_softmax_grad_##NAME(const T* y, const T* dy, T* dx, long long rows, int w,         \
                                                      double scale) {                                                \
        softmax_grad<T>(y, dy, dx, rows, w, scale);                                                                  \
    }                                                                                                                 \
    extern "C" __global__ void tf_gelu_fwd_##NAME(const T* x, T* y, long long n) { gelu_fwd<T>(x, y, n); }           \
    extern "C" __global__ void tf_gelu_grad_##NAME(const T* x, const T* dy, T* dx, long long n) {                    \
        gelu_grad<T>(x, dy, dx, n);                                                                                  \
    }                                                                                                                 \
    extern "C" __global__ void tf_dropout_##NAME(const T* x, T* y, long long n, unsigned long long seed,             \
                                                 unsigned long long threshold, double scale) {                       \
        dropout<T>(x, y, n, seed, threshold, scale);                                                                 \
    }                                                                                                                 \
    extern "C" __global__ void tf_bias_add_##NAME(const T* x, const T* b, T* y, long long n, int w) {                \
        bias_add<T>(x, b, y, n, w);                                                                                  \
    }                                                                                                                 \
    extern "C" __global__ void tf_swiglu_##NAME(const T* g, const T* u, T* y, long long n) { swiglu<T>(g, u, y, n); } \
    extern "C" __global__ void tf_swiglu_grad_gate_##NAME(const T* g, const T* u, const T* dy, T* dg, long long n) {  \
        swiglu_grad_gate<T>(g, u, dy, dg, n);                                                                        \
    }                                                                                                                 \
    extern "C" __global__ void tf_swiglu_grad_up_##NAME(const T* g, const T* dy, T* du, long long n) {                \
        swiglu_grad_up<T>(g, dy, du, n);                                                                             \
    }                                                                                                                 \
    extern "C" __global__ void tf_rope_##NAME(const T* x, const T* c, const T* s, T* y, long long pairs, int half,   \
                                              long long positions, int inverse) {                                  \
        rope<T>(x, c, s, y, pairs, half, positions, inverse);                                                        \
    }                                                                                                                 \
    extern "C" __global__ void tf_xent_fwd_##NAME(const T* x, const unsigned int* t, T* y, long long rows, int w) {    \
        xent_fwd<T>(x, t, y, rows, w);                                                                               \
    }                                                                                                                 \
    extern "C" __global__ void tf_xent_grad_##NAME(const T* x, const unsigned int* t, const T* dy, T* dx,             \
                                                   long long rows, int w) {                                          \
        xent_grad<T>(x, t, dy, dx, rows, w);                                                                         \
    }                                                                                                                 \
    extern "C" __global__ void tf_sum_squares_##NAME(const T* g, Acc<T>::type* out, long long n, long long slot) {    \
        sum_squares<T>(g, out, n, slot);                                                                             \
    }                                                                                                                 \
    extern "C" __global__ void tf_embedding_grad_##NAME(const unsigned int* ids, const T* dy, Acc<T>::type* dw,       \
                                                        long long rows, int w, long long vocab) {                    \
        embedding_grad<T>(ids, dy, dw, rows, w, vocab);                                                              \
    }                                                                                                                 \
    extern "C" __global__ void tf_adam_moments_##NAME(const T* g, float* mv, long long n, double beta1, double beta2, \
                                                      double gscale) {                                               \
        adam_moments<T>(g, mv, n, beta1, beta2, gscale);                                                             \
    }                                                                                                                 \
    extern "C" __global__ void tf_adam_apply_##NAME(T* p, const float* mv, long long n, double decay, double lr,     \
                                                    double bias1, double bias2, double eps) {                        \
        adam_apply<T>(p, mv, n, decay, lr, bias1, bias2, eps);                                                       \
    }

ENTRY_POINTS(float, f32)
ENTRY_POINTS(double, f64)
ENTRY_POINTS(__half, f16)
ENTRY_POINTS(__nv_bfloat16, bf16)
