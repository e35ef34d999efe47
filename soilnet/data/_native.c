/* The loader's per-sample work without the GIL: read a chunk's samples from their shards, then decode and
 * normalise each image while its bytes are still in cache.
 *
 * Loaded with ctypes (soilnet/data/native.py), which releases the GIL for the whole call, as FFCV does with its
 * libffcv: per-sample Python around os.preadv held the GIL long enough that two builder threads ran at the
 * speed of one, and the image then crossed memory three more times (float32 conversion, scale, bias).
 * The arithmetic is torch's, operation for operation (x * scale + bias, non-finite -> 0, + jitter, in float32,
 * then round to nearest even for bfloat16), so the Python fallback gives the same values.
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

/* Raw rows (k, C_stored, hw) of int16 or float16, row_bytes apart -> out (k, channels, hw) float32 or bfloat16:
 * out[i, c] = row[i, channel[c]] * scale[c] + bias[c], non-finite -> 0, then + jitter[i, c]. Mirrored by
 * native.Affine (ctypes.Structure): keep the two in step. */
typedef struct {
    const char *rows;
    int64_t row_bytes;
    int32_t is_int16;
    int32_t out_bf16;
    int64_t channels;
    const int64_t *channel;
    int64_t hw;
    const float *scale;
    const float *bias;
    const float *jitter; /* (k, channels), or NULL */
    void *out;
    int32_t max_isa; /* the widest kernels to use: 2 AVX-512, 1 AVX2, 0 scalar (to compare, or to rule one out) */
} soilnet_affine;

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

static inline uint16_t float_to_bf16(float f) { /* round to nearest even; f is finite here */
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return (uint16_t)((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

static inline float affine1(float x, float s, float b, float j) {
    float y = x * s + b; /* two roundings, as torch's mul_ then add_ */
    return (y - y == 0.0f ? y : 0.0f) + j;
}

static void plane_scalar(const char *src, int is_int16, void *out, int out_bf16, int64_t n, float s, float b,
                         float j) {
    for (int64_t p = 0; p < n; p++) {
        float x = is_int16 ? (float)((const int16_t *)src)[p] : half_to_float(((const uint16_t *)src)[p]);
        float y = affine1(x, s, b, j);
        if (out_bf16)
            ((uint16_t *)out)[p] = float_to_bf16(y);
        else
            ((float *)out)[p] = y;
    }
}

#if defined(__x86_64__)
__attribute__((target("avx2,f16c"))) static inline __m128i bf16x8(__m256 y) {
    const __m256i half = _mm256_set1_epi32(0x7fff), one = _mm256_set1_epi32(1);
    __m256i u = _mm256_castps_si256(y);
    u = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(half, _mm256_and_si256(_mm256_srli_epi32(u, 16), one))),
                          16);
    return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(u, u), 0xd8));
}

/* one loop per (input, output) pair: the compiler keeps no per-element branch */
#define PLANE_AVX2(name, LOAD, STORE)                                                                           \
    __attribute__((target("avx2,f16c"))) static int64_t name(const char *src, void *out, int64_t n, float s,       \
                                                            float b, float j) {                                  \
        const __m256 vs = _mm256_set1_ps(s), vb = _mm256_set1_ps(b), vj = _mm256_set1_ps(j);                   \
        const __m256 zero = _mm256_setzero_ps();                                                                 \
        int64_t p = 0;                                                                                           \
        for (; p + 8 <= n; p += 8) {                                                                             \
            __m128i raw = _mm_loadu_si128((const __m128i *)(src + 2 * p));                                     \
            __m256 y = _mm256_add_ps(_mm256_mul_ps(LOAD(raw), vs), vb);                                          \
            __m256 finite = _mm256_cmp_ps(_mm256_sub_ps(y, y), zero, _CMP_EQ_OQ);                                \
            y = _mm256_add_ps(_mm256_and_ps(y, finite), vj);                                                     \
            STORE;                                                                                               \
        }                                                                                                        \
        return p;                                                                                                \
    }

