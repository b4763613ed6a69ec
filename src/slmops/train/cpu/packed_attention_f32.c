/* Causal attention of packed sequences in fp32 on AVX2 + FMA: packed_attention.c's function for
 * CPUs without AVX512-BF16 (AMD Zen 2/3, Intel before Cooper Lake), where the fast path trains in
 * fp32 (a bf16 matmul there runs tens of times slower). Part of kernels.c's translation unit
 * (included at its end), its own file for its own instruction set.
 *
 * On such a CPU the long padding-free batches' attention otherwise runs in SDPA's fp32 flash kernel,
 * one call per sequence: 25% of a long-document step (tiny codes, 512-1,023 tokens) on a Zen 3 EPYC,
 * at 35-60 GFLOP/s where its fp32 matmuls make 130-170. Same layout and plan as the bf16 kernel:
 * rows of q (N, H, D), k and v (N, Hkv, D) fp32, sequence s in rows [offsets[s], offsets[s + 1]),
 * each attending causally to itself only; the unit of work one (sequence, key/value head), its K and
 * V packed once for every query head of the group; queries in blocks of FB_BQ rows against the keys
 * they see, so the softmax is exact per block and nothing past the diagonal's 16 columns is computed.
 * The forward keeps each row's log-sum-exp, the backward recomputes P from it. Everything stays
 * fp32 (no rounding of P or dS): the results match SDPA's fp32 kernel to ~1e-6.
 *
 * The products run on one register-blocked micro-kernel (fb_mm): 6 rows of A by a panel of 16
 * columns of B, 12 ymm accumulators, B packed in panels of 16 columns (k rows of 16 floats). Needs D
 * a multiple of 16. */
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

#define FB_BQ 48 /* query rows a block (a multiple of FB_MR): its scores, FB_BQ x length fp32, stay in L2 */
#define FB_MR 6  /* the micro-kernel's rows: 6 x 2 accumulators + 2 of B + 1 broadcast of the 16 ymm registers */

static inline int64_t fb_round16(int64_t x) { return (x + 15) / 16 * 16; }

/* The row stride of buffers with `lp` columns that C of fb_mm lands in: never a multiple of 4 KB,
 * whose rows share one set of the L1 cache (at lp = 1,024: dV^T's product 68 -> 89 GFLOP/s a core). */
static inline int64_t fb_ld(int64_t lp) { return (lp + 16) % 1024 ? lp + 16 : lp + 32; }

static inline __m256 fb_exp8(__m256 x) { /* exp16's polynomial (kernels.c), 8 lanes */
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.0f)), _mm256_set1_ps(88.0f));
    __m256 t = _mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f));
    __m256 n = _mm256_round_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 f = _mm256_sub_ps(t, n);
    __m256 p = _mm256_set1_ps(1.5403530393381609e-4f);
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.3333558146428443e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(9.6181291076284772e-3f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(5.5504108664821580e-2f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(2.4022650695910071e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(6.9314718055994531e-1f));
    p = _mm256_fmadd_ps(p, f, _mm256_set1_ps(1.0f));
    __m256i scale = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(scale));
}

static inline float fb_sum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

static inline float fb_max8(__m256 v) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

/* Lanes j .. j + 7 below `seen` (the keys a query row sees), as an all-ones / all-zeros mask. */
static inline __m256 fb_seen(int64_t seen, int64_t j) {
    __m256i lanes = _mm256_add_epi32(_mm256_set_epi32(7, 6, 5, 4, 3, 2, 1, 0), _mm256_set1_epi32((int)j));
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)seen), lanes));
}

/* C (rows, n) = alpha A @ B, or C += A @ B with `accumulate`: A (rows, k) row stride lda, B packed
 * in panels of 16 columns (panel p at b + p * pstride, k rows of 16 floats), n a multiple of 16.
 * Only A's and C's first `rows` rows are touched: a last partial group of FB_MR rows reads its rows
 * from `tail` (FB_MR x k), zero past them.
 * The micro-kernel makes the FMA units' peak only from L1: so k goes in chunks of FB_KC, and each
 * panel's chunk (16 KB) serves every row group while it is there (first version, panel-major per row
 * group: 18-30 GFLOP/s a core on the attention's shapes, B streaming from L2; this order 60-80). */
