/*
 * _dcpscan: a restricted, allocation-light pickle VM for torch.distributed.checkpoint
 * ``.metadata`` files (see _fast.py for the Python side).
 *
 * The scanner emulates CPython's C unpickler (``_pickle.Unpickler`` as subclassed by
 * ``_safe_pickle._RestrictedUnpickler``) opcode by opcode, but never builds a Python
 * object per chunk.  Values are 8-byte tagged words:
 *
 *   ints, bools, None               inline
 *   str / bytes                     ids into an interned string table
 *   tuples of ints (torch.Size)     (start, len) into an int arena
 *   other tuples                    (start, len) into a value arena
 *   list / dict / set               ids into a container table
 *   ChunkStorageMetadata,           rows of growable C arrays (the hot objects)
 *   MetadataIndex, _StorageInfo
 *   Metadata, TensorStorageMetadata, generic object records (a few thousand)
 *   BytesStorageMetadata, StorageMeta, TensorProperties
 *
 * Two passes over the input:
 *   pass 1 walks the opcodes only and records which memo indices are ever fetched (GET);
 *   pass 2 runs the VM and stores only those memo entries.  A 405B/1024-rank file has
 *   ~56 M memo puts and a few thousand gets, so this keeps memory proportional to the
 *   result instead of to the pickle.
 *
 * Transient tuples and state dicts are reclaimed with stack-like arenas: a value that
 * escapes (memoized-and-fetched, stored into a long-lived container, duplicated) pins
 * the arenas; a state dict consumed by BUILD of a hot object rolls them back.
 *
 * Results are exact or nothing: anything outside the modelled subset raises
 * ``Unsupported`` (the caller then uses the reference unpickler); a stream the C
 * unpickler would also reject raises ``Malformed``; a global outside the allow-list
 * raises ``Refused(module, name)``.  Every read is bounds-checked and no allocation is
 * sized from a length field before it is checked against the remaining input.  One
 * deliberate difference: a memo index out of sequence and >= 4 Mi is ``Malformed``, where
 * the C unpickler would allocate and zero 16 bytes per index -- also when pass 2 stops on
 * something unmodelled before reaching it (the stream never goes to the reference).
 *
 * Byte stream: the input is read in 1 MiB windows (or used in place when bytes-like).
 * FRAMEs are honoured the way the C unpickler reading from a file does; an opcode that
 * straddles the end of a frame (where its behaviour depends on its buffering) is
 * ``Unsupported``.  The GIL is released while scanning and re-taken for file reads,
 * global lookups and the allow-listed path functions.
 *
 * Python side: _fast.py (fast_parse); tests: tests/test_fastscan.py.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>
#include <stdlib.h>

#if defined(__GNUC__)
#define LIKELY(x) __builtin_expect(!!(x), 1)
#define UNLIKELY(x) __builtin_expect(!!(x), 0)
#else
#define LIKELY(x) (x)
#define UNLIKELY(x) (x)
#endif

/* portable popcount (no -mpopcnt needed) */
static inline int POPCNT64(uint64_t x)
{
    x = x - ((x >> 1) & 0x5555555555555555ULL);
    x = (x & 0x3333333333333333ULL) + ((x >> 2) & 0x3333333333333333ULL);
    x = (x + (x >> 4)) & 0x0F0F0F0F0F0F0F0FULL;
    return (int)((x * 0x0101010101010101ULL) >> 56);
}

/* ------------------------------------------------------------------------- */
/* status codes                                                               */

enum { ST_OK = 0, ST_MALFORMED = 1, ST_TRUNC = 2, ST_UNSUP = 3, ST_REFUSED = 4, ST_PYERR = 5, ST_NOMEM = 6 };

/* ------------------------------------------------------------------------- */
/* values                                                                     */

typedef uint64_t Val;

enum {
    T_NONE = 0, T_BOOL, T_INT, T_BIGINT, T_FLOAT, T_STR, T_DTYPE, T_BYTES, T_BYTEARRAY,
    T_ITUP, T_GTUP, T_LIST, T_DICT, T_SET, T_FROZENSET, T_OBJ, T_CHUNK, T_MIDX, T_SINFO,
    T_GLOBAL
};

#define TAGBITS 5
#define TAG(v) ((unsigned)((v) & 31u))
#define PAY(v) ((v) >> TAGBITS)
#define MK(t, p) ((((uint64_t)(p)) << TAGBITS) | (uint64_t)(t))
#define V_NONE MK(T_NONE, 0)
#define INT_MIN59 (-(((int64_t)1) << 58))
#define INT_MAX59 ((((int64_t)1) << 58) - 1)
#define SPAN_START(v) (PAY(v) & ((((uint64_t)1) << 40) - 1))
#define SPAN_LEN(v) (PAY(v) >> 40)
#define SPAN_MAXLEN ((((uint64_t)1) << 19) - 1)
#define SPAN_MAXSTART ((((uint64_t)1) << 40) - 1)

static inline int64_t int_of(Val v) { return ((int64_t)v) >> TAGBITS; }

/* global codes (kept in sync with _fast.py) */
enum {
    G_UNKNOWN = 0, G_METADATA, G_TSM, G_BSM, G_CHUNK, G_TP, G_MIDX, G_SMETA, G_MEMFMT,
    G_SINFO, G_SIZE, G_LAYOUT, G_POSIX, G_WINPATH, G_ODICT, G_NCODES
};

/* generic record classes (T_OBJ) */
enum { C_METADATA = 1, C_TSM, C_BSM, C_SMETA, C_TP };

/* keywords recognised in string table */
enum {
    KW_NONE = 0, KW_STATE_DICT_METADATA, KW_PLANNER_DATA, KW_STORAGE_DATA, KW_STORAGE_META,
    KW_VERSION, KW_PROPERTIES, KW_SIZE, KW_CHUNKS, KW_OFFSETS, KW_SIZES, KW_FQN, KW_OFFSET,
    KW_INDEX, KW_RELATIVE_PATH, KW_LENGTH, KW_TRANSFORM_DESCRIPTORS, KW_CHECKPOINT_ID,
    KW_SAVE_ID, KW_MODULES, KW_DTYPE, KW_TORCH_PREFIX_DUMMY
};
static const char *KW_NAMES[] = {
    "", "state_dict_metadata", "planner_data", "storage_data", "storage_meta", "version",
    "properties", "size", "chunks", "offsets", "sizes", "fqn", "offset", "index",
    "relative_path", "length", "transform_descriptors", "checkpoint_id", "save_id",
    "modules", "dtype", NULL
};

/* ------------------------------------------------------------------------- */
/* growable arrays                                                            */

#define VEC(T) struct { T *a; size_t n, cap; }
typedef VEC(int64_t) I64V;
typedef VEC(uint64_t) U64V;
typedef VEC(int32_t) I32V;
typedef VEC(uint32_t) U32V;
typedef VEC(uint8_t) U8V;
typedef VEC(Val) ValV;
typedef VEC(double) DblV;
typedef VEC(char) CharV;

static int grow_raw(void **a, size_t *cap, size_t need, size_t el)
{
    if (need <= *cap) return 0;
    size_t nc = *cap ? *cap : 16;
    while (nc < need) {
        size_t nn = nc + (nc >> 1) + 16;
        if (nn < nc) return -1;
        nc = nn;
    }
    if (nc > ((size_t)-1) / el) return -1;
    void *p = realloc(*a, nc * el);
    if (!p) return -1;
    *a = p;
    *cap = nc;
    return 0;
}
#define VRESERVE(s, v, need) (UNLIKELY((need) > (v).cap) ? vgrow_fail(s, grow_raw((void **)&(v).a, &(v).cap, (need), sizeof(*(v).a))) : 0)
#define VPUSH(s, v, x) (VRESERVE(s, v, (v).n + 1) ? -1 : ((v).a[(v).n++] = (x), 0))
#define VFREE(v) do { free((v).a); (v).a = NULL; (v).n = (v).cap = 0; } while (0)

/* ------------------------------------------------------------------------- */
/* records                                                                    */

typedef struct {
    uint64_t off;     /* into string bytes */
    uint32_t len;
    uint32_t hash;
    uint8_t kind;     /* 0 str, 1 bytes, 2 bytearray (not interned) */
    uint8_t kw;
} StrRec;

typedef struct {
    Val *heap;            /* NULL: items live in inl */
    uint32_t *hx;         /* hash index (entry+1), NULL when small */
    uint32_t n, cap;      /* entries (pairs for dicts) and capacity in entries */
    uint32_t hcap;
    uint8_t kind;         /* T_LIST/T_DICT/T_SET/T_FROZENSET, 0 when free */
    uint8_t esc;
    size_t itop0, vtop0;  /* arena tops when created */
    Val inl[8];
} Cont;

typedef struct {
    uint8_t cls;
    uint8_t keyed;
    uint8_t tp_set;
    int32_t dict;         /* container id of __dict__, -1 none */
    Val tp_dtype;
} Obj;

/* ------------------------------------------------------------------------- */
/* scanner state                                                              */

typedef struct {
    /* input */
    const uint8_t *p, *end, *lim, *win;
    uint64_t base;        /* absolute offset of win[0] */
    uint64_t fend;        /* absolute end of current frame, 0 when none */
    uint64_t total;       /* bytes available from the start */
    uint8_t *buf;
    size_t bufcap;
    PyObject *file, *readinto, *read;
    int file_mode;
    long long start_pos;
    Py_buffer view;
    int have_view;
    int pass;

    /* status */
    int st;
    char msg[320];
    PyObject *refmod, *refname;

    /* memo */
    U64V bits;            /* pass 1: bit i set when memo index i is fetched */
    uint32_t *rank;       /* per bitset word: set bits before it */
    Val *slots;
    size_t nslots;
    uint64_t memo_len;

    /* stack & marks */
    ValV stk;
    I64V marks;

    /* arenas */
    I64V ia;              /* ia.n is the int arena top */
    size_t ipin;
    ValV va;              /* va.n is the value arena top */
    size_t vpin, vesc;

    I64V bigs;
    DblV flts;

    /* strings */
    CharV sb;
    StrRec *strs;
    uint32_t nstr, strcap;
    uint32_t *sh;         /* intern table, id+1 */
    uint32_t shcap, shused;

    /* containers */
    Cont *ct;
    uint32_t nct, ctcap;
    U32V cfree;
    U32V work;

    /* generic objects */
    Obj *obj;
    uint32_t nobj, objcap;

    /* chunks */
    U8V ck_state;         /* 0 unbuilt, 1 ok, 2 unusable */
    I64V ck_coord;
    U32V ck_nd;
    I64V ck_off, ck_siz;

    /* MetadataIndex */
    U32V mi_fqn;          /* string id; 0xFFFFFFFF missing/not a str */
    U64V mi_off;          /* kind (0 None, 1 ints, 2 other) | len << 2 | start in mi_ints << 22 */
    I32V mi_idx;
    U8V mi_flags;         /* 1 built, 2 keyed */
    I64V mi_ints;

    /* _StorageInfo */
    U32V si_path;         /* string id; 0xFFFFFFFF missing/bad */
    I64V si_off, si_len;
    U32V si_td;           /* 0 none/missing, else index+1 into si_tdv */
    U8V si_flags;         /* 1 built, 2 keyed, 4 bad offset, 8 bad length */
    ValV si_tdv;

    /* python configuration */
    PyObject *gmap, *dtmap, *funcs, *dtype_cls;
    PyObject **pystr;
    uint32_t pystr_cap;

    Val result;

    /* the GIL is released while scanning and re-taken around calls into Python */
    PyThreadState *ts;
    int release, gdepth;
} S;

static PyObject *UnsupportedErr, *MalformedErr, *RefusedErr;

/* ------------------------------------------------------------------------- */
/* errors                                                                     */

static int fail(S *s, int st, const char *fmt, ...)
{
    if (s->st == ST_OK) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(s->msg, sizeof(s->msg), fmt, ap);
        va_end(ap);
        s->st = st;
    }
    return -1;
}
#define UNSUP(s, ...) fail((s), ST_UNSUP, __VA_ARGS__)
#define BAD(s, ...) fail((s), ST_MALFORMED, __VA_ARGS__)

static int vgrow_fail(S *s, int r)
{
    if (r < 0) {
        if (s->st == ST_OK) {
            s->st = ST_NOMEM;
            snprintf(s->msg, sizeof(s->msg), "out of memory");
        }
        return -1;
    }
    return 0;
}

static int pyerr(S *s)
{
    if (s->st == ST_OK) s->st = ST_PYERR;
    return -1;
}

/* ------------------------------------------------------------------------- */
/* GIL                                                                        */

static inline void gil_enter(S *s)
{
    if (s->ts) {
        PyEval_RestoreThread(s->ts);
        s->ts = NULL;
    }
    s->gdepth++;
}

static inline void gil_leave(S *s)
{
    if (--s->gdepth == 0 && s->release) s->ts = PyEval_SaveThread();
}

static void gil_release_all(S *s)
{
    s->release = 1;
    s->gdepth = 0;
    s->ts = PyEval_SaveThread();
}

static void gil_take_back(S *s)
{
    s->release = 0;
    s->gdepth = 0;
    if (s->ts) {
        PyEval_RestoreThread(s->ts);
        s->ts = NULL;
    }
}

/* ------------------------------------------------------------------------- */
/* input                                                                      */

static inline uint64_t rd_pos(S *s) { return s->base + (uint64_t)(s->p - s->win); }

static void rd_setlim(S *s)
{
    s->lim = s->end;
    if (s->fend) {
        uint64_t wend = s->base + (uint64_t)(s->end - s->win);
        if (s->fend < wend) s->lim = s->win + (s->fend - s->base);
    }
}

/* read more data so that at least n bytes are available at p (file mode) */
static int rd_fill_impl(S *s, size_t n);
static int rd_fill(S *s, size_t n)
{
    if (!s->file_mode) return fail(s, ST_TRUNC, "pickle data was truncated");
    gil_enter(s);
    int rc = rd_fill_impl(s, n);
    gil_leave(s);
    return rc;
}

static int rd_fill_impl(S *s, size_t n)
{
    size_t keep = (size_t)(s->end - s->p);
    if (!s->file_mode) return fail(s, ST_TRUNC, "pickle data was truncated");
    if (n > s->bufcap) {
        size_t nc = s->bufcap ? s->bufcap : (1u << 20);
        while (nc < n) nc *= 2;
        uint8_t *nb = (uint8_t *)malloc(nc);
        if (!nb) return vgrow_fail(s, -1);
        memcpy(nb, s->p, keep);
        free(s->buf);
        s->buf = nb;
        s->bufcap = nc;
    } else if (keep) {
        memmove(s->buf, s->p, keep);
    }
    s->base += (uint64_t)(s->p - s->win);
    s->win = s->buf;
    s->p = s->buf;
    s->end = s->buf + keep;
    while ((size_t)(s->end - s->p) < n) {
        size_t room = s->bufcap - (size_t)(s->end - s->buf);
        uint64_t left = s->total - (s->base + (uint64_t)(s->end - s->win));
        if (left == 0) return fail(s, ST_TRUNC, "pickle data was truncated");
        if (room > left) room = (size_t)left;
        Py_ssize_t got;
        if (s->readinto) {
            PyObject *mv = PyMemoryView_FromMemory((char *)s->end, (Py_ssize_t)room, PyBUF_WRITE);
            if (!mv) return pyerr(s);
            PyObject *r = PyObject_CallOneArg(s->readinto, mv);
            Py_DECREF(mv);
            if (!r) return pyerr(s);
            if (r == Py_None) {
                Py_DECREF(r);
                return UNSUP(s, "non-blocking file");
            }
            got = PyLong_AsSsize_t(r);
            Py_DECREF(r);
            if (got == -1 && PyErr_Occurred()) return pyerr(s);
            if (got < 0 || (size_t)got > room) return UNSUP(s, "readinto() returned %zd", got);
        } else {
            PyObject *r = PyObject_CallFunction(s->read, "n", (Py_ssize_t)room);
            if (!r) return pyerr(s);
            if (!PyBytes_Check(r)) {
                Py_DECREF(r);
                return UNSUP(s, "read() did not return bytes");
            }
            got = PyBytes_GET_SIZE(r);
            if ((size_t)got > room) {
                Py_DECREF(r);
                return UNSUP(s, "read() returned too much");
            }
            memcpy((void *)s->end, PyBytes_AS_STRING(r), (size_t)got);
            Py_DECREF(r);
        }
        if (got == 0) {
            s->total = s->base + (uint64_t)(s->end - s->win);
            return fail(s, ST_TRUNC, "pickle data was truncated");
        }
        s->end += got;
    }
    return 0;
}

/* slow path of NEED: frames, refills, truncation */
static int rd_slow(S *s, size_t n)
{
    uint64_t P = rd_pos(s);
    if (s->fend) {
        if (P == s->fend) {
            s->fend = 0;
        } else if (P + n > s->fend) {
            return UNSUP(s, "an opcode straddles the end of a FRAME at byte %llu", (unsigned long long)s->fend);
        }
    }
    if ((size_t)(s->end - s->p) < n) {
        if (n > s->total - P) {
            /* make the truncation message match where the C unpickler stops */
            return fail(s, ST_TRUNC, "pickle data was truncated");
        }
        if (rd_fill(s, n) < 0) return -1;
    }
    rd_setlim(s);
    return 0;
}