#define LOAD_F16(raw) _mm256_cvtph_ps(raw)
#define LOAD_I16(raw) _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(raw))
#define STORE_F32 _mm256_storeu_ps((float *)out + p, y)
#define STORE_BF16 _mm_storeu_si128((__m128i *)((uint16_t *)out + p), bf16x8(y))

PLANE_AVX2(f16_f32, LOAD_F16, STORE_F32)
PLANE_AVX2(f16_bf16, LOAD_F16, STORE_BF16)
PLANE_AVX2(i16_f32, LOAD_I16, STORE_F32)
PLANE_AVX2(i16_bf16, LOAD_I16, STORE_BF16)

/* AVX-512: 16 values a step, and vpmovdw packs 32 -> 16 bits without AVX2's lane shuffle */
#define PLANE_AVX512(name, LOAD, STORE)                                                                         \
    __attribute__((target("avx512f,avx512bw,avx512vl,f16c"))) static int64_t name(                           \
        const char *src, void *out, int64_t n, float s, float b, float j) {                                    \
        const __m512 vs = _mm512_set1_ps(s), vb = _mm512_set1_ps(b), vj = _mm512_set1_ps(j);                  \
        const __m512i half = _mm512_set1_epi32(0x7fff), one = _mm512_set1_epi32(1);                            \
        int64_t p = 0;                                                                                           \
        for (; p + 16 <= n; p += 16) {                                                                           \
            __m256i raw = _mm256_loadu_si256((const __m256i *)(src + 2 * p));                                  \
            __m512 y = _mm512_add_ps(_mm512_mul_ps(LOAD(raw), vs), vb);                                          \
            y = _mm512_add_ps(_mm512_maskz_mov_ps(_mm512_cmp_ps_mask(_mm512_sub_ps(y, y), _mm512_setzero_ps(),   \
                                                                     _CMP_EQ_OQ),                                \
                                                  y),                                                            \
                              vj);                                                                               \
            STORE;                                                                                               \
        }                                                                                                        \
        (void)half, (void)one;                                                                                   \
        return p;                                                                                                \
    }

#define LOAD512_F16(raw) _mm512_cvtph_ps(raw)
#define LOAD512_I16(raw) _mm512_cvtepi32_ps(_mm512_cvtepi16_epi32(raw))
#define STORE512_F32 _mm512_storeu_ps((float *)out + p, y)
#define STORE512_BF16                                                                                           \
    do {                                                                                                         \
        __m512i u = _mm512_castps_si512(y);                                                                      \
        u = _mm512_add_epi32(u, _mm512_add_epi32(half, _mm512_and_si512(_mm512_srli_epi32(u, 16), one)));       \
        _mm256_storeu_si256((__m256i *)((uint16_t *)out + p), _mm512_cvtepi32_epi16(_mm512_srli_epi32(u, 16))); \
    } while (0)

PLANE_AVX512(f16_f32_512, LOAD512_F16, STORE512_F32)
PLANE_AVX512(f16_bf16_512, LOAD512_F16, STORE512_BF16)
PLANE_AVX512(i16_f32_512, LOAD512_I16, STORE512_F32)
PLANE_AVX512(i16_bf16_512, LOAD512_I16, STORE512_BF16)

typedef int64_t (*plane_fn)(const char *, void *, int64_t, float, float, float);