#define FB_KC 256
static void fb_mm(const float *a, int64_t lda, int64_t rows, const float *b, int64_t pstride, int64_t k, int64_t n, float *c,
                  int64_t ldc, float alpha, int accumulate, float *tail) {
    __m256 vscale = _mm256_set1_ps(alpha);
    int64_t full = rows / FB_MR * FB_MR, partial = rows - full;
    if (partial) {
        for (int64_t r = 0; r < partial; r++) memcpy(tail + r * k, a + (full + r) * lda, (size_t)k * 4);
        memset(tail + partial * k, 0, (size_t)((FB_MR - partial) * k) * 4);
    }
    for (int64_t k0 = 0; k0 < k; k0 += FB_KC) {
        int64_t kc = k - k0 < FB_KC ? k - k0 : FB_KC;
        int load = accumulate || k0 > 0, scaled = !accumulate && k0 + kc >= k;
        for (int64_t p = 0; p < n / 16; p++) {
            const float *bp = b + p * pstride + k0 * 16;
            for (int64_t row = 0; row < rows; row += FB_MR) {
                int64_t valid = row < full ? FB_MR : partial, stride = row < full ? lda : k;
                const float *ar = (row < full ? a + row * lda : tail) + k0;
                float *cp = c + row * ldc + p * 16;
                __m256 acc[FB_MR][2];
                for (int i = 0; i < FB_MR; i++) {
                    int keep = load && i < valid;
                    acc[i][0] = keep ? _mm256_loadu_ps(cp + i * ldc) : _mm256_setzero_ps();
                    acc[i][1] = keep ? _mm256_loadu_ps(cp + i * ldc + 8) : _mm256_setzero_ps();
                }
                for (int64_t kk = 0; kk < kc; kk++) {
                    __m256 b0 = _mm256_loadu_ps(bp + kk * 16), b1 = _mm256_loadu_ps(bp + kk * 16 + 8);
                    for (int i = 0; i < FB_MR; i++) {
                        __m256 x = _mm256_broadcast_ss(ar + i * stride + kk);
                        acc[i][0] = _mm256_fmadd_ps(x, b0, acc[i][0]);
                        acc[i][1] = _mm256_fmadd_ps(x, b1, acc[i][1]);
                    }
                }
                for (int i = 0; i < valid; i++) {
                    _mm256_storeu_ps(cp + i * ldc, scaled ? _mm256_mul_ps(acc[i][0], vscale) : acc[i][0]);
                    _mm256_storeu_ps(cp + i * ldc + 8, scaled ? _mm256_mul_ps(acc[i][1], vscale) : acc[i][1]);
                }
            }
        }
    }
}

/* A sequence's keys (or values): the `pre` rows of the shared prefix at `prefix_rows` (none: pre 0),
 * then its own rows at `x`; key j's row. */
static inline const float *fb_key_row(const float *prefix_rows, int64_t pre, const float *x, int64_t stride, int64_t j) {
    return j < pre ? prefix_rows + j * stride : x + (j - pre) * stride;
}

/* B = X^T (k = dim, n = keys) for S = Q K^T and dP = dO V^T: panel of keys j .. j + 15, its row d
 * X[j .. j + 15, d] (X: the prefix's `pre` rows, then `x`'s); keys past `length` (up to its round16) zero. */
static void fb_pack_transposed(const float *prefix_rows, int64_t pre, const float *x, int64_t stride, int64_t dim, int64_t length,
                               float *out) {
    for (int64_t j = 0; j < fb_round16(length); j++) {
        float *panel = out + (j / 16) * dim * 16 + j % 16;
        const float *row = j < length ? fb_key_row(prefix_rows, pre, x, stride, j) : 0;
        for (int64_t d = 0; d < dim; d++) panel[d * 16] = row ? row[d] : 0.0f;
    }
}

/* B = X (k = keys, n = dim) for O = P V and dQ = dS K: panel of columns d .. d + 15 (lp rows apart),
 * its row j X[j, d .. d + 15] (X as above); rows past `length` (up to its round16) zero. */
