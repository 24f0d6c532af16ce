/* vlm_hpc._bicubic: Pillow 13's 8-bit BICUBIC resize of RGB images, bit for bit, but faster.
 *
 * Why this exists: the tiler resizes every image twice with Image.resize(..., BICUBIC) (the grid and the
 * thumbnail), which was over half of our CPU preprocessing time, and the product must keep Pillow's output
 * to the last bit. This file recomputes Pillow's fixed-point filter exactly and evaluates it with SIMD,
 * writing the channel-first tiles the model consumes directly.
 *
 * Pillow's arithmetic, reproduced exactly:
 *  - per output position: window [first, first + count) and weights in double (Keys cubic, a = -0.5),
 *    normalised, then rounded to 22-bit fixed point ((int)(v * 2^22 +- 0.5));
 *  - every pass sums uint8 * int32 weight from 2^21 and keeps clamp(sum >> 22, 0, 255) (uint8 between passes);
 *  - Pillow 13 runs the vertical pass first when the height shrinks by more than twice what the width does
 *    ((in_h - out_h) > 0 && (in_h - out_h) > 2 * (in_w - out_w)), else horizontal first; an unchanged
 *    dimension skips its pass; equal size copies.
 * Exact SIMD: each weight w is split into hi = w >> 11 and lo = w & 2047 (both int16), pixels are widened to
 * int16, and pmaddwd / vpdpwssd sum pairs of taps; (sum_hi << 11) + sum_lo + 2^21 is Pillow's int32 sum
 * (all arithmetic is modulo 2^32 and Pillow's true sum fits in int32, so intermediate wrap-around cannot
 * matter, and integer sums do not depend on their order).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#define HAVE_X86 1
#include <immintrin.h>
#define TARGET_AVX2 __attribute__((target("avx2")))
#define TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vbmi,avx512vnni")))
#else
#define HAVE_X86 0
#endif

#define FRACTION_BITS 22 /* Pillow: 32 bits - 8 for the pixel - 2 for the filter's overshoot */
#define ROUNDING (1 << (FRACTION_BITS - 1))
#define VEC_PAD 128 /* slack after our own row buffers, so vector loads/stores never need a tail */

enum { PATH_SCALAR = 0, PATH_AVX2 = 1, PATH_AVX512 = 2 };
static const char *const path_names[] = {"scalar", "avx2", "avx512"};
static int best_path = PATH_SCALAR; /* what this CPU supports */
static int default_path = PATH_SCALAR; /* what resize_tiles uses unless told otherwise */

/* ------------------------------------------------------------------------------------------------ */
/* Coefficients                                                                                      */