/* the widest kernel this CPU runs, up to max_isa, for (int16 input, bfloat16 output); NULL: scalar only */
static plane_fn pick_plane(int is_int16, int out_bf16, int max_isa) {
    static const plane_fn avx512[2][2] = {{f16_f32_512, f16_bf16_512}, {i16_f32_512, i16_bf16_512}};
    static const plane_fn avx2[2][2] = {{f16_f32, f16_bf16}, {i16_f32, i16_bf16}};
    if (max_isa >= 2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("f16c"))
        return avx512[is_int16][out_bf16];
    if (max_isa >= 1 && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c"))
        return avx2[is_int16][out_bf16];
    return NULL;
}
#endif

static void convert_row(const soilnet_affine *a, int64_t i) {
    plane_fn plane = NULL;
#if defined(__x86_64__)
    plane = pick_plane(a->is_int16, a->out_bf16, a->max_isa);
#endif
    size_t out_size = a->out_bf16 ? 2 : 4;
    for (int64_t c = 0; c < a->channels; c++) {
        const char *src = a->rows + i * a->row_bytes + a->channel[c] * a->hw * 2;
        char *dst = (char *)a->out + (i * a->channels + c) * a->hw * out_size;
        float s = a->scale[c], b = a->bias[c], j = a->jitter ? a->jitter[i * a->channels + c] : 0.0f;
        int64_t p = plane ? plane(src, dst, a->hw, s, b, j) : 0;
        plane_scalar(src + 2 * p, a->is_int16, dst + p * out_size, a->out_bf16, a->hw - p, s, b, j);
    }
}

/* Every row i < k of a. */
void soilnet_affine_rows(int64_t k, const soilnet_affine *a) {
    for (int64_t i = 0; i < k; i++) convert_row(a, i);
}

/* n_runs preadv calls, in row order: run r reads into iov[first[r] .. first[r] + count[r]) (pairs of address
 * and length) from fd[r] at offset[r]; got[r] is the byte count read, or -errno. With a conversion (a not NULL),
 * each row is converted right after its last run, if every run of it read in full. */
void soilnet_read_runs(int64_t n_runs, const int32_t *fd, const int64_t *offset, const int64_t *first,
                       const int32_t *count, const int64_t *row, const int64_t *iov, int64_t *got,
                       const soilnet_affine *a) {
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
            if (a && row_ok) convert_row(a, row[r]);
            row_ok = 1;
        }
    }
}

/* Pretraining's augmented views on a CPU in one pass (soilnet.data.augment, the CPU form): sample b's square
 * planes src (B, C, n, n) float32 -> out, out[b, c, i, j] = src[b, c, row[b, i], col[b, j]] + jitter[b, c], or
 * src[b, c, row[b, j], col[b, i]] + jitter[b, c] when transpose[b] (an odd number of quarter turns). row and col
 * (B, n) already hold the reflection, the reversal and the crop; jitter (B, C) or NULL. Index maps are mostly runs
 * (ascending, or descending after a flip), so on x86-64 four outputs are one load of a run (reversed by a shuffle
 * when descending; gathered one by one elsewhere, near a reflected edge), and a transposed view moves 4 x 4
 * blocks through registers: about one copy of the batch. */
static void views_scalar(const float *plane, float *o, int64_t n, const int32_t *r, const int32_t *q, int t,
                         float add) {
    for (int64_t i = 0; i < n; i++)
        for (int64_t j = 0; j < n; j++)
            o[i * n + j] = (t ? plane[(int64_t)r[j] * n + q[i]] : plane[(int64_t)r[i] * n + q[j]]) + add;
}

#if defined(__x86_64__)
/* +1 when m[0..3] is an ascending run, -1 a descending one, 0 neither */
static inline int run4(const int32_t *m) {
    if (m[1] == m[0] + 1 && m[2] == m[0] + 2 && m[3] == m[0] + 3) return 1;
    if (m[1] == m[0] - 1 && m[2] == m[0] - 2 && m[3] == m[0] - 3) return -1;
    return 0;
}

/* (p[m[0]], p[m[1]], p[m[2]], p[m[3]]) given run4(m) == dir */
static inline __m128 load4(const float *p, const int32_t *m, int dir) {
    if (dir > 0) return _mm_loadu_ps(p + m[0]);
    if (dir < 0) {
        __m128 v = _mm_loadu_ps(p + m[3]);
        return _mm_shuffle_ps(v, v, _MM_SHUFFLE(0, 1, 2, 3));
    }
    return _mm_setr_ps(p[m[0]], p[m[1]], p[m[2]], p[m[3]]);
}

