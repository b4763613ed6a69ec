/* Causal attention of packed sequences, for the CPU fast path's long padding-free batches
 * (attention.PackedAttentionFunction). Part of kernels.c's translation unit (included at its end:
 * it uses that file's packing, tile and vector helpers); its own file for its own subject.
 *
 * Training on long documents (512-1,024 tokens) spent ~45% of a step in attention, most of it in
 * PyTorch's CPU flash backward (~130 GFLOP/s on 2 cores, where the AMX tiles reach ~2,000 on the
 * projections). Here both directions, for a padding-free batch: rows of q (N, H, D), k and v
 * (N, Hkv, D) bf16, sequence s in rows [offsets[s], offsets[s + 1]), each attending causally to
 * itself only. The products run on AMX tiles where the CPU has them (`tiles`), else on AVX512-BF16
 * dot products (the same pair layout of B, 8 rows x 32 columns of accumulators in registers).
 * The unit of work is one (sequence, key/value head): its K and V are packed into the pair layout
 * once and serve every query head of the group (grouped-query attention), and the backward
 * accumulates that head's dK and dV without sharing them.
 * Queries go in blocks of FA_BQ rows against all the keys they see (the causal prefix), so the
 * softmax is exact per block (no running rescale) and no score past the diagonal's block is
 * computed; the block's scores (FA_BQ x length fp32) stay in cache. The forward keeps each row's
 * log-sum-exp; the backward recomputes P from it (as flash attention does) and needs O for
 * D = rowsum(dO * O). P and dS are rounded to bf16 for their products, as GPUs' flash kernels
 * do; every product accumulates in fp32. Needs D a multiple of 32 (the tiles' k step).
 * What is not a product (the exponentials, the masks, the layouts) costs about as much as the
 * products on the tiles, so it is done in as few passes as possible: scores and dP leave the
 * products straight into their buffers (the scale is applied in the exponential), dV^T and dK^T
 * accumulate in place, and the backward writes P directly in the pair layout. */
#if AVX512_BF16_bf16
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
#define FA_TILES 1
#else
#define FA_TILES 0
#endif
#define FA_BQ 32

static inline int64_t fa_round32(int64_t x) { return (x + 31) / 32 * 32; }
static inline __mmask16 fa_mask(int64_t left) { return left <= 0 ? 0 : left >= 16 ? 0xffff : (__mmask16)((1u << left) - 1); }

#if FA_TILES
/* C (rows, n) fp32 (+)= A (rows, k) @ B: B packed by amx_pack with kp pair rows a panel, of which
 * the first k / 2 are used (a prefix of B's rows); k and n multiples of 32. C holds whole 16-row
 * tiles (row stride ldc), and past `rows` of A (the last block of a sequence) its rows are
 * garbage: A's rows there are copied into `tail` (16 x k) so nothing past them is read. */
static void fa_tile_f32(const uint16_t *a, int64_t lda, int64_t rows, const uint16_t *packed, int64_t kp, int64_t k,
                           int64_t n, float *c, int64_t ldc, int accumulate, uint16_t *tail) {
    for (int64_t row = 0; row < rows; row += 16) {
        const uint16_t *ar = a + row * lda;
        int64_t stride = lda * 2;
        if (rows - row < 16) {
            for (int64_t r = 0; r < rows - row; r++) memcpy(tail + r * k, ar + r * lda, (size_t)k * 2);
            ar = tail;
            stride = k * 2;
        }
        for (int64_t p = 0; p < n / 16; p += 2) {
            float *cp = c + row * ldc + p * 16;
            const uint16_t *b0 = packed + p * kp * 32, *b1 = b0 + kp * 32;
            if (accumulate) {
                _tile_loadd(0, cp, ldc * 4);
                _tile_loadd(1, cp + 16, ldc * 4);
            } else {
                _tile_zero(0);
                _tile_zero(1);
            }
            for (int64_t kk = 0; kk < k; kk += 32) {
                _tile_loadd(2, ar + kk, stride);
                _tile_loadd(4, b0 + kk * 16, 64);
                _tile_loadd(5, b1 + kk * 16, 64);
                _tile_dpbf16ps(0, 2, 4);
                _tile_dpbf16ps(1, 2, 5);
            }
            _tile_stored(0, cp, ldc * 4);
            _tile_stored(1, cp + 16, ldc * 4);
        }
    }
}

