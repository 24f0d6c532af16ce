/* Pillow's 8-bit bicubic resize, bit-exact, on planar RGB and vectorised.
 *
 * The original tiles images with Pillow's Image.resize(BICUBIC). Its arithmetic is fixed: filter weights
 * in double precision, normalised, rounded to 22-bit fixed point; each pass (horizontal over the rows the
 * vertical pass needs, then vertical; or vertical first when the height shrinks much more) sums uint8 x
 * int32 products from 2^21 and keeps (sum >> 22) clamped to 0..255. Integer sums do not depend on their order, so this file computes the same weights and the
 * same sums, but on channel planes, eight products at a time, and writes channel-first output (the tiles'
 * layout). tests/test_tiling.py compares it with Pillow on many sizes.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define FRACTION_BITS 22 /* 32 bits - 8 for the pixel - 2 for the filter's overshoot */
#define ROUNDING (1 << (FRACTION_BITS - 1))
#define LANES 8
#define PLANE_PADDING 64 /* buffers read by the horizontal pass end with this, for its 8-wide loads */

typedef int32_t lanes_i32 __attribute__((vector_size(4 * LANES)));
typedef uint8_t lanes_u8 __attribute__((vector_size(LANES)));

/* Keys' cubic convolution with a = -0.5, in the association Pillow evaluates it. */
static double cubic(double x) {
    if (x < 0.0) x = -x;
    if (x < 1.0) return ((-0.5 + 2.0) * x - (-0.5 + 3.0)) * x * x + 1;
    if (x < 2.0) return (((x - 5) * x + 8) * x - 4) * -0.5;
    return 0.0;
}

/* For each output position: the first input index, the tap count, and `stride` fixed-point weights
 * (zero past the taps). */
typedef struct {
    int stride;
    int *first;
    int *count;
    int32_t *weights;
} Taps;

static void free_taps(Taps *taps) {
    free(taps->first);
    free(taps->count);
    free(taps->weights);
}

static int make_taps(int in_size, int out_size, Taps *taps) {
    double scale = (double)(float)in_size / out_size;
    double filterscale = scale < 1.0 ? 1.0 : scale;
    double support = 2.0 * filterscale;
    int ksize = (int)ceil(support) * 2 + 1;
    taps->stride = (ksize + LANES - 1) / LANES * LANES;
    taps->first = malloc(sizeof(int) * out_size);
    taps->count = malloc(sizeof(int) * out_size);
    taps->weights = calloc((size_t)out_size * taps->stride, sizeof(int32_t));
    double *w = malloc(sizeof(double) * ksize);
    if (!taps->first || !taps->count || !taps->weights || !w) {
        free(w);
        free_taps(taps);
        return -1;
    }
    for (int out = 0; out < out_size; out++) {
        double center = (out + 0.5) * scale;
        int lo = (int)(center - support + 0.5);
        int hi = (int)(center + support + 0.5);
        if (lo < 0) lo = 0;
        if (hi > in_size) hi = in_size;
        int n = hi - lo;
        double total = 0.0;
        for (int k = 0; k < n; k++) {
            w[k] = cubic((k + lo - center + 0.5) * (1.0 / filterscale));
            total += w[k];
        }
        int32_t *fixed = taps->weights + (size_t)out * taps->stride;
        for (int k = 0; k < n; k++) {
            double v = total != 0.0 ? w[k] / total : w[k];
            fixed[k] = v < 0 ? (int32_t)(-0.5 + v * (1 << FRACTION_BITS))
                             : (int32_t)(0.5 + v * (1 << FRACTION_BITS));
        }
        taps->first[out] = lo;
        taps->count[out] = n;
    }
    free(w);
    return 0;
}

static inline uint8_t to_pixel(int32_t sum) {
    int32_t v = sum >> FRACTION_BITS;
    return v < 0 ? 0 : v > 255 ? 255 : (uint8_t)v;
}

__attribute__((always_inline)) static inline lanes_i32 load_widened(const uint8_t *p) {
    lanes_u8 bytes;
    memcpy(&bytes, p, LANES);
    return __builtin_convertvector(bytes, lanes_i32);
}

