/* Fused elementwise kernels for CPU training (see cpu_kernels.py).

   Each kernel replaces a chain of PyTorch ops that each read and write the whole tensor:
   one pass over memory instead of five to ten, and no per-op dispatch. Math is fp32; bf16
   tensors are converted on load and rounded to nearest-even once, on store; the PyTorch ops
   they replace round intermediate results too, so the two agree to bf16 precision (about
   one unit in the last place), not bit for bit. (Rounding intermediates here as well made
   GCC's vector code of these loops ~8x slower.)

   Plain C with OpenMP (the same libgomp PyTorch loads, resolved by soname), no PyTorch
   headers: it compiles in well under a second. Called through ctypes on contiguous
   tensors' data pointers. Every tensor function exists for bf16 (suffix _bf16) and fp32 (_f32). */

#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define PARALLEL_MIN 16384 /* elements: below this, one thread is faster than waking two */

static inline float bf16_to_f32(uint16_t h) {
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)h << 16;
    return v.f;
}

static inline uint16_t f32_to_bf16(float f) {
    union { uint32_t u; float f; } v;
    v.f = f;
    uint32_t u = v.u;
    uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
    uint32_t nan = (u >> 16) | 0x40u;
    return (uint16_t)(((u & 0x7fffffffu) > 0x7f800000u) ? nan : rounded);
}

/* exp(x) for x in float range, ~2 ulp: 2^(x log2 e) split into integer and fraction, a
   degree-6 polynomial for 2^f on [-0.5, 0.5]. Branch-free, so loops vectorize. */
static inline float exp_f32(float x) {
    x = x < -87.0f ? -87.0f : (x > 88.0f ? 88.0f : x);
    float t = x * 1.44269504088896341f;
    float n = (t + 12582912.0f) - 12582912.0f; /* round to nearest: 1.5 * 2^23 pushes the fraction out */
    float f = t - n;
    float p = 1.5403530393381609e-4f;
    p = p * f + 1.3333558146428443e-3f;
    p = p * f + 9.6181291076284772e-3f;
    p = p * f + 5.5504108664821580e-2f;
    p = p * f + 2.4022650695910071e-1f;
    p = p * f + 6.9314718055994531e-1f;
    p = p * f + 1.0f;
    union { uint32_t u; float f; } scale;
    scale.u = (uint32_t)((int32_t)n + 127) << 23;
    return p * scale.f;
}

static inline float sigmoid_f32(float x) { return 1.0f / (1.0f + exp_f32(-x)); }

#define LOAD_bf16(p, i) bf16_to_f32((p)[i])
#define STORE_bf16(p, i, v) ((p)[i] = f32_to_bf16(v))
#define LOAD_f32(p, i) ((p)[i])
#define STORE_f32(p, i, v) ((p)[i] = (v))

/* Sparse LoRA dropout: k adapters read one input x (n, in); adapter j drops the flat positions of the
   sorted dropped[] that fall in [j * n * in, (j + 1) * n * in). The products run on x itself and these
   three kernels take the dropped elements' terms back out (dropout p is small: a few percent of x).
   a_t (in, k * r) holds the adapters' A matrices transposed, adapter j in columns j * r .. j * r + r - 1.
   lora_drop_h:  h (n, k * r) holds x a_t; minus, per dropped (j, m, c), x[m, c] * a_t[c, j's columns];
   lora_drop_da: da (in, k * r) fp32 holds x^T d_pre; minus x[m, c] * d_pre[m, j's columns] in row c;
   lora_drop_dx: dx (n, in) holds d_pre a_t^T; minus dot(d_pre[m, j's columns], a_t[c, j's columns]) at (m, c).
   Positions sorted by (j, m, c) let the forward sum each row's terms in fp32 and round once. */

/* Steps (j, m) to the row of flat position p; `row_start` is the flat index of (j, m, 0). */
#define ADVANCE(p) while ((p) - row_start >= in) { row_start += in; if (++m == n) { m = 0; j++; } }
/* (j, m, row_start) of the row holding flat position p, where a share of the positions begins. */
#define START_AT(p) int64_t row_ = (p) / in, j = row_ / n, m = row_ % n, row_start = row_ * in;

/* h and dx split the work between the threads: thread t of nt takes the rows m in [n t / nt, n (t + 1) / nt)
   of every adapter, found by binary search in the sorted dropped[], so no two threads write one row (dx's
   row m takes the terms of all k adapters). Measured on 2 vCPUs, 400 x 576, k = 3, 35k positions: h
   100 -> 55 us, dx 250 -> 135 us. da stays on one thread: its rows take terms from positions of any row,
   and with a per-thread copy of the shared adapter's columns it measured slower (104 -> 137-163 us),
   where h and dx, whose inner loops are chains of dependent FMAs and sums, gained 1.8-1.9x. */
#define DROP_PARALLEL_MIN 4096 /* positions */
static int64_t lower_bound(const int64_t *sorted, int64_t count, int64_t value) {
    int64_t lo = 0, hi = count;
    while (lo < hi) {
        int64_t mid = lo + (hi - lo) / 2;
        if (sorted[mid] < value) lo = mid + 1; else hi = mid;
    }
    return lo;
}
#define FOR_EACH_SHARE(call)                                                                         \
    _Pragma("omp parallel if (count >= DROP_PARALLEL_MIN)") {                                        \
        int nt_ = omp_get_num_threads(), t_ = omp_get_thread_num();                                  \
        int64_t m_lo = n * t_ / nt_, m_hi = n * (t_ + 1) / nt_;                                      \
        for (int64_t j_ = 0; j_ < k && m_lo < m_hi; j_++) {                                          \
            int64_t begin = lower_bound(dropped, count, (j_ * n + m_lo) * in);                       \
            int64_t stop = lower_bound(dropped, count, (j_ * n + m_hi) * in);                        \
            if (begin < stop) call;                                                                  \
        }                                                                                            \
    }


/* At the usual rank 16 in bf16, with AVX-512: one vector per adapter row. Other ranks and dtypes take the
   generic loops in KERNELS below. */
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512BF16__)
#include <immintrin.h>
#define AVX512_BF16_bf16 1
static inline __m512 load16_bf16(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}
static inline void store16_bf16(uint16_t *p, __m512 v) { _mm256_storeu_si256((__m256i *)p, (__m256i)_mm512_cvtneps_pbh(v)); }