#define NEED(n)                                                              \
    do {                                                                     \
        if (UNLIKELY((size_t)(s->lim - s->p) < (size_t)(n))) {              \
            if (rd_slow(s, (size_t)(n)) < 0) goto fail;                     \
        }                                                                    \
    } while (0)

/* a text line ending in '\n'; *len includes the newline */
static int rd_line(S *s, const uint8_t **line, size_t *len)
{
    for (;;) {
        uint64_t P = rd_pos(s);
        if (s->fend && P == s->fend) {
            s->fend = 0;
            rd_setlim(s);
        }
        const uint8_t *stop = s->fend ? s->lim : s->end;
        const uint8_t *nl = (const uint8_t *)memchr(s->p, '\n', (size_t)(stop - s->p));
        if (nl) {
            *line = s->p;
            *len = (size_t)(nl - s->p) + 1;
            s->p = nl + 1;
            return 0;
        }
        if (s->fend && s->fend <= s->base + (uint64_t)(s->end - s->win))
            return UNSUP(s, "a text line straddles the end of a FRAME");
        /* grow the window and look again */
        size_t have = (size_t)(s->end - s->p);
        if (P + have >= s->total) return fail(s, ST_TRUNC, "pickle data was truncated");
        if (rd_fill(s, have + 1) < 0) return -1;
        rd_setlim(s);
    }
}

static inline uint64_t le(const uint8_t *p, int n)
{
    uint64_t x = 0;
    for (int i = n - 1; i >= 0; i--) x = (x << 8) | p[i];
    return x;
}

/* ------------------------------------------------------------------------- */
/* utf-8                                                                      */

static int utf8_ok(const uint8_t *s, size_t n, int surrogates)
{
    size_t i = 0;
    while (i < n) {
        if (i + 8 <= n) {
            uint64_t w;
            memcpy(&w, s + i, 8);
            if (!(w & 0x8080808080808080ULL)) {
                i += 8;
                continue;
            }
        }
        uint8_t c = s[i];
        if (c < 0x80) {
            i++;
            continue;
        }
        if (c < 0xC2) return 0;
        if (c < 0xE0) {
            if (i + 1 >= n || (s[i + 1] & 0xC0) != 0x80) return 0;
            i += 2;
            continue;
        }
        if (c < 0xF0) {
            if (i + 2 >= n) return 0;
            uint8_t c1 = s[i + 1], c2 = s[i + 2];
            if ((c1 & 0xC0) != 0x80 || (c2 & 0xC0) != 0x80) return 0;
            if (c == 0xE0 && c1 < 0xA0) return 0;
            if (c == 0xED && c1 >= 0xA0 && !surrogates) return 0;
            i += 3;
            continue;
        }
        if (c < 0xF5) {
            if (i + 3 >= n) return 0;
            uint8_t c1 = s[i + 1], c2 = s[i + 2], c3 = s[i + 3];
            if ((c1 & 0xC0) != 0x80 || (c2 & 0xC0) != 0x80 || (c3 & 0xC0) != 0x80) return 0;
            if (c == 0xF0 && c1 < 0x90) return 0;
            if (c == 0xF4 && c1 >= 0x90) return 0;
            i += 4;
            continue;
        }
        return 0;
    }
    return 1;
}

/* ------------------------------------------------------------------------- */
/* strings                                                                    */

static uint32_t hash_bytes(const uint8_t *p, size_t n, uint8_t kind)
{
    uint64_t h = 1469598103934665603ULL ^ kind;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 1099511628211ULL;
    }
    h ^= h >> 29;
    return (uint32_t)(h ^ (h >> 32));
}

static int sh_grow(S *s)
{
    uint32_t nc = s->shcap ? s->shcap * 2 : 1024;
    uint32_t *t = (uint32_t *)calloc(nc, sizeof(uint32_t));
    if (!t) return vgrow_fail(s, -1);
    for (uint32_t i = 0; i < s->nstr; i++) {
        StrRec *r = &s->strs[i];
        if (r->kind == 2) continue;
        uint32_t j = r->hash & (nc - 1);
        while (t[j]) j = (j + 1) & (nc - 1);
        t[j] = i + 1;
    }
    free(s->sh);
    s->sh = t;
    s->shcap = nc;
    return 0;
}

static int str_new(S *s, const uint8_t *p, size_t n, uint8_t kind, uint32_t h, uint32_t *id)
{
    if (n > 0xFFFFFFFFu) return UNSUP(s, "string longer than 4 GiB");
    if (s->nstr == 0xFFFFFFF0u) return UNSUP(s, "too many strings");
    if (s->nstr == s->strcap) {
        size_t cap = s->strcap;
        if (vgrow_fail(s, grow_raw((void **)&s->strs, &cap, (size_t)s->nstr + 1, sizeof(StrRec))) < 0) return -1;
        s->strcap = (uint32_t)(cap > 0xFFFFFFF0u ? 0xFFFFFFF0u : cap);
    }
    if (VRESERVE(s, s->sb, s->sb.n + n) < 0) return -1;
    StrRec *r = &s->strs[s->nstr];
    r->off = s->sb.n;
    r->len = (uint32_t)n;
    r->hash = h;
    r->kind = kind;
    r->kw = 0;
    if (n) memcpy(s->sb.a + s->sb.n, p, n);
    s->sb.n += n;
    if (kind == 0 && n < 32) {
        for (int k = 1; KW_NAMES[k]; k++) {
            if (strlen(KW_NAMES[k]) == n && memcmp(KW_NAMES[k], p, n) == 0) {
                r->kw = (uint8_t)k;
                break;
            }
        }
    }
    *id = s->nstr++;
    return 0;
}

static int intern(S *s, const uint8_t *p, size_t n, uint8_t kind, uint32_t *id)
{
    if (kind == 2) return str_new(s, p, n, kind, 0, id);
    if ((s->shused + 1) * 2 > s->shcap && sh_grow(s) < 0) return -1;
    uint32_t h = hash_bytes(p, n, kind);
    uint32_t j = h & (s->shcap - 1);
    while (s->sh[j]) {
        StrRec *r = &s->strs[s->sh[j] - 1];
        if (r->hash == h && r->kind == kind && r->len == n && memcmp(s->sb.a + r->off, p, n) == 0) {
            *id = s->sh[j] - 1;
            return 0;
        }
        j = (j + 1) & (s->shcap - 1);
    }
    if (str_new(s, p, n, kind, h, id) < 0) return -1;
    s->sh[j] = *id + 1;
    s->shused++;
    return 0;
}

static inline const uint8_t *str_ptr(S *s, uint32_t id) { return (const uint8_t *)s->sb.a + s->strs[id].off; }
static inline int is_str(Val v) { return TAG(v) == T_STR || TAG(v) == T_DTYPE; }
static inline int val_kw(S *s, Val v) { return is_str(v) ? s->strs[(uint32_t)PAY(v)].kw : 0; }

static PyObject *py_str(S *s, uint32_t id)
{
    if (id >= s->pystr_cap) {
        uint32_t nc = s->nstr + 64;
        PyObject **t = (PyObject **)realloc(s->pystr, (size_t)nc * sizeof(PyObject *));
        if (!t) {
            PyErr_NoMemory();
            return NULL;
        }
        memset(t + s->pystr_cap, 0, (size_t)(nc - s->pystr_cap) * sizeof(PyObject *));
        s->pystr = t;
        s->pystr_cap = nc;
    }
    if (!s->pystr[id]) {
        StrRec *r = &s->strs[id];
        s->pystr[id] = PyUnicode_DecodeUTF8((const char *)str_ptr(s, id), r->len, "surrogatepass");
        if (!s->pystr[id]) return NULL;
    }
    Py_INCREF(s->pystr[id]);
    return s->pystr[id];
}

/* ------------------------------------------------------------------------- */
/* ints                                                                       */

static int mk_int(S *s, int64_t x, Val *out)
{
    if (x >= INT_MIN59 && x <= INT_MAX59) {
        *out = MK(T_INT, (uint64_t)x);
        return 0;
    }
    if (VPUSH(s, s->bigs, x) < 0) return -1;
    *out = MK(T_BIGINT, s->bigs.n - 1);
    return 0;
}
static inline int is_int(Val v) { return TAG(v) == T_INT || TAG(v) == T_BIGINT; }
static inline int64_t get_int(S *s, Val v) { return TAG(v) == T_INT ? int_of(v) : s->bigs.a[PAY(v)]; }

/* ------------------------------------------------------------------------- */
/* containers                                                                 */

static inline Val *citems(Cont *c) { return c->heap ? c->heap : c->inl; }
static inline uint32_t cwidth(Cont *c) { return c->kind == T_DICT ? 2 : 1; }

static int cont_new(S *s, uint8_t kind, uint32_t *id)
{
    uint32_t i;
    if (s->cfree.n) {
        i = s->cfree.a[--s->cfree.n];
    } else {
        if (s->nct == 0xFFFFFFF0u) return UNSUP(s, "too many containers");
        if (s->nct == s->ctcap) {
            size_t cap = s->ctcap;
            if (vgrow_fail(s, grow_raw((void **)&s->ct, &cap, (size_t)s->nct + 1, sizeof(Cont))) < 0) return -1;
            s->ctcap = (uint32_t)(cap > 0xFFFFFFF0u ? 0xFFFFFFF0u : cap);
        }
        i = s->nct++;
    }
    Cont *c = &s->ct[i];
    c->heap = NULL;
    c->hx = NULL;
    c->n = 0;
    c->cap = kind == T_DICT ? 4 : 8;
    c->hcap = 0;
    c->kind = kind;
    c->esc = 0;
    c->itop0 = s->ia.n;
    c->vtop0 = s->va.n;
    *id = i;
    return 0;
}

static void cont_free(S *s, uint32_t id)
{
    Cont *c = &s->ct[id];
    free(c->heap);
    free(c->hx);
    c->heap = NULL;
    c->hx = NULL;
    c->kind = 0;
    c->n = 0;
    if (s->cfree.n < s->cfree.cap || grow_raw((void **)&s->cfree.a, &s->cfree.cap, s->cfree.n + 1, sizeof(uint32_t)) == 0)
        s->cfree.a[s->cfree.n++] = id;
}

static int cont_reserve(S *s, Cont *c, size_t need)
{
    if (need <= c->cap) return 0;
    if (need > 0x7FFFFFF0u) return UNSUP(s, "container too large");
    size_t w = cwidth(c);
    size_t nc = c->cap * 2;
    while (nc < need) nc *= 2;
    if (nc > 0x7FFFFFF0u) nc = 0x7FFFFFF0u;
    Val *h;
    if (c->heap) {
        h = (Val *)realloc(c->heap, nc * w * sizeof(Val));
    } else {
        h = (Val *)malloc(nc * w * sizeof(Val));
        if (h) memcpy(h, c->inl, (size_t)c->n * w * sizeof(Val));
    }
    if (!h) return vgrow_fail(s, -1);
    c->heap = h;
    c->cap = (uint32_t)nc;
    return 0;
}

/* arenas */

static void pin_all(S *s)
{
    s->ipin = s->ia.n;
    if (s->vpin < s->va.n) s->vpin = s->va.n;
}

static int escape(S *s, Val v);

/* escape every value stored in the value arena above vesc (the closure of any escaping tuple) */
static int sweep_values(S *s)
{
    while (s->vesc < s->va.n) {
        size_t i = s->vesc++;
        Val x = s->va.a[i];
        unsigned t = TAG(x);
        if (t == T_LIST || t == T_DICT || t == T_SET || t == T_FROZENSET) {
            if (VPUSH(s, s->work, (uint32_t)PAY(x)) < 0) return -1;
        }
    }
    pin_all(s);
    return 0;
}

static int escape(S *s, Val v)
{
    unsigned t = TAG(v);
    if (t == T_ITUP) {
        size_t e = SPAN_START(v) + SPAN_LEN(v);
        if (e > s->ipin) s->ipin = e;
        return 0;
    }
    size_t w0 = s->work.n;
    if (t == T_GTUP) {
        size_t e = SPAN_START(v) + SPAN_LEN(v);
        if (e <= s->vesc && e <= s->vpin) return 0;
        if (sweep_values(s) < 0) return -1;
    } else if (t == T_LIST || t == T_DICT || t == T_SET || t == T_FROZENSET) {
        if (s->ct[PAY(v)].esc) return 0;
        if (VPUSH(s, s->work, (uint32_t)PAY(v)) < 0) return -1;
    } else {
        return 0;
    }
    while (s->work.n > w0) {
        uint32_t id = s->work.a[--s->work.n];
        Cont *c = &s->ct[id];
        if (c->esc || !c->kind) continue;
        c->esc = 1;
        size_t k = (size_t)c->n * cwidth(c);
        int needsweep = 0, pinint = 0;
        for (size_t j = 0; j < k; j++) {
            Val x = citems(&s->ct[id])[j];
            unsigned tx = TAG(x);
            if (tx == T_LIST || tx == T_DICT || tx == T_SET || tx == T_FROZENSET) {
                if (!s->ct[PAY(x)].esc && VPUSH(s, s->work, (uint32_t)PAY(x)) < 0) return -1;
            } else if (tx == T_GTUP) {
                needsweep = 1;
            } else if (tx == T_ITUP) {
                pinint = 1;
            }
        }
        if (needsweep && sweep_values(s) < 0) return -1;
        if (pinint) pin_all(s);
    }
    return 0;
}

/* key support for dicts and sets */

static int key_kind(Val k)
{
    switch (TAG(k)) {
    case T_NONE: case T_INT: case T_BIGINT: case T_STR: case T_DTYPE: case T_BYTES: case T_ITUP:
        return 1; /* hashed by value */
    case T_OBJ: case T_CHUNK: case T_MIDX: case T_SINFO:
        return 2; /* identity */
    default:
        return 0; /* unhashable or not modelled */
    }
}

static uint64_t key_hash(S *s, Val k)
{
    uint64_t h;
    unsigned t = TAG(k);
    if (t == T_DTYPE) t = T_STR;
    if (t == T_ITUP) {
        h = 0x9E3779B97F4A7C15ULL ^ SPAN_LEN(k);
        size_t a = SPAN_START(k), n = SPAN_LEN(k);
        for (size_t i = 0; i < n; i++) {
            h ^= (uint64_t)s->ia.a[a + i];
            h *= 0xBF58476D1CE4E5B9ULL;
            h ^= h >> 31;
        }
    } else if (t == T_BIGINT) {
        h = (uint64_t)s->bigs.a[PAY(k)] * 0x94D049BB133111EBULL;
    } else {
        h = (PAY(k) * 0x94D049BB133111EBULL) ^ t;
    }
    h ^= h >> 29;
    return h;
}

static int key_eq(S *s, Val a, Val b)
{
    unsigned ta = TAG(a), tb = TAG(b);
    if (ta == T_DTYPE) ta = T_STR;
    if (tb == T_DTYPE) tb = T_STR;
    if (ta != tb) return 0;
    if (ta == T_ITUP) {
        size_t n = SPAN_LEN(a);
        if (n != SPAN_LEN(b)) return 0;
        return n == 0 || memcmp(s->ia.a + SPAN_START(a), s->ia.a + SPAN_START(b), n * 8) == 0;
    }
    if (ta == T_BIGINT) return s->bigs.a[PAY(a)] == s->bigs.a[PAY(b)];
    return PAY(a) == PAY(b);
}

static int hx_rebuild(S *s, Cont *c, uint32_t want)
{
    uint32_t nc = 16;
    while (nc < want * 2) nc *= 2;
    uint32_t *t = (uint32_t *)calloc(nc, sizeof(uint32_t));
    if (!t) return vgrow_fail(s, -1);
    Val *it = citems(c);
    uint32_t w = cwidth(c);
    for (uint32_t i = 0; i < c->n; i++) {
        Val k = it[(size_t)i * w];
        if (key_kind(k) != 1) continue;
        uint32_t j = (uint32_t)key_hash(s, k) & (nc - 1);
        while (t[j]) j = (j + 1) & (nc - 1);
        t[j] = i + 1;
    }
    free(c->hx);
    c->hx = t;
    c->hcap = nc;
    return 0;
}

/* find entry with key k; returns index or -1 */
static int64_t cont_find(S *s, Cont *c, Val k)
{
    Val *it = citems(c);
    uint32_t w = cwidth(c);
    if (!c->hx) {
        for (uint32_t i = 0; i < c->n; i++)
            if (key_eq(s, it[(size_t)i * w], k)) return i;
        return -1;
    }
    uint32_t j = (uint32_t)key_hash(s, k) & (c->hcap - 1);
    while (c->hx[j]) {
        uint32_t i = c->hx[j] - 1;
        if (key_eq(s, it[(size_t)i * w], k)) return i;
        j = (j + 1) & (c->hcap - 1);
    }
    return -1;
}

static int mark_keyed(S *s, Val k)
{
    uint8_t *f;
    switch (TAG(k)) {
    case T_OBJ: f = &s->obj[PAY(k)].keyed; break;
    case T_MIDX: f = &s->mi_flags.a[PAY(k)]; break;
    case T_SINFO: f = &s->si_flags.a[PAY(k)]; break;
    case T_CHUNK: f = &s->ck_state.a[PAY(k)]; break;
    default: return UNSUP(s, "unexpected key");
    }
    if (*f & 0x80) return UNSUP(s, "an object is used twice as a key");
    *f |= 0x80;
    return 0;
}

