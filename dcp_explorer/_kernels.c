/* Optional compiled kernels for dequantization (dcp_explorer/quant.py uses them when built).
 *
 * fp8_rows(codes, lut, scol, out, n, w, per)
 *     out[i, j] = lut[codes[i, j]] * scol[i // per, j]   for i < n, j < w
 *
 * codes: n*w bytes (the stored 1-byte codes), lut: 256 float32 (each code's exact float32 value,
 * as torch converts it), scol: ceil(n / per) * w float32 (the scale of each (block-row, column)),
 * out: n*w float32, written. One float32 multiply per value, so the result is bit-identical to
 * torch's ``code.to(float32) * scale`` and to the numpy path (look-up, then multiply). The GIL is
 * released: quant.py runs slabs on several threads.
 *
 * mxfp4_pairs(blocks, scales, table, out, groups, width)
 *     out[g * width + j] = table[scales[g] << 8 | blocks[g * width + j]]   for g < groups, j < width
 *
 * blocks: groups*width bytes (two E2M1 codes each), scales: groups E8M0 bytes, table: 65536 items of
 * 4 or 8 bytes (the two values of each (scale, byte), already rounded to the target dtype; quant.py's
 * _mxfp4_table), out: groups*width items of the table's size. The same look-up numpy's take does on
 * a (scale << 8 | byte) index, without building the index.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

static int
get(PyObject *obj, Py_buffer *view, int writable, const char *what)
{
    if (PyObject_GetBuffer(obj, view, PyBUF_C_CONTIGUOUS | (writable ? PyBUF_WRITABLE : 0)) < 0) {
        PyErr_Format(PyExc_TypeError, "%s must be a C-contiguous%s buffer", what,
                     writable ? " writable" : "");
        return -1;
    }
    return 0;
}

/* Acquire the buffers of objs[0..n) into views[0..n), C-contiguous, the last one (every kernel's
 * output) writable. On failure, release those already acquired and return -1 with TypeError set. */
static int
get_all(PyObject *const *objs, Py_buffer *views, const char *const *names, int n)
{
    for (int i = 0; i < n; i++) {
        if (get(objs[i], &views[i], i == n - 1, names[i]) < 0) {
            while (i-- > 0)
                PyBuffer_Release(&views[i]);
            return -1;
        }
    }
    return 0;
}