static void lora_drop_h_rank16_bf16(uint16_t *h, const uint16_t *x, const uint16_t *a_t, const int64_t *dropped,
                                    int64_t begin, int64_t stop, int64_t k, int64_t n, int64_t in) {
    int64_t kr = k * 16;
    START_AT(dropped[begin]);
    for (int64_t i = begin; i < stop;) {
        ADVANCE(dropped[i]);
        int64_t end = row_start + in;
        __m512 acc = _mm512_setzero_ps();
        for (; i < stop && dropped[i] < end; i++) {
            int64_t c = dropped[i] - row_start;
            acc = _mm512_fmadd_ps(_mm512_set1_ps(bf16_to_f32(x[m * in + c])), load16_bf16(a_t + c * kr + j * 16), acc);
        }
        uint16_t *hr = h + m * kr + j * 16;
        store16_bf16(hr, _mm512_sub_ps(load16_bf16(hr), acc));
    }
}

static void lora_drop_da_rank16_bf16(float *da, const uint16_t *x, const uint16_t *d_pre, const int64_t *dropped,
                                     int64_t begin, int64_t stop, int64_t k, int64_t n, int64_t in) {
    int64_t kr = k * 16;
    START_AT(dropped[begin]);
    for (int64_t i = begin; i < stop;) {
        ADVANCE(dropped[i]);
        int64_t end = row_start + in;
        __m512 d = load16_bf16(d_pre + m * kr + j * 16);
        for (; i < stop && dropped[i] < end; i++) {
            int64_t c = dropped[i] - row_start;
            float *dr = da + c * kr + j * 16;
            _mm512_storeu_ps(dr, _mm512_fnmadd_ps(_mm512_set1_ps(bf16_to_f32(x[m * in + c])), d, _mm512_loadu_ps(dr)));
        }
    }
}

static void lora_drop_dx_rank16_bf16(uint16_t *dx, const uint16_t *d_pre, const uint16_t *a_t, const int64_t *dropped,
                                     int64_t begin, int64_t stop, int64_t k, int64_t n, int64_t in) {
    int64_t kr = k * 16;
    START_AT(dropped[begin]);
    for (int64_t i = begin; i < stop;) {
        ADVANCE(dropped[i]);
        int64_t end = row_start + in;
        __m512 d = load16_bf16(d_pre + m * kr + j * 16);
        uint16_t *row = dx + m * in;
        for (; i < stop && dropped[i] < end; i++) {
            int64_t c = dropped[i] - row_start;
            float dot = _mm512_reduce_add_ps(_mm512_mul_ps(d, load16_bf16(a_t + c * kr + j * 16)));
            row[c] = f32_to_bf16(bf16_to_f32(row[c]) - dot);
        }
    }
}
/* SwiGLU in bf16 with AVX-512: the generic loops below vectorize too, but divide for the sigmoid and
   round to bf16 with integer arithmetic; here one reciprocal estimate with a Newton step and the
   CPU's own rounding conversion (round to nearest even, as f32_to_bf16): 1.2x forward, 1.37x
   backward (interleaved A/B of the two builds, 384 x 1536). */
static inline __m512 exp16(__m512 x) { /* exp_f32, 16 lanes */
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.0f)), _mm512_set1_ps(88.0f));
    __m512 t = _mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f));
    __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 f = _mm512_sub_ps(t, n);
    __m512 p = _mm512_set1_ps(1.5403530393381609e-4f);
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.6181291076284772e-3f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.5504108664821580e-2f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.4022650695910071e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.9314718055994531e-1f));
    p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f));
    __m512i scale = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_mul_ps(p, _mm512_castsi512_ps(scale));
}
static inline __m512 sigmoid16(__m512 g) {
    __m512 d = _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)));
    __m512 r = _mm512_rcp14_ps(d);
    return _mm512_mul_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(2.0f))); /* r (2 - d r): ~2^-28 */
}
static inline __m512 loadn_bf16(const uint16_t *p, __mmask16 m) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
static inline void storen_bf16(uint16_t *p, __mmask16 m, __m512 v) {
    _mm256_mask_storeu_epi16(p, m, (__m256i)_mm512_cvtneps_pbh(v));
}
static void swiglu_fwd_avx512_bf16(const uint16_t *gate, const uint16_t *up, uint16_t *out, int64_t n) {
    #pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN)
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        __m512 g = loadn_bf16(gate + i, m);
        storen_bf16(out + i, m, _mm512_mul_ps(_mm512_mul_ps(g, sigmoid16(g)), loadn_bf16(up + i, m)));
    }
}
static void swiglu_bwd_avx512_bf16(const uint16_t *grad, const uint16_t *gate, const uint16_t *up, uint16_t *d_gate,
                                   uint16_t *d_up, int64_t n) {
    #pragma omp parallel for schedule(static) if (n >= PARALLEL_MIN)
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 m = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        __m512 g = loadn_bf16(gate + i, m), d = loadn_bf16(grad + i, m), s = sigmoid16(g);
        storen_bf16(d_up + i, m, _mm512_mul_ps(_mm512_mul_ps(d, g), s));
        __m512 slope = _mm512_fmadd_ps(g, _mm512_sub_ps(_mm512_set1_ps(1.0f), s), _mm512_set1_ps(1.0f)); /* 1 + g (1 - s) */
        storen_bf16(d_gate + i, m, _mm512_mul_ps(_mm512_mul_ps(_mm512_mul_ps(d, loadn_bf16(up + i, m)), s), slope));
    }
}
#else
#define AVX512_BF16_bf16 0
#define swiglu_fwd_avx512_bf16(...) ((void)0)
#define swiglu_bwd_avx512_bf16(...) ((void)0)
#define lora_drop_h_rank16_bf16(...) ((void)0)
#define lora_drop_da_rank16_bf16(...) ((void)0)
#define lora_drop_dx_rank16_bf16(...) ((void)0)
#endif
#define AVX512_BF16_f32 0