/* out rows i of columns j..j+3 (a plain view): the run's direction is the same down the rows, so the branch is
 * taken once per group of columns */
static void plain_columns(const float *plane, float *o, int64_t n, const int32_t *r, const int32_t *m, int dir,
                          __m128 a) {
    if (dir > 0)
        for (int64_t i = 0; i < n; i++) _mm_storeu_ps(o + i * n, _mm_add_ps(_mm_loadu_ps(plane + r[i] * n + m[0]), a));
    else if (dir < 0)
        for (int64_t i = 0; i < n; i++) {
            __m128 v = _mm_loadu_ps(plane + r[i] * n + m[3]);
            _mm_storeu_ps(o + i * n, _mm_add_ps(_mm_shuffle_ps(v, v, _MM_SHUFFLE(0, 1, 2, 3)), a));
        }
    else
        for (int64_t i = 0; i < n; i++) _mm_storeu_ps(o + i * n, _mm_add_ps(load4(plane + r[i] * n, m, 0), a));
}

static void views_sse(const float *plane, float *o, int64_t n, const int32_t *r, const int32_t *q, int t,
                      float add, const int8_t *qdir) {
    __m128 a = _mm_set1_ps(add);
    if (!t) {
        for (int64_t j = 0; j < n; j += 4) plain_columns(plane, o + j, n, r, q + j, qdir[j / 4], a);
        return;
    }
    for (int64_t i = 0; i < n; i += 4) {
        int dir = qdir[i / 4];
        for (int64_t j = 0; j < n; j += 4) { /* columns j..j+3 of out rows i..i+3 are source rows r[j..j+3] */
            __m128 c0 = load4(plane + (int64_t)r[j] * n, q + i, dir);
            __m128 c1 = load4(plane + (int64_t)r[j + 1] * n, q + i, dir);
            __m128 c2 = load4(plane + (int64_t)r[j + 2] * n, q + i, dir);
            __m128 c3 = load4(plane + (int64_t)r[j + 3] * n, q + i, dir);
            _MM_TRANSPOSE4_PS(c0, c1, c2, c3);
            _mm_storeu_ps(o + i * n + j, _mm_add_ps(c0, a));
            _mm_storeu_ps(o + (i + 1) * n + j, _mm_add_ps(c1, a));
            _mm_storeu_ps(o + (i + 2) * n + j, _mm_add_ps(c2, a));
            _mm_storeu_ps(o + (i + 3) * n + j, _mm_add_ps(c3, a));
        }
    }
}
#endif

void soilnet_views(int64_t B, int64_t C, int64_t n, const float *src, float *out, const int32_t *row,
                   const int32_t *col, const uint8_t *transpose, const float *jitter) {
    for (int64_t b = 0; b < B; b++) {
        const int32_t *r = row + b * n, *q = col + b * n;
#if defined(__x86_64__)
        int8_t qdir[1024] = {0};
        int sse = n % 4 == 0 && n / 4 <= 1024;
        for (int64_t g = 0; sse && g < n / 4; g++) qdir[g] = (int8_t)run4(q + 4 * g);
#endif
        for (int64_t c = 0; c < C; c++) {
            const float *plane = src + (b * C + c) * n * n;
            float *o = out + (b * C + c) * n * n;
            float add = jitter ? jitter[b * C + c] : 0.0f;
#if defined(__x86_64__)
            if (sse) {
                views_sse(plane, o, n, r, q, transpose[b], add, qdir);
                continue;
            }
#endif
            views_scalar(plane, o, n, r, q, transpose[b], add);
        }
    }
}

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, .m_name = "_native", .m_size = -1};

PyMODINIT_FUNC PyInit__native(void) { return PyModule_Create(&module); }