/* C (rows, n) bf16 = alpha * A @ B, as fa_product_f32 but rounded into C's first `rows` rows only
 * (an output tensor's rows: past them is the next sequence). */
static void fa_tile_bf16(const uint16_t *a, int64_t lda, int64_t rows, const uint16_t *packed, int64_t kp, int64_t k,
                            int64_t n, uint16_t *c, int64_t ldc, float alpha, uint16_t *tail, float *acc) {
    for (int64_t row = 0; row < rows; row += 16)
        for (int64_t p = 0; p < n / 16; p += 2)
            amx_block(a, lda, packed, kp, k, p, 1, row, rows - row < 16 ? rows - row : 16, c, ldc, n, alpha, 0, AMX_OUT_BF16,
                      tail, acc);
}
#endif

/* The same products on AVX512-BF16 dot products (CPUs without tiles: AMD Zen 4/5, Intel before
 * Sapphire Rapids with AVX512-BF16): per block of 8 rows of A and a pair of B's panels, 16
 * accumulators (8 rows x 32 fp32) stay in registers while B's pair rows stream past, each one
 * (16 columns x 2 k) a single vector; A's pair of k for a row is broadcast to all lanes. Partial
 * blocks read A's rows from `tail`, so nothing past `rows` is read. Stores `rows` rows of C
 * (fp32: whole blocks of 8 rows, as the tiles store 16; bf16: exactly `rows`, times alpha). */
static void fa_vec(const uint16_t *a, int64_t lda, int64_t rows, const uint16_t *packed, int64_t kp, int64_t k, int64_t n,
                   void *c, int64_t ldc, float alpha, int accumulate, int bf16_out, uint16_t *tail) {
    __m512 scale = _mm512_set1_ps(alpha);
    for (int64_t row = 0; row < rows; row += 8) {
        const uint16_t *ar = a + row * lda;
        int64_t stride = lda, valid = rows - row < 8 ? rows - row : 8;
        if (valid < 8) {
            for (int64_t r = 0; r < valid; r++) memcpy(tail + r * k, ar + r * lda, (size_t)k * 2);
            memset(tail + valid * k, 0, (size_t)((8 - valid) * k) * 2);
            ar = tail;
            stride = k;
        }
        for (int64_t p = 0; p < n / 16; p += 2) {
            const uint16_t *b0 = packed + p * kp * 32, *b1 = b0 + kp * 32;
            __m512 c0[8], c1[8];
            for (int i = 0; i < 8; i++) {
                const float *cr = (const float *)c + (row + i) * ldc + p * 16;
                c0[i] = accumulate ? _mm512_loadu_ps(cr) : _mm512_setzero_ps();
                c1[i] = accumulate ? _mm512_loadu_ps(cr + 16) : _mm512_setzero_ps();
            }
            for (int64_t r = 0; r < k / 2; r++) {
                __m512bh v0 = (__m512bh)_mm512_loadu_si512(b0 + r * 32), v1 = (__m512bh)_mm512_loadu_si512(b1 + r * 32);
                for (int i = 0; i < 8; i++) {
                    int32_t pair;
                    memcpy(&pair, ar + i * stride + 2 * r, 4);
                    __m512bh x = (__m512bh)_mm512_set1_epi32(pair);
                    c0[i] = _mm512_dpbf16_ps(c0[i], x, v0);
                    c1[i] = _mm512_dpbf16_ps(c1[i], x, v1);
                }
            }
            for (int i = 0; i < 8; i++) {
                if (bf16_out) {
                    if (i >= valid) break;
                    uint16_t *cr = (uint16_t *)c + (row + i) * ldc + p * 16;
                    storen_bf16(cr, 0xffff, _mm512_mul_ps(c0[i], scale));
                    storen_bf16(cr + 16, 0xffff, _mm512_mul_ps(c1[i], scale));
                } else {
                    float *cr = (float *)c + (row + i) * ldc + p * 16;
                    _mm512_storeu_ps(cr, c0[i]);
                    _mm512_storeu_ps(cr + 16, c1[i]);
                }
            }
        }
    }
}