#define KERNELS(S, T)                                                                                           \
    /* y = w * x * inv_rms: Llama's RMSNorm; inv_rms (fp32, one per row) is kept for the backward. */               \
    void rmsnorm_fwd_##S(const T *x, const T *w, T *y, float *inv_rms, int64_t rows, int64_t cols, float eps) { \
        _Pragma("omp parallel for schedule(static) if (rows * cols >= PARALLEL_MIN)")                          \
        for (int64_t r = 0; r < rows; r++) {                                                                    \
            const T *xr = x + r * cols;                                                                         \
            T *yr = y + r * cols;                                                                               \
            float sum = 0.0f;                                                                                   \
            _Pragma("omp simd reduction(+ : sum)")                                                              \
            for (int64_t c = 0; c < cols; c++) {                                                                \
                float v = LOAD_##S(xr, c);                                                                      \
                sum += v * v;                                                                                   \
            }                                                                                                   \
            float inv = 1.0f / sqrtf(sum / (float)cols + eps);                                                  \
            inv_rms[r] = inv;                                                                                   \
            for (int64_t c = 0; c < cols; c++)                                                                  \
                STORE_##S(yr, c, LOAD_##S(w, c) * (LOAD_##S(xr, c) * inv));                           \
        }                                                                                                       \
    }                                                                                                           \
                                                                                                                \
    /* One row of the backward: dx = inv_rms * (g - x_hat * mean(g * x_hat)), g = grad * w, x_hat = x * inv_rms; \
       with acc (a trainable weight), also acc += grad * x_hat, its gradient's share from this row. */          \
    static inline void rmsnorm_bwd_row_##S(const T *gr, const T *xr, const T *w, float inv, T *dr, float *acc, \
                                           int64_t cols) {                                                      \
        float dot = 0.0f;                                                                                       \
        _Pragma("omp simd reduction(+ : dot)")                                                                  \
        for (int64_t c = 0; c < cols; c++)                                                                      \
            dot += LOAD_##S(gr, c) * LOAD_##S(w, c) * LOAD_##S(xr, c);                                          \
        float mean = dot * inv / (float)cols;                                                                   \
        if (acc == NULL) {                                                                                      \
            for (int64_t c = 0; c < cols; c++)                                                                  \
                STORE_##S(dr, c, inv * (LOAD_##S(gr, c) * LOAD_##S(w, c) - LOAD_##S(xr, c) * inv * mean));      \
            return;                                                                                             \
        }                                                                                                       \
        _Pragma("omp simd")                                                                                     \
        for (int64_t c = 0; c < cols; c++) {                                                                    \
            float g = LOAD_##S(gr, c), x_hat = LOAD_##S(xr, c) * inv;                                           \
            acc[c] += g * x_hat;                                                                                \
            STORE_##S(dr, c, inv * (g * LOAD_##S(w, c) - x_hat * mean));                                        \
        }                                                                                                       \
    }                                                                                                           \
                                                                                                                \
    /* The backward on a frozen weight: dx only. */                                                           \
    void rmsnorm_bwd_##S(const T *grad, const T *x, const T *w, const float *inv_rms, T *dx, int64_t rows,      \
                         int64_t cols) {                                                                        \
        _Pragma("omp parallel for schedule(static) if (rows * cols >= PARALLEL_MIN)")                          \
        for (int64_t r = 0; r < rows; r++)                                                                      \
            rmsnorm_bwd_row_##S(grad + r * cols, x + r * cols, w, inv_rms[r], dx + r * cols, NULL, cols);       \
    }                                                                                                           \
                                                                                                                \
    /* On a trainable weight: dx and the weight's gradient, dw = sum over rows of grad * x_hat, in fp32. The    \
       rows are split into `parts` fixed blocks, each summed into its own row of dw_parts (parts x cols,      \
       zeroed by the caller, added up by it), so the result does not depend on the thread count. */          \
    void rmsnorm_bwd_dw_##S(const T *grad, const T *x, const T *w, const float *inv_rms, T *dx, float *dw_parts, \
                            int64_t parts, int64_t rows, int64_t cols) {                                        \
        _Pragma("omp parallel for schedule(static) if (rows * cols >= PARALLEL_MIN)")                          \
        for (int64_t p = 0; p < parts; p++)                                                                     \
            for (int64_t r = rows * p / parts; r < rows * (p + 1) / parts; r++)                                 \
                rmsnorm_bwd_row_##S(grad + r * cols, x + r * cols, w, inv_rms[r], dx + r * cols,                \
                                    dw_parts + p * cols, cols);                                                 \
    }                                                                                                           \
                                                                                                                \
    /* out = silu(gate) * up: act_fn(gate_proj(x)) * up_proj(x) of a SwiGLU MLP. */          \
    void swiglu_fwd_##S(const T *gate, const T *up, T *out, int64_t n) {                                        \
        if (AVX512_BF16_##S) {                                                                                  \
            swiglu_fwd_avx512_bf16((const uint16_t *)gate, (const uint16_t *)up, (uint16_t *)out, n);           \
            return;                                                                                             \
        }                                                                                                       \
        _Pragma("omp parallel for simd schedule(static) if (n >= PARALLEL_MIN)")                                \
        for (int64_t i = 0; i < n; i++) {                                                                       \
            float g = LOAD_##S(gate, i);                                                                        \
            STORE_##S(out, i, g * sigmoid_f32(g) * LOAD_##S(up, i));                                 \
        }                                                                                                       \
    }                                                                                                           \
                                                                                                                \
    /* d_up = grad * silu(gate); d_gate = grad * up * silu'(gate). */                             \
    void swiglu_bwd_##S(const T *grad, const T *gate, const T *up, T *d_gate, T *d_up, int64_t n) {            \
        if (AVX512_BF16_##S) {                                                                                  \
            swiglu_bwd_avx512_bf16((const uint16_t *)grad, (const uint16_t *)gate, (const uint16_t *)up,         \
                                   (uint16_t *)d_gate, (uint16_t *)d_up, n);                                    \
            return;                                                                                             \
        }                                                                                                       \
        _Pragma("omp parallel for simd schedule(static) if (n >= PARALLEL_MIN)")                                \
        for (int64_t i = 0; i < n; i++) {                                                                       \
            float g = LOAD_##S(gate, i), d = LOAD_##S(grad, i);                                                 \
            float s = sigmoid_f32(g);                                                                           \
            STORE_##S(d_up, i, d * g * s);                                                           \
            STORE_##S(d_gate, i, d * LOAD_##S(up, i) * s * (1.0f + g * (1.0f - s)));                 \
        }                                                                                                       \
    }                                                                                                           \
                                                                                                                \
    static void lora_drop_h_range_##S(T *h, const T *x, const T *a_t, const int64_t *dropped, int64_t begin, int64_t stop,   \
                                      int64_t k, int64_t n, int64_t in, int64_t r) {                                             \
        if (r == 16 && AVX512_BF16_##S) {                                                                                        \
            lora_drop_h_rank16_bf16((uint16_t *)h, (const uint16_t *)x, (const uint16_t *)a_t, dropped, begin, stop, k, n, in);  \
            return;                                                                                                              \
        }                                                                                                                        \
        int64_t kr = k * r;                                                                                                      \
        START_AT(dropped[begin]);                                                                                                \
        float acc[r];                                                                                                            \
        for (int64_t i = begin; i < stop;) {                                                                                     \
            ADVANCE(dropped[i]);                                                                                                 \
            int64_t end = row_start + in;                                                                                        \
            for (int64_t t = 0; t < r; t++) acc[t] = 0.0f;                                                                       \
            for (; i < stop && dropped[i] < end; i++) {                                                                          \
                int64_t c = dropped[i] - row_start;                                                                              \
                float xv = LOAD_##S(x, m * in + c);                                                                              \
                const T *ar = a_t + c * kr + j * r;                                                                              \
                for (int64_t t = 0; t < r; t++) acc[t] += xv * LOAD_##S(ar, t);                                                  \
            }                                                                                                                    \
            T *hr = h + m * kr + j * r;                                                                                          \
            for (int64_t t = 0; t < r; t++) STORE_##S(hr, t, LOAD_##S(hr, t) - acc[t]);                                          \
        }                                                                                                                        \
    }                                                                                                                            \
    void lora_drop_h_##S(T *h, const T *x, const T *a_t, const int64_t *dropped, int64_t count, int64_t k,                       \
                         int64_t n, int64_t in, int64_t r) {                                                                     \
        FOR_EACH_SHARE(lora_drop_h_range_##S(h, x, a_t, dropped, begin, stop, k, n, in, r))                                      \
    }                                                                                                                            \
                                                                                                                                 \
    static void lora_drop_da_range_##S(float *da, const T *x, const T *d_pre, const int64_t *dropped, int64_t begin,             \
                                       int64_t stop, int64_t k, int64_t n, int64_t in, int64_t r) {                              \
        if (r == 16 && AVX512_BF16_##S) {                                                                                        \
            lora_drop_da_rank16_bf16(da, (const uint16_t *)x, (const uint16_t *)d_pre, dropped, begin, stop, k, n, in);          \
            return;                                                                                                              \
        }                                                                                                                        \
        int64_t kr = k * r;                                                                                                      \
        START_AT(dropped[begin]);                                                                                                \
        for (int64_t i = begin; i < stop; i++) {                                                                                 \
            ADVANCE(dropped[i]);                                                                                                 \
            int64_t c = dropped[i] - row_start;                                                                                  \
            float xv = LOAD_##S(x, m * in + c);                                                                                  \
            const T *dp = d_pre + m * kr + j * r;                                                                                \
            float *dr = da + c * kr + j * r;                                                                                     \
            for (int64_t t = 0; t < r; t++) dr[t] -= xv * LOAD_##S(dp, t);                                                       \
        }                                                                                                                        \
    }                                                                                                                            \
    void lora_drop_da_##S(float *da, const T *x, const T *d_pre, const int64_t *dropped, int64_t count, int64_t k,               \
                          int64_t n, int64_t in, int64_t r) {                                                                    \
        if (count) lora_drop_da_range_##S(da, x, d_pre, dropped, 0, count, k, n, in, r);                                        \
    }                                                                                                                            \
                                                                                                                                 \
    static void lora_drop_dx_range_##S(T *dx, const T *d_pre, const T *a_t, const int64_t *dropped, int64_t begin,               \
                                       int64_t stop, int64_t k, int64_t n, int64_t in, int64_t r) {                              \
        if (r == 16 && AVX512_BF16_##S) {                                                                                        \
            lora_drop_dx_rank16_bf16((uint16_t *)dx, (const uint16_t *)d_pre, (const uint16_t *)a_t, dropped, begin, stop, k, n, \
                                     in);                                                                                        \
            return;                                                                                                              \
        }                                                                                                                        \
        int64_t kr = k * r;                                                                                                      \
        START_AT(dropped[begin]);                                                                                                \
        for (int64_t i = begin; i < stop; i++) {                                                                                 \
            ADVANCE(dropped[i]);                                                                                                 \
            int64_t c = dropped[i] - row_start;                                                                                  \
            const T *dp = d_pre + m * kr + j * r, *ar = a_t + c * kr + j * r;                                                    \
            float dot = 0.0f;                                                                                                    \
            for (int64_t t = 0; t < r; t++) dot += LOAD_##S(dp, t) * LOAD_##S(ar, t);                                            \
            STORE_##S(dx, m * in + c, LOAD_##S(dx, m * in + c) - dot);                                                           \
        }                                                                                                                        \
    }                                                                                                                            \
    void lora_drop_dx_##S(T *dx, const T *d_pre, const T *a_t, const int64_t *dropped, int64_t count, int64_t k,                 \
                          int64_t n, int64_t in, int64_t r) {                                                                    \
        FOR_EACH_SHARE(lora_drop_dx_range_##S(dx, d_pre, a_t, dropped, begin, stop, k, n, in, r))                                \
    }

KERNELS(bf16, uint16_t)
KERNELS(f32, float)

/* Rotary position embedding with the head transpose, for the fused attention (fast_attention.py).
   y = x * cos + swap(x * sin_swapped), swap exchanging the two halves of the head dimension
   (Llama's rotate_half), then times `scale`; with cos == NULL, only the transpose.

   rope_heads_first: x (B, T, heads, D) with `row_stride` elements between tokens (q, k, v are
   column slices of one projection output) -> y (B, heads, T, D) fp32, contiguous.
   rope_tokens_first: the backward: g (B, heads, T, D) fp32 -> y (B, T, heads, D) contiguous, with
   the transposed rotation g * cos + swap(g * -sin_swapped). cos and sin_swapped: (B, T, D) fp32, or
   (1, T, D) shared by the batch (rope_batch_stride 0 instead of T * D). */
#define ROPE_KERNELS(S, T)                                                                                      \
    void rope_heads_first_##S(const T *x, int64_t row_stride, const float *cos, const float *sin_swapped,       \
                              int64_t rope_batch_stride, float *y, int64_t batch, int64_t tokens, int64_t heads,  \
                              int64_t dim, float scale) {                                                        \
        int64_t half = dim / 2;                                                                                 \
        _Pragma("omp parallel for schedule(static) if (batch * tokens * heads * dim >= PARALLEL_MIN)")         \
        for (int64_t bt = 0; bt < batch * tokens; bt++) {                                                       \
            int64_t b = bt / tokens, t = bt % tokens;                                                           \
            int64_t at = b * rope_batch_stride + t * dim;                                                       \
            const float *c = cos ? cos + at : 0, *s = sin_swapped ? sin_swapped + at : 0;                       \
            for (int64_t h = 0; h < heads; h++) {                                                               \
                const T *xr = x + bt * row_stride + h * dim;                                                    \
                float *yr = y + ((b * heads + h) * tokens + t) * dim;                                           \
                if (!c) {                                                                                       \
                    for (int64_t i = 0; i < dim; i++) yr[i] = LOAD_##S(xr, i) * scale;                          \
                    continue;                                                                                   \
                }                                                                                               \
                for (int64_t i = 0; i < half; i++) {                                                            \
                    float lo = LOAD_##S(xr, i), hi = LOAD_##S(xr, i + half);                                    \
                    yr[i] = (lo * c[i] + hi * s[i + half]) * scale;                                             \
                    yr[i + half] = (hi * c[i + half] + lo * s[i]) * scale;                                      \
                }                                                                                               \
            }                                                                                                   \
        }                                                                                                       \
    }                                                                                                           \
    void rope_tokens_first_##S(const float *g, const float *cos, const float *sin_swapped,                     \
                               int64_t rope_batch_stride, T *y, int64_t batch, int64_t tokens, int64_t heads,   \
                               int64_t dim, float scale) {                                                      \
        int64_t half = dim / 2;                                                                                 \
        _Pragma("omp parallel for schedule(static) if (batch * tokens * heads * dim >= PARALLEL_MIN)")         \
        for (int64_t bt = 0; bt < batch * tokens; bt++) {                                                       \
            int64_t b = bt / tokens, t = bt % tokens;                                                           \
            int64_t at = b * rope_batch_stride + t * dim;                                                       \
            const float *c = cos ? cos + at : 0, *s = sin_swapped ? sin_swapped + at : 0;                       \
            for (int64_t h = 0; h < heads; h++) {                                                               \
                const float *gr = g + ((b * heads + h) * tokens + t) * dim;                                     \
                T *yr = y + (bt * heads + h) * dim;                                                             \
                if (!c) {                                                                                       \
                    for (int64_t i = 0; i < dim; i++) STORE_##S(yr, i, gr[i] * scale);                          \
                    continue;                                                                                   \
                }                                                                                               \
                for (int64_t i = 0; i < half; i++) {                                                            \
                    float lo = gr[i], hi = gr[i + half];                                                        \
                    STORE_##S(yr, i, (lo * c[i] - hi * s[i + half]) * scale);                                   \
                    STORE_##S(yr, i + half, (hi * c[i + half] - lo * s[i]) * scale);                            \
                }                                                                                               \
            }                                                                                                   \
        }                                                                                                       \
    }