/* dict[k] = v / set.add(k) */
static int cont_set(S *s, uint32_t id, Val k, Val v)
{
    Cont *c = &s->ct[id];
    if (LIKELY(TAG(k) == T_STR && !c->hx && !c->esc && c->kind == T_DICT && c->n < c->cap)) {
        /* hot path: a small private state dict with str keys */
        Val *it = citems(c);
        for (uint32_t i = 0; i < c->n; i++) {
            Val x = it[2 * i];
            if (x == k || (TAG(x) == T_DTYPE && PAY(x) == PAY(k))) {
                it[2 * i + 1] = v;
                return 0;
            }
        }
        if (c->n < 8) {
            it[2 * c->n] = k;
            it[2 * c->n + 1] = v;
            c->n++;
            return 0;
        }
    }
    int kk = key_kind(k);
    if (!kk) return UNSUP(s, "dict key or set item of a type the scanner does not hash (tag %u)", TAG(k));
    if (kk == 1) {
        int64_t i = cont_find(s, c, k);
        if (i >= 0) {
            if (c->kind == T_DICT) {
                if (c->esc && escape(s, v) < 0) return -1;
                c = &s->ct[id];
                citems(c)[(size_t)i * 2 + 1] = v;
            }
            return 0;
        }
    } else if (mark_keyed(s, k) < 0) {
        return -1;
    }
    if (c->esc) {
        if (escape(s, k) < 0) return -1;
        if (c->kind == T_DICT && escape(s, v) < 0) return -1;
        c = &s->ct[id];
    }
    if (cont_reserve(s, c, (size_t)c->n + 1) < 0) return -1;
    uint32_t w = cwidth(c);
    Val *it = citems(c);
    it[(size_t)c->n * w] = k;
    if (w == 2) it[(size_t)c->n * 2 + 1] = v;
    c->n++;
    if (kk == 1 && (c->hx || c->n > 8)) {
        if (!c->hx || c->n * 2 > c->hcap) {
            if (hx_rebuild(s, c, c->n) < 0) return -1;
        } else {
            uint32_t j = (uint32_t)key_hash(s, k) & (c->hcap - 1);
            while (c->hx[j]) j = (j + 1) & (c->hcap - 1);
            c->hx[j] = c->n;
        }
    }
    return 0;
}

static int list_append(S *s, uint32_t id, const Val *vals, size_t k)
{
    Cont *c = &s->ct[id];
    if (c->esc) {
        for (size_t i = 0; i < k; i++)
            if (escape(s, vals[i]) < 0) return -1;
        c = &s->ct[id];
    }
    if (cont_reserve(s, c, (size_t)c->n + k) < 0) return -1;
    memcpy(citems(c) + c->n, vals, k * sizeof(Val));
    c->n += (uint32_t)k;
    return 0;
}

/* lookup of a keyword key in a dict container; returns 1 and *out when present */
static int dict_get_kw(S *s, uint32_t id, int kw, Val *out)
{
    Cont *c = &s->ct[id];
    Val *it = citems(c);
    for (uint32_t i = 0; i < c->n; i++) {
        Val k = it[(size_t)i * 2];
        if (is_str(k) && s->strs[(uint32_t)PAY(k)].kw == kw) {
            *out = it[(size_t)i * 2 + 1];
            return 1;
        }
    }
    return 0;
}

/* ------------------------------------------------------------------------- */
/* stack                                                                      */

static inline size_t fence(S *s) { return s->marks.n ? (size_t)s->marks.a[s->marks.n - 1] : 0; }

static int underflow(S *s)
{
    return BAD(s, s->marks.n ? "unexpected MARK found" : "unpickling stack underflow");
}

static inline int push(S *s, Val v)
{
    if (UNLIKELY(s->stk.n == s->stk.cap) && VRESERVE(s, s->stk, s->stk.n + 1) < 0) return -1;
    s->stk.a[s->stk.n++] = v;
    return 0;
}

static inline int pop(S *s, Val *v)
{
    if (UNLIKELY(s->stk.n <= fence(s))) return underflow(s);
    *v = s->stk.a[--s->stk.n];
    return 0;
}

static int marker(S *s, size_t *m)
{
    if (s->marks.n < 1) return BAD(s, "could not find MARK");
    *m = (size_t)s->marks.a[--s->marks.n];
    return 0;
}

/* ------------------------------------------------------------------------- */
/* tuples                                                                     */

static int make_tuple(S *s, size_t from, Val *out)
{
    size_t k = s->stk.n - from;
    Val *it = s->stk.a + from;
    if (k == 0) {
        *out = MK(T_ITUP, 0);
        return 0;
    }
    if (k > SPAN_MAXLEN) return UNSUP(s, "tuple too long");
    int allint = 1;
    for (size_t i = 0; i < k; i++)
        if (!is_int(it[i])) {
            allint = 0;
            break;
        }
    if (allint) {
        size_t a = s->ia.n;
        if (a + k > SPAN_MAXSTART) return UNSUP(s, "int arena full");
        if (VRESERVE(s, s->ia, a + k) < 0) return -1;
        it = s->stk.a + from;
        for (size_t i = 0; i < k; i++) s->ia.a[a + i] = get_int(s, it[i]);
        s->ia.n = a + k;
        *out = MK(T_ITUP, (uint64_t)a | ((uint64_t)k << 40));
    } else {
        size_t a = s->va.n;
        if (a + k > SPAN_MAXSTART) return UNSUP(s, "value arena full");
        if (VRESERVE(s, s->va, a + k) < 0) return -1;
        memcpy(s->va.a + a, s->stk.a + from, k * sizeof(Val));
        s->va.n = a + k;
        *out = MK(T_GTUP, (uint64_t)a | ((uint64_t)k << 40));
    }
    return 0;
}

static inline size_t tup_len(Val v) { return SPAN_LEN(v); }
static inline Val tup_item(S *s, Val v, size_t i)
{
    if (TAG(v) == T_GTUP) return s->va.a[SPAN_START(v) + i];
    Val out = V_NONE;
    mk_int(s, s->ia.a[SPAN_START(v) + i], &out);
    return out;
}

/* release a consumed, non-escaped argument tuple at the top of its arena */
static void drop_tuple(S *s, Val v)
{
    size_t a = SPAN_START(v), e = a + SPAN_LEN(v);
    if (TAG(v) == T_GTUP) {
        if (e == s->va.n && e > s->vpin) s->va.n = a > s->vpin ? a : s->vpin;
        if (s->vesc > s->va.n) s->vesc = s->va.n;
    } else if (TAG(v) == T_ITUP) {
        if (e == s->ia.n && e > s->ipin) s->ia.n = a > s->ipin ? a : s->ipin;
    }
}

/* roll the arenas back after a hot BUILD consumed a private state dict */
static void drop_state(S *s, uint32_t id)
{
    Cont *c = &s->ct[id];
    size_t i0 = c->itop0 > s->ipin ? c->itop0 : s->ipin;
    size_t v0 = c->vtop0 > s->vpin ? c->vtop0 : s->vpin;
    cont_free(s, id);
    if (i0 < s->ia.n) s->ia.n = i0;
    if (v0 < s->va.n) s->va.n = v0;
    if (s->vesc > s->va.n) s->vesc = s->va.n;
}

/* ------------------------------------------------------------------------- */
/* memo                                                                       */

static inline int bit_get(S *s, uint64_t i) { return (s->bits.a[i >> 6] >> (i & 63)) & 1; }

static inline int memo_put(S *s, uint64_t idx, Val v)
{
    if (UNLIKELY(idx > s->memo_len)) {
        /* The C unpickler grows its memo array to 2 * idx entries and zero-fills it: a 4-byte
           index can make it touch tens of GB.  No pickle of this size can have so many memo
           entries: refuse (from 4 Mi entries on) rather than hand the file to it. */
        if (idx >= ((uint64_t)1 << 22)) {
            /* even if pass 2 stops earlier on something the scanner does not model, this stream never
               goes to the reference unpickler (see py_scan) */
            if (idx >= s->total)
                return BAD(s, "memo index %llu is beyond the size of the pickle (%llu bytes)", (unsigned long long)idx,
                           (unsigned long long)s->total);
            return BAD(s, "memo index %llu is out of sequence, past 4 Mi entries (the C unpickler would zero 16 "
                       "bytes per index)", (unsigned long long)idx);
        }
        return UNSUP(s, "memo index %llu is not sequential", (unsigned long long)idx);
    }
    if (idx == s->memo_len) s->memo_len++;
    if (s->pass == 1) {
        if (LIKELY((idx >> 6) < s->bits.n)) return 0;
        if ((idx >> 6) >= s->bits.n) {
            size_t w = s->bits.n;
            if (VRESERVE(s, s->bits, (idx >> 6) + 1) < 0) return -1;
            memset(s->bits.a + w, 0, ((idx >> 6) + 1 - w) * 8);
            s->bits.n = (idx >> 6) + 1;
        }
        return 0;
    }
    if (UNLIKELY((idx >> 6) >= s->bits.n)) return UNSUP(s, "memo index beyond the first pass");
    if (LIKELY(!bit_get(s, idx))) return 0;
    if (escape(s, v) < 0) return -1;
    uint64_t r = s->rank[idx >> 6] + (uint64_t)POPCNT64(s->bits.a[idx >> 6] & ((((uint64_t)1) << (idx & 63)) - 1));
    s->slots[r] = v;
    return 0;
}

static inline int memo_get(S *s, uint64_t idx, Val *v)
{
    if (UNLIKELY(idx >= s->memo_len)) return BAD(s, "Memo value not found at index %llu", (unsigned long long)idx);
    if (s->pass == 1) {
        s->bits.a[idx >> 6] |= ((uint64_t)1) << (idx & 63);
        *v = V_NONE;
        return 0;
    }
    if (UNLIKELY((idx >> 6) >= s->bits.n || !bit_get(s, idx))) return UNSUP(s, "memo fetch not seen by the first pass");
    uint64_t r = s->rank[idx >> 6] + (uint64_t)POPCNT64(s->bits.a[idx >> 6] & ((((uint64_t)1) << (idx & 63)) - 1));
    *v = s->slots[r];
    return 0;
}

/* ------------------------------------------------------------------------- */
/* objects                                                                    */

static int obj_new(S *s, uint8_t cls, Val *out)
{
    if (s->nobj == 0xFFFFFFF0u) return UNSUP(s, "too many objects");
    if (s->nobj == s->objcap) {
        size_t cap = s->objcap;
        if (vgrow_fail(s, grow_raw((void **)&s->obj, &cap, (size_t)s->nobj + 1, sizeof(Obj))) < 0) return -1;
        s->objcap = (uint32_t)(cap > 0xFFFFFFF0u ? 0xFFFFFFF0u : cap);
    }
    Obj *o = &s->obj[s->nobj];
    o->cls = cls;
    o->keyed = 0;
    o->tp_set = 0;
    o->dict = -1;
    o->tp_dtype = V_NONE;
    *out = MK(T_OBJ, s->nobj++);
    return 0;
}

/* instantiate an allow-listed class with no arguments */
static int instantiate(S *s, int code, Val *out)
{
    switch (code) {
    case G_METADATA: return obj_new(s, C_METADATA, out);
    case G_TSM: return obj_new(s, C_TSM, out);
    case G_BSM: return obj_new(s, C_BSM, out);
    case G_SMETA: return obj_new(s, C_SMETA, out);
    case G_TP: return obj_new(s, C_TP, out);
    case G_CHUNK:
        if (s->ck_state.n >= 0xFFFFFFF0u) return UNSUP(s, "too many chunks");
        if (VPUSH(s, s->ck_state, 0) < 0 || VPUSH(s, s->ck_coord, 0) < 0 || VPUSH(s, s->ck_nd, 0) < 0) return -1;
        *out = MK(T_CHUNK, s->ck_state.n - 1);
        return 0;
    case G_MIDX:
        if (s->mi_flags.n >= 0xFFFFFFF0u) return UNSUP(s, "too many MetadataIndex");
        if (VPUSH(s, s->mi_fqn, 0xFFFFFFFFu) < 0 || VPUSH(s, s->mi_off, 0) < 0 ||
            VPUSH(s, s->mi_idx, -1) < 0 || VPUSH(s, s->mi_flags, 0) < 0)
            return -1;
        *out = MK(T_MIDX, s->mi_flags.n - 1);
        return 0;
    case G_SINFO:
        if (s->si_flags.n >= 0xFFFFFFF0u) return UNSUP(s, "too many _StorageInfo");
        if (VPUSH(s, s->si_path, 0xFFFFFFFFu) < 0 || VPUSH(s, s->si_off, 0) < 0 || VPUSH(s, s->si_len, 0) < 0 ||
            VPUSH(s, s->si_td, 0) < 0 || VPUSH(s, s->si_flags, 0x0C) < 0)
            return -1;
        *out = MK(T_SINFO, s->si_flags.n - 1);
        return 0;
    case G_ODICT: {
        uint32_t id;
        if (cont_new(s, T_DICT, &id) < 0) return -1;
        *out = MK(T_DICT, id);
        return 0;
    }
    case G_SIZE:
        *out = MK(T_ITUP, 0);
        return 0;
    default:
        return UNSUP(s, "cannot instantiate global code %d", code);
    }
}

static int is_type_code(int code)
{
    return code == G_METADATA || code == G_TSM || code == G_BSM || code == G_SMETA || code == G_TP ||
           code == G_CHUNK || code == G_MIDX || code == G_SINFO || code == G_ODICT || code == G_SIZE;
}

/* BUILD for the hot records: read the fields they need from the state dict */
static int build_hot(S *s, Val inst, uint32_t d)
{
    Cont *c = &s->ct[d];
    Val *it = citems(c);
    uint32_t n = c->n;
    unsigned t = TAG(inst);
    size_t id = (size_t)PAY(inst);
    if (t == T_CHUNK) {
        if (s->ck_state.a[id] & 0x7F) return UNSUP(s, "ChunkStorageMetadata built twice");
        Val off = V_NONE, siz = V_NONE;
        int hoff = 0, hsiz = 0;
        for (uint32_t i = 0; i < n; i++) {
            int kw = val_kw(s, it[2 * i]);
            if (kw == KW_OFFSETS) { off = it[2 * i + 1]; hoff = 1; }
            else if (kw == KW_SIZES) { siz = it[2 * i + 1]; hsiz = 1; }
        }
        if (hoff && hsiz && TAG(off) == T_ITUP && TAG(siz) == T_ITUP && SPAN_LEN(off) == SPAN_LEN(siz)) {
            size_t k = SPAN_LEN(off), a = s->ck_off.n;
            if (VRESERVE(s, s->ck_off, a + k) < 0 || VRESERVE(s, s->ck_siz, a + k) < 0) return -1;
            if (k) {
                memcpy(s->ck_off.a + a, s->ia.a + SPAN_START(off), k * 8);
                memcpy(s->ck_siz.a + a, s->ia.a + SPAN_START(siz), k * 8);
            }
            s->ck_off.n = a + k;
            s->ck_siz.n = a + k;
            s->ck_coord.a[id] = (int64_t)a;
            s->ck_nd.a[id] = (uint32_t)k;
            s->ck_state.a[id] |= 1;
        } else {
            s->ck_state.a[id] |= 2;
        }
        return 0;
    }
    if (t == T_MIDX) {
        if (s->mi_flags.a[id] & 1) return UNSUP(s, "MetadataIndex built twice");
        s->mi_flags.a[id] |= 1;
        for (uint32_t i = 0; i < n; i++) {
            int kw = val_kw(s, it[2 * i]);
            Val v = it[2 * i + 1];
            if (kw == KW_FQN) {
                s->mi_fqn.a[id] = is_str(v) ? (uint32_t)PAY(v) : 0xFFFFFFFFu;
                if (!is_str(v)) s->mi_flags.a[id] |= 4;
            } else if (kw == KW_OFFSET) {
                if (TAG(v) == T_NONE) {
                    s->mi_off.a[id] = 0;
                } else if (TAG(v) == T_ITUP) {
                    size_t k = SPAN_LEN(v), a = s->mi_ints.n;
                    if (a + k >= ((uint64_t)1 << 41)) return UNSUP(s, "too many offsets");
                    if (VRESERVE(s, s->mi_ints, a + k) < 0) return -1;
                    if (k) memcpy(s->mi_ints.a + a, s->ia.a + SPAN_START(v), k * 8);
                    s->mi_ints.n = a + k;
                    s->mi_off.a[id] = ((uint64_t)a << 22) | ((uint64_t)k << 2) | 1;
                } else {
                    s->mi_off.a[id] = 2;
                }
            } else if (kw == KW_INDEX) {
                int32_t h = -1;
                if (TAG(v) == T_BOOL) h = (int32_t)PAY(v);
                else if (is_int(v)) {
                    int64_t x = get_int(s, v);
                    h = (x >= 0 && x <= 0x7FFFFFFF) ? (int32_t)x : -1;
                }
                s->mi_idx.a[id] = h;
            }
        }
        return 0;
    }
    /* T_SINFO */
    if (s->si_flags.a[id] & 1) return UNSUP(s, "_StorageInfo built twice");
    s->si_flags.a[id] |= 1;
    for (uint32_t i = 0; i < n; i++) {
        int kw = val_kw(s, it[2 * i]);
        Val v = it[2 * i + 1];
        if (kw == KW_RELATIVE_PATH) {
            /* a DType would stay a DType in the reference's file names: not modelled */
            s->si_path.a[id] = TAG(v) == T_STR ? (uint32_t)PAY(v) : 0xFFFFFFFFu;
        } else if (kw == KW_OFFSET || kw == KW_LENGTH) {
            int64_t x = 0;
            int ok = 1;
            if (TAG(v) == T_BOOL) x = (int64_t)PAY(v);
            else if (is_int(v)) x = get_int(s, v);
            else ok = 0;
            uint8_t bit = kw == KW_OFFSET ? 4 : 8;
            if (kw == KW_OFFSET) s->si_off.a[id] = x; else s->si_len.a[id] = x;
            if (ok) s->si_flags.a[id] &= (uint8_t)~bit; else s->si_flags.a[id] |= bit;
        } else if (kw == KW_TRANSFORM_DESCRIPTORS) {
            if (TAG(v) == T_NONE) {
                s->si_td.a[id] = 0;
            } else {
                if (escape(s, v) < 0) return -1;
                if (VPUSH(s, s->si_tdv, v) < 0) return -1;
                if (s->si_tdv.n >= 0xFFFFFFF0u) return UNSUP(s, "too many transform descriptors");
                s->si_td.a[id] = (uint32_t)s->si_tdv.n;
            }
        }
    }
    return 0;
}