/* C (rows, n) fp32 (+)= A (rows, k) @ B and C (rows, n) bf16 = alpha A @ B, on the tiles or the vectors. */
static inline void fa_f32(int tiles, const uint16_t *a, int64_t lda, int64_t rows, const uint16_t *packed, int64_t kp, int64_t k,
                          int64_t n, float *c, int64_t ldc, int accumulate, uint16_t *tail) {
#if FA_TILES
    if (tiles) {
        fa_tile_f32(a, lda, rows, packed, kp, k, n, c, ldc, accumulate, tail);
        return;
    }
#endif
    (void)tiles;
    fa_vec(a, lda, rows, packed, kp, k, n, c, ldc, 1.0f, accumulate, 0, tail);
}
static inline void fa_bf16(int tiles, const uint16_t *a, int64_t lda, int64_t rows, const uint16_t *packed, int64_t kp, int64_t k,
                           int64_t n, uint16_t *c, int64_t ldc, float alpha, uint16_t *tail, float *acc) {
#if FA_TILES
    if (tiles) {
        fa_tile_bf16(a, lda, rows, packed, kp, k, n, c, ldc, alpha, tail, acc);
        return;
    }
#endif
    (void)tiles, (void)acc;
    fa_vec(a, lda, rows, packed, kp, k, n, c, ldc, alpha, 0, 1, tail);
}

/* B = X^T (k = dim, n = length) for S = Q K^T and dP = dO V^T: panels up to round32(length) / 16,
 * the one past the last row's panel zero. */
static void fa_pack_transposed(const uint16_t *x, int64_t stride, int64_t dim, int64_t length, uint16_t *out) {
    int64_t used = (length + 15) / 16, panels = fa_round32(length) / 16, kp = dim / 2;
    amx_pack(x, 1, stride, dim, length, 0, used, out);
    if (panels > used) memset(out + used * kp * 32, 0, (size_t)kp * 32 * sizeof(uint16_t));
}

/* out (dim, FA_BQ) = the block's rows (rows of x, row stride `stride`, zero past `rows`) transposed:
 * two output rows per pair of 32-bit gathers (elements d and d + 1 of 16 rows each), split by
 * truncating and shifting conversions. */
static void fa_transpose_block(const uint16_t *x, int64_t stride, int64_t rows, int64_t dim, uint16_t *out) {
    __m512i index = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                       _mm512_set1_epi32((int)(stride * 2)));
    __mmask16 m0 = fa_mask(rows), m1 = fa_mask(rows - 16);
    for (int64_t d = 0; d < dim; d += 2) {
        __m512i lo = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m0, index, x + d, 1);
        __m512i hi = m1 ? _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), m1, index, x + 16 * stride + d, 1)
                        : _mm512_setzero_si512();
        _mm256_storeu_si256((__m256i *)(out + d * FA_BQ), _mm512_cvtepi32_epi16(lo));
        _mm256_storeu_si256((__m256i *)(out + d * FA_BQ + 16), _mm512_cvtepi32_epi16(hi));
        _mm256_storeu_si256((__m256i *)(out + (d + 1) * FA_BQ), _mm512_cvtepi32_epi16(_mm512_srli_epi32(lo, 16)));
        _mm256_storeu_si256((__m256i *)(out + (d + 1) * FA_BQ + 16), _mm512_cvtepi32_epi16(_mm512_srli_epi32(hi, 16)));
    }
}