ROPE_KERNELS(bf16, uint16_t)
ROPE_KERNELS(f32, float)

/* The rotary embedding of a packed batch in its layout: x (rows, heads, dim; rows x_row_stride
   elements apart) -> y (rows, heads, dim) contiguous, of x's dtype, y = x * cos + swap(x * sin_swapped) per head (swap: exchange the halves;
   cos, sin_swapped (rows, dim) fp32, one row per token, shared by the heads), each element
   rounded once. With sign = -1, the transpose (the backward). In PyTorch this is four passes
   over q or k and four more backward (~36 ms a layer for q at 12k tokens x 9 heads x 64). */
#define ROPE_ROWS_KERNEL(S, T)                                                                                   \
    void rope_rows_##S(const T *x, int64_t x_row_stride, const float *cos, const float *sin_swapped, T *y,         \
                       int64_t rows, int64_t heads, int64_t dim, float sign) {                                   \
        int64_t half = dim / 2;                                                                                  \
        _Pragma("omp parallel for schedule(static) if (rows * heads * dim >= PARALLEL_MIN)")                    \
        for (int64_t r = 0; r < rows; r++) {                                                                     \
            const float *c = cos + r * dim, *s = sin_swapped + r * dim;                                          \
            for (int64_t h = 0; h < heads; h++) {                                                                \
                const T *xr = x + r * x_row_stride + h * dim;                                                    \
                T *yr = y + (r * heads + h) * dim;                                                               \
                for (int64_t i = 0; i < half; i++) {                                                             \
                    float lo = LOAD_##S(xr, i), hi = LOAD_##S(xr, i + half);                                     \
                    STORE_##S(yr, i, lo * c[i] + sign * hi * s[i + half]);                                       \
                    STORE_##S(yr, i + half, hi * c[i + half] + sign * lo * s[i]);                                \
                }                                                                                                \
            }                                                                                                    \
        }                                                                                                        \
    }