/* in_h x w plane -> out_h x w: each output row is a weighted sum of whole input rows. */
__attribute__((target_clones("avx2", "default")))
static void vertical(const uint8_t *in, int w, const Taps *taps, int first_row, int out_h, uint8_t *out) {
    for (int y = 0; y < out_h; y++) {
        const int32_t *weights = taps->weights + (size_t)y * taps->stride;
        const uint8_t *top = in + (size_t)(taps->first[y] - first_row) * w;
        int n = taps->count[y];
        uint8_t *dst = out + (size_t)y * w;
        int x = 0;
        for (; x + LANES <= w; x += LANES) {
            lanes_i32 acc = {ROUNDING, ROUNDING, ROUNDING, ROUNDING, ROUNDING, ROUNDING, ROUNDING, ROUNDING};
            for (int k = 0; k < n; k++) acc += load_widened(top + (size_t)k * w + x) * weights[k];
            acc >>= FRACTION_BITS;
            acc &= ~(acc < 0);                           /* comparisons give all-ones lanes where true */
            lanes_i32 over = acc > 255;
            acc = (acc & ~over) | (over & 255);
            lanes_u8 pixels = __builtin_convertvector(acc, lanes_u8);
            memcpy(dst + x, &pixels, LANES);
        }
        for (; x < w; x++) {
            int32_t sum = ROUNDING;
            for (int k = 0; k < n; k++) sum += top[(size_t)k * w + x] * weights[k];
            dst[x] = to_pixel(sum);
        }
    }
}

/* rows x cols -> cols x rows, in cache-sized blocks. */
static void transpose(const uint8_t *in, int rows, int cols, uint8_t *out) {
    enum { BLOCK = 32 };
    for (int r0 = 0; r0 < rows; r0 += BLOCK)
        for (int c0 = 0; c0 < cols; c0 += BLOCK) {
            int r1 = r0 + BLOCK < rows ? r0 + BLOCK : rows, c1 = c0 + BLOCK < cols ? c0 + BLOCK : cols;
            for (int c = c0; c < c1; c++)
                for (int r = r0; r < r1; r++) out[(size_t)c * rows + r] = in[(size_t)r * cols + c];
        }
}

/* rows x in_w -> rows x out_w: transposed, the columns combine like rows do in `vertical`. `scratch` holds
 * in_w * rows + out_w * rows bytes. */
static void horizontal(const uint8_t *in, int in_w, int rows, const Taps *taps, int out_w, uint8_t *out,
                       uint8_t *scratch) {
    uint8_t *columns = scratch, *combined = scratch + (size_t)in_w * rows;
    transpose(in, rows, in_w, columns);
    vertical(columns, rows, taps, 0, out_w, combined);
    transpose(combined, out_w, rows, out);
}

/* planar(rgb, width, height) -> bytearray: 3 planes of height x width (plus padding) from packed RGB. */
static PyObject *planar(PyObject *self, PyObject *args) {
    Py_buffer rgb;
    int width, height;
    if (!PyArg_ParseTuple(args, "y*ii", &rgb, &width, &height)) return NULL;
    size_t pixels = (size_t)width * height;
    if (width <= 0 || height <= 0 || (size_t)rgb.len != pixels * 3) {
        PyBuffer_Release(&rgb);
        return PyErr_Format(PyExc_ValueError, "planar: need %d x %d x 3 bytes, got %zd", width, height, rgb.len);
    }
    PyObject *result = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(pixels * 3 + PLANE_PADDING));
    if (result) {
        uint8_t *planes = (uint8_t *)PyByteArray_AS_STRING(result);
        const uint8_t *src = rgb.buf;
        Py_BEGIN_ALLOW_THREADS
        for (size_t i = 0; i < pixels; i++) {
            planes[i] = src[3 * i];
            planes[pixels + i] = src[3 * i + 1];
            planes[2 * pixels + i] = src[3 * i + 2];
        }
        memset(planes + pixels * 3, 0, PLANE_PADDING);
        Py_END_ALLOW_THREADS
    }
    PyBuffer_Release(&rgb);
    return result;
}