/* Per-thread buffers, for sequences up to `lp` (a multiple of 32) tokens and head size `dim`. */
typedef struct {
    uint16_t *kt, *vt, *kn, *vn, *p, *ds, *pk, *dsk, *dot, *qt, *tail;
    float *s, *dp, *dkt, *dvt, *acc;
} fa_scratch;

/* The buffers one direction uses (the rest stay NULL); 0 where one could not be allocated. */
static int fa_alloc(fa_scratch *w, int64_t lp, int64_t dim, int backward) {
    memset(w, 0, sizeof *w);
    size_t kv = (size_t)(lp * dim), blk = (size_t)(FA_BQ * lp);
    /* both: K^T for the scores, the block's scores and a second fp32 block (O, or dP), A's partial rows */
    w->kt = aligned_alloc(64, kv * 2);
    w->s = aligned_alloc(64, blk * 4), w->dp = aligned_alloc(64, blk * 4);
    w->tail = calloc((size_t)(16 * (lp > dim ? lp : dim)), 2);
    int ready = w->kt && w->s && w->dp && w->tail;
    if (!backward) { /* V for O = P V, and P */
        w->vn = aligned_alloc(64, kv * 2), w->p = aligned_alloc(64, blk * 2);
        return ready && w->vn && w->p;
    }
    /* V^T for dP, K for dQ, dS, P and dS in the pair layout, the block transposes, dK^T and dV^T, a tile */
    w->vt = aligned_alloc(64, kv * 2), w->kn = aligned_alloc(64, kv * 2);
    w->ds = aligned_alloc(64, blk * 2), w->pk = aligned_alloc(64, blk * 2), w->dsk = aligned_alloc(64, blk * 2);
    w->dot = aligned_alloc(64, (size_t)(dim * FA_BQ) * 2), w->qt = aligned_alloc(64, (size_t)(dim * FA_BQ) * 2);
    w->dkt = aligned_alloc(64, kv * 4), w->dvt = aligned_alloc(64, kv * 4);
    w->acc = aligned_alloc(64, 256 * 4);
    return ready && w->vt && w->kn && w->ds && w->pk && w->dsk && w->dot && w->qt && w->dkt && w->dvt && w->acc;
}

static void fa_free(fa_scratch *w) {
    void *all[] = {w->kt, w->vt, w->kn, w->vn, w->p, w->ds, w->pk, w->dsk, w->dot, w->qt, w->tail, w->s, w->dp, w->dkt, w->dvt, w->acc};
    for (size_t i = 0; i < sizeof all / sizeof *all; i++) free(all[i]);
}

/* A thread's start and end in fa_forward_bf16 / fa_backward_bf16: its buffers, and the tiles'
 * configuration where they are used. Returns 0 where the buffers could not be allocated. */
static int fa_thread_begin(fa_scratch *w, int64_t lp, int64_t dim, int backward, int tiles) {
    int ready = fa_alloc(w, lp, dim, backward);
#if FA_TILES
    if (ready && tiles) amx_configure(0);
#endif
    (void)tiles;
    return ready;
}

static void fa_thread_end(fa_scratch *w, int ready, int tiles) {
#if FA_TILES
    if (ready && tiles) _tile_release();
#endif
    (void)ready, (void)tiles;
    fa_free(w);
}

static int64_t fa_longest(const int64_t *offsets, int64_t sequences) {
    int64_t longest = 0;
    for (int64_t s = 0; s < sequences; s++)
        if (offsets[s + 1] - offsets[s] > longest) longest = offsets[s + 1] - offsets[s];
    return longest;
}

/* 1: this build has the packed attention (AVX512-BF16); `tiles` may be 1 where amx_available() is. */
int fa_available(void) { return 1; }

/* out (N, H, D) bf16 and lse (N, H) fp32 (the scaled scores' log-sum-exp per query row); the products
 * on AMX tiles with `tiles` (a build with them, the permission granted), else on AVX512-BF16. 0 on a
 * failed allocation or a head size it does not take. */