ROPE_ROWS_KERNEL(bf16, uint16_t)
ROPE_ROWS_KERNEL(f32, float)

/* ln(x) for normal x > 0 (measured: within 2.5 ulp of log() on [2^-24, 1], the range used here): x = 2^e * m with m in [sqrt(1/2), sqrt(2)), ln m = 2 atanh(f),
   f = (m - 1) / (m + 1), |f| < 0.172, by its odd series to f^11. Branch-free, so loops vectorize. */
static inline float log_f32(float x) {
    union { float f; uint32_t u; } v = {x};
    int32_t e = (int32_t)((v.u >> 23) & 0xff) - 127;
    v.u = (v.u & 0x007fffffu) | 0x3f800000u; /* mantissa in [1, 2) */
    float m = v.f;
    int32_t big = m > 1.41421356f;
    m = big ? m * 0.5f : m;
    e += big;
    float f = (m - 1.0f) / (m + 1.0f), f2 = f * f;
    float s = 1.0f / 11.0f;
    s = s * f2 + 1.0f / 9.0f;
    s = s * f2 + 1.0f / 7.0f;
    s = s * f2 + 1.0f / 5.0f;
    s = s * f2 + 1.0f / 3.0f;
    s = s * f2 + 1.0f;
    return (float)e * 0.693147180559945f + 2.0f * f * s;
}

/* splitmix64's output function (Steele, Lea and Flood 2014): on the Weyl sequence seed + i * GOLDEN it is
   the splitmix64 generator (passes BigCrush), and any element can be computed on its own, so the
   loop below vectorizes. */