static int do_build(S *s)
{
    Val state = 0, inst;
    if ((int64_t)s->stk.n - 2 < (int64_t)fence(s)) return underflow(s);
    if (pop(s, &state) < 0) return -1;
    inst = s->stk.a[s->stk.n - 1];
    unsigned ti = TAG(inst), ts = TAG(state);

    if (ti == T_OBJ && s->obj[PAY(inst)].cls == C_TP) {
        Obj *o = &s->obj[PAY(inst)];
        if ((ts == T_GTUP || ts == T_ITUP) && SPAN_LEN(state) == 5) {
            Val dt = tup_item(s, state, 0);
            if (escape(s, dt) < 0) return -1;
            o = &s->obj[PAY(inst)];
            o->tp_dtype = dt;
            o->tp_set = 1;
            return 0;
        }
        if (ts == T_DICT) {
            Val dt = V_NONE;
            dict_get_kw(s, (uint32_t)PAY(state), KW_DTYPE, &dt);
            if (escape(s, dt) < 0) return -1;
            o = &s->obj[PAY(inst)];
            o->tp_dtype = dt;
            o->tp_set = 1;
            return 0;
        }
        return UNSUP(s, "TensorProperties state of an unexpected type");
    }
    if (ts == T_NONE) {
        if (ti == T_GLOBAL && PAY(inst) == G_TP) return UNSUP(s, "BUILD on the TensorProperties class");
        return 0; /* no __setstate__ and a None state: nothing to do */
    }
    if (ts != T_DICT) return UNSUP(s, "BUILD state of an unexpected type");
    uint32_t d = (uint32_t)PAY(state);
    if (ti == T_CHUNK || ti == T_MIDX || ti == T_SINFO) {
        if (build_hot(s, inst, d) < 0) return -1;
        if (!s->ct[d].esc) drop_state(s, d);
        return 0;
    }
    if (ti != T_OBJ) return UNSUP(s, "BUILD on a value without __dict__");
    Obj *o = &s->obj[PAY(inst)];
    if (o->dict < 0 && !s->ct[d].esc) {
        o->dict = (int32_t)d;
        return escape(s, state);
    }
    if (o->dict < 0) {
        uint32_t nd;
        if (cont_new(s, T_DICT, &nd) < 0) return -1;
        s->ct[nd].esc = 1;
        s->obj[PAY(inst)].dict = (int32_t)nd;
    }
    uint32_t od = (uint32_t)s->obj[PAY(inst)].dict;
    for (uint32_t i = 0; i < s->ct[d].n; i++) {
        Val *it = citems(&s->ct[d]);
        Val k = it[2 * i], v = it[2 * i + 1];
        if (cont_set(s, od, k, v) < 0) return -1;
    }
    return 0;
}

/* call one of the allow-listed path functions with materialized arguments */
static PyObject *materialize(S *s, Val v, int depth);

static int call_func(S *s, int code, Val args, Val *out)
{
    PyObject *f = code < PyList_GET_SIZE(s->funcs) ? PyList_GET_ITEM(s->funcs, code) : NULL;
    if (!f || f == Py_None) return UNSUP(s, "no function for global code %d", code);
    size_t n = tup_len(args);
    PyObject *t = PyTuple_New((Py_ssize_t)n);
    if (!t) return pyerr(s);
    for (size_t i = 0; i < n; i++) {
        Val x = tup_item(s, args, i);
        if (!(is_str(x) || is_int(x))) {
            Py_DECREF(t);
            return UNSUP(s, "path argument of an unexpected type");
        }
        PyObject *o = materialize(s, x, 0);
        if (!o) {
            Py_DECREF(t);
            return -1;
        }
        PyTuple_SET_ITEM(t, (Py_ssize_t)i, o);
    }
    PyObject *r = PyObject_CallObject(f, t);
    Py_DECREF(t);
    if (!r) {
        PyErr_Clear();
        return UNSUP(s, "path function raised");
    }
    if (!PyUnicode_CheckExact(r)) {
        Py_DECREF(r);
        return UNSUP(s, "path function returned a non-str");
    }
    Py_ssize_t len;
    const char *u = PyUnicode_AsUTF8AndSize(r, &len);
    if (!u) {
        PyErr_Clear();
        Py_DECREF(r);
        return UNSUP(s, "path with surrogates");
    }
    uint32_t id;
    int rc = intern(s, (const uint8_t *)u, (size_t)len, 0, &id);
    Py_DECREF(r);
    if (rc < 0) return -1;
    *out = MK(T_STR, id);
    return 0;
}

static int do_reduce(S *s)
{
    Val args = 0, fn = 0, out = 0;
    if (pop(s, &args) < 0 || pop(s, &fn) < 0) return -1;
    unsigned ta = TAG(args);
    if (TAG(fn) != T_GLOBAL) return UNSUP(s, "REDUCE with a non-global callable");
    if (ta != T_ITUP && ta != T_GTUP) return UNSUP(s, "REDUCE arguments are not a tuple");
    int code = (int)PAY(fn);
    size_t n = tup_len(args);
    switch (code) {
    case G_SIZE:
        if (n == 0) out = MK(T_ITUP, 0);
        else if (n == 1) {
            out = tup_item(s, args, 0);
            if (TAG(out) != T_ITUP && TAG(out) != T_GTUP) return UNSUP(s, "torch.Size of a non-tuple");
        } else return UNSUP(s, "torch.Size with %zu arguments", n);
        break;
    case G_MEMFMT:
        if (n != 1) return UNSUP(s, "_MEM_FORMAT_ENCODING arity");
        out = tup_item(s, args, 0);
        if (!is_int(out) && TAG(out) != T_BOOL) return UNSUP(s, "_MEM_FORMAT_ENCODING of a non-int");
        break;
    case G_LAYOUT: {
        if (n != 1) return UNSUP(s, "_get_layout arity");
        Val x = tup_item(s, args, 0);
        if (!is_str(x)) return UNSUP(s, "_get_layout of a non-str");
        uint32_t id = (uint32_t)PAY(x);
        StrRec *r = &s->strs[id];
        if (r->len >= 6 && memcmp(str_ptr(s, id), "torch.", 6) == 0) {
            uint32_t nid;
            /* copy: the string table may move while interning */
            size_t L = r->len - 6;
            uint8_t *tmp = (uint8_t *)malloc(L ? L : 1);
            if (!tmp) return vgrow_fail(s, -1);
            memcpy(tmp, str_ptr(s, id) + 6, L);
            int rc = intern(s, tmp, L, 0, &nid);
            free(tmp);
            if (rc < 0) return -1;
            out = MK(T_STR, nid);
        } else {
            out = MK(T_STR, id);
        }
        break;
    }
    case G_POSIX: case G_WINPATH: {
        gil_enter(s);
        int rc = call_func(s, code, args, &out);
        if (rc < 0) return -1;
        gil_leave(s);
        break;
    }
    case G_METADATA: case G_TSM: case G_BSM: case G_SMETA: case G_TP: case G_CHUNK: case G_MIDX:
    case G_SINFO: case G_ODICT:
        if (n != 0) return UNSUP(s, "class called with arguments");
        if (instantiate(s, code, &out) < 0) return -1;
        break;
    default:
        return UNSUP(s, "REDUCE on global code %d", code);
    }
    drop_tuple(s, args);
    return push(s, out);
}

static int do_newobj(S *s, int ex)
{
    Val kw = V_NONE, args = 0, cls = 0, out = 0;
    if (ex && pop(s, &kw) < 0) return -1;
    if (pop(s, &args) < 0 || pop(s, &cls) < 0) return -1;
    if (TAG(cls) != T_GLOBAL || !is_type_code((int)PAY(cls))) return UNSUP(s, "NEWOBJ of a non-class");
    if (TAG(args) != T_ITUP && TAG(args) != T_GTUP) return UNSUP(s, "NEWOBJ args are not a tuple");
    if (ex && (TAG(kw) != T_DICT || s->ct[PAY(kw)].n != 0)) return UNSUP(s, "NEWOBJ_EX with keyword arguments");
    int code = (int)PAY(cls);
    if (code == G_ODICT) {
        if (instantiate(s, code, &out) < 0) return -1;
    } else if (tup_len(args) != 0) {
        if (code == G_SIZE && !ex && tup_len(args) == 1) {
            out = tup_item(s, args, 0);
            if (TAG(out) != T_ITUP && TAG(out) != T_GTUP) return UNSUP(s, "torch.Size of a non-tuple");
        } else {
            return UNSUP(s, "NEWOBJ with arguments");
        }
    } else if (instantiate(s, code, &out) < 0) {
        return -1;
    }
    drop_tuple(s, args);
    return push(s, out);
}

/* find_class: the allow-list and the torch dtypes, nothing else */
static int find_class(S *s, PyObject *mod, PyObject *name, Val *out)
{
    PyObject *key = PyTuple_Pack(2, mod, name);
    if (!key) return pyerr(s);
    PyObject *code = PyDict_GetItemWithError(s->gmap, key);
    Py_DECREF(key);
    if (code) {
        long c = PyLong_AsLong(code);
        if (c == -1 && PyErr_Occurred()) return pyerr(s);
        if (c <= G_UNKNOWN || c >= G_NCODES) return UNSUP(s, "allow-listed global without a model");
        *out = MK(T_GLOBAL, (uint64_t)c);
        return 0;
    }
    if (PyErr_Occurred()) return pyerr(s);
    if (PyUnicode_CompareWithASCIIString(mod, "torch") == 0) {
        PyObject *canon = PyDict_GetItemWithError(s->dtmap, name);
        if (canon) {
            Py_ssize_t len;
            const char *u = PyUnicode_AsUTF8AndSize(canon, &len);
            if (!u) return pyerr(s);
            uint32_t id;
            if (intern(s, (const uint8_t *)u, (size_t)len, 0, &id) < 0) return -1;
            *out = MK(T_DTYPE, id);
            return 0;
        }
        if (PyErr_Occurred()) return pyerr(s);
    }
    Py_INCREF(mod);
    Py_INCREF(name);
    s->refmod = mod;
    s->refname = name;
    s->st = ST_REFUSED;
    return -1;
}

/* GLOBAL, STACK_GLOBAL (pass 2, GIL held): *out = the global mod.name (find_class), and the GIL is
 * let go again. Takes the references to mod and name; either is NULL where making it failed (the
 * Python error is set) */
static int find_global(S *s, PyObject *mod, PyObject *name, Val *out)
{
    if (!mod || !name) {
        Py_XDECREF(mod);
        Py_XDECREF(name);
        return pyerr(s);
    }
    int rc = find_class(s, mod, name, out);
    Py_DECREF(mod);
    Py_DECREF(name);
    if (rc < 0) return -1;
    gil_leave(s);
    return 0;
}

/* ------------------------------------------------------------------------- */
/* the VM                                                                     */

static int parse_decimal(const uint8_t *p, size_t n, uint64_t *out)
{
    /* n excludes the newline; digits only */
    if (n == 0 || n > 18) return -1;
    uint64_t x = 0;
    for (size_t i = 0; i < n; i++) {
        if (p[i] < '0' || p[i] > '9') return -1;
        x = x * 10 + (uint64_t)(p[i] - '0');
    }
    *out = x;
    return 0;
}

/* FRAME (both passes), after the opcode: its 8-byte length. A frame ends inside the data and inside
 * the frame around it; opcodes may not straddle its end (rd_slow) */
static int do_frame(S *s)
{
    NEED(8);
    uint64_t L = le(s->p, 8);
    s->p += 8;
    if (L > (uint64_t)INT64_MAX) return BAD(s, "FRAME length exceeds system's maximum");
    uint64_t P = rd_pos(s);
    if (s->fend && P == s->fend) s->fend = 0;
    if (s->fend) {
        if (L > s->fend - P) return UNSUP(s, "FRAME inside a FRAME passes its end");
    } else if (L) {
        if (L > s->total - P) return fail(s, ST_TRUNC, "pickle data was truncated");
        s->fend = P + L;
    }
    rd_setlim(s);
    return 0;
fail:
    return -1;
}

/* LONG1 (op 0x8a) or LONG4 (0x8b), after the opcode: *n = the byte count that follows (LONG4's is
 * signed: negative is malformed) */
static int long_nbytes(S *s, uint8_t op, size_t *n)
{
    if (op == 0x8a) {
        NEED(1);
        *n = s->p[0];
        s->p += 1;
    } else {
        NEED(4);
        int64_t x = (int32_t)(uint32_t)le(s->p, 4);
        s->p += 4;
        if (x < 0) return BAD(s, "LONG pickle has negative byte count");
        *n = (size_t)x;
    }
    return 0;
fail:
    return -1;
}

/* BINGET, BINPUT (ops 'h', 'q': one byte) or LONG_BINGET, LONG_BINPUT ('j', 'r': four), after the
 * opcode: *idx = the memo index */
static inline int memo_index(S *s, uint8_t op, uint64_t *idx)
{
    if (op == 'h' || op == 'q') {
        NEED(1);
        *idx = s->p[0];
        s->p += 1;
    } else {
        NEED(4);
        *idx = le(s->p, 4);
        s->p += 4;
    }
    return 0;
fail:
    return -1;
}

/* pass 1: opcode lengths and memo accounting only (no values, no stack) */
static int run1(S *s)
{
    for (;;) {
        NEED(1);
        uint8_t op = *s->p++;
        size_t n;
        switch (op) {
        /* no argument */
        case '(': case '0': case '1': case '2': case 'N': case 0x88: case 0x89: case ')': case 0x85:
        case 0x86: case 0x87: case 't': case ']': case '}': case 0x8f: case 'l': case 'd': case 0x91:
        case 'a': case 'e': case 's': case 'u': case 0x90: case 'b': case 'R': case 0x81: case 0x92:
        case 0x93:
            break;
        case '.':
            return 0;
        case 0x94:
            if (memo_put(s, s->memo_len, V_NONE) < 0) return -1;
            break;
        case 'K': case 0x80:
            NEED(1);
            if (op == 0x80 && *s->p > 5) return BAD(s, "unsupported pickle protocol: %d", *s->p);
            s->p += 1;
            break;
        case 'M':
            NEED(2);
            s->p += 2;
            break;
        case 'J':
            NEED(4);
            s->p += 4;
            break;
        case 'G':
            NEED(8);
            s->p += 8;
            break;
        case 'h': case 'j': case 'q': case 'r': {
            uint64_t idx;
            if (memo_index(s, op, &idx) < 0) return -1;
            if (op == 'h' || op == 'j') {
                Val v;
                if (memo_get(s, idx, &v) < 0) return -1;
            } else if (memo_put(s, idx, V_NONE) < 0) {
                return -1;
            }
            break;
        }
        case 0x8a: case 0x8b:
            if (long_nbytes(s, op, &n) < 0) return -1;
            NEED(n);
            s->p += n;
            break;
        case 0x8c: case 'X': case 0x8d: case 'C': case 'B': case 0x8e: case 'U': case 'T': case 0x96: {
            int w8 = (op == 0x8c || op == 'C' || op == 'U') ? 1 : (op == 'X' || op == 'B' || op == 'T') ? 4 : 8;
            NEED(w8);
            uint64_t L = le(s->p, w8);
            s->p += w8;
            if (L > (uint64_t)PY_SSIZE_T_MAX) return BAD(s, "string length exceeds system's maximum");
            NEED(L);
            s->p += L;
            break;
        }
        case 0x95:
            if (do_frame(s) < 0) return -1;
            break;
        case 'I': case 'g': case 'p': case 'c': {
            const uint8_t *ln;
            size_t len;
            if (rd_line(s, &ln, &len) < 0) return -1;
            if (len < 2) return fail(s, ST_TRUNC, "pickle data was truncated");
            if (op == 'c') {
                if (rd_line(s, &ln, &len) < 0) return -1;
                if (len < 2) return fail(s, ST_TRUNC, "pickle data was truncated");
            } else if (op == 'g' || op == 'p') {
                uint64_t idx;
                if (parse_decimal(ln, len - 1, &idx) < 0) return UNSUP(s, "GET/PUT in an unusual form");
                if (op == 'g') {
                    Val v;
                    if (memo_get(s, idx, &v) < 0) return -1;
                } else if (memo_put(s, idx, V_NONE) < 0) {
                    return -1;
                }
            }
            break;
        }
        default:
            return UNSUP(s, "opcode 0x%02x stops the first pass", op);
        }
    }
fail:
    return -1;
}