int fa_forward_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, const int64_t *offsets, int64_t sequences,
                    int64_t heads, int64_t kv_heads, int64_t dim, float scale, int tiles, uint16_t *out, float *lse) {
    if (dim % 32 || dim <= 0 || heads % kv_heads) return 0;
    int64_t lp = fa_round32(fa_longest(offsets, sequences)), group = heads / kv_heads;
    int64_t sq = heads * dim, skv = kv_heads * dim, units = sequences * kv_heads;
    int failed = 0;
    #pragma omp parallel reduction(| : failed)
    {
        fa_scratch w;
        int ready = fa_thread_begin(&w, lp, dim, 0, tiles);
        failed |= !ready;
        __m512 vscale = _mm512_set1_ps(scale);
        #pragma omp for schedule(dynamic, 1) /* every thread takes part (the loop's barrier), a failed one idle */
        for (int64_t unit = 0; unit < units; unit++) {
            int64_t seq = unit / kv_heads, g = unit % kv_heads, first = offsets[seq], length = offsets[seq + 1] - first;
            if (!ready || length <= 0) continue;
            fa_pack_transposed(k + first * skv + g * dim, skv, dim, length, w.kt);
            amx_pack(v + first * skv + g * dim, skv, 1, length, dim, 0, dim / 16, w.vn);
            int64_t kp_rows = fa_round32(length) / 2;
            for (int64_t h = g * group; h < (g + 1) * group; h++)
                for (int64_t r0 = 0; r0 < length; r0 += FA_BQ) {
                    int64_t rows = length - r0 < FA_BQ ? length - r0 : FA_BQ, keys = fa_round32(r0 + rows);
                    fa_f32(tiles, q + (first + r0) * sq + h * dim, sq, rows, w.kt, dim / 2, dim, keys, w.s, lp, 0, w.tail);
                    float inv[FA_BQ];
                    for (int64_t r = 0; r < rows; r++) { /* exp(scores - max), unnormalized, zero past the diagonal */
                        int64_t seen = r0 + r + 1; /* keys 0 .. r0 + r */
                        const float *srow = w.s + r * lp;
                        uint16_t *prow = w.p + r * lp;
                        __m512 vmax = _mm512_set1_ps(-INFINITY);
                        for (int64_t j = 0; j < seen; j += 16)
                            vmax = _mm512_max_ps(vmax, _mm512_mask_loadu_ps(_mm512_set1_ps(-INFINITY), fa_mask(seen - j), srow + j));
                        float top = _mm512_reduce_max_ps(vmax) * scale; /* (scale > 0) */
                        __m512 vtop = _mm512_set1_ps(top), vsum = _mm512_setzero_ps();
                        for (int64_t j = 0; j < keys; j += 16) {
                            __mmask16 m = fa_mask(seen - j);
                            __m512 e = _mm512_maskz_mov_ps(m, exp16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, srow + j), vscale, vtop)));
                            storen_bf16(prow + j, 0xffff, e);
                            vsum = _mm512_add_ps(vsum, e);
                        }
                        float sum = _mm512_reduce_add_ps(vsum);
                        inv[r] = 1.0f / sum;
                        lse[(first + r0 + r) * heads + h] = top + logf(sum);
                    }
                    /* O = (exp P) V, each row divided by its sum on the way out */
                    fa_f32(tiles, w.p, lp, rows, w.vn, kp_rows, keys, dim, w.dp, lp, 0, w.tail);
                    for (int64_t r = 0; r < rows; r++) {
                        uint16_t *orow = out + (first + r0 + r) * sq + h * dim;
                        __m512 vinv = _mm512_set1_ps(inv[r]);
                        for (int64_t d = 0; d < dim; d += 16) storen_bf16(orow + d, 0xffff, _mm512_mul_ps(_mm512_loadu_ps(w.dp + r * lp + d), vinv));
                    }
                }
        }
        fa_thread_end(&w, ready, tiles);
    }
    return !failed;
}