#define GOLDEN 0x9E3779B97F4A7C15ull
static inline uint64_t mix64(uint64_t z) {
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Dropout positions from geometric gaps (fast_lora.drop_positions). Uniform i (counting from `first`) is
   the top 24 bits of mix64(seed + (first + i + 1) * GOLDEN) over 2^24, in [0, 1) like torch.rand's floats;
   gap_i = floor(ln(1 - u_i) / log_keep) + 1 elements to the next drop, position_i = end + gap_1 + ... + gap_i.
   Writes the positions below numel to out and returns how many (count: all of them, draw more from
   first + count). The gaps go through `out` first: one vectorized pass, then the running sum. */
int64_t drop_positions_seeded(uint64_t seed, int64_t first, int64_t count, double log_keep, int64_t end, int64_t numel,
                              int64_t *out) {
    float inv = (float)(1.0 / log_keep);
    uint64_t base = seed + (uint64_t)first * GOLDEN;
    #pragma omp simd /* one thread: in the training loop, splitting this loop measured 2x slower (11-15 vs 6-7.5 ms a step) */
    for (int64_t i = 0; i < count; i++) {
        float u = (float)(mix64(base + (uint64_t)(i + 1) * GOLDEN) >> 40) * 0x1p-24f;
        out[i] = (int64_t)(log_f32(1.0f - u) * inv); /* >= 0, so the conversion's truncation is floor */
    }
    for (int64_t i = 0; i < count; i++) {
        end += out[i] + 1;
        if (end >= numel) return i;
        out[i] = end;
    }
    return count;
}

/* The version the Python side expects; bumped with any change of signature. */
/* ---- Operands of an adapter group, and small transposes ---------------------------------------
 * Each call of a LoRA group needs its adapters' fp32 master weights as bf16 matrices in three
 * layouts: A stacked (k r, in) for the products, its transpose (in, k r) for the dropout kernels,
 * and the B's transposed, each times its adapter's scale, into one (k r, total) block matrix
 * (scaling B rather than the (n, k r) products saves a pass over them forward and one backward).
 * In PyTorch that is seven ops (stack, cast, transpose copy, block_diag, cast...); here one pass. */
void lora_operands_bf16(const float *const *a, const float *const *b, const float *b_scales, const int64_t *cols,
                        const int64_t *sizes, int64_t k, int64_t r, int64_t in, int64_t total, uint16_t *a2, uint16_t *a_t,
                        uint16_t *b_block) {
    int64_t kr = k * r;
    memset(b_block, 0, (size_t)(kr * total) * sizeof(uint16_t));
    for (int64_t j = 0; j < k; j++) {
        for (int64_t i = 0; i < r; i++) {
            const float *row = a[j] + i * in;
            uint16_t *dst = a2 + (j * r + i) * in;
            for (int64_t c = 0; c < in; c++) {
                uint16_t v = f32_to_bf16(row[c]);
                dst[c] = v;
                a_t[c * kr + j * r + i] = v;
            }
        }
        for (int64_t o = 0; o < sizes[j]; o++) /* B_j (size_j, r): its transpose into rows j r.., columns cols[j].. */
            for (int64_t i = 0; i < r; i++)
                b_block[(j * r + i) * total + cols[j] + o] = f32_to_bf16(b_scales[j] * b[j][o * r + i]);
    }
}

/* dst (cols, rows) = src (rows, cols)^T, both contiguous, in 32 x 32 blocks (both sides stay in cache). */
#define TRANSPOSE(S, T)                                                                                  \
    void transpose_##S(const T *src, int64_t rows, int64_t cols, T *dst) {                              \
        for (int64_t r0 = 0; r0 < rows; r0 += 32)                                                        \
            for (int64_t c0 = 0; c0 < cols; c0 += 32)                                                    \
                for (int64_t r = r0; r < (r0 + 32 < rows ? r0 + 32 : rows); r++)                         \
                    for (int64_t c = c0; c < (c0 + 32 < cols ? c0 + 32 : cols); c++)                     \
                        dst[c * rows + r] = src[r * cols + c];                                           \
    }
TRANSPOSE(bf16, uint16_t)
TRANSPOSE(f32, float)

/* B (k, n) in the pair layout of bf16 dot products, both the AMX tiles' and AVX512-BF16's. */
#if AVX512_BF16_bf16
/* Panels [first, last) of B (k, n), element (i, j) at src[i * sk + j * sn]: panel p holds
 * round_up(k, 32) / 2 rows, row r the 16 pairs (B[2r][16p + j], B[2r + 1][16p + j]); zero beyond k, n. */
static void amx_pack(const uint16_t *src, int64_t sk, int64_t sn, int64_t k, int64_t n, int64_t first, int64_t last,
                     uint16_t *out) {
    int64_t kp = (k + 31) / 32 * 16;
    __m512i index = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                       _mm512_set1_epi32((int)(sn * 2)));
    for (int64_t r = 0; r < kp; r++) { /* pair rows outer: a row-major B is read in order */
        int64_t i = 2 * r;
        for (int64_t p = first; p < last; p++) {
            int64_t col = p * 16, cols = n - col < 16 ? n - col : 16;
            __mmask16 mask = (__mmask16)((1u << cols) - 1);
            __m512i pairs = _mm512_setzero_si512();
            if (i + 1 < k && sn == 1) { /* rows of B contiguous: interleave two rows */
                __m512i lo = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, src + i * sk + col));
                __m512i hi = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(mask, src + (i + 1) * sk + col));
                pairs = _mm512_or_si512(lo, _mm512_slli_epi32(hi, 16));
            } else if (i + 1 < k && sk == 1) { /* columns of B contiguous: one 32-bit pair from each */
                pairs = _mm512_mask_i32gather_epi32(pairs, mask, index, src + col * sn + i, 1);
            } else if (i < k) { /* the general case, and an odd k's last row */
                uint32_t tmp[16] = {0};
                for (int64_t j = 0; j < cols; j++)
                    tmp[j] = src[i * sk + (col + j) * sn] | (i + 1 < k ? (uint32_t)src[(i + 1) * sk + (col + j) * sn] << 16 : 0u);
                pairs = _mm512_loadu_si512(tmp);
            }
            _mm512_storeu_si512((uint32_t *)out + (p * kp + r) * 16, pairs);
        }
    }
}
#endif

/* ---- The LoRA products on AMX tiles -------------------------------------------------------------
 * oneDNN's bf16 matmul takes 60-250 us a call on the shapes of a LoRA step (384 x 576 x 48,
 * 384 x 48 x 960, the weight gradients 48 x 384 x 960...), where the tile arithmetic takes a few
 * microseconds: per-call setup, and blocking made for large products. A step makes six such
 * products per adapter group. amx_matmul computes C (m, n) = alpha * A (m, k) @ B (k, n) (+ C)
 * with A row-major bf16 (any row stride) and B bf16 with any strides, packed on the fly into the
 * tiles' pair-interleaved layout; C is bf16 (rounded once from the fp32 tiles) or fp32, optionally
 * stored transposed.
 * Work split: where B is large (an activation: the weight gradients, whose inner size is the
 * batch's rows), each thread takes a range of C's 32-column panel pairs, packs just those columns
 * of B and computes them for all rows of A (a thread reading columns another thread packed
 * measured 2x slower, 126 vs 65 us for 48 x 384 x 960). A small B (an adapter matrix) each thread
 * packs whole into its own scratch, and takes a range of A's 16-row blocks, C's rows in order. */
#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && AVX512_BF16_bf16
#include <sys/syscall.h>
#include <unistd.h>

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} amx_config;

/* Linux grants the AMX register state per process on request (oneDNN asks too; asking again is harmless). */
int amx_available(void) {
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
}

/* Tiles: 0, 1 accumulators (16 rows x 16 fp32: two column panels); 2 A (16 rows x 32 k);
 * 3 A's last k % 32; 4, 5 B (16 k-pairs of the two panels); 6, 7 B's last (k % 32) / 2 pairs. */