static int run(S *s)
{
    const int p2 = s->pass == 2;
    Val v = 0, w = 0;
    for (;;) {
        if (UNLIKELY(s->lim == s->p)) {
            if (rd_pos(s) >= s->total) {
                /* nothing left at an opcode boundary: EOFError("Ran out of input") */
                return fail(s, ST_TRUNC, "Ran out of input");
            }
        }
        NEED(1);
        uint8_t op = *s->p++;
        switch (op) {
        case 0x80: /* PROTO */
            NEED(1);
            if (*s->p > 5) return BAD(s, "unsupported pickle protocol: %d", *s->p);
            s->p++;
            break;
        case 0x95: /* FRAME */
            if (do_frame(s) < 0) return -1;
            break;
        case '.': /* STOP */
            if (!p2) return 0;
            if (pop(s, &v) < 0) return -1;
            s->result = v;
            return 0;
        case '(': /* MARK */
            if (VPUSH(s, s->marks, (int64_t)s->stk.n) < 0) return -1;
            break;
        case '0': /* POP */
            if (s->marks.n && (size_t)s->marks.a[s->marks.n - 1] == s->stk.n) s->marks.n--;
            else if (s->stk.n <= fence(s)) return underflow(s);
            else s->stk.n--;
            break;
        case '1': { /* POP_MARK */
            size_t m = 0;
            if (marker(s, &m) < 0) return -1;
            if (m < s->stk.n) s->stk.n = m;
            break;
        }
        case '2': /* DUP */
            if (s->stk.n <= fence(s)) return underflow(s);
            v = s->stk.a[s->stk.n - 1];
            if (p2 && escape(s, v) < 0) return -1;
            if (push(s, v) < 0) return -1;
            break;
        case 'N':
            if (push(s, V_NONE) < 0) return -1;
            break;
        case 0x88:
            if (push(s, MK(T_BOOL, 1)) < 0) return -1;
            break;
        case 0x89:
            if (push(s, MK(T_BOOL, 0)) < 0) return -1;
            break;
        case 'K':
            NEED(1);
            v = MK(T_INT, (uint64_t)s->p[0]);
            s->p += 1;
            if (push(s, v) < 0) return -1;
            break;
        case 'M':
            NEED(2);
            v = MK(T_INT, (uint64_t)(s->p[0] | ((unsigned)s->p[1] << 8)));
            s->p += 2;
            if (push(s, v) < 0) return -1;
            break;
        case 'J': {
            NEED(4);
            int64_t x = (int32_t)(uint32_t)le(s->p, 4);
            s->p += 4;
            if (push(s, MK(T_INT, (uint64_t)x)) < 0) return -1;
            break;
        }
        case 'I': { /* INT (text) */
            const uint8_t *ln;
            size_t len;
            if (rd_line(s, &ln, &len) < 0) return -1;
            if (len < 2) return fail(s, ST_TRUNC, "pickle data was truncated");
            size_t n = len - 1;
            if (n == 2 && ln[0] == '0' && (ln[1] == '0' || ln[1] == '1')) {
                v = MK(T_BOOL, (uint64_t)(ln[1] - '0'));
            } else {
                int neg = ln[0] == '-';
                uint64_t x;
                if (n - (size_t)neg == 0 || (ln[neg] == '0' && n - (size_t)neg > 1) ||
                    parse_decimal(ln + neg, n - (size_t)neg, &x) < 0)
                    return UNSUP(s, "INT opcode in an unusual form");
                if (neg && x == 0) return UNSUP(s, "INT -0");
                if (mk_int(s, neg ? -(int64_t)x : (int64_t)x, &v) < 0) return -1;
            }
            if (push(s, v) < 0) return -1;
            break;
        }
        case 0x8a: case 0x8b: { /* LONG1, LONG4 */
            size_t n;
            if (long_nbytes(s, op, &n) < 0) return -1;
            int64_t x = 0;
            if (n) {
                NEED(n);
                const uint8_t *b = s->p;
                s->p += n;
                if (n > 8) {
                    uint8_t sign = (b[7] & 0x80) ? 0xFF : 0x00;
                    for (size_t i = 8; i < n; i++)
                        if (b[i] != sign) return UNSUP(s, "integer wider than 64 bits");
                }
                size_t m = n > 8 ? 8 : n;
                uint64_t u = le(b, (int)m);
                if (m < 8 && (b[m - 1] & 0x80)) u |= ~((((uint64_t)1) << (8 * m)) - 1);
                x = (int64_t)u;
            }
            if (mk_int(s, x, &v) < 0) return -1;
            if (push(s, v) < 0) return -1;
            break;
        }
        case 'G': { /* BINFLOAT */
            NEED(8);
            /* big-endian IEEE 754 (no Python call: the GIL is not held here) */
            uint64_t bits = 0;
            for (int i = 0; i < 8; i++) bits = (bits << 8) | s->p[i];
            double d;
            memcpy(&d, &bits, 8);
            s->p += 8;
            if (p2) {
                if (VPUSH(s, s->flts, d) < 0) return -1;
                v = MK(T_FLOAT, s->flts.n - 1);
            } else {
                v = V_NONE;
            }
            if (push(s, v) < 0) return -1;
            break;
        }
        case 0x8c: case 'X': case 0x8d: /* SHORT_BINUNICODE, BINUNICODE, BINUNICODE8 */
        case 'C': case 'B': case 0x8e: /* SHORT_BINBYTES, BINBYTES, BINBYTES8 */
        case 'U': case 'T': /* SHORT_BINSTRING, BINSTRING */
        case 0x96: { /* BYTEARRAY8 */
            int w8 = (op == 0x8c || op == 'C' || op == 'U') ? 1 : (op == 'X' || op == 'B' || op == 'T') ? 4 : 8;
            NEED(w8);
            uint64_t n = le(s->p, w8);
            s->p += w8;
            if (n > (uint64_t)PY_SSIZE_T_MAX) return BAD(s, "string length exceeds system's maximum");
            NEED(n);
            const uint8_t *b = s->p;
            s->p += n;
            uint8_t kind;
            if (op == 0x8c || op == 'X' || op == 0x8d) {
                if (!utf8_ok(b, (size_t)n, 1)) return BAD(s, "invalid utf-8 in a str");
                kind = 0;
            } else if (op == 'U' || op == 'T') {
                for (uint64_t i = 0; i < n; i++)
                    if (b[i] & 0x80) return BAD(s, "non-ascii byte in a protocol-2 str");
                kind = 0;
            } else {
                kind = op == 0x96 ? 2 : 1;
            }
            if (p2) {
                uint32_t id;
                if (intern(s, b, (size_t)n, kind, &id) < 0) return -1;
                v = MK(kind == 0 ? T_STR : kind == 1 ? T_BYTES : T_BYTEARRAY, id);
            } else {
                v = V_NONE;
            }
            if (push(s, v) < 0) return -1;
            break;
        }
        case ')':
            if (push(s, MK(T_ITUP, 0)) < 0) return -1;
            break;
        case 0x85: case 0x86: case 0x87: { /* TUPLE1..3 */
            size_t k = (size_t)(op - 0x84);
            if (s->stk.n < k || s->stk.n - k < fence(s)) return underflow(s);
            if (p2) {
                if (make_tuple(s, s->stk.n - k, &v) < 0) return -1;
            } else {
                v = V_NONE;
            }
            s->stk.n -= k;
            if (push(s, v) < 0) return -1;
            break;
        }
        case 't': { /* TUPLE */
            size_t m = 0;
            if (marker(s, &m) < 0) return -1;
            if (m > s->stk.n) return underflow(s);
            if (p2) {
                if (make_tuple(s, m, &v) < 0) return -1;
            } else {
                v = V_NONE;
            }
            s->stk.n = m;
            if (push(s, v) < 0) return -1;
            break;
        }
        case ']': case '}': case 0x8f: { /* EMPTY_LIST, EMPTY_DICT, EMPTY_SET */
            if (p2) {
                uint32_t id;
                uint8_t kind = op == ']' ? T_LIST : op == '}' ? T_DICT : T_SET;
                if (cont_new(s, kind, &id) < 0) return -1;
                v = MK(kind, id);
            } else {
                v = V_NONE;
            }
            if (push(s, v) < 0) return -1;
            break;
        }
        case 'l': case 'd': case 0x91: { /* LIST, DICT, FROZENSET */
            size_t m = 0;
            if (marker(s, &m) < 0) return -1;
            if (m > s->stk.n) return underflow(s);
            size_t k = s->stk.n - m;
            if (op == 'd' && (k & 1)) return BAD(s, "odd number of items for DICT");
            if (p2) {
                uint32_t id;
                uint8_t kind = op == 'l' ? T_LIST : op == 'd' ? T_DICT : T_FROZENSET;
                if (cont_new(s, kind, &id) < 0) return -1;
                if (kind == T_LIST) {
                    if (list_append(s, id, s->stk.a + m, k) < 0) return -1;
                } else if (kind == T_DICT) {
                    for (size_t i = 0; i < k; i += 2)
                        if (cont_set(s, id, s->stk.a[m + i], s->stk.a[m + i + 1]) < 0) return -1;
                } else {
                    for (size_t i = 0; i < k; i++)
                        if (cont_set(s, id, s->stk.a[m + i], V_NONE) < 0) return -1;
                }
                v = MK(kind, id);
            } else {
                v = V_NONE;
            }
            s->stk.n = m;
            if (push(s, v) < 0) return -1;
            break;
        }
        case 'a': case 'e': { /* APPEND, APPENDS */
            int64_t x;
            if (op == 'a') {
                if ((int64_t)s->stk.n - 1 <= (int64_t)fence(s)) return underflow(s);
                x = (int64_t)s->stk.n - 1;
            } else {
                size_t m = 0;
                if (marker(s, &m) < 0) return -1;
                x = (int64_t)m;
            }
            if (x > (int64_t)s->stk.n || x <= (int64_t)fence(s)) return underflow(s);
            if (x == (int64_t)s->stk.n) break;
            if (p2) {
                Val L = s->stk.a[x - 1];
                if (TAG(L) != T_LIST) return UNSUP(s, "APPEND to a non-list");
                if (list_append(s, (uint32_t)PAY(L), s->stk.a + x, s->stk.n - (size_t)x) < 0) return -1;
            }
            s->stk.n = (size_t)x;
            break;
        }
        case 's': case 'u': { /* SETITEM, SETITEMS */
            int64_t x;
            if (op == 's') {
                x = (int64_t)s->stk.n - 2;
            } else {
                size_t m = 0;
                if (marker(s, &m) < 0) return -1;
                x = (int64_t)m;
            }
            if (x > (int64_t)s->stk.n || x <= (int64_t)fence(s)) return underflow(s);
            if (x == (int64_t)s->stk.n) break;
            if (((int64_t)s->stk.n - x) & 1) return BAD(s, "odd number of items for SETITEMS");
            if (p2) {
                Val D = s->stk.a[x - 1];
                if (TAG(D) != T_DICT) return UNSUP(s, "SETITEMS on a non-dict");
                for (size_t i = (size_t)x; i < s->stk.n; i += 2)
                    if (cont_set(s, (uint32_t)PAY(D), s->stk.a[i], s->stk.a[i + 1]) < 0) return -1;
            }
            s->stk.n = (size_t)x;
            break;
        }
        case 0x90: { /* ADDITEMS */
            size_t m = 0;
            if (marker(s, &m) < 0) return -1;
            if (m > s->stk.n || m <= fence(s)) return underflow(s);
            if (m == s->stk.n) break;
            if (p2) {
                Val T = s->stk.a[m - 1];
                if (TAG(T) != T_SET) return UNSUP(s, "ADDITEMS on a non-set");
                for (size_t i = m; i < s->stk.n; i++)
                    if (cont_set(s, (uint32_t)PAY(T), s->stk.a[i], V_NONE) < 0) return -1;
            }
            s->stk.n = m;
            break;
        }
        case 'b': /* BUILD */
            if (p2) {
                if (do_build(s) < 0) return -1;
            } else {
                if ((int64_t)s->stk.n - 2 < (int64_t)fence(s)) return underflow(s);
                if (pop(s, &v) < 0) return -1;
            }
            break;
        case 'R': /* REDUCE */
            if (p2) {
                if (do_reduce(s) < 0) return -1;
            } else {
                if (pop(s, &v) < 0 || pop(s, &w) < 0) return -1;
                if (push(s, V_NONE) < 0) return -1;
            }
            break;
        case 0x81: case 0x92: /* NEWOBJ, NEWOBJ_EX */
            if (p2) {
                if (do_newobj(s, op == 0x92) < 0) return -1;
            } else {
                if (op == 0x92 && pop(s, &v) < 0) return -1;
                if (pop(s, &v) < 0 || pop(s, &w) < 0) return -1;
                if (push(s, V_NONE) < 0) return -1;
            }
            break;
        case 0x93: { /* STACK_GLOBAL */
            Val nm = 0, md = 0;
            if (pop(s, &nm) < 0 || pop(s, &md) < 0) return -1;
            if (p2) {
                if (TAG(nm) != T_STR || TAG(md) != T_STR) return BAD(s, "STACK_GLOBAL requires str");
                gil_enter(s);
                PyObject *m = py_str(s, (uint32_t)PAY(md));
                PyObject *n = m ? py_str(s, (uint32_t)PAY(nm)) : NULL;
                /* py_str caches by id: the cache must cover ids created later */
                if (find_global(s, m, n, &v) < 0) return -1;
            } else {
                v = V_NONE;
            }
            if (push(s, v) < 0) return -1;
            break;
        }
        case 'c': { /* GLOBAL */
            const uint8_t *l1, *l2;
            size_t n1, n2;
            if (p2) gil_enter(s);
            if (rd_line(s, &l1, &n1) < 0) return -1;
            if (n1 < 2) return fail(s, ST_TRUNC, "pickle data was truncated");
            if (!utf8_ok(l1, n1 - 1, 0)) return BAD(s, "invalid utf-8 in a GLOBAL module name");
            PyObject *m = NULL;
            if (p2) {
                m = PyUnicode_DecodeUTF8((const char *)l1, (Py_ssize_t)(n1 - 1), "strict");
                if (!m) return pyerr(s);
            }
            if (rd_line(s, &l2, &n2) < 0) {
                Py_XDECREF(m);
                return -1;
            }
            if (n2 < 2) {
                Py_XDECREF(m);
                return fail(s, ST_TRUNC, "pickle data was truncated");
            }
            if (!utf8_ok(l2, n2 - 1, 0)) {
                Py_XDECREF(m);
                return BAD(s, "invalid utf-8 in a GLOBAL name");
            }
            if (p2) {
                PyObject *n = PyUnicode_DecodeUTF8((const char *)l2, (Py_ssize_t)(n2 - 1), "strict");
                if (find_global(s, m, n, &v) < 0) return -1;
            } else {
                v = V_NONE;
            }
            if (push(s, v) < 0) return -1;
            break;
        }
        case 'h': case 'j': case 'g': { /* BINGET, LONG_BINGET, GET */
            uint64_t idx;
            if (op != 'g') {
                if (memo_index(s, op, &idx) < 0) return -1;
            } else {
                const uint8_t *ln;
                size_t len;
                if (rd_line(s, &ln, &len) < 0) return -1;
                if (len < 2) return fail(s, ST_TRUNC, "pickle data was truncated");
                if (parse_decimal(ln, len - 1, &idx) < 0) return UNSUP(s, "GET in an unusual form");
            }
            if (memo_get(s, idx, &v) < 0) return -1;
            if (push(s, v) < 0) return -1;
            break;
        }
        case 'q': case 'r': case 'p': case 0x94: { /* BINPUT, LONG_BINPUT, PUT, MEMOIZE */
            uint64_t idx;
            if (op == 'q' || op == 'r') {
                if (memo_index(s, op, &idx) < 0) return -1;
            } else if (op == 'p') {
                const uint8_t *ln;
                size_t len;
                if (rd_line(s, &ln, &len) < 0) return -1;
                if (len < 2) return fail(s, ST_TRUNC, "pickle data was truncated");
                if (s->stk.n <= fence(s)) return underflow(s);
                if (parse_decimal(ln, len - 1, &idx) < 0) return UNSUP(s, "PUT in an unusual form");
            } else {
                idx = s->memo_len;
            }
            if (s->stk.n <= fence(s)) return underflow(s);
            if (memo_put(s, idx, s->stk.a[s->stk.n - 1]) < 0) return -1;
            break;
        }
        /* valid opcodes outside the modelled subset */
        case 'L': case 'F': case 'S': case 'V': case 'i': case 'o': case 'P': case 'Q':
        case 0x82: case 0x83: case 0x84: case 0x97: case 0x98:
            return UNSUP(s, "opcode 0x%02x is outside the modelled subset", op);
        default:
            if (op >= 0x20 && op <= 0x7e && op != '\'' && op != '\\')
                return BAD(s, "invalid load key, '%c'.", op);
            return BAD(s, "invalid load key, '\\x%02x'.", op);
        }
    }
fail:
    return -1;
}