/* dq (N, H, D), dk and dv (N, Hkv, D) bf16 from grad (N, H, D) = dL/d out and the forward's
 * q, k, v, out and lse. 0 as fa_forward_bf16. */
int fa_backward_bf16(const uint16_t *grad, const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint16_t *out,
                     const float *lse, const int64_t *offsets, int64_t sequences, int64_t heads, int64_t kv_heads,
                     int64_t dim, float scale, int tiles, uint16_t *dq, uint16_t *dk, uint16_t *dv) {
    if (dim % 32 || dim <= 0 || heads % kv_heads) return 0;
    int64_t lp = fa_round32(fa_longest(offsets, sequences)), group = heads / kv_heads;
    int64_t sq = heads * dim, skv = kv_heads * dim, units = sequences * kv_heads;
    /* P's pairs of rows into the tiles' layout: (p_r[0..15], p_r+1[0..15]) -> (p_r[0], p_r+1[0], p_r[1], ...) */
    __m512i interleave = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6, 21, 5, 20,
                                          4, 19, 3, 18, 2, 17, 1, 16, 0);
    int failed = 0;
    #pragma omp parallel reduction(| : failed)
    {
        fa_scratch w;
        int ready = fa_thread_begin(&w, lp, dim, 1, tiles);
        failed |= !ready;
        __m512 vscale = _mm512_set1_ps(scale);
        #pragma omp for schedule(dynamic, 1) /* every thread takes part (the loop's barrier), a failed one idle */
        for (int64_t unit = 0; unit < units; unit++) {
            int64_t seq = unit / kv_heads, g = unit % kv_heads, first = offsets[seq], length = offsets[seq + 1] - first;
            if (!ready || length <= 0) continue;
            int64_t kp_rows = fa_round32(length) / 2;
            fa_pack_transposed(k + first * skv + g * dim, skv, dim, length, w.kt);
            fa_pack_transposed(v + first * skv + g * dim, skv, dim, length, w.vt);
            amx_pack(k + first * skv + g * dim, skv, 1, length, dim, 0, dim / 16, w.kn);
            memset(w.dkt, 0, (size_t)(dim * lp) * 4);
            memset(w.dvt, 0, (size_t)(dim * lp) * 4);
            for (int64_t h = g * group; h < (g + 1) * group; h++)
                for (int64_t r0 = 0; r0 < length; r0 += FA_BQ) {
                    int64_t rows = length - r0 < FA_BQ ? length - r0 : FA_BQ, keys = fa_round32(r0 + rows);
                    const uint16_t *qb = q + (first + r0) * sq + h * dim, *gb = grad + (first + r0) * sq + h * dim;
                    fa_f32(tiles, qb, sq, rows, w.kt, dim / 2, dim, keys, w.s, lp, 0, w.tail);
                    fa_f32(tiles, gb, sq, rows, w.vt, dim / 2, dim, keys, w.dp, lp, 0, w.tail);
                    /* per pair of rows: P (straight into the pair layout, for dV) and dS (row-major for dQ, and
                     * into the pair layout for dK); rows past the sequence are zero */
                    for (int64_t r = 0; r < FA_BQ; r += 2) {
                        __m512 dsum[2], vl[2];
                        int64_t seen[2];
                        for (int i = 0; i < 2; i++) {
                            int64_t row = r + i, t = first + r0 + row;
                            seen[i] = row < rows ? r0 + row + 1 : 0;
                            if (!seen[i]) { dsum[i] = vl[i] = _mm512_setzero_ps(); continue; }
                            const uint16_t *orow = out + t * sq + h * dim, *grow = grad + t * sq + h * dim;
                            __m512 vd = _mm512_setzero_ps();
                            for (int64_t d = 0; d < dim; d += 16)
                                vd = _mm512_fmadd_ps(loadn_bf16(orow + d, 0xffff), loadn_bf16(grow + d, 0xffff), vd);
                            dsum[i] = _mm512_set1_ps(_mm512_reduce_add_ps(vd));
                            vl[i] = _mm512_set1_ps(lse[t * heads + h]);
                        }
                        for (int64_t j = 0; j < keys; j += 16) {
                            __m512 p[2], ds[2];
                            for (int i = 0; i < 2; i++) {
                                __mmask16 m = fa_mask(seen[i] - j);
                                const float *srow = w.s + (r + i) * lp, *dprow = w.dp + (r + i) * lp;
                                p[i] = _mm512_maskz_mov_ps(m, exp16(_mm512_fmsub_ps(_mm512_maskz_loadu_ps(m, srow + j), vscale, vl[i])));
                                ds[i] = _mm512_mul_ps(p[i], _mm512_sub_ps(_mm512_maskz_loadu_ps(m, dprow + j), dsum[i]));
                                storen_bf16(w.ds + (r + i) * lp + j, 0xffff, ds[i]);
                            }
                            /* panel j / 16, pair row r / 2 of a (k = FA_BQ, n = keys) B: 16 pair rows a panel */
                            int64_t at = ((j / 16) * (FA_BQ / 2) + r / 2) * 32;
                            _mm512_storeu_si512(w.pk + at, _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(p[1], p[0])));
                            _mm512_storeu_si512(w.dsk + at, _mm512_permutexvar_epi16(interleave, (__m512i)_mm512_cvtne2ps_pbh(ds[1], ds[0])));
                        }
                    }
                    /* dQ = scale dS K */
                    fa_bf16(tiles, w.ds, lp, rows, w.kn, kp_rows, keys, dim, dq + (first + r0) * sq + h * dim, sq, scale, w.tail,
                                    w.acc);
                    /* dV^T += dO^T P and dK^T += Q^T dS (scaled at the end): the block's rows are the inner size */
                    fa_transpose_block(gb, sq, rows, dim, w.dot);
                    fa_transpose_block(qb, sq, rows, dim, w.qt);
                    fa_f32(tiles, w.dot, FA_BQ, dim, w.pk, FA_BQ / 2, FA_BQ, keys, w.dvt, lp, 1, w.tail);
                    fa_f32(tiles, w.qt, FA_BQ, dim, w.dsk, FA_BQ / 2, FA_BQ, keys, w.dkt, lp, 1, w.tail);
                }
            for (int64_t j = 0; j < length; j++) {
                uint16_t *dkr = dk + (first + j) * skv + g * dim, *dvr = dv + (first + j) * skv + g * dim;
                for (int64_t d = 0; d < dim; d++) {
                    dkr[d] = f32_to_bf16(scale * w.dkt[d * lp + j]);
                    dvr[d] = f32_to_bf16(w.dvt[d * lp + j]);
                }
            }
        }
        fa_thread_end(&w, ready, tiles);
    }
    return !failed;
}

#else
int fa_available(void) { return 0; }
int fa_forward_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, const int64_t *offsets, int64_t sequences,
                    int64_t heads, int64_t kv_heads, int64_t dim, float scale, int tiles, uint16_t *out, float *lse) {
    (void)q, (void)k, (void)v, (void)offsets, (void)sequences, (void)heads, (void)kv_heads, (void)dim, (void)scale, (void)tiles,
        (void)out, (void)lse;
    return 0;
}
int fa_backward_bf16(const uint16_t *grad, const uint16_t *q, const uint16_t *k, const uint16_t *v, const uint16_t *out,
                     const float *lse, const int64_t *offsets, int64_t sequences, int64_t heads, int64_t kv_heads,
                     int64_t dim, float scale, int tiles, uint16_t *dq, uint16_t *dk, uint16_t *dv) {
    (void)grad, (void)q, (void)k, (void)v, (void)out, (void)lse, (void)offsets, (void)sequences, (void)heads, (void)kv_heads,
        (void)dim, (void)scale, (void)tiles, (void)dq, (void)dk, (void)dv;
    return 0;
}
#endif