static void amx_configure(int64_t k_rest) {
    amx_config c;
    memset(&c, 0, sizeof c);
    c.palette = 1;
    for (int t = 0; t < 6; t++) {
        c.rows[t] = 16;
        c.colsb[t] = 64;
    }
    if (k_rest) {
        c.colsb[3] = (uint16_t)(2 * k_rest);
        c.rows[6] = c.rows[7] = (uint8_t)(k_rest / 2);
        c.colsb[6] = c.colsb[7] = 64;
    } else {
        c.rows[3] = 0;
        c.colsb[3] = 0;
    }
    _tile_loadconfig(&c);
}

enum { AMX_OUT_BF16 = 0, AMX_OUT_F32 = 1, AMX_OUT_F32_TRANSPOSED = 2 };

/* acc (16 x 16 fp32) scaled into C's rows [row, row + rows), columns [col, col + cols). */
static inline void amx_store(const float *acc, void *c, int64_t ldc, int64_t row, int64_t rows, int64_t col,
                             int64_t cols, float alpha, int accumulate, int mode) {
    __mmask16 mask = (__mmask16)((1u << cols) - 1);
    __m512 scale = _mm512_set1_ps(alpha);
    if (mode == AMX_OUT_F32_TRANSPOSED) { /* C^T: element (i, j) at c[j * ldc + i] */
        float *ct = (float *)c;
        for (int64_t j = 0; j < cols; j++)
            for (int64_t r = 0; r < rows; r++) {
                float v = alpha * acc[r * 16 + j];
                float *dst = ct + (col + j) * ldc + row + r;
                *dst = accumulate ? *dst + v : v;
            }
        return;
    }
    for (int64_t r = 0; r < rows; r++) {
        __m512 v = _mm512_mul_ps(_mm512_load_ps(acc + r * 16), scale);
        if (mode == AMX_OUT_F32) {
            float *dst = (float *)c + (row + r) * ldc + col;
            if (accumulate) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mask, dst));
            _mm512_mask_storeu_ps(dst, mask, v);
        } else {
            uint16_t *dst = (uint16_t *)c + (row + r) * ldc + col;
            if (accumulate) {
                __m256i old = _mm256_maskz_loadu_epi16(mask, dst);
                v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(old), 16)));
            }
            _mm256_mask_storeu_epi16(dst, mask, (__m256i)_mm512_cvtneps_pbh(v));
        }
    }
}

/* The 16-row block of A at `row` (rows of it valid) times panels p0 and, if two, p0 + 1 of the
 * packed B (kp pair rows each), into C. */
static void amx_block(const uint16_t *a, int64_t lda, const uint16_t *packed, int64_t kp, int64_t k, int64_t p0,
                      int two, int64_t row, int64_t rows, void *c, int64_t ldc, int64_t n, float alpha,
                      int accumulate, int mode, uint16_t *tail, float *acc) {
    int64_t k_full = k / 32 * 32, k_rest = k % 32, stride = lda * 2;
    const uint16_t *ar = a + row * lda, *b0 = packed + p0 * kp * 32, *b1 = b0 + kp * 32;
    if (rows < 16) { /* tiles read 16 rows: the last block's, copied into zero-padded rows */
        for (int64_t r = 0; r < rows; r++) memcpy(tail + r * k, ar + r * lda, (size_t)k * 2);
        ar = tail;
        stride = k * 2;
    }
/* One k-step at k0: A's tile times B's tiles of the two panels into accumulators 0 and 1 (tile
 * numbers are immediates in the AMX instructions, so the full and the last step are one macro). */
#define AMX_K_STEP(A_TILE, B0_TILE, B1_TILE, k0)          \
    do {                                                  \
        _tile_loadd(A_TILE, ar + (k0), stride);           \
        _tile_loadd(B0_TILE, b0 + (k0) * 16, 64);         \
        _tile_dpbf16ps(0, A_TILE, B0_TILE);               \
        if (two) {                                        \
            _tile_loadd(B1_TILE, b1 + (k0) * 16, 64);     \
            _tile_dpbf16ps(1, A_TILE, B1_TILE);           \
        }                                                 \
    } while (0)
    _tile_zero(0);
    _tile_zero(1);
    for (int64_t kk = 0; kk < k_full; kk += 32) AMX_K_STEP(2, 4, 5, kk);
    if (k_rest) AMX_K_STEP(3, 6, 7, k_full);
#undef AMX_K_STEP
    for (int half = 0; half < 1 + two; half++) {
        int64_t col = (p0 + half) * 16;
        if (half) _tile_stored(1, acc, 64); else _tile_stored(0, acc, 64);
        amx_store(acc, c, ldc, row, rows, col, n - col < 16 ? n - col : 16, alpha, accumulate, mode);
    }
}

/* Panel pairs [first, last) of a packed B, for every 16-row block of A. */
static void amx_columns(const uint16_t *a, int64_t lda, const uint16_t *packed, int64_t first, int64_t last, void *c,
                        int64_t ldc, int64_t m, int64_t n, int64_t k, float alpha, int accumulate, int mode,
                        uint16_t *tail, float *acc) {
    int64_t kp = (k + 31) / 32 * 16, panels = (n + 15) / 16;
    for (int64_t pair = first; pair < last; pair++)
        for (int64_t row = 0; row < m; row += 16)
            amx_block(a, lda, packed, kp, k, 2 * pair, 2 * pair + 1 < panels, row, m - row < 16 ? m - row : 16, c, ldc, n,
                      alpha, accumulate, mode, tail, acc);
}

static int amx_threads(int64_t m, int64_t n, int64_t k) { return m * n * k < (1 << 20) ? 1 : omp_get_max_threads(); }
/* Split by columns where B is large (an activation: k is the rows of a batch) and has panel pairs
 * enough for every thread; a small B (an adapter matrix) each thread packs whole. */
#define AMX_SHARED_B_MIN 131072 /* elements of B */
static int amx_split_columns(int64_t n, int64_t k, int threads) {
    return n * k >= AMX_SHARED_B_MIN && (n + 31) / 32 >= 4 * threads;
}

static int64_t amx_packed_elements(int64_t m, int64_t n, int64_t k) {
    int threads = amx_threads(m, n, k);
    int64_t packed = (n + 15) / 16 * ((k + 31) / 32 * 16) * 32;
    return amx_split_columns(n, k, threads) ? packed : packed * threads;
}

/* Elements of the bf16 scratch amx_matmul needs for these sizes (with A strided along k: a
 * row-major copy of A per thread too). */
int64_t amx_scratch_elements(int64_t m, int64_t n, int64_t k, int a_strided) {
    return amx_packed_elements(m, n, k) + (a_strided ? amx_threads(m, n, k) * m * k : 0);
}