/* resize(planes, width, height, out_width, out_height) -> bytearray of 3 x out_height x out_width, equal to
 * Pillow's image.resize((out_width, out_height), BICUBIC) in channel-first order. */
static PyObject *resize(PyObject *self, PyObject *args) {
    Py_buffer buffer;
    int in_w, in_h, out_w, out_h;
    if (!PyArg_ParseTuple(args, "y*iiii", &buffer, &in_w, &in_h, &out_w, &out_h)) return NULL;
    size_t in_plane = (size_t)in_w * in_h, out_plane = (size_t)out_w * out_h;
    if (in_w <= 0 || in_h <= 0 || out_w <= 0 || out_h <= 0 || (size_t)buffer.len < in_plane * 3 + PLANE_PADDING) {
        PyBuffer_Release(&buffer);
        return PyErr_Format(PyExc_ValueError, "resize: bad sizes or a buffer not made by planar()");
    }
    PyObject *result = PyByteArray_FromStringAndSize(NULL, (Py_ssize_t)(out_plane * 3));
    if (!result) {
        PyBuffer_Release(&buffer);
        return NULL;
    }
    uint8_t *out = (uint8_t *)PyByteArray_AS_STRING(result);
    const uint8_t *in = buffer.buf;
    int failed = 0;
    Py_BEGIN_ALLOW_THREADS
    Taps rows = {0}, cols = {0};
    uint8_t *temp = NULL;
    int need_h = out_w != in_w, need_v = out_h != in_h;
    /* Pillow 13 runs the vertical pass first when height shrinks by more than twice what width does */
    int horizontal_first = !(in_h - out_h > 0 && in_h - out_h > (in_w - out_w) * 2);
    int tallest = in_h > out_h ? in_h : out_h;
    uint8_t *scratch = need_h ? malloc((size_t)(in_w + out_w) * tallest) : NULL;
    if (make_taps(in_h, out_h, &rows) != 0 || (need_h && (make_taps(in_w, out_w, &cols) != 0 || !scratch))) {
        failed = 1;
    } else if (need_h && need_v && horizontal_first) {
        /* only the input rows the vertical pass reads: [first of row 0, end of the last row) */
        int first = rows.first[0], last = rows.first[out_h - 1] + rows.count[out_h - 1];
        temp = malloc((size_t)out_w * (last - first));
        failed = temp == NULL;
        for (int c = 0; c < 3 && !failed; c++) {
            horizontal(in + c * in_plane + (size_t)first * in_w, in_w, last - first, &cols, out_w, temp, scratch);
            vertical(temp, out_w, &rows, first, out_h, out + c * out_plane);
        }
    } else if (need_h && need_v) {
        temp = malloc((size_t)in_w * out_h + PLANE_PADDING);  /* padded for the horizontal pass's loads */
        failed = temp == NULL;
        for (int c = 0; c < 3 && !failed; c++) {
            vertical(in + c * in_plane, in_w, &rows, 0, out_h, temp);
            horizontal(temp, in_w, out_h, &cols, out_w, out + c * out_plane, scratch);
        }
    } else if (need_h) {
        for (int c = 0; c < 3; c++) horizontal(in + c * in_plane, in_w, in_h, &cols, out_w, out + c * out_plane, scratch);
    } else if (need_v) {
        for (int c = 0; c < 3; c++) vertical(in + c * in_plane, in_w, &rows, 0, out_h, out + c * out_plane);
    } else {
        memcpy(out, in, out_plane * 3);
    }
    free(temp);
    free(scratch);
    free_taps(&rows);
    if (need_h) free_taps(&cols);
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&buffer);
    if (failed) {
        Py_DECREF(result);
        return PyErr_NoMemory();
    }
    return result;
}

static PyMethodDef methods[] = {
    {"planar", planar, METH_VARARGS, "planar(rgb, width, height) -> bytearray: packed RGB to 3 padded planes"},
    {"resize", resize, METH_VARARGS,
     "resize(planes, width, height, out_width, out_height) -> bytearray: Pillow's bicubic resize, channel-first"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_resample", NULL, -1, methods};

PyMODINIT_FUNC PyInit__resample(void) { return PyModule_Create(&module); }