/* ------------------------------------------------------------------------- */
/* materialization (small parts only: planner_data, version, storage_meta)     */

static PyObject *materialize(S *s, Val v, int depth)
{
    if (depth > 200) {
        UNSUP(s, "value nested too deeply");
        return NULL;
    }
    PyObject *o = NULL;
    switch (TAG(v)) {
    case T_NONE: Py_RETURN_NONE;
    case T_BOOL: return PyBool_FromLong((long)PAY(v));
    case T_INT: case T_BIGINT: o = PyLong_FromLongLong(get_int(s, v)); break;
    case T_FLOAT: o = PyFloat_FromDouble(s->flts.a[PAY(v)]); break;
    case T_STR: o = py_str(s, (uint32_t)PAY(v)); break;
    case T_DTYPE: {
        PyObject *n = py_str(s, (uint32_t)PAY(v));
        if (!n) break;
        o = PyObject_CallOneArg(s->dtype_cls, n);
        Py_DECREF(n);
        break;
    }
    case T_BYTES: case T_BYTEARRAY: {
        uint32_t id = (uint32_t)PAY(v);
        if (TAG(v) == T_BYTES) o = PyBytes_FromStringAndSize((const char *)str_ptr(s, id), s->strs[id].len);
        else o = PyByteArray_FromStringAndSize((const char *)str_ptr(s, id), s->strs[id].len);
        break;
    }
    case T_ITUP: case T_GTUP: {
        size_t n = SPAN_LEN(v);
        o = PyTuple_New((Py_ssize_t)n);
        if (!o) break;
        for (size_t i = 0; i < n; i++) {
            PyObject *x;
            if (TAG(v) == T_ITUP) x = PyLong_FromLongLong(s->ia.a[SPAN_START(v) + i]);
            else x = materialize(s, s->va.a[SPAN_START(v) + i], depth + 1);
            if (!x) {
                Py_CLEAR(o);
                break;
            }
            PyTuple_SET_ITEM(o, (Py_ssize_t)i, x);
        }
        break;
    }
    case T_LIST: case T_DICT: case T_SET: case T_FROZENSET: {
        uint32_t id = (uint32_t)PAY(v);
        unsigned t = TAG(v);
        o = (t == T_LIST || t == T_FROZENSET) ? PyList_New(0) : t == T_DICT ? PyDict_New() : PySet_New(NULL);
        if (!o) break;
        for (uint32_t i = 0; i < s->ct[id].n; i++) {
            Val *it = citems(&s->ct[id]);
            if (t == T_DICT) {
                Val kv = it[2 * i], vv = it[2 * i + 1];
                PyObject *k = materialize(s, kv, depth + 1);
                if (!k) { Py_CLEAR(o); break; }
                PyObject *x = materialize(s, vv, depth + 1);
                if (!x) { Py_DECREF(k); Py_CLEAR(o); break; }
                int rc = PyDict_SetItem(o, k, x);
                Py_DECREF(k);
                Py_DECREF(x);
                if (rc < 0) { Py_CLEAR(o); break; }
            } else {
                PyObject *x = materialize(s, it[i], depth + 1);
                if (!x) { Py_CLEAR(o); break; }
                int rc = (t == T_LIST || t == T_FROZENSET) ? PyList_Append(o, x) : PySet_Add(o, x);
                Py_DECREF(x);
                if (rc < 0) { Py_CLEAR(o); break; }
            }
        }
        if (o && t == T_FROZENSET) {
            PyObject *f = PyFrozenSet_New(o);
            Py_DECREF(o);
            o = f;
        }
        break;
    }
    default:
        UNSUP(s, "cannot materialize a value with tag %u", TAG(v));
        return NULL;
    }
    if (!o && s->st == ST_OK) pyerr(s);
    return o;
}

/* ------------------------------------------------------------------------- */
/* output buffers                                                             */

typedef struct {
    PyObject_HEAD
    void *p;
    Py_ssize_t nbytes;
    Py_ssize_t exports;
} BufObject;

static int Buf_getbuffer(BufObject *self, Py_buffer *view, int flags)
{
    static char dummy[8];
    void *p = self->p ? self->p : dummy;
    if (PyBuffer_FillInfo(view, (PyObject *)self, p, self->nbytes, 0, flags) < 0) return -1;
    self->exports++;
    return 0;
}
static void Buf_releasebuffer(BufObject *self, Py_buffer *view) { self->exports--; }
static void Buf_dealloc(BufObject *self)
{
    free(self->p);
    Py_TYPE(self)->tp_free((PyObject *)self);
}
static PyBufferProcs Buf_as_buffer = {(getbufferproc)Buf_getbuffer, (releasebufferproc)Buf_releasebuffer};
static PyTypeObject BufType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "dcp_explorer.readers._dcpscan.Buffer",
    .tp_basicsize = sizeof(BufObject),
    .tp_dealloc = (destructor)Buf_dealloc,
    .tp_as_buffer = &Buf_as_buffer,
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Memory owned by the scanner, exported through the buffer protocol.",
};

/* take ownership of p (malloc'ed) */
static PyObject *buf_new(void *p, size_t nbytes)
{
    BufObject *b = PyObject_New(BufObject, &BufType);
    if (!b) {
        free(p);
        return NULL;
    }
    b->p = p;
    b->nbytes = (Py_ssize_t)nbytes;
    b->exports = 0;
    return (PyObject *)b;
}

static void *xmalloc(size_t n) { return malloc(n ? n : 1); }

/* ------------------------------------------------------------------------- */
/* turning the scanned objects into the index                                  */

static int setitem_steal(PyObject *d, const char *k, PyObject *v)
{
    if (!v) return -1;
    int rc = PyDict_SetItemString(d, k, v);
    Py_DECREF(v);
    return rc;
}

typedef struct {
    uint32_t *slot; /* row+1 */
    uint32_t cap;
    size_t used;    /* rows of the entries indexed so far */
} RowHash;

static uint64_t coords_hash(const int64_t *a, size_t n, uint32_t e)
{
    uint64_t h = 0x9E3779B97F4A7C15ULL ^ e ^ ((uint64_t)n << 32);
    for (size_t i = 0; i < n; i++) {
        h ^= (uint64_t)a[i];
        h *= 0xBF58476D1CE4E5B9ULL;
        h ^= h >> 31;
    }
    return h;
}

/* the chunk rows, for the row tables below: row r belongs to entry[r] and starts at offsets
 * offs[coord[r]], coord[r + 1] - coord[r] of them */
typedef struct {
    const int64_t *coord, *offs;
    const int32_t *entry;
} Rows;

/* A table of rows by (entry, offsets): open addressing, slot = row + 1 (0: empty), cap a power of
 * two and never full. The slot of the row of entry e whose offsets are key[0..nd), or the empty
 * slot where it would go */
static uint32_t row_slot(const uint32_t *slot, uint32_t cap, Rows rw, const int64_t *key, size_t nd, uint32_t e)
{
    uint32_t j = (uint32_t)coords_hash(key, nd, e) & (cap - 1);
    while (slot[j]) {
        size_t q = slot[j] - 1;
        size_t qa = (size_t)rw.coord[q], qn = (size_t)(rw.coord[q + 1] - rw.coord[q]);
        if (rw.entry[q] == (int32_t)e && qn == nd && (nd == 0 || memcmp(rw.offs + qa, key, nd * 8) == 0)) break;
        j = (j + 1) & (cap - 1);
    }
    return j;
}

/* add row r, of entry e, unless a row of e with the same offsets is there (the first one wins, like
 * dict.setdefault) */
static void row_add(uint32_t *slot, uint32_t cap, Rows rw, size_t r, uint32_t e)
{
    size_t a0 = (size_t)rw.coord[r], nd = (size_t)(rw.coord[r + 1] - rw.coord[r]);
    uint32_t j = row_slot(slot, cap, rw, rw.offs + a0, nd, e);
    if (!slot[j]) slot[j] = (uint32_t)(r + 1);
}