/* C = alpha * A @ B (+ C); A (m, k) bf16 with element (i, l) at a[i * sam + l * sak], B (k, n) bf16
 * with element (l, j) at b[l * sk + j * sn], C per `mode` (row stride ldc; transposed: C^T's);
 * scratch of amx_scratch_elements(m, n, k, sak != 1). Returns 0, computing nothing, where k is odd. */
int amx_matmul(const uint16_t *a, int64_t sam, int64_t sak, const uint16_t *b, int64_t sk, int64_t sn,
               uint16_t *scratch, void *c, int64_t ldc, int64_t m, int64_t n, int64_t k, float alpha, int accumulate,
               int mode) {
    if (k % 2 || k <= 0 || m <= 0 || n <= 0) return 0;
    int64_t kp = (k + 31) / 32 * 16, panels = (n + 15) / 16, pairs = (panels + 1) / 2, blocks = (m + 15) / 16;
    int threads = amx_threads(m, n, k), by_columns = amx_split_columns(n, k, threads);
    int64_t lda = sam;
#pragma omp parallel num_threads(threads) firstprivate(a, lda)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        if (sak != 1) { /* A strided along k (a transpose, the small side of a weight gradient): a row-major copy */
            uint16_t *copy = scratch + amx_packed_elements(m, n, k) + (int64_t)t * m * k;
            for (int64_t l0 = 0; l0 < k; l0 += 32)
                for (int64_t i = 0; i < m; i++)
                    for (int64_t l = l0; l < (l0 + 32 < k ? l0 + 32 : k); l++) copy[i * k + l] = a[i * sam + l * sak];
            a = copy;
            lda = k;
        }
        float acc[16 * 16] __attribute__((aligned(64)));
        uint16_t *tail = (m % 16) ? (uint16_t *)calloc((size_t)(16 * k), sizeof(uint16_t)) : NULL;
        amx_configure(k % 32);
        if (by_columns) { /* my panel pairs, packed by me, for every row block */
            int64_t first = pairs * t / nt, last = pairs * (t + 1) / nt;
            amx_pack(b, sk, sn, k, n, 2 * first, 2 * last < panels ? 2 * last : panels, scratch);
            amx_columns(a, lda, scratch, first, last, c, ldc, m, n, k, alpha, accumulate, mode, tail, acc);
        } else { /* all of B, packed into my own scratch, for my row blocks */
            uint16_t *mine = scratch + (int64_t)t * panels * kp * 32;
            amx_pack(b, sk, sn, k, n, 0, panels, mine);
            for (int64_t block = blocks * t / nt; block < blocks * (t + 1) / nt; block++) {
                int64_t row = block * 16, rows = m - row < 16 ? m - row : 16;
                for (int64_t pair = 0; pair < pairs; pair++)
                    amx_block(a, lda, mine, kp, k, 2 * pair, 2 * pair + 1 < panels, row, rows, c, ldc, n, alpha,
                              accumulate, mode, tail, acc);
            }
        }
        _tile_release();
        free(tail);
    }
    return 1;
}

/* A frozen linear layer's weight W (out, in) packed once as B = W^T for amx_linear: the packing
 * reads W column-wise (a gather per 16 pairs), too slow per call, and a packed B lets the product
 * run at ~950 GFLOP/s where oneDNN's linear, which reorders W itself, ran at ~690 (400 x 576 x
 * 1536 and the other SmolLM2 shapes, 30 layers' weights in turn, 2 cores). */
int64_t amx_packed_weight_elements(int64_t out, int64_t in) { return (out + 15) / 16 * ((in + 31) / 32 * 16) * 32; }
void amx_pack_weight(const uint16_t *w, int64_t out, int64_t in, uint16_t *packed) {
    int64_t panels = (out + 15) / 16;
#pragma omp parallel
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        amx_pack(w, 1, in, in, out, panels * t / nt, panels * (t + 1) / nt, packed);
    }
}

/* y (m, out; row stride ldy) = x (m, in; row stride ldx) W^T (+ y), W packed by amx_pack_weight;
 * each thread takes a range of W's column panel pairs for all rows. 0 where `in` is odd. */
int amx_linear(const uint16_t *x, int64_t ldx, const uint16_t *packed, uint16_t *y, int64_t ldy, int64_t m, int64_t out,
               int64_t in, int accumulate) {
    if (in % 2 || in <= 0 || m <= 0 || out <= 0) return 0;
    int64_t pairs = ((out + 15) / 16 + 1) / 2;
    int threads = amx_threads(m, out, in);
#pragma omp parallel num_threads(threads)
    {
        int t = omp_get_thread_num(), nt = omp_get_num_threads();
        float acc[16 * 16] __attribute__((aligned(64)));
        uint16_t *tail = (m % 16) ? (uint16_t *)calloc((size_t)(16 * in), sizeof(uint16_t)) : NULL;
        amx_configure(in % 32);
        amx_columns(x, ldx, packed, pairs * t / nt, pairs * (t + 1) / nt, y, ldy, m, out, in, 1.0f, accumulate,
                    AMX_OUT_BF16, tail, acc);
        _tile_release();
        free(tail);
    }
    return 1;
}

#else
int amx_available(void) { return 0; }
int64_t amx_packed_weight_elements(int64_t out, int64_t in) {
    (void)out, (void)in;
    return 0;
}
void amx_pack_weight(const uint16_t *w, int64_t out, int64_t in, uint16_t *packed) { (void)w, (void)out, (void)in, (void)packed; }
int amx_linear(const uint16_t *x, int64_t ldx, const uint16_t *packed, uint16_t *y, int64_t ldy, int64_t m, int64_t out,
               int64_t in, int accumulate) {
    (void)x, (void)ldx, (void)packed, (void)y, (void)ldy, (void)m, (void)out, (void)in, (void)accumulate;
    return 0;
}
int64_t amx_scratch_elements(int64_t m, int64_t n, int64_t k, int a_strided) {
    (void)m, (void)n, (void)k, (void)a_strided;
    return 0;
}
int amx_matmul(const uint16_t *a, int64_t sam, int64_t sak, const uint16_t *b, int64_t sk, int64_t sn,
               uint16_t *scratch, void *c, int64_t ldc, int64_t m, int64_t n, int64_t k, float alpha, int accumulate,
               int mode) {
    (void)a, (void)sam, (void)sak, (void)b, (void)sk, (void)sn, (void)scratch, (void)c, (void)ldc, (void)m, (void)n, (void)k,
        (void)alpha, (void)accumulate, (void)mode;
    return 0;
}
#endif

/* The causal attention of packed sequences (long padding-free batches): its own file, this translation unit. */
#include "packed_attention.c"
#include "packed_attention_f32.c"
#include "nf4.c"

int slmops_kernels_version(void) { return 12; }
