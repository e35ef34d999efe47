/* The loader's per-sample work without the GIL: read a chunk's samples from their shards, then decode and
 * normalise each image while its bytes are still in cache.
 *
 * Loaded with ctypes (soilnet/data/native.py), which releases the GIL for the whole call, as FFCV does with its
 * libffcv: per-sample Python around os.preadv held the GIL long enough that two builder threads ran at the
 * speed of one, and the image then crossed memory three more times (float32 conversion, scale, bias).
 * The module init below only lets setuptools build this file as an extension module. */
#define _GNU_SOURCE
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>

#if defined(__x86_64__)
#include <immintrin.h>
#endif

#define MAX_IOV 64

static float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000 | (man << 13); /* inf, nan */
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: normalise */
        exp = 113;
        while (!(man & 0x400)) {
            man <<= 1;
            exp--;
        }
        bits = sign | (exp << 23) | ((man & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, sizeof f);
    return f;
}

static inline float finite_or_zero(float y) { return y - y == 0.0f ? y : 0.0f; }

static void affine_f16(const uint16_t *src, float *out, int64_t n, float s, float b) {
    for (int64_t p = 0; p < n; p++) out[p] = finite_or_zero(half_to_float(src[p]) * s + b);
}

static void affine_i16(const int16_t *src, float *out, int64_t n, float s, float b) {
    for (int64_t p = 0; p < n; p++) out[p] = finite_or_zero((float)src[p] * s + b);
}

#if defined(__x86_64__)
__attribute__((target("avx2,fma,f16c"))) static void affine_f16_avx2(const uint16_t *src, float *out, int64_t n,
                                                                      float s, float b) {
    const __m256 vs = _mm256_set1_ps(s), vb = _mm256_set1_ps(b), zero = _mm256_setzero_ps();
    int64_t p = 0;
    for (; p + 8 <= n; p += 8) {
        __m256 y = _mm256_fmadd_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(src + p))), vs, vb);
        __m256 finite = _mm256_cmp_ps(_mm256_sub_ps(y, y), zero, _CMP_EQ_OQ);
        _mm256_storeu_ps(out + p, _mm256_and_ps(y, finite));
    }
    affine_f16(src + p, out + p, n - p, s, b);
}
#endif

/* rows: k raw images (C_stored, hw) of int16 or float16, row_bytes apart -> out (k, channels, hw) float32,
 * out[i, c] = row[i, channel[c]] * scale[c] + bias[c], non-finite -> 0; rows with skip[i] != 0 are left alone. */
void soilnet_affine_rows(int64_t k, const char *rows, int64_t row_bytes, int is_int16, int64_t channels,
                         const int64_t *channel, int64_t hw, const float *scale, const float *bias, const uint8_t *skip,
                         float *out) {
#if defined(__x86_64__)
    int avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
    for (int64_t i = 0; i < k; i++) {
        if (skip && skip[i]) continue;
        for (int64_t c = 0; c < channels; c++) {
            const char *src = rows + i * row_bytes + channel[c] * hw * 2;
            float *dst = out + (i * channels + c) * hw;
            if (is_int16) {
                affine_i16((const int16_t *)src, dst, hw, scale[c], bias[c]);
                continue;
            }
#if defined(__x86_64__)
            if (avx2) {
                affine_f16_avx2((const uint16_t *)src, dst, hw, scale[c], bias[c]);
                continue;
            }
#endif
            affine_f16((const uint16_t *)src, dst, hw, scale[c], bias[c]);
        }
    }
}

/* n_runs preadv calls, in row order: run r reads into iov[first[r] .. first[r] + count[r]) (pairs of address
 * and length) from fd[r] at offset[r]; got[r] is the byte count read, or -errno. When out is not NULL, each row
 * is converted by soilnet_affine_rows right after its last run, if every run of it read in full. */
void soilnet_read_runs(int64_t n_runs, const int32_t *fd, const int64_t *offset, const int64_t *first,
                       const int32_t *count, const int64_t *row, const int64_t *iov, int64_t *got, const char *rows,
                       int64_t row_bytes, int is_int16, int64_t channels, const int64_t *channel, int64_t hw,
                       const float *scale, const float *bias, float *out) {
    struct iovec vec[MAX_IOV];
    int row_ok = 1;
    for (int64_t r = 0; r < n_runs; r++) {
        int n = count[r] < MAX_IOV ? count[r] : MAX_IOV;
        int64_t want = 0;
        for (int j = 0; j < n; j++) {
            vec[j].iov_base = (void *)(intptr_t)iov[2 * (first[r] + j)];
            vec[j].iov_len = (size_t)iov[2 * (first[r] + j) + 1];
            want += (int64_t)vec[j].iov_len;
        }
        ssize_t g = preadv(fd[r], vec, n, offset[r]);
        got[r] = g < 0 ? -errno : g;
        row_ok = row_ok && g == want && n == count[r];
        if (r + 1 == n_runs || row[r + 1] != row[r]) {
            if (out && row_ok) {
                float *dst = out + row[r] * channels * hw;
                soilnet_affine_rows(1, rows + row[r] * row_bytes, row_bytes, is_int16, channels, channel, hw, scale,
                                    bias, NULL, dst);
            }
            row_ok = 1;
        }
    }
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_native", NULL, -1, NULL};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