static PyObject *finish(S *s)
{
    PyObject *out = NULL, *fqns = NULL, *dtypes = NULL, *shapes = NULL;
    int32_t *sdm_of_str = NULL, *entry = NULL, *filec = NULL, *fid_of_str = NULL, *tr_of_str = NULL;
    int64_t *cstart = NULL, *coord = NULL, *offs = NULL, *sizs = NULL, *boff = NULL, *blen = NULL;
    int16_t *tcol = NULL;
    uint8_t *kinds = NULL, *seen = NULL;
    uint64_t *nd_of = NULL;
    RowHash rh = {NULL, 0, 0};
    size_t n = 0, m = 0, total = 0;
    int identity = 0;

    Val top = s->result;
    if (TAG(top) != T_OBJ || s->obj[PAY(top)].cls == C_TP) {
        UNSUP(s, "the pickle does not hold an object with a __dict__");
        goto fail;
    }
    int32_t mdict = s->obj[PAY(top)].dict;
    Val sdmv;
    if (mdict < 0 || !dict_get_kw(s, (uint32_t)mdict, KW_STATE_DICT_METADATA, &sdmv) || TAG(sdmv) != T_DICT) {
        UNSUP(s, "no state_dict_metadata dict");
        goto fail;
    }
    uint32_t sdm = (uint32_t)PAY(sdmv);
    n = s->ct[sdm].n;
    out = PyDict_New();
    if (!out) { pyerr(s); goto fail; }

    /* small parts as Python objects */
    {
        Val pv = V_NONE, vv = V_NONE, smv = V_NONE;
        PyObject *planner;
        if (dict_get_kw(s, (uint32_t)mdict, KW_PLANNER_DATA, &pv) && TAG(pv) == T_DICT) {
            planner = materialize(s, pv, 0);
            if (!planner) goto fail;
        } else {
            planner = PyDict_New();
        }
        if (setitem_steal(out, "planner_data", planner) < 0) { pyerr(s); goto fail; }
        PyObject *ver;
        if (dict_get_kw(s, (uint32_t)mdict, KW_VERSION, &vv)) {
            ver = materialize(s, vv, 0);
            if (!ver) goto fail;
        } else {
            Py_INCREF(Py_None);
            ver = Py_None;
        }
        if (setitem_steal(out, "version", ver) < 0) { pyerr(s); goto fail; }
        PyObject *smd = PyDict_New();
        if (setitem_steal(out, "storage_meta", smd) < 0) { pyerr(s); goto fail; }
        if (dict_get_kw(s, (uint32_t)mdict, KW_STORAGE_META, &smv)) {
            unsigned t = TAG(smv);
            if (t == T_CHUNK || t == T_MIDX || t == T_SINFO || t == T_GLOBAL) {
                UNSUP(s, "storage_meta of an unexpected type");
                goto fail;
            }
            if (t == T_OBJ && s->obj[PAY(smv)].cls != C_TP && s->obj[PAY(smv)].dict >= 0) {
                uint32_t sd = (uint32_t)s->obj[PAY(smv)].dict;
                static const int kws[3] = {KW_CHECKPOINT_ID, KW_SAVE_ID, KW_MODULES};
                static const char *names[3] = {"checkpoint_id", "save_id", "modules"};
                for (int q = 0; q < 3; q++) {
                    Val x;
                    if (dict_get_kw(s, sd, kws[q], &x)) {
                        PyObject *xo = materialize(s, x, 0);
                        if (!xo) goto fail;
                        if (setitem_steal(smd, names[q], xo) < 0) { pyerr(s); goto fail; }
                    }
                }
            }
        }
    }


    /* entries */
    sdm_of_str = (int32_t *)xmalloc((size_t)s->nstr * sizeof(int32_t));
    kinds = (uint8_t *)xmalloc(n);
    cstart = (int64_t *)xmalloc((n + 1) * sizeof(int64_t));
    nd_of = (uint64_t *)xmalloc((n + 1) * sizeof(uint64_t));
    fqns = PyTuple_New((Py_ssize_t)n);
    dtypes = PyTuple_New((Py_ssize_t)n);
    shapes = PyTuple_New((Py_ssize_t)n);
    if (!sdm_of_str || !kinds || !cstart || !nd_of || !fqns || !dtypes || !shapes) {
        if (!PyErr_Occurred()) PyErr_NoMemory();
        pyerr(s);
        goto fail;
    }
    for (uint32_t i = 0; i < s->nstr; i++) sdm_of_str[i] = -1;
    cstart[0] = 0;
    for (size_t e = 0; e < n; e++) {
        Val *it = citems(&s->ct[sdm]);
        Val k = it[2 * e], v = it[2 * e + 1];
        if (!is_str(k)) { UNSUP(s, "a state_dict_metadata key is not a str"); goto fail; }
        sdm_of_str[PAY(k)] = (int32_t)e;
        PyObject *ko = materialize(s, k, 0);
        if (!ko) goto fail;
        PyTuple_SET_ITEM(fqns, (Py_ssize_t)e, ko);
        if (TAG(v) != T_OBJ || (s->obj[PAY(v)].cls != C_TSM && s->obj[PAY(v)].cls != C_BSM)) {
            UNSUP(s, "a state_dict_metadata value is neither tensor nor bytes metadata");
            goto fail;
        }
        Obj *o = &s->obj[PAY(v)];
        if (o->cls == C_BSM) {
            kinds[e] = 1;
            Py_INCREF(Py_None);
            PyTuple_SET_ITEM(dtypes, (Py_ssize_t)e, Py_None);
            PyObject *emp = PyTuple_New(0);
            if (!emp) { pyerr(s); goto fail; }
            PyTuple_SET_ITEM(shapes, (Py_ssize_t)e, emp);
            cstart[e + 1] = cstart[e];
            nd_of[e] = 0;
            continue;
        }
        kinds[e] = 0;
        Val props = V_NONE, size = V_NONE, chunks = V_NONE;
        if (o->dict >= 0) {
            dict_get_kw(s, (uint32_t)o->dict, KW_PROPERTIES, &props);
            dict_get_kw(s, (uint32_t)o->dict, KW_SIZE, &size);
            dict_get_kw(s, (uint32_t)o->dict, KW_CHUNKS, &chunks);
        }
        if (TAG(props) != T_OBJ || s->obj[PAY(props)].cls != C_TP || !s->obj[PAY(props)].tp_set ||
            !is_str(s->obj[PAY(props)].tp_dtype)) {
            UNSUP(s, "tensor properties without a str dtype");
            goto fail;
        }
        if (TAG(size) != T_ITUP) { UNSUP(s, "tensor size is not a tuple of ints"); goto fail; }
        if (TAG(chunks) != T_LIST) { UNSUP(s, "tensor chunks is not a list"); goto fail; }
        PyObject *dt = py_str(s, (uint32_t)PAY(s->obj[PAY(props)].tp_dtype));
        if (!dt) { pyerr(s); goto fail; }
        PyTuple_SET_ITEM(dtypes, (Py_ssize_t)e, dt);
        PyObject *sh = materialize(s, size, 0);
        if (!sh) goto fail;
        PyTuple_SET_ITEM(shapes, (Py_ssize_t)e, sh);
        cstart[e + 1] = cstart[e] + (int64_t)s->ct[PAY(chunks)].n;
        nd_of[e] = SPAN_LEN(size) | ((uint64_t)PAY(chunks) << 20);
    }
    m = (size_t)cstart[n];
    if (m >= 0x7FFFFFF0u) { UNSUP(s, "too many chunk rows"); goto fail; }

    /* chunk rows: check, and use the scanner's arrays directly when rows are in creation order */
    entry = (int32_t *)xmalloc(m * sizeof(int32_t));
    if (!entry) { PyErr_NoMemory(); pyerr(s); goto fail; }
    identity = 1;
    {
        size_t r = 0;
        int64_t pos = 0;
        for (size_t e = 0; e < n; e++) {
            if (kinds[e]) continue;
            uint32_t L = (uint32_t)(nd_of[e] >> 20);
            uint32_t nd = (uint32_t)(nd_of[e] & 0xFFFFF);
            Cont *c = &s->ct[L];
            Val *it = citems(c);
            for (uint32_t j = 0; j < c->n; j++, r++) {
                Val x = it[j];
                if (TAG(x) != T_CHUNK) { UNSUP(s, "a chunks item is not a ChunkStorageMetadata"); goto fail; }
                size_t id = (size_t)PAY(x);
                if ((s->ck_state.a[id] & 0x7F) != 1) { UNSUP(s, "a chunk without int offsets/sizes"); goto fail; }
                if (s->ck_nd.a[id] != nd) { UNSUP(s, "a chunk has a different number of dims than its tensor"); goto fail; }
                if (identity && (id != r || s->ck_coord.a[id] != pos)) identity = 0;
                pos += nd;
                entry[r] = (int32_t)e;
            }
        }
        total = (size_t)pos;
    }
    if (identity) {
        if (VRESERVE(s, s->ck_coord, m + 1) < 0) goto fail;
        s->ck_coord.a[m] = (int64_t)total;
        coord = s->ck_coord.a;
        offs = s->ck_off.a;
        sizs = s->ck_siz.a;
        s->ck_coord.a = NULL; s->ck_coord.n = s->ck_coord.cap = 0;
        s->ck_off.a = NULL; s->ck_off.n = s->ck_off.cap = 0;
        s->ck_siz.a = NULL; s->ck_siz.n = s->ck_siz.cap = 0;
    } else {
        coord = (int64_t *)xmalloc((m + 1) * sizeof(int64_t));
        offs = (int64_t *)xmalloc(total * sizeof(int64_t));
        sizs = (int64_t *)xmalloc(total * sizeof(int64_t));
        if (!coord || !offs || !sizs) { PyErr_NoMemory(); pyerr(s); goto fail; }
        size_t r = 0, pos = 0;
        for (size_t e = 0; e < n; e++) {
            if (kinds[e]) continue;
            Cont *c = &s->ct[(uint32_t)(nd_of[e] >> 20)];
            Val *it = citems(c);
            for (uint32_t j = 0; j < c->n; j++, r++) {
                size_t id = (size_t)PAY(it[j]);
                size_t nd = s->ck_nd.a[id];
                coord[r] = (int64_t)pos;
                if (nd) {
                    memcpy(offs + pos, s->ck_off.a + s->ck_coord.a[id], nd * 8);
                    memcpy(sizs + pos, s->ck_siz.a + s->ck_coord.a[id], nd * 8);
                }
                pos += nd;
            }
        }
        coord[m] = (int64_t)pos;
        VFREE(s->ck_coord);
        VFREE(s->ck_off);
        VFREE(s->ck_siz);
    }
    VFREE(s->ck_nd);
    VFREE(s->ck_state);
    VFREE(s->ia);
    {
        /* the chunk lists are no longer needed, unless a transform_descriptors value is a list */
        int keep = 0;
        for (size_t i = 0; i < s->si_tdv.n; i++)
            if (TAG(s->si_tdv.a[i]) == T_LIST) keep = 1;
        for (size_t e = 0; e < n && !keep; e++)
            if (!kinds[e]) {
                Cont *c = &s->ct[(uint32_t)(nd_of[e] >> 20)];
                free(c->heap);
                c->heap = NULL;
                c->n = 0;
                c->cap = 8;
            }
    }

    /* storage */
    filec = (int32_t *)xmalloc(m * sizeof(int32_t));
    boff = (int64_t *)xmalloc(m * sizeof(int64_t));
    blen = (int64_t *)xmalloc(m * sizeof(int64_t));
    tcol = (int16_t *)xmalloc(m * sizeof(int16_t));
    if (!filec || !boff || !blen || !tcol) { PyErr_NoMemory(); pyerr(s); goto fail; }
    for (size_t r = 0; r < m; r++) {
        filec[r] = -1;
        boff[r] = -1;
        blen[r] = -1;
        tcol[r] = -1;
    }
    PyObject *files = PyList_New(0), *transforms = PyList_New(0), *bytes_items = PyDict_New();
    if (setitem_steal(out, "files", files) < 0 || setitem_steal(out, "transforms", transforms) < 0 ||
        setitem_steal(out, "bytes_items", bytes_items) < 0) {
        pyerr(s);
        goto fail;
    }
    Val stv = V_NONE;
    int has_storage = dict_get_kw(s, (uint32_t)mdict, KW_STORAGE_DATA, &stv) && TAG(stv) != T_NONE;
    if (has_storage) {
        if (TAG(stv) != T_DICT) { UNSUP(s, "storage_data is not a dict"); goto fail; }
        uint32_t st = (uint32_t)PAY(stv);
        size_t K = s->ct[st].n;
        fid_of_str = (int32_t *)xmalloc((size_t)s->nstr * sizeof(int32_t));
        tr_of_str = (int32_t *)xmalloc((size_t)s->nstr * sizeof(int32_t));
        if (!fid_of_str || !tr_of_str) { PyErr_NoMemory(); pyerr(s); goto fail; }
        for (uint32_t i = 0; i < s->nstr; i++) fid_of_str[i] = tr_of_str[i] = -1;
        /* validate all keys first, then all values (the reference's order of checks) */
        for (size_t i = 0; i < K; i++) {
            Val k = citems(&s->ct[st])[2 * i];
            if (TAG(k) != T_MIDX) { UNSUP(s, "a storage_data key is not a MetadataIndex"); goto fail; }
        }
        for (size_t i = 0; i < K; i++) {
            Val v = citems(&s->ct[st])[2 * i + 1];
            if (TAG(v) != T_SINFO) { UNSUP(s, "a storage_data value is not a _StorageInfo"); goto fail; }
        }
        for (size_t i = 0; i < K; i++) {
            size_t mi = (size_t)PAY(citems(&s->ct[st])[2 * i]);
            uint32_t f = s->mi_fqn.a[mi];
            if (!(s->mi_flags.a[mi] & 1) || f == 0xFFFFFFFFu || sdm_of_str[f] < 0) {
                UNSUP(s, "a storage_data key names no entry");
                goto fail;
            }
        }
        /* one pass in storage order: file ids and transforms (first seen), bytes items, rows */
        seen = (uint8_t *)calloc(m ? m : 1, 1);
        if (!seen) { PyErr_NoMemory(); pyerr(s); goto fail; }
        uint8_t *indexed = NULL; /* entries whose rows are in the search table */
        const Rows rw = {coord, offs, entry};
        int nfiles = 0, ntr = 0, bad = 0;
        for (size_t i = 0; i < K && !bad; i++) {
            size_t mi = (size_t)PAY(citems(&s->ct[st])[2 * i]);
            size_t si = (size_t)PAY(citems(&s->ct[st])[2 * i + 1]);
            uint32_t e = (uint32_t)sdm_of_str[s->mi_fqn.a[mi]];
            uint32_t pth = s->si_path.a[si];
            if (pth == 0xFFFFFFFFu) { UNSUP(s, "a relative_path is missing or not a str"); bad = 1; break; }
            if (fid_of_str[pth] < 0) {
                PyObject *po = py_str(s, pth);
                if (!po || PyList_Append(files, po) < 0) { Py_XDECREF(po); pyerr(s); bad = 1; break; }
                Py_DECREF(po);
                fid_of_str[pth] = nfiles++;
            }
            int32_t fid = fid_of_str[pth];
            if (s->si_flags.a[si] & 0x0C) { UNSUP(s, "a _StorageInfo offset/length is not an int"); bad = 1; break; }
            int16_t tid = -1;
            uint32_t tdi = s->si_td.a[si];
            if (tdi) {
                Val td = s->si_tdv.a[tdi - 1];
                unsigned tt = TAG(td);
                int truthy;
                size_t cnt = 0;
                const Val *items = NULL;
                switch (tt) {
                case T_NONE: truthy = 0; break;
                case T_BOOL: truthy = PAY(td) != 0; break;
                case T_INT: truthy = int_of(td) != 0; break;
                case T_BIGINT: truthy = 1; break;
                case T_FLOAT: truthy = s->flts.a[PAY(td)] != 0.0; break;
                case T_STR: case T_DTYPE: case T_BYTES: case T_BYTEARRAY:
                    truthy = s->strs[(uint32_t)PAY(td)].len != 0; break;
                case T_ITUP: truthy = SPAN_LEN(td) != 0; break;
                case T_GTUP: truthy = SPAN_LEN(td) != 0; cnt = SPAN_LEN(td); items = s->va.a + SPAN_START(td); break;
                case T_LIST: case T_DICT: case T_SET: case T_FROZENSET:
                    truthy = s->ct[PAY(td)].n != 0;
                    if (tt == T_LIST) { cnt = s->ct[PAY(td)].n; items = citems(&s->ct[PAY(td)]); }
                    break;
                default: truthy = 1; break;
                }
                if (truthy) {
                    if (!items) { UNSUP(s, "transform_descriptors is not a list of str"); bad = 1; break; }
                    size_t L = 0;
                    for (size_t j = 0; j < cnt; j++) {
                        if (!is_str(items[j])) { bad = 1; break; }
                        L += s->strs[(uint32_t)PAY(items[j])].len + (j ? 1 : 0);
                    }
                    if (bad) { UNSUP(s, "transform_descriptors is not a list of str"); break; }
                    uint8_t *tmp = (uint8_t *)xmalloc(L);
                    if (!tmp) { vgrow_fail(s, -1); bad = 1; break; }
                    size_t q = 0;
                    for (size_t j = 0; j < cnt; j++) {
                        uint32_t id = (uint32_t)PAY(items[j]);
                        if (j) tmp[q++] = '+';
                        memcpy(tmp + q, str_ptr(s, id), s->strs[id].len);
                        q += s->strs[id].len;
                    }
                    uint32_t jid;
                    size_t oldn = s->nstr;
                    int rc = intern(s, tmp, L, 0, &jid);
                    free(tmp);
                    if (rc < 0) { bad = 1; break; }
                    if (s->nstr != oldn) {
                        /* a new string: grow the per-string maps */
                        int32_t *a1 = (int32_t *)realloc(fid_of_str, (size_t)s->nstr * sizeof(int32_t));
                        if (a1) fid_of_str = a1;
                        int32_t *a2 = (int32_t *)realloc(tr_of_str, (size_t)s->nstr * sizeof(int32_t));
                        if (a2) tr_of_str = a2;
                        int32_t *a3 = (int32_t *)realloc(sdm_of_str, (size_t)s->nstr * sizeof(int32_t));
                        if (a3) sdm_of_str = a3;
                        if (!a1 || !a2 || !a3) { vgrow_fail(s, -1); bad = 1; break; }
                        for (size_t z = oldn; z < s->nstr; z++) fid_of_str[z] = tr_of_str[z] = sdm_of_str[z] = -1;
                    }
                    if (tr_of_str[jid] < 0) {
                        if (ntr >= 32767) { UNSUP(s, "too many transforms"); bad = 1; break; }
                        PyObject *po = py_str(s, jid);
                        if (!po || PyList_Append(transforms, po) < 0) { Py_XDECREF(po); pyerr(s); bad = 1; break; }
                        Py_DECREF(po);
                        tr_of_str[jid] = ntr++;
                    }
                    tid = (int16_t)tr_of_str[jid];
                }
            }
            if (kinds[e]) {
                PyObject *key = PyLong_FromUnsignedLong(e);
                PyObject *val = Py_BuildValue("(iLLi)", fid, (long long)s->si_off.a[si], (long long)s->si_len.a[si], (int)tid);
                int rc = (!key || !val) ? -1 : PyDict_SetItem(bytes_items, key, val);
                Py_XDECREF(key);
                Py_XDECREF(val);
                if (rc < 0) { bad = 1; pyerr(s); break; }
                continue;
            }
            /* the row: the index hint when its offsets match, else a search by offsets */
            uint64_t ok = s->mi_off.a[mi];
            if ((ok & 3) == 2) { bad = 1; UNSUP(s, "a MetadataIndex offset is not a tuple of ints"); break; }
            if ((ok & 3) == 0) { bad = 1; UNSUP(s, "a tensor's MetadataIndex has no offset"); break; }
            const int64_t *ko = s->mi_ints.a + (ok >> 22);
            size_t knd = (size_t)((ok >> 2) & 0xFFFFF);
            int64_t cnt = cstart[e + 1] - cstart[e];
            int32_t h = s->mi_idx.a[mi];
            int64_t row = -1;
            if (h >= 0 && h < cnt) {
                int64_t r = cstart[e] + h;
                size_t a0 = (size_t)coord[r], nd = (size_t)(coord[r + 1] - coord[r]);
                if (knd == nd && (nd == 0 || memcmp(offs + a0, ko, nd * 8) == 0)) row = r;
            }
            if (row < 0) {
                if (!indexed) {
                    indexed = (uint8_t *)calloc(n ? n : 1, 1);
                    if (!indexed) { PyErr_NoMemory(); pyerr(s); bad = 1; break; }
                }
                if (!indexed[e]) {
                    /* first row of each distinct offsets wins, like dict.setdefault */
                    indexed[e] = 1;
                    rh.used += (size_t)(cnt > 0 ? cnt : 0);
                    if (rh.used * 2 + 16 > rh.cap) {
                        /* (re)build the table over every indexed entry, larger */
                        uint32_t hc = 64;
                        while (hc < rh.used * 4 + 16 && hc < 0x80000000u) hc *= 2;
                        free(rh.slot);
                        rh.slot = (uint32_t *)calloc(hc, sizeof(uint32_t));
                        if (!rh.slot) { PyErr_NoMemory(); pyerr(s); bad = 1; break; }
                        rh.cap = hc;
                        for (size_t e2 = 0; e2 < n; e2++) {
                            if (!indexed[e2] || e2 == e) continue;
                            for (int64_t r = cstart[e2]; r < cstart[e2 + 1]; r++)
                                row_add(rh.slot, rh.cap, rw, (size_t)r, (uint32_t)e2);
                        }
                    }
                    for (int64_t r = cstart[e]; r < cstart[e + 1]; r++)
                        row_add(rh.slot, rh.cap, rw, (size_t)r, e);
                }
                uint32_t j = row_slot(rh.slot, rh.cap, rw, ko, knd, e);
                if (rh.slot[j]) row = (int64_t)rh.slot[j] - 1;
                if (row < 0) { UNSUP(s, "a storage_data chunk is missing from its tensor"); bad = 1; break; }
            }
            seen[row] = 1;
            filec[row] = fid;
            boff[row] = s->si_off.a[si];
            blen[row] = s->si_len.a[si];
            tcol[row] = tid;
        }
        free(indexed);
        if (bad) goto fail;
        /* storage_data is keyed by (fqn, offset) only: a chunk without its own entry shares the
           stored item of the first stored chunk of the same tensor with equal offsets
           (mirrors parse_metadata) */
        {
            size_t unseen = 0;
            for (size_t r = 0; r < m; r++) unseen += !seen[r];
            if (unseen) {
                uint8_t *want = (uint8_t *)calloc(n ? n : 1, 1);
                if (!want) { PyErr_NoMemory(); pyerr(s); goto fail; }
                for (size_t r = 0; r < m; r++)
                    if (!seen[r]) want[entry[r]] = 1;
                size_t nins = 0;
                for (size_t e = 0; e < n; e++)
                    if (want[e]) nins += (size_t)(cstart[e + 1] - cstart[e]);
                uint32_t hc = 64;
                while (hc < (uint64_t)nins * 2 + 16 && hc < 0x80000000u) hc *= 2;
                uint32_t *tab = (uint32_t *)calloc(hc, sizeof(uint32_t));
                if (!tab) { free(want); PyErr_NoMemory(); pyerr(s); goto fail; }
                for (size_t r = 0; r < m; r++)
                    if (seen[r] && want[entry[r]]) row_add(tab, hc, rw, r, (uint32_t)entry[r]);
                for (size_t r = 0; r < m; r++) {
                    if (seen[r]) continue;
                    size_t a0 = (size_t)coord[r], nd = (size_t)(coord[r + 1] - coord[r]);
                    uint32_t j = row_slot(tab, hc, rw, offs + a0, nd, (uint32_t)entry[r]);
                    if (tab[j]) {
                        size_t q = tab[j] - 1;
                        filec[r] = filec[q];
                        boff[r] = boff[q];
                        blen[r] = blen[q];
                        tcol[r] = tcol[q];
                        seen[r] = 2;
                    }
                }
                free(want);
                free(tab);
            }
        }
        size_t missing = 0, first = 0;
        for (size_t r = m; r-- > 0;)
            if (!seen[r]) { missing++; first = r; }
        PyObject *wm = missing ? Py_BuildValue("(nn)", (Py_ssize_t)missing, (Py_ssize_t)entry[first]) : (Py_INCREF(Py_None), Py_None);
        if (setitem_steal(out, "missing_chunks", wm) < 0) { pyerr(s); goto fail; }
    }
    if (setitem_steal(out, "has_storage", PyBool_FromLong(has_storage)) < 0) { pyerr(s); goto fail; }

    /* columns */
    {
        PyObject *b;
#define PUTBUF(name, ptr, bytes)                                         \
        b = buf_new((ptr), (bytes));                                     \
        (ptr) = NULL;                                                    \
        if (setitem_steal(out, name, b) < 0) { pyerr(s); goto fail; }
        PUTBUF("entry", entry, m * 4);
        PUTBUF("coord_start", coord, (m + 1) * 8);
        PUTBUF("offsets", offs, total * 8);
        PUTBUF("sizes", sizs, total * 8);
        PUTBUF("file", filec, m * 4);
        PUTBUF("byte_offset", boff, m * 8);
        PUTBUF("byte_length", blen, m * 8);
        PUTBUF("transform", tcol, m * 2);
        PUTBUF("chunk_start", cstart, (n + 1) * 8);
        PUTBUF("kinds", kinds, n);
#undef PUTBUF
    }
    if (setitem_steal(out, "fqns", fqns) < 0) { fqns = NULL; pyerr(s); goto fail; }
    fqns = NULL;
    if (setitem_steal(out, "dtypes", dtypes) < 0) { dtypes = NULL; pyerr(s); goto fail; }
    dtypes = NULL;
    if (setitem_steal(out, "shapes", shapes) < 0) { shapes = NULL; pyerr(s); goto fail; }
    shapes = NULL;
    if (setitem_steal(out, "identity", PyBool_FromLong(identity)) < 0) { pyerr(s); goto fail; }

    free(sdm_of_str); free(nd_of); free(fid_of_str); free(tr_of_str); free(seen); free(rh.slot);
    return out;

fail:
    Py_XDECREF(out);
    Py_XDECREF(fqns); Py_XDECREF(dtypes); Py_XDECREF(shapes);
    free(sdm_of_str); free(kinds); free(cstart); free(nd_of); free(entry); free(filec); free(boff); free(blen);
    free(tcol); free(fid_of_str); free(tr_of_str); free(seen); free(rh.slot);
    if (coord != s->ck_coord.a) free(coord);
    if (offs != s->ck_off.a) free(offs);
    if (sizs != s->ck_siz.a) free(sizs);
    if (s->st == ST_OK) pyerr(s);
    return NULL;
}