/* Keys' cubic convolution with a = -0.5, written in the association Pillow evaluates it (bit-exact doubles). */
static double cubic(double x) {
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((-0.5 + 2.0) * x - (-0.5 + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * -0.5;
    return 0.0;
}

typedef struct {
    int out_size;  /* real outputs; arrays below hold out_pad entries (padding: count 0) */
    int out_pad;   /* out_size rounded up to 8, so SIMD code can produce 4 or 8 outputs at a time */
    int ksize;     /* Pillow's maximum tap count */
    int npair;     /* tap pairs per output, rounded up to a multiple of 4 (one AVX-512 group = 4 pairs) */
    int *first;    /* first input index of each output */
    int *count;    /* taps of each output */
    int32_t *w;    /* Pillow's fixed-point weights, ksize per output */
    int32_t *vhi, *vlo;  /* vertical SIMD: per output, npair int32 = (int16 w[2p], int16 w[2p+1]) */
    int16_t *hhi, *hlo;  /* horizontal SIMD: per output, npair blocks of 8 int16: (w[2p], w[2p+1]) x 4 channels */
    /* horizontal AVX-512, per quad of outputs (one 128-bit lane each): the window starts at pixel qbase; qgroups
     * groups of 4 taps; qfit = 0 when the 4 windows do not fit in 128 bytes (then the per-pixel kernel runs);
     * qdata: a vpermt2b index then, per group, 3 x 64 bytes of signed weight digits. */
    int qstride;
    int *qbase, *qgroups;
    uint8_t *qfit;
    int8_t *qdata;
} Coeffs;

static void free_coeffs(Coeffs *c) {
    free(c->first);
    free(c->count);
    free(c->w);
    free(c->vhi);
    free(c->vlo);
    free(c->hhi);
    free(c->hlo);
    free(c->qbase);
    free(c->qgroups);
    free(c->qfit);
    free(c->qdata);
    memset(c, 0, sizeof(*c));
}

/* w == d2 * 65536 + d1 * 256 + d0 with signed-byte digits (vpdpbusd multiplies u8 pixels by s8). For Pillow's
 * weights (|w| <= 2^22) d2 stays within -32..64. */
static void digits(int32_t w, int8_t d[3]) {
    d[0] = (int8_t)(w & 255);
    w = (w - d[0]) >> 8; /* exact */
    d[1] = (int8_t)(w & 255);
    d[2] = (int8_t)((w - d[1]) >> 8);
}

/* Quad layout for the AVX-512 horizontal kernel with pixel stride s. */
static int make_quads(Coeffs *c, int s) {
    int nq = c->out_pad / 4, gmax = (c->ksize + 3) / 4;
    c->qstride = 64 + gmax * 192;
    c->qbase = calloc((size_t)nq, sizeof(int));
    c->qgroups = calloc((size_t)nq, sizeof(int));
    c->qfit = calloc((size_t)nq, 1);
    c->qdata = calloc((size_t)nq, (size_t)c->qstride);
    if (!c->qbase || !c->qgroups || !c->qfit || !c->qdata) return -1;
    for (int q = 0; q < nq; q++) {
        int base = c->first[4 * q], groups = 0, fit = 1;
        for (int i = 0; i < 4; i++) {
            int o = 4 * q + i, n = c->count[o];
            if (n == 0) continue; /* padding output */
            if ((n + 3) / 4 > groups) groups = (n + 3) / 4;
            if ((c->first[o] - base + 3) * s + 3 > 128) fit = 0;
        }
        c->qbase[q] = base;
        c->qgroups[q] = groups;
        c->qfit[q] = (uint8_t)fit;
        if (!fit) continue;
        int8_t *d = c->qdata + (size_t)q * c->qstride;
        for (int i = 0; i < 4; i++) {
            int o = 4 * q + i, n = c->count[o];
            for (int ch = 0; ch < 4; ch++)
                for (int j = 0; j < 4; j++)
                    d[16 * i + 4 * ch + j] = n && ch < 3 ? (int8_t)((c->first[o] - base + j) * s + ch) : 0;
            for (int t = 0; t < n; t++) {
                int8_t dg[3];
                digits(c->w[(size_t)o * c->ksize + t], dg);
                for (int k = 0; k < 3; k++)
                    for (int ch = 0; ch < 3; ch++) /* the 4th channel slot keeps weight 0 */
                        d[64 + (t / 4) * 192 + k * 64 + 16 * i + 4 * ch + t % 4] = dg[k];
            }
        }
    }
    return 0;
}

/* layout: 0 = plain weights only, 1 = plus vertical pairs, 2 = plus horizontal blocks. Returns -1 on OOM. */
static int make_coeffs(int in_size, int out_size, int layout, Coeffs *c) {
    memset(c, 0, sizeof(*c));
    double scale = (double)(float)in_size / out_size; /* Pillow: (double)(box1 - box0) / out, box in float */
    double filterscale = scale < 1.0 ? 1.0 : scale;
    double support = 2.0 * filterscale;
    int ksize = (int)ceil(support) * 2 + 1;
    int out_pad = (out_size + 7) & ~7;
    int npair = ((ksize + 1) / 2 + 3) & ~3;
    c->out_size = out_size;
    c->out_pad = out_pad;
    c->ksize = ksize;
    c->npair = npair;
    c->first = calloc((size_t)out_pad, sizeof(int));
    c->count = calloc((size_t)out_pad, sizeof(int));
    c->w = calloc((size_t)out_pad * ksize, sizeof(int32_t));
    double *k = malloc(sizeof(double) * ksize);
    if (!c->first || !c->count || !c->w || !k) goto oom;
    for (int xx = 0; xx < out_size; xx++) {
        double center = (xx + 0.5) * scale;
        double ww = 0.0, ss = 1.0 / filterscale;
        int xmin = (int)(center - support + 0.5);
        if (xmin < 0) xmin = 0;
        int xmax = (int)(center + support + 0.5);
        if (xmax > in_size) xmax = in_size;
        xmax -= xmin;
        for (int x = 0; x < xmax; x++) {
            double w = cubic((x + xmin - center + 0.5) * ss);
            k[x] = w;
            ww += w;
        }
        int32_t *fixed = c->w + (size_t)xx * ksize;
        for (int x = 0; x < xmax; x++) {
            double v = ww != 0.0 ? k[x] / ww : k[x];
            fixed[x] = v < 0 ? (int32_t)(-0.5 + v * (1 << FRACTION_BITS)) : (int32_t)(0.5 + v * (1 << FRACTION_BITS));
        }
        c->first[xx] = xmin;
        c->count[xx] = xmax;
    }
    free(k);
    k = NULL;
    if (layout == 1) {
        c->vhi = calloc((size_t)out_pad * npair, sizeof(int32_t));
        c->vlo = calloc((size_t)out_pad * npair, sizeof(int32_t));
        if (!c->vhi || !c->vlo) goto oom;
        for (int o = 0; o < out_size; o++)
            for (int t = 0; t < c->count[o]; t++) {
                int32_t w = c->w[(size_t)o * ksize + t];
                uint32_t hi = (uint16_t)(int16_t)(w >> 11), lo = (uint16_t)(w & 2047);
                int shift = (t & 1) * 16;
                c->vhi[(size_t)o * npair + t / 2] |= (int32_t)(hi << shift);
                c->vlo[(size_t)o * npair + t / 2] |= (int32_t)(lo << shift);
            }
    } else if (layout == 2) {
        c->hhi = calloc((size_t)out_pad * npair * 8, sizeof(int16_t));
        c->hlo = calloc((size_t)out_pad * npair * 8, sizeof(int16_t));
        if (!c->hhi || !c->hlo) goto oom;
        for (int o = 0; o < out_size; o++)
            for (int t = 0; t < c->count[o]; t++) {
                int32_t w = c->w[(size_t)o * ksize + t];
                size_t base = ((size_t)o * npair + t / 2) * 8 + (t & 1);
                for (int ch = 0; ch < 3; ch++) { /* the 4th channel slot keeps weight 0: its sum is discarded */
                    c->hhi[base + 2 * ch] = (int16_t)(w >> 11);
                    c->hlo[base + 2 * ch] = (int16_t)(w & 2047);
                }
            }
    }
    return 0;
oom:
    free(k);
    free_coeffs(c);
    return -1;
}

static inline uint8_t clip8(int32_t sum) {
    int32_t v = sum >> FRACTION_BITS;
    return v < 0 ? 0 : v > 255 ? 255 : (uint8_t)v;
}

/* ------------------------------------------------------------------------------------------------ */
/* Row kernels. A vertical kernel combines bytes off..off+len-1 of n rows (same weights for every byte); a       */
/* horizontal kernel turns one row of pixels (stride s, channels at +0..2) into three planes, each at    */
/* `ps` bytes from the previous, and may write up to out_pad bytes per plane.                           */

typedef void (*vrow_fn)(const uint8_t *const *rows, size_t off, const Coeffs *c, int o, int len, uint8_t *out);
typedef void (*hrow_fn)(const uint8_t *row, int rowbytes, int s, const Coeffs *c, uint8_t *out, int ps);

static void vrow_scalar(const uint8_t *const *rows, size_t off, const Coeffs *c, int o, int len, uint8_t *out) {
    /* blocks of bytes with int32 accumulators: the compiler vectorises this on any target */
    const int32_t *w = c->w + (size_t)o * c->ksize;
    int n = c->count[o];
    enum { BLOCK = 256 };
    int32_t acc[BLOCK];
    for (int x0 = 0; x0 < len; x0 += BLOCK) {
        int m = len - x0 < BLOCK ? len - x0 : BLOCK;
        for (int i = 0; i < m; i++) acc[i] = ROUNDING;
        for (int k = 0; k < n; k++) {
            const uint8_t *r = rows[k] + off + x0;
            int32_t wk = w[k];
            for (int i = 0; i < m; i++) acc[i] += r[i] * wk;
        }
        for (int i = 0; i < m; i++) out[x0 + i] = clip8(acc[i]);
    }
}

static inline void hpixel_scalar(const uint8_t *row, int s, const Coeffs *c, int o, uint8_t *out, int ps) {
    const int32_t *w = c->w + (size_t)o * c->ksize;
    const uint8_t *p = row + (size_t)c->first[o] * s;
    int32_t r = ROUNDING, g = ROUNDING, b = ROUNDING;
    for (int k = 0; k < c->count[o]; k++, p += s) {
        r += p[0] * w[k];
        g += p[1] * w[k];
        b += p[2] * w[k];
    }
    out[o] = clip8(r);
    out[ps + o] = clip8(g);
    out[2 * ps + o] = clip8(b);
}

static void hrow_scalar(const uint8_t *row, int rowbytes, int s, const Coeffs *c, uint8_t *out, int ps) {
    (void)rowbytes;
    for (int o = 0; o < c->out_size; o++) hpixel_scalar(row, s, c, o, out, ps);
}

#if HAVE_X86
/* Scalar tail of the SIMD vertical kernels (bytes x0..len-1). */
static void vrow_scalar_from(const uint8_t *const *rows, size_t off, const Coeffs *c, int o, int x0, int len,
                             uint8_t *out) {
    const int32_t *w = c->w + (size_t)o * c->ksize;
    int n = c->count[o];
    for (int x = x0; x < len; x++) {
        int32_t sum = ROUNDING;
        for (int k = 0; k < n; k++) sum += rows[k][off + x] * w[k];
        out[x] = clip8(sum);
    }
}

/* ---- AVX2: pmaddwd on 256-bit vectors ---- */

TARGET_AVX2 static void vrow_avx2(const uint8_t *const *rows, size_t off, const Coeffs *c, int o, int len,
                                  uint8_t *out) {
    const int32_t *whi = c->vhi + (size_t)o * c->npair, *wlo = c->vlo + (size_t)o * c->npair;
    int np = (c->count[o] + 1) / 2;
    const __m256i zero = _mm256_setzero_si256(), round = _mm256_set1_epi32(ROUNDING);
    int x = 0;
    for (; x + 32 <= len; x += 32) {
        __m256i h0 = zero, h1 = zero, h2 = zero, h3 = zero, l0 = round, l1 = round, l2 = round, l3 = round;
        for (int p = 0; p < np; p++) {
            __m256i a = _mm256_loadu_si256((const __m256i *)(rows[2 * p] + off + x));
            __m256i b = _mm256_loadu_si256((const __m256i *)(rows[2 * p + 1] + off + x));
            /* (a, b) byte pairs, then zero-extended: int32 lanes holding int16 (a[x], b[x]) */
            __m256i t0 = _mm256_unpacklo_epi8(a, b), t1 = _mm256_unpackhi_epi8(a, b);
            __m256i q0 = _mm256_unpacklo_epi8(t0, zero), q1 = _mm256_unpackhi_epi8(t0, zero);
            __m256i q2 = _mm256_unpacklo_epi8(t1, zero), q3 = _mm256_unpackhi_epi8(t1, zero);
            __m256i wh = _mm256_set1_epi32(whi[p]), wl = _mm256_set1_epi32(wlo[p]);
            h0 = _mm256_add_epi32(h0, _mm256_madd_epi16(q0, wh));
            h1 = _mm256_add_epi32(h1, _mm256_madd_epi16(q1, wh));
            h2 = _mm256_add_epi32(h2, _mm256_madd_epi16(q2, wh));
            h3 = _mm256_add_epi32(h3, _mm256_madd_epi16(q3, wh));
            l0 = _mm256_add_epi32(l0, _mm256_madd_epi16(q0, wl));
            l1 = _mm256_add_epi32(l1, _mm256_madd_epi16(q1, wl));
            l2 = _mm256_add_epi32(l2, _mm256_madd_epi16(q2, wl));
            l3 = _mm256_add_epi32(l3, _mm256_madd_epi16(q3, wl));
        }
        h0 = _mm256_srai_epi32(_mm256_add_epi32(_mm256_slli_epi32(h0, 11), l0), FRACTION_BITS);
        h1 = _mm256_srai_epi32(_mm256_add_epi32(_mm256_slli_epi32(h1, 11), l1), FRACTION_BITS);
        h2 = _mm256_srai_epi32(_mm256_add_epi32(_mm256_slli_epi32(h2, 11), l2), FRACTION_BITS);
        h3 = _mm256_srai_epi32(_mm256_add_epi32(_mm256_slli_epi32(h3, 11), l3), FRACTION_BITS);
        /* saturating packs clamp to 0..255 and undo the in-lane unpack order */
        __m256i r = _mm256_packus_epi16(_mm256_packs_epi32(h0, h1), _mm256_packs_epi32(h2, h3));
        _mm256_storeu_si256((__m256i *)(out + x), r);
    }
    if (x < len) vrow_scalar_from(rows, off, c, o, x, len, out);
}

TARGET_AVX2 static void hrow_avx2(const uint8_t *row, int rowbytes, int s, const Coeffs *c, uint8_t *out, int ps) {
    /* Per 128-bit lane: one tap pair x 4 channel slots as int16 (p[2j].ch, p[2j+1].ch); lane j of a group of
     * 4 taps takes pixels 2j, 2j+1 of a 16-byte load broadcast to both lanes. */
    int8_t ctl[32];
    for (int j = 0; j < 2; j++)
        for (int ch = 0; ch < 4; ch++)
            for (int e = 0; e < 2; e++) {
                ctl[16 * j + 4 * ch + 2 * e] = ch < 3 ? (int8_t)((2 * j + e) * s + ch) : (int8_t)-128;
                ctl[16 * j + 4 * ch + 2 * e + 1] = -128;
            }
    const __m256i shuf = _mm256_loadu_si256((const __m256i *)ctl);
    /* bytes R0..R3 G0..G3 B0..B3 from the packed [R G B X] x 4 */
    const __m128i gather = _mm_setr_epi8(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
    const __m128i round = _mm_set1_epi32(ROUNDING);
    int npair = c->npair;
    for (int o0 = 0; o0 < c->out_pad; o0 += 4) {
        __m128i sum[4];
        int scalar_needed = 0;
        for (int i = 0; i < 4; i++) {
            int o = o0 + i, n = c->count[o], groups = (n + 3) / 4;
            const uint8_t *p = row + (size_t)c->first[o] * s;
            if (groups > 0 && (long)(c->first[o] + 4 * (groups - 1)) * s + 16 > rowbytes) {
                scalar_needed |= 1 << i; /* a 16-byte load would pass the row's end: done exactly below */
                sum[i] = _mm_setzero_si128();
                continue;
            }
            const int16_t *wh = c->hhi + (size_t)o * npair * 8, *wl = c->hlo + (size_t)o * npair * 8;
            __m256i h = _mm256_setzero_si256(), l = _mm256_setzero_si256();
            for (int g = 0; g < groups; g++) {
                __m256i d = _mm256_broadcastsi128_si256(_mm_loadu_si128((const __m128i *)(p + (size_t)4 * g * s)));
                __m256i q = _mm256_shuffle_epi8(d, shuf);
                h = _mm256_add_epi32(h, _mm256_madd_epi16(q, _mm256_loadu_si256((const __m256i *)(wh + 16 * g))));
                l = _mm256_add_epi32(l, _mm256_madd_epi16(q, _mm256_loadu_si256((const __m256i *)(wl + 16 * g))));
            }
            h = _mm256_add_epi32(_mm256_slli_epi32(h, 11), l);
            sum[i] = _mm_add_epi32(_mm256_castsi256_si128(h), _mm256_extracti128_si256(h, 1));
        }
        for (int i = 0; i < 4; i++) sum[i] = _mm_srai_epi32(_mm_add_epi32(sum[i], round), FRACTION_BITS);
        __m128i b = _mm_packus_epi16(_mm_packs_epi32(sum[0], sum[1]), _mm_packs_epi32(sum[2], sum[3]));
        b = _mm_shuffle_epi8(b, gather);
        uint32_t v0 = (uint32_t)_mm_cvtsi128_si32(b), v1 = (uint32_t)_mm_extract_epi32(b, 1),
                 v2 = (uint32_t)_mm_extract_epi32(b, 2);
        memcpy(out + o0, &v0, 4);
        memcpy(out + ps + o0, &v1, 4);
        memcpy(out + 2 * ps + o0, &v2, 4);
        if (scalar_needed)
            for (int i = 0; i < 4; i++)
                if (scalar_needed >> i & 1) hpixel_scalar(row, s, c, o0 + i, out, ps);
    }
}

/* ---- AVX-512 (BW, VBMI, VNNI): vpdpwssd on 512-bit vectors ---- */

TARGET_AVX512 static void vrow_avx512(const uint8_t *const *rows, size_t off, const Coeffs *c, int o, int len,
                                    uint8_t *out) {
    const int32_t *whi = c->vhi + (size_t)o * c->npair, *wlo = c->vlo + (size_t)o * c->npair;
    int np = (c->count[o] + 1) / 2;
    const __m512i zero = _mm512_setzero_si512(), round = _mm512_set1_epi32(ROUNDING);
    int x = 0;
    for (; x + 64 <= len; x += 64) {
        __m512i h0 = zero, h1 = zero, h2 = zero, h3 = zero, l0 = round, l1 = round, l2 = round, l3 = round;
        for (int p = 0; p < np; p++) {
            __m512i a = _mm512_loadu_si512((const void *)(rows[2 * p] + off + x));
            __m512i b = _mm512_loadu_si512((const void *)(rows[2 * p + 1] + off + x));
            __m512i t0 = _mm512_unpacklo_epi8(a, b), t1 = _mm512_unpackhi_epi8(a, b);
            __m512i q0 = _mm512_unpacklo_epi8(t0, zero), q1 = _mm512_unpackhi_epi8(t0, zero);
            __m512i q2 = _mm512_unpacklo_epi8(t1, zero), q3 = _mm512_unpackhi_epi8(t1, zero);
            __m512i wh = _mm512_set1_epi32(whi[p]), wl = _mm512_set1_epi32(wlo[p]);
            h0 = _mm512_dpwssd_epi32(h0, q0, wh);
            h1 = _mm512_dpwssd_epi32(h1, q1, wh);
            h2 = _mm512_dpwssd_epi32(h2, q2, wh);
            h3 = _mm512_dpwssd_epi32(h3, q3, wh);
            l0 = _mm512_dpwssd_epi32(l0, q0, wl);
            l1 = _mm512_dpwssd_epi32(l1, q1, wl);
            l2 = _mm512_dpwssd_epi32(l2, q2, wl);
            l3 = _mm512_dpwssd_epi32(l3, q3, wl);
        }
        h0 = _mm512_srai_epi32(_mm512_add_epi32(_mm512_slli_epi32(h0, 11), l0), FRACTION_BITS);
        h1 = _mm512_srai_epi32(_mm512_add_epi32(_mm512_slli_epi32(h1, 11), l1), FRACTION_BITS);
        h2 = _mm512_srai_epi32(_mm512_add_epi32(_mm512_slli_epi32(h2, 11), l2), FRACTION_BITS);
        h3 = _mm512_srai_epi32(_mm512_add_epi32(_mm512_slli_epi32(h3, 11), l3), FRACTION_BITS);
        __m512i r = _mm512_packus_epi16(_mm512_packs_epi32(h0, h1), _mm512_packs_epi32(h2, h3));
        _mm512_storeu_si512((void *)(out + x), r);
    }
    if (x < len) vrow_scalar_from(rows, off, c, o, x, len, out);
}

/* Per-pixel fallback for quads whose windows are too far apart (downscales beyond ~9x): int16 weight halves,
 * taps in lanes, then a cross-lane sum. Returns lane i = [R G B -] sums (without rounding) of output o0 + i. */
TARGET_AVX512 static __m512i hquad_spread_avx512(const uint8_t *row, int s, const Coeffs *c, int o0, __m512i perm) {
    const __mmask64 even = 0x5555555555555555ULL;
    int npair = c->npair;
    __m512i acc[4];
    for (int i = 0; i < 4; i++) {
        int o = o0 + i, n = c->count[o];
        const uint8_t *p = row + (size_t)c->first[o] * s;
        const int16_t *wh = c->hhi + (size_t)o * npair * 8, *wl = c->hlo + (size_t)o * npair * 8;
        __m512i h = _mm512_setzero_si512(), l = _mm512_setzero_si512();
        for (int g = 0; 8 * g < n; g++) {
            int k = n - 8 * g < 8 ? n - 8 * g : 8;
            __mmask64 m = (((uint64_t)1) << ((k - 1) * s + 3)) - 1; /* bytes of k pixels, not past the 3rd channel */
            __m512i d = _mm512_maskz_loadu_epi8(m, p + (size_t)8 * g * s);
            __m512i q = _mm512_maskz_permutexvar_epi8(even, perm, d);
            h = _mm512_dpwssd_epi32(h, q, _mm512_loadu_si512((const void *)(wh + 32 * g)));
            l = _mm512_dpwssd_epi32(l, q, _mm512_loadu_si512((const void *)(wl + 32 * g)));
        }
        acc[i] = _mm512_add_epi32(_mm512_slli_epi32(h, 11), l);
    }
    /* sum the four 128-bit lanes of each pixel: result lane i = pixel o0 + i */
    __m512i a = _mm512_add_epi32(_mm512_shuffle_i64x2(acc[0], acc[1], 0x44), _mm512_shuffle_i64x2(acc[0], acc[1], 0xEE));
    __m512i b = _mm512_add_epi32(_mm512_shuffle_i64x2(acc[2], acc[3], 0x44), _mm512_shuffle_i64x2(acc[2], acc[3], 0xEE));
    return _mm512_add_epi32(_mm512_shuffle_i64x2(a, b, 0x88), _mm512_shuffle_i64x2(a, b, 0xDD));
}

/* Quads q and q + 1 (when two == 1) of the fitting kind: lane i of *t0 / *t1 = [R G B -] sums of output
 * 4q + i / 4q + 4 + i. Both quads run in one loop (more independent accumulators); the shorter one's extra
 * group has zero weights. */
TARGET_AVX512 static inline void hquads_avx512(const uint8_t *row, int rowbytes, int s, const Coeffs *c, int q, int two,
                                               __m512i *t0, __m512i *t1) {
    const int8_t *qd0 = c->qdata + (size_t)q * c->qstride, *qd1 = two ? qd0 + c->qstride : qd0;
    const __m512i sel0 = _mm512_loadu_si512((const void *)qd0), sel1 = _mm512_loadu_si512((const void *)qd1);
    __m512i a0 = _mm512_setzero_si512(), a1 = a0, a2 = a0, b0 = a0, b1 = a0, b2 = a0;
    int groups = c->qgroups[q];
    if (two && c->qgroups[q + 1] > groups) groups = c->qgroups[q + 1];
    long off0 = (long)c->qbase[q] * s, off1 = two ? (long)c->qbase[q + 1] * s : off0;
    const int8_t *w0 = qd0 + 64, *w1 = qd1 + 64;
    /* a padding quad (no outputs) has base 0, so the furthest read is from whichever base is larger */
    long furthest = off0 > off1 ? off0 : off1;
    if (furthest + (long)4 * s * (groups - 1) + 128 <= rowbytes) {
        for (int g = 0; g < groups; g++, off0 += 4 * s, off1 += 4 * s, w0 += 192, w1 += 192) {
            __m512i px = _mm512_permutex2var_epi8(_mm512_loadu_si512((const void *)(row + off0)), sel0,
                                                  _mm512_loadu_si512((const void *)(row + off0 + 64)));
            __m512i py = _mm512_permutex2var_epi8(_mm512_loadu_si512((const void *)(row + off1)), sel1,
                                                  _mm512_loadu_si512((const void *)(row + off1 + 64)));
            a0 = _mm512_dpbusd_epi32(a0, px, _mm512_loadu_si512((const void *)w0));
            a1 = _mm512_dpbusd_epi32(a1, px, _mm512_loadu_si512((const void *)(w0 + 64)));
            a2 = _mm512_dpbusd_epi32(a2, px, _mm512_loadu_si512((const void *)(w0 + 128)));
            b0 = _mm512_dpbusd_epi32(b0, py, _mm512_loadu_si512((const void *)w1));
            b1 = _mm512_dpbusd_epi32(b1, py, _mm512_loadu_si512((const void *)(w1 + 64)));
            b2 = _mm512_dpbusd_epi32(b2, py, _mm512_loadu_si512((const void *)(w1 + 128)));
        }
    } else { /* near the row's end: masked loads never touch bytes past it */
        for (int g = 0; g < groups; g++, off0 += 4 * s, off1 += 4 * s, w0 += 192, w1 += 192) {
            __m512i p[2];
            for (int k = 0; k < 2; k++) {
                long off = k ? off1 : off0, left = rowbytes - off;
                __mmask64 mlo = left >= 64 ? ~(__mmask64)0 : left <= 0 ? 0 : (((__mmask64)1) << left) - 1;
                left -= 64;
                __mmask64 mhi = left >= 64 ? ~(__mmask64)0 : left <= 0 ? 0 : (((__mmask64)1) << left) - 1;
                p[k] = _mm512_permutex2var_epi8(_mm512_maskz_loadu_epi8(mlo, row + off), k ? sel1 : sel0,
                                                _mm512_maskz_loadu_epi8(mhi, row + off + 64));
            }
            a0 = _mm512_dpbusd_epi32(a0, p[0], _mm512_loadu_si512((const void *)w0));
            a1 = _mm512_dpbusd_epi32(a1, p[0], _mm512_loadu_si512((const void *)(w0 + 64)));
            a2 = _mm512_dpbusd_epi32(a2, p[0], _mm512_loadu_si512((const void *)(w0 + 128)));
            b0 = _mm512_dpbusd_epi32(b0, p[1], _mm512_loadu_si512((const void *)w1));
            b1 = _mm512_dpbusd_epi32(b1, p[1], _mm512_loadu_si512((const void *)(w1 + 64)));
            b2 = _mm512_dpbusd_epi32(b2, p[1], _mm512_loadu_si512((const void *)(w1 + 128)));
        }
    }
    /* weight digits: sum = d0 + d1 * 2^8 + d2 * 2^16 */
    *t0 = _mm512_add_epi32(_mm512_add_epi32(a0, _mm512_slli_epi32(a1, 8)), _mm512_slli_epi32(a2, 16));
    *t1 = _mm512_add_epi32(_mm512_add_epi32(b0, _mm512_slli_epi32(b1, 8)), _mm512_slli_epi32(b2, 16));
}

TARGET_AVX512 static void hrow_avx512(const uint8_t *row, int rowbytes, int s, const Coeffs *c, uint8_t *out, int ps) {
    /* spread kernel: int16 lane 8j + 2ch + e of a group of 8 taps = channel ch of tap 2j + e */
    int8_t idx[64];
    for (int j = 0; j < 4; j++)
        for (int ch = 0; ch < 4; ch++)
            for (int e = 0; e < 2; e++) {
                idx[2 * (8 * j + 2 * ch + e)] = ch < 3 ? (int8_t)((2 * j + e) * s + ch) : 0;
                idx[2 * (8 * j + 2 * ch + e) + 1] = 0;
            }
    const __m512i perm = _mm512_loadu_si512((const void *)idx);
    /* after packing two quads: lane i holds bytes R G B - of output o0 + i, then of o0 + 4 + i */
    const __m512i gather = _mm512_castsi256_si512(_mm256_setr_epi8(
        0, 16, 32, 48, 4, 20, 36, 52, 1, 17, 33, 49, 5, 21, 37, 53, 2, 18, 34, 50, 6, 22, 38, 54, 0, 0, 0, 0, 0, 0, 0, 0));
    const __m512i round = _mm512_set1_epi32(ROUNDING);
    int nq = c->out_pad / 4;
    for (int q = 0; q < nq; q += 2) {
        __m512i t0, t1;
        int two = q + 1 < nq;
        if (c->qfit[q] && (!two || c->qfit[q + 1])) {
            hquads_avx512(row, rowbytes, s, c, q, two, &t0, &t1);
        } else {
            t0 = c->qfit[q] ? (hquads_avx512(row, rowbytes, s, c, q, 0, &t0, &t1), t0)
                            : hquad_spread_avx512(row, s, c, 4 * q, perm);
            t1 = !two ? _mm512_setzero_si512()
                 : c->qfit[q + 1] ? (hquads_avx512(row, rowbytes, s, c, q + 1, 0, &t1, &t1), t1)
                                  : hquad_spread_avx512(row, s, c, 4 * q + 4, perm);
        }
        t0 = _mm512_srai_epi32(_mm512_add_epi32(t0, round), FRACTION_BITS);
        t1 = _mm512_srai_epi32(_mm512_add_epi32(t1, round), FRACTION_BITS);
        __m512i b = _mm512_packs_epi32(t0, t1); /* saturating packs clamp to 0..255 */
        b = _mm512_packus_epi16(b, b);
        __m256i v = _mm512_castsi512_si256(_mm512_permutexvar_epi8(gather, b));
        int o0 = 4 * q;
        __m128i rg = _mm256_castsi256_si128(v);
        _mm_storel_epi64((__m128i *)(out + o0), rg);
        _mm_storel_epi64((__m128i *)(out + ps + o0), _mm_unpackhi_epi64(rg, rg));
        _mm_storel_epi64((__m128i *)(out + 2 * ps + o0), _mm256_extracti128_si256(v, 1));
    }
}
#endif /* HAVE_X86 */

/* ------------------------------------------------------------------------------------------------ */
/* Drivers                                                                                           */

typedef struct {
    const uint8_t *src;
    int in_w, in_h;
    size_t row_stride;
    int s;
    int out_w, out_h, tile;
    uint8_t *dst;
    int path;
} Job;

/* One output row held as three planes (ps apart) -> its place in the [ty][tx][3][tile][tile] tiles. */
static void scatter_row(const Job *j, const uint8_t *planes, int ps, int y) {
    size_t tile = (size_t)j->tile, tiles_x = (size_t)j->out_w / tile;
    size_t ty = (size_t)y / tile, yy = (size_t)y % tile;
    for (size_t tx = 0; tx < tiles_x; tx++)
        for (int ch = 0; ch < 3; ch++)
            memcpy(j->dst + (((ty * tiles_x + tx) * 3 + ch) * tile + yy) * tile, planes + (size_t)ch * ps + tx * tile,
                   tile);
}

static void deinterleave(const uint8_t *px, int w, int s, uint8_t *planes, int ps) {
    for (int x = 0; x < w; x++) {
        planes[x] = px[(size_t)x * s];
        planes[ps + x] = px[(size_t)x * s + 1];
        planes[2 * ps + x] = px[(size_t)x * s + 2];
    }
}

static size_t round_up(size_t v, size_t m) { return (v + m - 1) / m * m; }

/* Returns 0, or -1 when out of memory. Runs without the GIL. */
static int run_job(const Job *j) {
    vrow_fn vrow = vrow_scalar;
    hrow_fn hrow = hrow_scalar;
#if HAVE_X86
    if (j->path == PATH_AVX512) {
        vrow = vrow_avx512;
        hrow = hrow_avx512;
    } else if (j->path == PATH_AVX2) {
        vrow = vrow_avx2;
        hrow = hrow_avx2;
    }
#endif
    int simd = j->path != PATH_SCALAR;
    int need_h = j->out_w != j->in_w, need_v = j->out_h != j->in_h;
    int dw = j->in_w - j->out_w, dh = j->in_h - j->out_h;
    int vertical_first = need_h && need_v && dh > 0 && dh > 2 * dw; /* Pillow 13's pass order */
    int s = j->s;
    size_t in_row_bytes = (size_t)(j->in_w - 1) * s + 3; /* readable bytes of a source row */
    size_t ps = round_up((size_t)j->out_w, 64) + 64;    /* plane stride of our planar rows */
    size_t planar_bytes = 3 * ps + VEC_PAD;
    Coeffs ch = {0}, cv = {0};
    uint8_t *buf = NULL, *ring = NULL;
    const uint8_t **rows = NULL;
    int rc = -1;

    if (need_h && make_coeffs(j->in_w, j->out_w, simd ? 2 : 0, &ch)) goto done;
    if (need_h && j->path == PATH_AVX512 && make_quads(&ch, s)) goto done;
    if (need_v && make_coeffs(j->in_h, j->out_h, simd ? 1 : 0, &cv)) goto done;
    if (need_v && !(rows = malloc(sizeof(*rows) * ((size_t)cv.ksize + 2)))) goto done;

    if (!need_h && !need_v) {
        if (!(buf = malloc(planar_bytes))) goto done;
        for (int y = 0; y < j->out_h; y++) {
            deinterleave(j->src + (size_t)y * j->row_stride, j->in_w, s, buf, (int)ps);
            scatter_row(j, buf, (int)ps, y);
        }
    } else if (!need_v) { /* horizontal only */
        if (!(buf = malloc(planar_bytes))) goto done;
        for (int y = 0; y < j->out_h; y++) {
            hrow(j->src + (size_t)y * j->row_stride, (int)in_row_bytes, s, &ch, buf, (int)ps);
            scatter_row(j, buf, (int)ps, y);
        }
    } else if (!need_h || vertical_first) {
        /* vertical over the interleaved source bytes (any byte is just a sample), then the horizontal pass or
         * a plain deinterleave of that row */
        size_t mid_bytes = round_up(in_row_bytes, 64) + VEC_PAD;
        if (!(buf = malloc(planar_bytes + mid_bytes))) goto done;
        uint8_t *mid = buf + planar_bytes;
        memset(mid, 0, mid_bytes);
        for (int y = 0; y < j->out_h; y++) {
            int first = cv.first[y], n = cv.count[y];
            for (int k = 0; k < n; k++) rows[k] = j->src + (size_t)(first + k) * j->row_stride;
            rows[n] = rows[n - 1];
            vrow(rows, 0, &cv, y, (int)in_row_bytes, mid);
            if (need_h)
                hrow(mid, (int)mid_bytes, s, &ch, buf, (int)ps);
            else
                deinterleave(mid, j->in_w, s, buf, (int)ps);
            scatter_row(j, buf, (int)ps, y);
        }
    } else {
        /* horizontal first, lazily: a ring of ksize planar rows holds the horizontal results the next
         * output row needs (windows only move forward) */
        int ring_n = cv.ksize;
        size_t ring_row = round_up(3 * ps, 64) + VEC_PAD;
        if (!(buf = malloc(planar_bytes + ring_row))) goto done;
        if (!(ring = calloc((size_t)ring_n, ring_row))) goto done;
        int next = cv.first[0];
        int direct = simd && j->tile % 64 == 0;
        for (int y = 0; y < j->out_h; y++) {
            int first = cv.first[y], n = cv.count[y];
            for (; next < first + n; next++) {
                if (next < first) continue; /* never happens for Pillow's windows, kept for safety */
                hrow(j->src + (size_t)next * j->row_stride, (int)in_row_bytes, s, &ch,
                     ring + (size_t)(next % ring_n) * ring_row, (int)ps);
            }
            for (int k = 0; k < n; k++) rows[k] = ring + (size_t)((first + k) % ring_n) * ring_row;
            rows[n] = rows[n - 1];
            if (direct) { /* each tile row is a whole number of vectors: write it in place, no row copy */
                size_t tile = (size_t)j->tile, tiles_x = (size_t)j->out_w / tile;
                size_t ty = (size_t)y / tile, yy = (size_t)y % tile;
                for (size_t tx = 0; tx < tiles_x; tx++)
                    for (int chn = 0; chn < 3; chn++)
                        vrow(rows, chn * ps + tx * tile, &cv, y, (int)tile,
                             j->dst + (((ty * tiles_x + tx) * 3 + chn) * tile + yy) * tile);
            } else {
                vrow(rows, 0, &cv, y, (int)(3 * ps), buf);
                scatter_row(j, buf, (int)ps, y);
            }
        }
    }
    rc = 0;
done:
    free(rows);
    free(buf);
    free(ring);
    free_coeffs(&ch);
    free_coeffs(&cv);
    return rc;
}

/* ------------------------------------------------------------------------------------------------ */
/* Python interface                                                                                  */

static int parse_path(const char *name) {
    if (!strcmp(name, "auto")) return best_path;
    for (int p = 0; p < 3; p++)
        if (!strcmp(name, path_names[p])) {
            if (p > best_path) {
                PyErr_Format(PyExc_ValueError, "path %s is not supported by this CPU (best: %s)", name,
                             path_names[best_path]);
                return -1;
            }
            return p;
        }
    PyErr_Format(PyExc_ValueError, "unknown path %s (scalar, avx2, avx512 or auto)", name);
    return -1;
}

PyDoc_STRVAR(resize_tiles_doc,
"resize_tiles(src, width, height, row_stride, pixel_stride, out_width, out_height, tile, dst, *, path=None)\n"
"\n"
"Pillow 13's image.resize((out_width, out_height), Image.Resampling.BICUBIC) of an 8-bit RGB image, bit for\n"
"bit, written channel-first in tiles. src: a buffer of height rows, row y at y*row_stride, pixel x at\n"
"+x*pixel_stride (3 or 4), channels R,G,B at +0,+1,+2. dst: a writable C-contiguous buffer of\n"
"3*out_height*out_width bytes laid out [out_height/tile][out_width/tile][3][tile][tile]; out_width and\n"
"out_height must be multiples of tile. path: 'scalar', 'avx2', 'avx512' or 'auto' (default: simd()).\n"
"Releases the GIL while computing.");

static PyObject *resize_tiles(PyObject *self, PyObject *args, PyObject *kwargs) {
    (void)self;
    static char *kwlist[] = {"src", "width", "height", "row_stride", "pixel_stride", "out_width", "out_height",
                             "tile", "dst", "path", NULL};
    Py_buffer src = {0}, dst = {0};
    Py_ssize_t w, h, row_stride, s, ow, oh, tile;
    const char *path_name = NULL;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*nnnnnnnw*|$z:resize_tiles", kwlist, &src, &w, &h, &row_stride,
                                     &s, &ow, &oh, &tile, &dst, &path_name))
        return NULL;
    PyObject *result = NULL;
    int path = default_path;
    if (path_name && (path = parse_path(path_name)) < 0) goto out;
    const Py_ssize_t LIMIT = 1 << 24; /* sizes far beyond any image, so all offsets below fit easily */
    if (w < 1 || h < 1 || ow < 1 || oh < 1 || tile < 1 || w > LIMIT || h > LIMIT || ow > LIMIT || oh > LIMIT) {
        PyErr_Format(PyExc_ValueError, "resize_tiles: bad sizes %zdx%zd -> %zdx%zd (tile %zd)", w, h, ow, oh, tile);
        goto out;
    }
    if (ow % tile || oh % tile) {
        PyErr_Format(PyExc_ValueError, "resize_tiles: output %zdx%zd is not a multiple of tile %zd", ow, oh, tile);
        goto out;
    }
    if (s != 3 && s != 4) {
        PyErr_Format(PyExc_ValueError, "resize_tiles: pixel_stride must be 3 or 4, got %zd", s);
        goto out;
    }
    Py_ssize_t row_bytes = (w - 1) * s + 3;
    if (row_stride < row_bytes || row_stride > ((Py_ssize_t)1 << 40) / h) {
        PyErr_Format(PyExc_ValueError, "resize_tiles: row_stride %zd does not fit width %zd x pixel_stride %zd",
                     row_stride, w, s);
        goto out;
    }
    if (src.len < (h - 1) * row_stride + row_bytes) {
        PyErr_Format(PyExc_ValueError, "resize_tiles: src holds %zd bytes, need %zd", src.len,
                     (h - 1) * row_stride + row_bytes);
        goto out;
    }
    if (dst.len != 3 * ow * oh) {
        PyErr_Format(PyExc_ValueError, "resize_tiles: dst holds %zd bytes, need 3*%zd*%zd = %zd", dst.len, oh, ow,
                     3 * ow * oh);
        goto out;
    }
    Job job = {(const uint8_t *)src.buf, (int)w, (int)h, (size_t)row_stride, (int)s,
               (int)ow, (int)oh, (int)tile, (uint8_t *)dst.buf, path};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = run_job(&job);
    Py_END_ALLOW_THREADS
    if (rc) {
        PyErr_NoMemory();
        goto out;
    }
    result = Py_None;
    Py_INCREF(result);
out:
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

PyDoc_STRVAR(simd_doc, "simd() -> str: the code path resize_tiles uses by default ('avx512', 'avx2' or 'scalar').");

static PyObject *simd(PyObject *self, PyObject *unused) {
    (void)self;
    (void)unused;
    return PyUnicode_FromString(path_names[default_path]);
}

PyDoc_STRVAR(set_path_doc,
"set_path(name) -> str: make 'scalar', 'avx2', 'avx512' or 'auto' (the best this CPU runs) the default path;\n"
"returns the previous one. The environment variable VLM_HPC_BICUBIC_PATH sets it at import.");

static PyObject *set_path(PyObject *self, PyObject *arg) {
    (void)self;
    const char *name = PyUnicode_AsUTF8(arg);
    if (!name) return NULL;
    int p = parse_path(name);
    if (p < 0) return NULL;
    int previous = default_path;
    default_path = p;
    return PyUnicode_FromString(path_names[previous]);
}

static PyMethodDef methods[] = {
    {"resize_tiles", (PyCFunction)(void (*)(void))resize_tiles, METH_VARARGS | METH_KEYWORDS, resize_tiles_doc},
    {"simd", simd, METH_NOARGS, simd_doc},
    {"set_path", set_path, METH_O, set_path_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_bicubic",
    "Pillow 13's 8-bit BICUBIC resize of RGB images, bit-exact and SIMD-accelerated, into channel-first tiles.", -1,
    methods, NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__bicubic(void) {
#if HAVE_X86
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2")) best_path = PATH_AVX2;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vbmi") &&
        __builtin_cpu_supports("avx512vnni"))
        best_path = PATH_AVX512;
#endif
    default_path = best_path;
    const char *forced = getenv("VLM_HPC_BICUBIC_PATH");
    if (forced && *forced) {
        int p = parse_path(forced);
        if (p < 0) return NULL;
        default_path = p;
    }
    return PyModule_Create(&module);
}