/* A kernel's end: release views[0..n), then None, or ValueError "kernel: bad" when bad is set. */
static PyObject *
finish(Py_buffer *views, int n, const char *kernel, const char *bad)
{
    for (int i = 0; i < n; i++)
        PyBuffer_Release(&views[i]);
    if (bad != NULL) {
        PyErr_Format(PyExc_ValueError, "%s: %s", kernel, bad);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
fp8_rows(PyObject *self, PyObject *args)
{
    static const char *const names[] = {"codes", "lut", "scol", "out"};
    PyObject *objs[4];
    Py_buffer v[4];
    const Py_buffer *codes = &v[0], *lut = &v[1], *scol = &v[2], *out = &v[3];
    Py_ssize_t n, w, per;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOOnnn", &objs[0], &objs[1], &objs[2], &objs[3], &n, &w, &per))
        return NULL;
    if (n < 0 || w < 0 || per <= 0) {
        PyErr_SetString(PyExc_ValueError, "fp8_rows: need n >= 0, w >= 0, per > 0");
        return NULL;
    }
    if (get_all(objs, v, names, 4) < 0)
        return NULL;
    Py_ssize_t k = n ? (n - 1) / per + 1 : 0;
    const char *bad = NULL;
    if (codes->len < n * w)
        bad = "codes is shorter than n * w bytes";
    else if (lut->len != 256 * (Py_ssize_t)sizeof(float))
        bad = "lut must hold 256 float32";
    else if (scol->len < k * w * (Py_ssize_t)sizeof(float))
        bad = "scol is shorter than ceil(n / per) * w float32";
    else if (out->len < n * w * (Py_ssize_t)sizeof(float))
        bad = "out is shorter than n * w float32";
    if (bad == NULL) {
        const uint8_t *c = (const uint8_t *)codes->buf;
        const float *s0 = (const float *)scol->buf;
        float *o = (float *)out->buf;
        float table[256];
        memcpy(table, lut->buf, sizeof(table));
        Py_BEGIN_ALLOW_THREADS
        for (Py_ssize_t i = 0; i < n; i++) {
            const uint8_t *ci = c + i * w;
            const float *si = s0 + (i / per) * w;
            float *oi = o + i * w;
            for (Py_ssize_t j = 0; j < w; j++)
                oi[j] = table[ci[j]] * si[j];
        }
        Py_END_ALLOW_THREADS
    }
    return finish(v, 4, "fp8_rows", bad);
}

static PyObject *
mxfp4_pairs(PyObject *self, PyObject *args)
{
    static const char *const names[] = {"blocks", "scales", "table", "out"};
    PyObject *objs[4];
    Py_buffer v[4];
    const Py_buffer *blocks = &v[0], *scales = &v[1], *table = &v[2], *out = &v[3];
    Py_ssize_t groups, width;
    (void)self;
    if (!PyArg_ParseTuple(args, "OOOOnn", &objs[0], &objs[1], &objs[2], &objs[3], &groups, &width))
        return NULL;
    if (groups < 0 || width < 0) {
        PyErr_SetString(PyExc_ValueError, "mxfp4_pairs: need groups >= 0, width >= 0");
        return NULL;
    }
    if (get_all(objs, v, names, 4) < 0)
        return NULL;
    Py_ssize_t isz = table->len / 65536;
    const char *bad = NULL;
    if (table->len != 65536 * isz || (isz != 4 && isz != 8))
        bad = "table must hold 65536 items of 4 or 8 bytes";
    else if (blocks->len < groups * width)
        bad = "blocks is shorter than groups * width bytes";
    else if (scales->len < groups)
        bad = "scales is shorter than groups bytes";
    else if (out->len < groups * width * isz)
        bad = "out is shorter than groups * width items";
    else if (((uintptr_t)out->buf | (uintptr_t)table->buf) % (uintptr_t)isz)
        bad = "out and table must be aligned to the item size";
    if (bad == NULL) {
        const uint8_t *b = (const uint8_t *)blocks->buf;
        const uint8_t *sc = (const uint8_t *)scales->buf;
        Py_BEGIN_ALLOW_THREADS
        if (isz == 8) {
            const uint64_t *t = (const uint64_t *)table->buf;
            uint64_t *o = (uint64_t *)out->buf;
            for (Py_ssize_t g = 0; g < groups; g++) {
                const uint64_t *tg = t + ((size_t)sc[g] << 8);
                const uint8_t *bg = b + g * width;
                uint64_t *og = o + g * width;
                for (Py_ssize_t j = 0; j < width; j++)
                    og[j] = tg[bg[j]];
            }
        }
        else {
            const uint32_t *t = (const uint32_t *)table->buf;
            uint32_t *o = (uint32_t *)out->buf;
            for (Py_ssize_t g = 0; g < groups; g++) {
                const uint32_t *tg = t + ((size_t)sc[g] << 8);
                const uint8_t *bg = b + g * width;
                uint32_t *og = o + g * width;
                for (Py_ssize_t j = 0; j < width; j++)
                    og[j] = tg[bg[j]];
            }
        }
        Py_END_ALLOW_THREADS
    }
    return finish(v, 4, "mxfp4_pairs", bad);
}

static PyMethodDef methods[] = {
    {"mxfp4_pairs", mxfp4_pairs, METH_VARARGS,
     "mxfp4_pairs(blocks, scales, table, out, groups, width): "
     "out[g * width + j] = table[scales[g] << 8 | blocks[g * width + j]]"},
    {"fp8_rows", fp8_rows, METH_VARARGS,
     "fp8_rows(codes, lut, scol, out, n, w, per): out[i, j] = lut[codes[i, j]] * scol[i // per, j]"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_kernels", "Optional compiled dequantization kernels.", -1, methods,
};

PyMODINIT_FUNC
PyInit__kernels(void)
{
    return PyModule_Create(&module);
}
