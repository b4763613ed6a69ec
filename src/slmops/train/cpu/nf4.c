/* 4-bit weights (bitsandbytes' NF4 and FP4 layouts) to fp32 or bf16, for QLoRA's frozen base: part
 * of kernels.c's translation unit (included at its end), its own file for its own concern.
 *
 * A QLoRA step dequantizes every base weight twice (the forward's product and the backward's
 * dX), and bitsandbytes' CPU routine (0.50) makes ~0.9 G elements/s on a Zen 3 core: 9% of a tone
 * step on the 135M model. The layout is bitsandbytes': element 2i in the high nibble of byte i,
 * 2i + 1 in the low one; each run of `blocksize` elements of the flattened weight scaled by its
 * absmax (fp32: a nested absmax is expanded once by the caller); the 16 levels are the quant
 * type's code (passed in: bitsandbytes' own table). Each element is code[q] * absmax, one fp32
 * product as bitsandbytes computes it; bf16 rounds that product to nearest-even once.
 *
 * With AVX2: 8 bytes to 16 floats by two 8-entry permutes and a blend on the index's top bit.
 * Elsewhere a 256-entry table of level pairs, one byte at a time. Split over the threads by
 * 16-element groups (blocksize is a multiple of 16: bitsandbytes takes 32 to 4,096). */
#if defined(__AVX2__)
#include <immintrin.h>
#endif

static void nf4_dequantize_range(const uint8_t *packed, const float *absmax, const float *code, int64_t blocksize,
                                 int64_t first, int64_t last, float *out_f32, uint16_t *out_bf16) {
    /* elements [first, last) (first a multiple of 16; last even) */
    int64_t i = first;
#if defined(__AVX2__)
    const __m256 low_levels = _mm256_loadu_ps(code), high_levels = _mm256_loadu_ps(code + 8);
    const __m256i fifteen = _mm256_set1_epi32(15);
    for (; i + 16 <= last; i += 16) {
        __m256i bytes = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)(packed + i / 2)));
        __m256i hi = _mm256_srli_epi32(bytes, 4), lo = _mm256_and_si256(bytes, fifteen);
        __m256i a = _mm256_unpacklo_epi32(hi, lo), b = _mm256_unpackhi_epi32(hi, lo); /* lanes: (0,1 | 4,5), (2,3 | 6,7) */
        __m256i index[2] = {_mm256_permute2x128_si256(a, b, 0x20), _mm256_permute2x128_si256(a, b, 0x31)};
        __m256 scale = _mm256_set1_ps(absmax[i / blocksize]);
        __m256 v[2];
        for (int h = 0; h < 2; h++) {
            __m256 level = _mm256_blendv_ps(_mm256_permutevar8x32_ps(low_levels, index[h]),
                                            _mm256_permutevar8x32_ps(high_levels, index[h]),
                                            _mm256_castsi256_ps(_mm256_slli_epi32(index[h], 28)));
            v[h] = _mm256_mul_ps(level, scale);
        }
        if (out_f32) {
            _mm256_storeu_ps(out_f32 + i, v[0]);
            _mm256_storeu_ps(out_f32 + i + 8, v[1]);
        } else { /* round to nearest even: u + 0x7fff + ((u >> 16) & 1), the top half (no NaN: finite levels) */
            __m256i r[2];
            for (int h = 0; h < 2; h++) {
                __m256i u = _mm256_castps_si256(v[h]);
                __m256i odd = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
                r[h] = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), odd)), 16);
            }
            __m256i packed16 = _mm256_permute4x64_epi64(_mm256_packus_epi32(r[0], r[1]), 0xD8);
            _mm256_storeu_si256((__m256i *)(out_bf16 + i), packed16);
        }
    }
#endif
    float pairs[512]; /* byte -> (code[high nibble], code[low nibble]) */
    for (int byte = 0; byte < 256; byte++) pairs[2 * byte] = code[byte >> 4], pairs[2 * byte + 1] = code[byte & 15];
    for (; i < last; i += 2) {
        const float *pair = pairs + 2 * packed[i / 2];
        float scale = absmax[i / blocksize];
        if (out_f32) {
            out_f32[i] = pair[0] * scale;
            out_f32[i + 1] = pair[1] * scale;
        } else {
            out_bf16[i] = f32_to_bf16(pair[0] * scale);
            out_bf16[i + 1] = f32_to_bf16(pair[1] * scale);
        }
    }
}

/* packed: (n + 1) / 2 bytes; absmax: n / blocksize (rounded up) fp32; code: 16 fp32 levels; n even.
 * out_f32 or out_bf16 (the other NULL): n elements. 0 when the sizes are not taken. */
int nf4_dequantize(const uint8_t *packed, const float *absmax, const float *code, int64_t n, int64_t blocksize,
                   float *out_f32, uint16_t *out_bf16) {
    if (n % 2 || blocksize <= 0 || blocksize % 16 || (out_f32 == NULL) == (out_bf16 == NULL)) return 0;
    int64_t groups = (n + 15) / 16;
#pragma omp parallel if (n >= 4 * PARALLEL_MIN)
    {
        int threads = omp_get_num_threads(), t = omp_get_thread_num();
        int64_t first = groups * t / threads * 16, last = groups * (t + 1) / threads * 16;
        if (last > n) last = n;
        if (first < last) nf4_dequantize_range(packed, absmax, code, blocksize, first, last, out_f32, out_bf16);
    }
    return 1;
}