static void fb_pack(const float *prefix_rows, int64_t pre, const float *x, int64_t stride, int64_t dim, int64_t length, int64_t lp,
                    float *out) {
    for (int64_t j = 0; j < fb_round16(length); j++)
        for (int64_t d = 0; d < dim; d += 16) {
            float *to = out + (d / 16) * lp * 16 + j * 16;
            if (j < length) memcpy(to, fb_key_row(prefix_rows, pre, x, stride, j) + d, 64);
            else memset(to, 0, 64);
        }
}

/* out (dim, FB_BQ) = a block's rows transposed (rows of x, row stride `stride`), zero past `rows`. */
static void fb_transpose_block(const float *x, int64_t stride, int64_t rows, int64_t dim, float *out) {
    for (int64_t d = 0; d < dim; d++)
        for (int64_t r = 0; r < FB_BQ; r++) out[d * FB_BQ + r] = r < rows ? x[r * stride + d] : 0.0f;
}

/* Per-thread buffers, for sequences up to `lp` (a multiple of 16) tokens and head size `dim`. */
typedef struct {
    float *kt, *vt, *kn, *vn, *s, *dp, *p, *pk, *dsk, *o, *dot, *qt, *dkt, *dvt, *tail;
} fb_scratch;

static int fb_alloc(fb_scratch *w, int64_t lp, int64_t dim, int backward) {
    memset(w, 0, sizeof *w);
    size_t kv = (size_t)(fb_ld(lp) * dim) * 4, blk = (size_t)(FB_BQ * fb_ld(lp)) * 4, wide = (size_t)(lp > dim ? lp : dim);
    w->kt = aligned_alloc(64, kv), w->s = aligned_alloc(64, blk), w->p = aligned_alloc(64, blk);
    w->tail = calloc((size_t)FB_MR * (wide > FB_BQ ? wide : FB_BQ), 4);
    int ready = w->kt && w->s && w->p && w->tail;
    if (!backward) { /* V for O = P V, and O's block */
        w->vn = aligned_alloc(64, kv), w->o = aligned_alloc(64, (size_t)(FB_BQ * dim) * 4);
        return ready && w->vn && w->o;
    }
    /* V^T for dP, K for dQ, dP, P and dS in panels of keys, the block transposes, dK^T and dV^T (p holds dS) */
    w->vt = aligned_alloc(64, kv), w->kn = aligned_alloc(64, kv), w->dp = aligned_alloc(64, blk);
    w->pk = aligned_alloc(64, blk), w->dsk = aligned_alloc(64, blk);
    w->dot = aligned_alloc(64, (size_t)(dim * FB_BQ) * 4), w->qt = aligned_alloc(64, (size_t)(dim * FB_BQ) * 4);
    w->dkt = aligned_alloc(64, kv), w->dvt = aligned_alloc(64, kv);
    return ready && w->vt && w->kn && w->dp && w->pk && w->dsk && w->dot && w->qt && w->dkt && w->dvt;
}

static void fb_free(fb_scratch *w) {
    void *all[] = {w->kt, w->vt, w->kn, w->vn, w->s, w->dp, w->p, w->pk, w->dsk, w->o, w->dot, w->qt, w->dkt, w->dvt, w->tail};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) free(all[i]);
}

/* The most keys a sequence attends to: its own tokens, and the shared prefix's for sequences after the first. */
static int64_t fb_longest(const int64_t *offsets, int64_t sequences, int64_t prefix) {
    int64_t longest = 0;
    for (int64_t s = 0; s < sequences; s++) {
        int64_t keys = offsets[s + 1] - offsets[s] + (s > 0 ? prefix : 0);
        if (keys > longest) longest = keys;
    }
    return longest;
}

/* 1: this build has the fp32 packed attention (AVX2 + FMA). */
int fa_f32_available(void) { return 1; }

/* out (N, H, D) fp32 and lse (N, H) fp32 (each query row's log-sum-exp of its scaled scores). With a
 * shared `prefix` (a batch packed with the prefix its examples share once: attention.Packing.prefix),
 * the sequences after the first also attend to rows 0 .. prefix - 1 (the first sequence's first
 * rows) before their own: their keys are the prefix's, then their own, causally. 0 on a failed
 * allocation or a head size it does not take. */
