/* Fused elementwise kernels for CPU training (see cpu_kernels.py).

   Each kernel replaces a chain of PyTorch ops that each read and write the whole tensor:
   one pass over memory instead of five to ten, and no per-op dispatch. Math is fp32; bf16
   tensors are converted on load and rounded to nearest-even once, on store; the PyTorch ops
   they replace round intermediate results too, so the two agree to bf16 precision (about
   one unit in the last place), not bit for bit. (Rounding intermediates here as well made
   GCC's vector code of these loops ~8x slower.)

   Plain C with OpenMP (the same libgomp PyTorch loads, resolved by soname), no PyTorch
   headers: it compiles in well under a second. Called through ctypes on contiguous
   tensors' data pointers. Every function exists for bf16 (suffix _bf16) and fp32 (_f32). */

#include <math.h>
#include <stdint.h>
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
    /* dx = inv_rms * (g - x_hat * mean(g * x_hat)), g = grad * w, x_hat = x * inv_rms (weight frozen). */      \
    void rmsnorm_bwd_##S(const T *grad, const T *x, const T *w, const float *inv_rms, T *dx, int64_t rows,      \
                         int64_t cols) {                                                                        \
        _Pragma("omp parallel for schedule(static) if (rows * cols >= PARALLEL_MIN)")                          \
        for (int64_t r = 0; r < rows; r++) {                                                                    \
            const T *gr = grad + r * cols, *xr = x + r * cols;                                                  \
            T *dr = dx + r * cols;                                                                              \
            float inv = inv_rms[r], dot = 0.0f;                                                                 \
            _Pragma("omp simd reduction(+ : dot)")                                                              \
            for (int64_t c = 0; c < cols; c++)                                                                  \
                dot += LOAD_##S(gr, c) * LOAD_##S(w, c) * LOAD_##S(xr, c);                                      \
            float mean = dot * inv / (float)cols;                                                               \
            for (int64_t c = 0; c < cols; c++)                                                                  \
                STORE_##S(dr, c, inv * (LOAD_##S(gr, c) * LOAD_##S(w, c) - LOAD_##S(xr, c) * inv * mean));      \
        }                                                                                                       \
    }                                                                                                           \
                                                                                                                \
    /* out = silu(gate) * up: act_fn(gate_proj(x)) * up_proj(x) of a SwiGLU MLP. */          \
    void swiglu_fwd_##S(const T *gate, const T *up, T *out, int64_t n) {                                        \
        _Pragma("omp parallel for simd schedule(static) if (n >= PARALLEL_MIN)")                                \
        for (int64_t i = 0; i < n; i++) {                                                                       \
            float g = LOAD_##S(gate, i);                                                                        \
            STORE_##S(out, i, g * sigmoid_f32(g) * LOAD_##S(up, i));                                 \
        }                                                                                                       \
    }                                                                                                           \
                                                                                                                \
    /* d_up = grad * silu(gate); d_gate = grad * up * silu'(gate). */                             \
    void swiglu_bwd_##S(const T *grad, const T *gate, const T *up, T *d_gate, T *d_up, int64_t n) {            \
        _Pragma("omp parallel for simd schedule(static) if (n >= PARALLEL_MIN)")                                \
        for (int64_t i = 0; i < n; i++) {                                                                       \
            float g = LOAD_##S(gate, i), d = LOAD_##S(grad, i);                                                 \
            float s = sigmoid_f32(g);                                                                           \
            STORE_##S(d_up, i, d * g * s);                                                           \
            STORE_##S(d_gate, i, d * LOAD_##S(up, i) * s * (1.0f + g * (1.0f - s)));                 \
        }                                                                                                       \
    }                                                                                                           \
                                                                                                                \
    /* out[j] = x with the flat positions dropped[] of the (k, numel) output zeroed: the k dropout copies of  \
       one input that a group of LoRA adapters reads (fast_lora.py). */                                       \
    void dropped_copies_##S(const T *x, T *out, int64_t k, int64_t numel, const int64_t *dropped, int64_t n) {  \
        for (int64_t j = 0; j < k; j++)                                                                         \
            memcpy(out + j * numel, x, (size_t)numel * sizeof(T));                                              \
        for (int64_t m = 0; m < n; m++)                                                                         \
            out[dropped[m]] = 0;                                                                                \
    }                                                                                                           \
                                                                                                                \
    /* dx (+)= sum over j of parts[j], with the flat positions dropped[] of parts (k, numel) zeroed first: the  \
       input gradient of k dropout-masked LoRA adapters. */                                                   \
    void masked_sum_##S(T *dx, T *parts, int64_t k, int64_t numel, const int64_t *dropped, int64_t n,           \
                        int accumulate) {                                                                       \
        for (int64_t m = 0; m < n; m++)                                                                         \
            parts[dropped[m]] = 0;                                                                              \
        _Pragma("omp parallel for simd schedule(static) if (numel >= PARALLEL_MIN)")                            \
        for (int64_t i = 0; i < numel; i++) {                                                                   \
            float v = accumulate ? LOAD_##S(dx, i) : 0.0f;                                                      \
            for (int64_t j = 0; j < k; j++)                                                                     \
                v += LOAD_##S(parts, j * numel + i);                                                            \
            STORE_##S(dx, i, v);                                                                                \
        }                                                                                                       \
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
                                                                                                                \
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

/* The version the Python side expects; bumped with any change of signature. */
int slmops_kernels_version(void) { return 3; }