/* ------------------------------------------------------------------------- */
/* driver                                                                     */

static void s_free(S *s)
{
    if (s->have_view) PyBuffer_Release(&s->view);
    free(s->buf);
    VFREE(s->bits);
    free(s->rank);
    free(s->slots);
    VFREE(s->stk);
    VFREE(s->marks);
    VFREE(s->ia);
    VFREE(s->va);
    VFREE(s->bigs);
    VFREE(s->flts);
    VFREE(s->sb);
    free(s->strs);
    free(s->sh);
    for (uint32_t i = 0; i < s->nct; i++) {
        free(s->ct[i].heap);
        free(s->ct[i].hx);
    }
    free(s->ct);
    VFREE(s->cfree);
    VFREE(s->work);
    free(s->obj);
    VFREE(s->ck_state); VFREE(s->ck_coord); VFREE(s->ck_nd); VFREE(s->ck_off); VFREE(s->ck_siz);
    VFREE(s->mi_fqn); VFREE(s->mi_off); VFREE(s->mi_idx); VFREE(s->mi_flags); VFREE(s->mi_ints);
    VFREE(s->si_path); VFREE(s->si_off); VFREE(s->si_len); VFREE(s->si_td); VFREE(s->si_flags); VFREE(s->si_tdv);
    if (s->pystr) {
        for (uint32_t i = 0; i < s->pystr_cap; i++) Py_XDECREF(s->pystr[i]);
        free(s->pystr);
    }
    Py_XDECREF(s->readinto);
    Py_XDECREF(s->read);
    Py_XDECREF(s->refmod);
    Py_XDECREF(s->refname);
}

static int rd_rewind(S *s)
{
    s->fend = 0;
    if (!s->file_mode) {
        s->win = s->p = (const uint8_t *)s->view.buf;
        s->end = s->win + s->view.len;
        s->base = 0;
    } else {
        PyObject *r = PyObject_CallMethod(s->file, "seek", "L", s->start_pos);
        if (!r) return pyerr(s);
        Py_DECREF(r);
        s->win = s->p = s->end = s->buf;
        s->base = 0;
    }
    rd_setlim(s);
    return 0;
}

static PyObject *raise_status(S *s)
{
    switch (s->st) {
    case ST_PYERR:
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_SystemError, "scanner error without exception");
        return NULL;
    case ST_NOMEM:
        return PyErr_NoMemory();
    case ST_UNSUP:
        PyErr_SetString(UnsupportedErr, s->msg);
        return NULL;
    case ST_REFUSED: {
        PyObject *a = PyTuple_Pack(2, s->refmod, s->refname);
        if (a) {
            PyErr_SetObject(RefusedErr, a);
            Py_DECREF(a);
        }
        return NULL;
    }
    case ST_TRUNC: {
        PyObject *a = Py_BuildValue("(sO)", s->msg, Py_True);
        if (a) {
            PyErr_SetObject(MalformedErr, a);
            Py_DECREF(a);
        }
        return NULL;
    }
    default: {
        PyObject *a = Py_BuildValue("(sO)", s->msg, Py_False);
        if (a) {
            PyErr_SetObject(MalformedErr, a);
            Py_DECREF(a);
        }
        return NULL;
    }
    }
}

/* scan(src, start, total, gmap, dtmap, funcs, dtype_cls) */
static PyObject *py_scan(PyObject *self, PyObject *args)
{
    PyObject *src, *gmap, *dtmap, *funcs, *dtype_cls;
    long long start, total;
    if (!PyArg_ParseTuple(args, "OLLO!O!O!O", &src, &start, &total, &PyDict_Type, &gmap, &PyDict_Type, &dtmap,
                          &PyList_Type, &funcs, &dtype_cls))
        return NULL;
    S *s = (S *)calloc(1, sizeof(S));
    if (!s) return PyErr_NoMemory();
    s->gmap = gmap;
    s->dtmap = dtmap;
    s->funcs = funcs;
    s->dtype_cls = dtype_cls;
    PyObject *res = NULL;

    if (start < 0) {
        if (PyObject_GetBuffer(src, &s->view, PyBUF_SIMPLE) < 0) goto done_err;
        s->have_view = 1;
        s->total = (uint64_t)s->view.len;
    } else {
        s->file_mode = 1;
        s->file = src;
        s->start_pos = start;
        s->total = total < 0 ? 0 : (uint64_t)total;
        if (PyObject_HasAttrString(src, "readinto")) {
            s->readinto = PyObject_GetAttrString(src, "readinto");
            if (!s->readinto) goto done_err;
        } else if (PyObject_HasAttrString(src, "read")) {
            s->read = PyObject_GetAttrString(src, "read");
            if (!s->read) goto done_err;
        }
        if (!s->readinto && !s->read) {
            PyErr_SetString(PyExc_TypeError, "file must have readinto() or read()");
            goto done_err;
        }
        s->bufcap = 1u << 20;
        s->buf = (uint8_t *)malloc(s->bufcap);
        if (!s->buf) {
            PyErr_NoMemory();
            goto done_err;
        }
    }

    /* pass 1: which memo entries are fetched */
    s->pass = 1;
    if (!s->file_mode) {
        s->win = s->p = (const uint8_t *)s->view.buf;
        s->end = s->win + s->view.len;
    } else {
        s->win = s->p = s->end = s->buf;
    }
    rd_setlim(s);
    gil_release_all(s);
    int rc1 = run1(s);
    gil_take_back(s);
    if (rc1 < 0 && (s->st == ST_PYERR || s->st == ST_NOMEM)) goto done_status;
    /* pass 2 runs even when pass 1 stopped early: it reports the first problem in stream order */
    int st1 = rc1 < 0 ? s->st : ST_OK;
    char msg1[sizeof(s->msg)];
    memcpy(msg1, s->msg, sizeof(msg1));
    s->st = ST_OK;
    s->msg[0] = 0;
    {
        size_t words = s->bits.n;
        s->rank = (uint32_t *)malloc((words + 1) * sizeof(uint32_t));
        if (!s->rank) {
            PyErr_NoMemory();
            goto done_err;
        }
        uint64_t acc = 0;
        for (size_t i = 0; i < words; i++) {
            s->rank[i] = (uint32_t)acc;
            acc += (uint64_t)POPCNT64(s->bits.a[i]);
        }
        if (acc > 0xFFFFFFF0u) {
            PyErr_SetString(UnsupportedErr, "too many memo references");
            goto done_err;
        }
        s->nslots = (size_t)acc;
        s->slots = (Val *)calloc(acc ? acc : 1, sizeof(Val));
        if (!s->slots) {
            PyErr_NoMemory();
            goto done_err;
        }
    }
    s->pass = 2;
    s->memo_len = 0;
    s->stk.n = 0;
    s->marks.n = 0;
    if (rd_rewind(s) < 0) goto done_status;
    gil_release_all(s);
    int rc2 = run(s);
    gil_take_back(s);
    if (rc2 < 0 && s->st == ST_UNSUP && (st1 == ST_MALFORMED || st1 == ST_TRUNC)) {
        /* pass 2 stopped on something unmodelled before the problem pass 1 found further on (a
           truncation, a bad opcode, a memo index the C unpickler would allocate GBs for): the
           reference would fail there too, after doing whatever comes first -- refuse now */
        s->st = st1;
        memcpy(s->msg, msg1, sizeof(msg1));
    }
    if (rc2 < 0) goto done_status;
    /* nothing of the memo or the stack is needed any more */
    free(s->slots);
    s->slots = NULL;
    VFREE(s->bits);
    VFREE(s->stk);
    res = finish(s);
    if (!res) goto done_status;
    goto done;

done_status:
    raise_status(s);
    goto done;
done_err:
    res = NULL;
done:
    s_free(s);
    free(s);
    return res;
}

static PyObject *py_utf8_check(PyObject *self, PyObject *args)
{
    Py_buffer b;
    int sur;
    if (!PyArg_ParseTuple(args, "y*p", &b, &sur)) return NULL;
    int ok = utf8_ok((const uint8_t *)b.buf, (size_t)b.len, sur);
    PyBuffer_Release(&b);
    return PyBool_FromLong(ok);
}

/* ------------------------------------------------------------------------- */
/* guard: what the reference unpickler may be given                          */

/* Walk the opcodes of a whole pickle linearly (a FRAME only announces how many of the following
   bytes the C unpickler prefetches; the opcodes go on in sequence), as far as the C unpickler could
   get, and report what would make it allocate memory the input does not justify: a memo index out
   of sequence and >= 4 Mi (it grows its memo array to 2 * index entries and zero-fills it), or a
   length field or frame past the end of the input (it would fail there; BYTEARRAY8 would first
   allocate the length).  Returns None, or (kind, message) with kind "memo" or "truncated". */
static PyObject *guard_result(const char *kind, const char *fmt, unsigned long long a, unsigned long long b)
{
    char msg[200];
    snprintf(msg, sizeof(msg), fmt, a, b);
    return Py_BuildValue("(ss)", kind, msg);
}

static PyObject *py_memo_guard(PyObject *self, PyObject *args)
{
    Py_buffer b;
    if (!PyArg_ParseTuple(args, "y*", &b)) return NULL;
    const uint8_t *base = (const uint8_t *)b.buf, *p = base, *end = base + b.len;
    uint64_t puts = 0;
    PyObject *res = NULL;
    while (p < end) {
        uint8_t op = *p++;
        uint64_t idx = 0, L = 0;
        int has_idx = 0, w = 0, lw = 0;
        switch (op) {
        case '.':
            goto out;
        case '(': case '0': case '1': case '2': case 'N': case 0x88: case 0x89: case ')': case 0x85: case 0x86:
        case 0x87: case 't': case ']': case '}': case 0x8f: case 'l': case 'd': case 0x91: case 'a': case 'e':
        case 's': case 'u': case 0x90: case 'b': case 'R': case 0x81: case 0x92: case 0x93: case 'Q': case 'o':
        case 0x97: case 0x98:
            continue;
        case 0x94:
            puts++;
            continue;
        case 'K': case 0x80: case 'h': case 0x82: w = 1; break;
        case 'M': case 0x83: w = 2; break;
        case 'J': case 'j': case 0x84: w = 4; break;
        case 'G': w = 8; break;
        case 'q': case 'r':
            w = op == 'q' ? 1 : 4;
            if ((uint64_t)(end - p) < (uint64_t)w) goto out;
            idx = le(p, w);
            p += w;
            has_idx = 1;
            break;
        case 'C': case 'U': case 0x8c: case 0x8a: lw = 1; break;
        case 'X': case 'B': case 'T': case 0x8b: lw = 4; break;
        case 0x8d: case 0x8e: case 0x96: case 0x95: lw = 8; break;
        case 'I': case 'F': case 'L': case 'S': case 'V': case 'P': case 'g': case 'p': case 'c': case 'i': {
            int lines = (op == 'c' || op == 'i') ? 2 : 1;
            const uint8_t *start = p;
            for (int k = 0; k < lines; k++) {
                const uint8_t *nl = (const uint8_t *)memchr(p, '\n', (size_t)(end - p));
                if (!nl) goto out; /* the C unpickler fails here */
                p = nl + 1;
            }
            if (op == 'p') { /* PUT: as int() reads it (spaces, a sign, underscores) */
                const uint8_t *q = start, *e = p - 1;
                while (q < e && (*q == ' ' || *q == '\t')) q++;
                while (e > q && (e[-1] == ' ' || e[-1] == '\t' || e[-1] == '\r')) e--;
                if (q < e && *q == '+') q++;
                int digits = 0;
                for (; q < e; q++) {
                    if (*q == '_') continue;
                    if (*q < '0' || *q > '9') goto out; /* not a number: the C unpickler fails here */
                    if (idx < ((uint64_t)1 << 40)) idx = idx * 10 + (uint64_t)(*q - '0');
                    digits++;
                }
                if (!digits) goto out;
                has_idx = 1;
            }
            break;
        }
        default:
            goto out; /* not an opcode: the C unpickler stops here ("invalid load key") */
        }
        if (w && !has_idx) {
            if ((uint64_t)(end - p) < (uint64_t)w) goto out;
            p += w;
        }
        if (lw) {
            if ((uint64_t)(end - p) < (uint64_t)lw) goto out;
            L = le(p, lw);
            p += lw;
            if (op == 0x8b && (int32_t)(uint32_t)L < 0) goto out; /* negative LONG4: fails */
            if (L > (uint64_t)(end - p)) {
                res = guard_result("truncated", "a length of %llu bytes at byte %llu runs past the end of the pickle",
                                   (unsigned long long)L, (unsigned long long)(p - base));
                goto out;
            }
            if (op != 0x95) p += L; /* a FRAME's bytes are the opcodes that follow */
        }
        if (has_idx) {
            if (idx >= ((uint64_t)1 << 22) && idx > puts) {
                res = guard_result("memo", "memo index %llu is out of sequence after %llu entries (CPython's unpickler "
                                   "would allocate and zero 16 bytes per index)", (unsigned long long)idx,
                                   (unsigned long long)puts);
                goto out;
            }
            puts++;
        }
    }
out:
    PyBuffer_Release(&b);
    if (!res && PyErr_Occurred()) return NULL;
    if (!res) Py_RETURN_NONE;
    return res;
}

static PyMethodDef methods[] = {
    {"scan", py_scan, METH_VARARGS,
     "scan(src, start, total, gmap, dtmap, funcs, dtype_cls) -> dict\n\n"
     "Scan a DCP .metadata pickle.  src is a bytes-like object (start=-1) or a binary file\n"
     "positioned at start with total bytes left."},
    {"_utf8_check", py_utf8_check, METH_VARARGS, "Test hook: the scanner's UTF-8 validator."},
    {"memo_guard", py_memo_guard, METH_VARARGS,
     "memo_guard(buffer) -> None or (kind, message)\n\n"
     "What in a whole pickle would make CPython's unpickler allocate memory the input does not justify:\n"
     "an out-of-sequence memo index >= 4 Mi ('memo'), or a length past the end ('truncated')."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef moddef = {PyModuleDef_HEAD_INIT, "_dcpscan", "Restricted scanner for DCP .metadata pickles.", -1, methods};

PyMODINIT_FUNC PyInit__dcpscan(void)
{
    if (PyType_Ready(&BufType) < 0) return NULL;
    PyObject *m = PyModule_Create(&moddef);
    if (!m) return NULL;
    UnsupportedErr = PyErr_NewException("dcp_explorer.readers._dcpscan.Unsupported", NULL, NULL);
    MalformedErr = PyErr_NewException("dcp_explorer.readers._dcpscan.Malformed", PyExc_ValueError, NULL);
    RefusedErr = PyErr_NewException("dcp_explorer.readers._dcpscan.Refused", NULL, NULL);
    if (!UnsupportedErr || !MalformedErr || !RefusedErr) return NULL;
    Py_INCREF(UnsupportedErr);
    Py_INCREF(MalformedErr);
    Py_INCREF(RefusedErr);
    if (PyModule_AddObject(m, "Unsupported", UnsupportedErr) < 0 || PyModule_AddObject(m, "Malformed", MalformedErr) < 0 ||
        PyModule_AddObject(m, "Refused", RefusedErr) < 0)
        return NULL;
    Py_INCREF(&BufType);
    PyModule_AddObject(m, "Buffer", (PyObject *)&BufType);
    PyModule_AddIntConstant(m, "G_METADATA", G_METADATA);
    PyModule_AddIntConstant(m, "G_TSM", G_TSM);
    PyModule_AddIntConstant(m, "G_BSM", G_BSM);
    PyModule_AddIntConstant(m, "G_CHUNK", G_CHUNK);
    PyModule_AddIntConstant(m, "G_TP", G_TP);
    PyModule_AddIntConstant(m, "G_MIDX", G_MIDX);
    PyModule_AddIntConstant(m, "G_SMETA", G_SMETA);
    PyModule_AddIntConstant(m, "G_MEMFMT", G_MEMFMT);
    PyModule_AddIntConstant(m, "G_SINFO", G_SINFO);
    PyModule_AddIntConstant(m, "G_SIZE", G_SIZE);
    PyModule_AddIntConstant(m, "G_LAYOUT", G_LAYOUT);
    PyModule_AddIntConstant(m, "G_POSIX", G_POSIX);
    PyModule_AddIntConstant(m, "G_WINPATH", G_WINPATH);
    PyModule_AddIntConstant(m, "G_ODICT", G_ODICT);
    PyModule_AddIntConstant(m, "G_NCODES", G_NCODES);
    return m;
}