int fa_forward_f32(const float *q, const float *k, const float *v, const int64_t *offsets, int64_t sequences, int64_t heads,
                   int64_t kv_heads, int64_t dim, float scale, int64_t prefix, float *out, float *lse) {
    if (dim % 16 || dim <= 0 || heads % kv_heads || prefix < 0 || (sequences > 0 && prefix > offsets[1] - offsets[0])) return 0;
    int64_t lp = fb_round16(fb_longest(offsets, sequences, prefix)), ld = fb_ld(lp), group = heads / kv_heads;
    int64_t sq = heads * dim, skv = kv_heads * dim, units = sequences * kv_heads;
    int failed = 0;
    #pragma omp parallel reduction(| : failed)
    {
        fb_scratch w;
        int ready = fb_alloc(&w, lp, dim, 0);
        failed |= !ready;
        __m256 vscale = _mm256_set1_ps(scale), zero = _mm256_setzero_ps();
        #pragma omp for schedule(dynamic, 1) /* every thread takes part (the loop's barrier), a failed one idle */
        for (int64_t unit = 0; unit < units; unit++) {
            int64_t seq = unit / kv_heads, g = unit % kv_heads, first = offsets[seq], length = offsets[seq + 1] - first;
            int64_t pre = seq > 0 ? prefix : 0; /* the shared prefix's keys, before the sequence's own */
            if (!ready || length <= 0) continue;
            fb_pack_transposed(k + g * dim, pre, k + first * skv + g * dim, skv, dim, pre + length, w.kt);
            fb_pack(v + g * dim, pre, v + first * skv + g * dim, skv, dim, pre + length, lp, w.vn);
            for (int64_t h = g * group; h < (g + 1) * group; h++)
                for (int64_t r0 = 0; r0 < length; r0 += FB_BQ) {
                    int64_t rows = length - r0 < FB_BQ ? length - r0 : FB_BQ, keys = fb_round16(pre + r0 + rows);
                    fb_mm(q + (first + r0) * sq + h * dim, sq, rows, w.kt, dim * 16, dim, keys, w.s, ld, 1.0f, 0, w.tail);
                    float inv[FB_BQ];
                    for (int64_t r = 0; r < rows; r++) { /* exp(scores - max), unnormalized, zero past the diagonal */
                        int64_t seen = pre + r0 + r + 1;
                        const float *srow = w.s + r * ld;
                        float *prow = w.p + r * ld;
                        __m256 vmax = _mm256_set1_ps(-INFINITY);
                        for (int64_t j = 0; j < seen; j += 8)
                            vmax = _mm256_max_ps(vmax, _mm256_blendv_ps(_mm256_set1_ps(-INFINITY), _mm256_loadu_ps(srow + j), fb_seen(seen, j)));
                        float top = fb_max8(vmax) * scale; /* (scale > 0) */
                        __m256 vtop = _mm256_set1_ps(top), vsum = zero;
                        for (int64_t j = 0; j < keys; j += 8) {
                            __m256 e = _mm256_blendv_ps(zero, fb_exp8(_mm256_fmsub_ps(_mm256_loadu_ps(srow + j), vscale, vtop)), fb_seen(seen, j));
                            _mm256_storeu_ps(prow + j, e);
                            vsum = _mm256_add_ps(vsum, e);
                        }
                        float sum = fb_sum8(vsum);
                        inv[r] = 1.0f / sum;
                        lse[(first + r0 + r) * heads + h] = top + logf(sum);
                    }
                    /* O = (exp P) V, each row divided by its sum on the way out */
                    fb_mm(w.p, ld, rows, w.vn, lp * 16, keys, dim, w.o, dim, 1.0f, 0, w.tail);
                    for (int64_t r = 0; r < rows; r++) {
                        float *orow = out + (first + r0 + r) * sq + h * dim;
                        __m256 vinv = _mm256_set1_ps(inv[r]);
                        for (int64_t d = 0; d < dim; d += 8) _mm256_storeu_ps(orow + d, _mm256_mul_ps(_mm256_loadu_ps(w.o + r * dim + d), vinv));
                    }
                }
        }
        fb_free(&w);
    }
    return !failed;
}

/* dq (N, H, D), dk and dv (N, Hkv, D) fp32 from grad (N, H, D) = dL/d out and the forward's q, k, v,
 * out and lse, with the forward's `prefix`. The prefix's keys and values gather the gradients of every
 * sequence that attends to them: each later sequence's part goes to its own slot of a buffer, added to
 * rows 0 .. prefix - 1 in sequence order after all have run (the same sums whatever the threads).
 * 0 as fa_forward_f32. */
int fa_backward_f32(const float *grad, const float *q, const float *k, const float *v, const float *out, const float *lse,
                    const int64_t *offsets, int64_t sequences, int64_t heads, int64_t kv_heads, int64_t dim, float scale,
                    int64_t prefix, float *dq, float *dk, float *dv) {
    if (dim % 16 || dim <= 0 || heads % kv_heads || prefix < 0 || (sequences > 0 && prefix > offsets[1] - offsets[0])) return 0;
    int64_t lp = fb_round16(fb_longest(offsets, sequences, prefix)), ld = fb_ld(lp), group = heads / kv_heads;
    int64_t sq = heads * dim, skv = kv_heads * dim, units = sequences * kv_heads;
    /* the later sequences' parts of the prefix's dK and dV: (sequence, prefix row, Hkv * D) each */
    size_t parts = prefix > 0 && sequences > 1 ? (size_t)(sequences * prefix * skv) : 0;
    float *prefix_dk = parts ? malloc(parts * 4) : 0, *prefix_dv = parts ? malloc(parts * 4) : 0;
    if (parts && !(prefix_dk && prefix_dv)) {
        free(prefix_dk), free(prefix_dv);
        return 0;
    }
    int failed = 0;
    #pragma omp parallel reduction(| : failed)
    {
        fb_scratch w;
        int ready = fb_alloc(&w, lp, dim, 1);
        failed |= !ready;
        __m256 vscale = _mm256_set1_ps(scale), zero = _mm256_setzero_ps();
        #pragma omp for schedule(dynamic, 1) /* every thread takes part (the loop's barrier), a failed one idle */
        for (int64_t unit = 0; unit < units; unit++) {
            int64_t seq = unit / kv_heads, g = unit % kv_heads, first = offsets[seq], length = offsets[seq + 1] - first;
            int64_t pre = seq > 0 ? prefix : 0;
            if (!ready || length <= 0) continue;
            fb_pack_transposed(k + g * dim, pre, k + first * skv + g * dim, skv, dim, pre + length, w.kt);
            fb_pack_transposed(v + g * dim, pre, v + first * skv + g * dim, skv, dim, pre + length, w.vt);
            fb_pack(k + g * dim, pre, k + first * skv + g * dim, skv, dim, pre + length, lp, w.kn);
            memset(w.dkt, 0, (size_t)(dim * ld) * 4);
            memset(w.dvt, 0, (size_t)(dim * ld) * 4);
            for (int64_t h = g * group; h < (g + 1) * group; h++)
                for (int64_t r0 = 0; r0 < length; r0 += FB_BQ) {
                    int64_t rows = length - r0 < FB_BQ ? length - r0 : FB_BQ, keys = fb_round16(pre + r0 + rows);
                    const float *qb = q + (first + r0) * sq + h * dim, *gb = grad + (first + r0) * sq + h * dim;
                    fb_mm(qb, sq, rows, w.kt, dim * 16, dim, keys, w.s, ld, 1.0f, 0, w.tail);
                    fb_mm(gb, sq, rows, w.vt, dim * 16, dim, keys, w.dp, ld, 1.0f, 0, w.tail);
                    /* P and dS = P (dP - rowsum(dO * O)): dS row-major (w.p) for dQ, both in panels of 16 keys
                     * (row r of panel j / 16 at ((j / 16) * FB_BQ + r) * 16) for dV and dK; rows past the block zero */
                    for (int64_t r = 0; r < FB_BQ; r++) {
                        if (r >= rows) {
                            for (int64_t j = 0; j < keys; j += 16) {
                                memset(w.pk + ((j / 16) * FB_BQ + r) * 16, 0, 64);
                                memset(w.dsk + ((j / 16) * FB_BQ + r) * 16, 0, 64);
                            }
                            continue;
                        }
                        int64_t t = first + r0 + r, seen = pre + r0 + r + 1;
                        const float *orow = out + t * sq + h * dim, *grow = grad + t * sq + h * dim;
                        __m256 vd = zero;
                        for (int64_t d = 0; d < dim; d += 8) vd = _mm256_fmadd_ps(_mm256_loadu_ps(orow + d), _mm256_loadu_ps(grow + d), vd);
                        __m256 dsum = _mm256_set1_ps(fb_sum8(vd)), vl = _mm256_set1_ps(lse[t * heads + h]);
                        const float *srow = w.s + r * ld, *dprow = w.dp + r * ld;
                        for (int64_t j = 0; j < keys; j += 8) {
                            __m256 p = _mm256_blendv_ps(zero, fb_exp8(_mm256_fmsub_ps(_mm256_loadu_ps(srow + j), vscale, vl)), fb_seen(seen, j));
                            __m256 ds = _mm256_mul_ps(p, _mm256_sub_ps(_mm256_loadu_ps(dprow + j), dsum));
                            int64_t at = ((j / 16) * FB_BQ + r) * 16 + j % 16;
                            _mm256_storeu_ps(w.p + r * ld + j, ds);
                            _mm256_storeu_ps(w.pk + at, p);
                            _mm256_storeu_ps(w.dsk + at, ds);
                        }
                    }
                    /* dQ = scale dS K */
                    fb_mm(w.p, ld, rows, w.kn, lp * 16, keys, dim, dq + (first + r0) * sq + h * dim, sq, scale, 0, w.tail);
                    /* dV^T += dO^T P and dK^T += Q^T dS (scaled at the end): the block's rows are the inner size */
                    fb_transpose_block(gb, sq, rows, dim, w.dot);
                    fb_transpose_block(qb, sq, rows, dim, w.qt);
                    fb_mm(w.dot, FB_BQ, dim, w.pk, FB_BQ * 16, FB_BQ, keys, w.dvt, ld, 1.0f, 1, w.tail);
                    fb_mm(w.qt, FB_BQ, dim, w.dsk, FB_BQ * 16, FB_BQ, keys, w.dkt, ld, 1.0f, 1, w.tail);
                }
            for (int64_t j = 0; j < pre + length; j++) { /* key j: a prefix row's part to the buffer, an own row's in place */
                int64_t at = j < pre ? (seq * prefix + j) * skv + g * dim : (first + j - pre) * skv + g * dim;
                float *dkr = (j < pre ? prefix_dk : dk) + at, *dvr = (j < pre ? prefix_dv : dv) + at;
                for (int64_t d = 0; d < dim; d++) {
                    dkr[d] = scale * w.dkt[d * ld + j];
                    dvr[d] = w.dvt[d * ld + j];
                }
            }
        }
        fb_free(&w);
    }
    if (parts && !failed) { /* rows 0 .. prefix - 1 (written by the first sequence's units) += every later sequence's part */
        #pragma omp parallel for schedule(static)
        for (int64_t j = 0; j < prefix; j++)
            for (int64_t seq = 1; seq < sequences; seq++) {
                const float *pk = prefix_dk + (seq * prefix + j) * skv, *pv = prefix_dv + (seq * prefix + j) * skv;
                float *dkr = dk + j * skv, *dvr = dv + j * skv;
                if (offsets[seq + 1] > offsets[seq])
                    for (int64_t c = 0; c < skv; c++) dkr[c] += pk[c], dvr[c] += pv[c];
            }
    }
    free(prefix_dk), free(prefix_dv);
    return !failed;
}

#else
int fa_f32_available(void) { return 0; }
int fa_forward_f32(const float *q, const float *k, const float *v, const int64_t *offsets, int64_t sequences, int64_t heads,
                   int64_t kv_heads, int64_t dim, float scale, int64_t prefix, float *out, float *lse) {
    (void)q, (void)k, (void)v, (void)offsets, (void)sequences, (void)heads, (void)kv_heads, (void)dim, (void)scale, (void)prefix,
        (void)out, (void)lse;
    return 0;
}
int fa_backward_f32(const float *grad, const float *q, const float *k, const float *v, const float *out, const float *lse,
                    const int64_t *offsets, int64_t sequences, int64_t heads, int64_t kv_heads, int64_t dim, float scale,
                    int64_t prefix, float *dq, float *dk, float *dv) {
    (void)prefix, (void)grad, (void)q, (void)k, (void)v, (void)out, (void)lse, (void)offsets, (void)sequences, (void)heads, (void)kv_heads,
        (void)dim, (void)scale, (void)dq, (void)dk, (void)dv;
    return 0;
}
#endif
