/*
 * module.c: the Python bindings of tramontane.quant._kernels and its init. Only argument parsing and
 * checking lives here: every buffer comes as a (data_ptr, nbytes) tuple (data_ptr a raw address, such
 * as torch's data_ptr()), and before any pointer is followed its nbytes is checked against the extent
 * the shapes and types require, a ValueError naming the buffer when it is too small. The computing is
 * in matmul.c and block_step.c, on the instruction set isa.c chose. No alignment is assumed anywhere.
 *
 *   matmul(x, w, y, M, N, K, qtype, n_threads[, tiles])
 *       y[M,N] = x[M,K] @ W^T, W stored as N rows of GGML blocks of type `qtype` (row r starts at
 *       w + r * row_bytes, row_bytes = K / block_size * type_size). float32 accumulation; the
 *       activations as the process's setting has them (tram_set_q8), or with `tiles` rounded to
 *       bfloat16 on AMX-BF16 tiles where tiles_ok (tiles_bf16.c).
 *   tiles_ok(N, K, qtype)
 *       whether matmul's `tiles` runs on AMX-BF16 tiles for this matrix (else it is the plain matmul).
 *   tiles_from(), set_tiles(on)
 *       the fewest tokens of a prompt whose prompt rows decode_block gives the tiles (0: none), and the
 *       switch.
 *   dequantize_rows(w, out, N, K, qtype, n_threads)
 *       W -> float32 [N,K].
 *   lookup_rows(w, idx, out, N, K, qtype)
 *       rows idx of W -> float32 (embedding lookups).
 *   interleave(src, dst, N, K, qtype, to_r8)
 *       Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q4_K, Q6_K or Q3_K rows to the layout their integer kernel reads (T_Q4_0_R8 ... T_Q5_1_R8,
 *       blocks.h) or back.
 *   rms_norm(x, w, out, B, n, eps)
 *       the blocks' RMSNorm of B rows (a step's final norm; out may be x).
 *   greedy_rows(x, w, out, M, N, K, qtype, bias_ids, bias_vals, n_bias, n_threads)
 *       out[m] (int64) = the argmax of row m of matmul's y plus the bias every row shares (bias_vals[i],
 *       float32, added at token bias_ids[i], int64: n_bias distinct ids in [0, N)), the first maximum, for a
 *       Q8_0 head under q16, computing only the logits that can be the largest (greedy.c); False where that
 *       does not apply (nothing written), True where it did.
 *   argmax_rows(x, out, M, N, n_threads)
 *       out[m] (int64) = the argmax of row m of x, float32 [M,N] (numpy's: the first maximum, the first NaN).
 *   decode_block(shape, buffers, eps, window, n_threads)
 *       one transformer block for one new token per row, on an offline or a paged cache (block_step.c);
 *       on the paged one, every row's sequence, block table entries and span of keys are checked in
 *       range first; with LoRA adapters, their columns and every row's adapter slot too. `buffers` is
 *       one block's dict, or a list of dicts: the blocks run in order (each block's output rows are the
 *       next one's input), all checked before the first runs, the GIL released once for all of them.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <limits.h>

#include "kernels.h"

/* A caller's buffer: its address and its size in bytes. */
typedef struct {
    unsigned long long ptr;
    Py_ssize_t nbytes;
} buffer;

/* The buffer names of decode_block as interned strings (the dict keys), made at init. */
static PyObject *g_block_keys[BUF_COUNT];

/* 0 when buffer `name` of `fn` holds at least `need` bytes and is not null (unless empty); else -1
 * with a ValueError. */
static int check_extent(const char *fn, const char *name, const buffer *b, size_t need) {
    if (b->nbytes < 0) {
        PyErr_Format(PyExc_ValueError, "%s: buffer %s has a negative size (%zd bytes)", fn, name, b->nbytes);
        return -1;
    }
    if ((size_t)b->nbytes < need) {
        PyErr_Format(PyExc_ValueError, "%s: buffer %s holds %zd bytes, its shape needs %zu", fn, name,
                     b->nbytes, need);
        return -1;
    }
    if (need && !b->ptr) {
        PyErr_Format(PyExc_ValueError, "%s: buffer %s is a null pointer", fn, name);
        return -1;
    }
    return 0;
}

static PyObject *too_large(const char *fn) {
    return PyErr_Format(PyExc_ValueError, "%s: the shapes' byte sizes overflow", fn);
}

/* ------------------------------------------------------------------------------------------------
 * matmul, dequantize_rows */

static int check_common(long N, long K, int qtype, int n_threads) {
    if (!tram_type_ok(qtype)) {
        PyErr_Format(PyExc_ValueError, "unsupported GGML type id %d for the packed kernels", qtype);
        return -1;
    }
    if (N < 0 || K <= 0 || K % tram_types[qtype].block) {
        PyErr_Format(PyExc_ValueError, "bad shape N=%ld K=%ld: K must be a positive multiple of %d",
                     N, K, tram_types[qtype].block);
        return -1;
    }
    if (tram_r8_base(qtype) >= 0 && N % 8) {
        PyErr_Format(PyExc_ValueError, "bad shape N=%ld: interleaved rows come in groups of 8", N);
        return -1;
    }
    if (K / tram_types[qtype].block > 0x7fffffffL) {
        PyErr_SetString(PyExc_ValueError, "K too large");
        return -1;
    }
    if (n_threads < 1) {
        PyErr_Format(PyExc_ValueError, "n_threads must be >= 1, got %d", n_threads);
        return -1;
    }
    return 0;
}

static PyObject *py_matmul(PyObject *self, PyObject *args) {
    buffer x, w, y;
    Py_ssize_t M, N, K;
    int qtype, nth, tiles = 0;
    size_t need_x, need_w, need_y;
    (void)self;
    if (!PyArg_ParseTuple(args, "(Kn)(Kn)(Kn)nnnii|p", &x.ptr, &x.nbytes, &w.ptr, &w.nbytes, &y.ptr, &y.nbytes,
                          &M, &N, &K, &qtype, &nth, &tiles))
        return NULL;
    if (check_common((long)N, (long)K, qtype, nth)) return NULL;
    if (M < 0) return PyErr_Format(PyExc_ValueError, "bad M=%zd", M);
    if (tram_extent(&need_x, 4, M, K, 1, 1) || tram_packed_extent(&need_w, qtype, N, K) ||
        tram_extent(&need_y, 4, M, N, 1, 1))
        return too_large("matmul");
    if (check_extent("matmul", "x", &x, need_x) || check_extent("matmul", "w", &w, need_w) ||
        check_extent("matmul", "y", &y, need_y))
        return NULL;
    if (M == 0 || N == 0) Py_RETURN_NONE;
    const isa_ops *ops = tram_isa_current();
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = (tiles ? tram_tiles_bf16 : tram_matmul)(ops, (const float *)(uintptr_t)x.ptr, (const uint8_t *)(uintptr_t)w.ptr,
                                                 (float *)(uintptr_t)y.ptr, (long)M, (long)N, (long)K, qtype, nth);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_tiles_ok(PyObject *self, PyObject *args) {
    Py_ssize_t N, K;
    int qtype;
    (void)self;
    if (!PyArg_ParseTuple(args, "nni", &N, &K, &qtype)) return NULL;
    return PyBool_FromLong(tram_type_ok(qtype) && tram_tiles_ok(tram_isa_current(), (long)N, (long)K, qtype));
}

static PyObject *py_dequantize_rows(PyObject *self, PyObject *args) {
    buffer w, out;
    Py_ssize_t N, K;
    int qtype, nth;
    size_t need_w, need_out;
    (void)self;
    if (!PyArg_ParseTuple(args, "(Kn)(Kn)nnii", &w.ptr, &w.nbytes, &out.ptr, &out.nbytes, &N, &K, &qtype, &nth))
        return NULL;
    if (check_common((long)N, (long)K, qtype, nth)) return NULL;
    if (tram_packed_extent(&need_w, qtype, N, K) || tram_extent(&need_out, 4, N, K, 1, 1))
        return too_large("dequantize_rows");
    if (check_extent("dequantize_rows", "w", &w, need_w) || check_extent("dequantize_rows", "out", &out, need_out))
        return NULL;
    if (N == 0) Py_RETURN_NONE;
    const isa_ops *ops = tram_isa_current();
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = tram_dequantize(ops, (const uint8_t *)(uintptr_t)w.ptr, (float *)(uintptr_t)out.ptr, (long)N, (long)K,
                         qtype, nth);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_lookup_rows(PyObject *self, PyObject *args) {
    buffer w, idx, out;
    Py_ssize_t N, K;
    int qtype;
    size_t need_w, need_out;
    (void)self;
    if (!PyArg_ParseTuple(args, "(Kn)(Kn)(Kn)nni", &w.ptr, &w.nbytes, &idx.ptr, &idx.nbytes, &out.ptr, &out.nbytes, &N,
                          &K, &qtype))
        return NULL;
    if (check_common((long)N, (long)K, qtype, 1)) return NULL;
    if (idx.nbytes < 0 || idx.nbytes % 8) return PyErr_Format(PyExc_ValueError, "lookup_rows: idx must be int64");
    const long n = (long)(idx.nbytes / 8);
    if (tram_packed_extent(&need_w, qtype, N, K) || tram_extent(&need_out, 4, n, K, 1, 1)) return too_large("lookup_rows");
    if (check_extent("lookup_rows", "w", &w, need_w) || check_extent("lookup_rows", "out", &out, need_out) ||
        (n && check_extent("lookup_rows", "idx", &idx, (size_t)idx.nbytes)))
        return NULL;
    const int64_t *ids = (const int64_t *)(uintptr_t)idx.ptr;
    for (long i = 0; i < n; i++)
        if (ids[i] < 0 || ids[i] >= N)
            return PyErr_Format(PyExc_IndexError, "lookup_rows: row %lld is out of range [0, %zd)", (long long)ids[i], N);
    const isa_ops *ops = tram_isa_current();
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = tram_lookup(ops, (const uint8_t *)(uintptr_t)w.ptr, ids, n, (long)K, qtype, (float *)(uintptr_t)out.ptr);
    Py_END_ALLOW_THREADS
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

static PyObject *py_encode_rows(PyObject *self, PyObject *args) {
    buffer x, out;
    Py_ssize_t N, K;
    int type;
    size_t need_x, need_out;
    (void)self;
    if (!PyArg_ParseTuple(args, "(Kn)(Kn)nni", &x.ptr, &x.nbytes, &out.ptr, &out.nbytes, &N, &K, &type)) return NULL;
    if (N < 0) return PyErr_Format(PyExc_ValueError, "encode_rows: N must be >= 0, got %zd", N);
    if (!tram_kv_type_ok(type) || K <= 0 || K % tram_types[type].block)
        return PyErr_Format(PyExc_ValueError, "encode_rows: type %d (F32, F16, BF16 or Q8_0) cannot hold rows of %zd",
                            type, K);
    if (tram_extent(&need_x, 4, N, K, 1, 1) || tram_packed_extent(&need_out, type, N, K)) return too_large("encode_rows");
    if (check_extent("encode_rows", "x", &x, need_x) || check_extent("encode_rows", "out", &out, need_out)) return NULL;
    const size_t rb = tram_row_bytes(type, (long)K);
    for (Py_ssize_t r = 0; r < N; r++)
        tram_store_row(tram_isa_current(), type, (const float *)(uintptr_t)x.ptr + r * K, (long)K,
                       (uint8_t *)(uintptr_t)out.ptr + r * rb);
    Py_RETURN_NONE;
}

static PyObject *py_rms_norm(PyObject *self, PyObject *args) {
    buffer x, w, out;
    Py_ssize_t B, n;
    float eps;
    size_t need_x, need_w;
    (void)self;
    if (!PyArg_ParseTuple(args, "(Kn)(Kn)(Kn)nnf", &x.ptr, &x.nbytes, &w.ptr, &w.nbytes, &out.ptr, &out.nbytes, &B, &n,
                          &eps))
        return NULL;
    if (B < 0 || n <= 0) return PyErr_Format(PyExc_ValueError, "rms_norm: bad shape B=%zd n=%zd", B, n);
    if (tram_extent(&need_x, 4, B, n, 1, 1) || tram_extent(&need_w, 4, 1, n, 1, 1)) return too_large("rms_norm");
    if (check_extent("rms_norm", "x", &x, need_x) || check_extent("rms_norm", "w", &w, need_w) ||
        check_extent("rms_norm", "out", &out, need_x))
        return NULL;
    if (out.ptr != x.ptr && out.ptr < x.ptr + need_x && x.ptr < out.ptr + need_x)
        return PyErr_Format(PyExc_ValueError, "rms_norm: out overlaps x without being x");
    tram_rms_norm_rows((const float *)(uintptr_t)x.ptr, (const float *)(uintptr_t)w.ptr, eps, (long)B, (long)n,
                       (float *)(uintptr_t)out.ptr);
    Py_RETURN_NONE;
}

/* The bias's buffers hold n entries, each id in [0, N) and named once (seen: room for N flags). */
static int check_bias(buffer *ids, buffer *vals, Py_ssize_t n, Py_ssize_t N) {
    size_t need_ids, need_vals;
    if (n < 0 || tram_extent(&need_ids, 8, n, 1, 1, 1) || tram_extent(&need_vals, 4, n, 1, 1, 1)) {
        PyErr_Format(PyExc_ValueError, "greedy_rows: bad bias count %zd", n);
        return -1;
    }
    if (check_extent("greedy_rows", "bias_ids", ids, need_ids) || check_extent("greedy_rows", "bias_vals", vals, need_vals))
        return -1;
    unsigned char *seen = calloc((size_t)N + 1, 1);
    if (!seen) {
        PyErr_NoMemory();
        return -1;
    }
    const int64_t *id = (const int64_t *)(uintptr_t)ids->ptr;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (id[i] < 0 || id[i] >= N || seen[id[i]]++) {
            PyErr_Format(PyExc_ValueError, "greedy_rows: bias token %lld out of [0, %zd) or named twice", (long long)id[i], N);
            free(seen);
            return -1;
        }
    }
    free(seen);
    return 0;
}

static PyObject *py_greedy_rows(PyObject *self, PyObject *args) {
    buffer x, w, out, ids, vals;
    Py_ssize_t M, N, K, nbias;
    int qtype, nth;
    size_t need_x, need_w, need_out;
    (void)self;
    if (!PyArg_ParseTuple(args, "(Kn)(Kn)(Kn)nnni(Kn)(Kn)ni", &x.ptr, &x.nbytes, &w.ptr, &w.nbytes, &out.ptr,
                          &out.nbytes, &M, &N, &K, &qtype, &ids.ptr, &ids.nbytes, &vals.ptr, &vals.nbytes, &nbias, &nth))
        return NULL;
    if (check_common((long)N, (long)K, qtype, nth)) return NULL;
    if (M < 0) return PyErr_Format(PyExc_ValueError, "greedy_rows: bad M=%zd", M);
    if (tram_extent(&need_x, 4, M, K, 1, 1) || tram_packed_extent(&need_w, qtype, N, K) ||
        tram_extent(&need_out, 8, M, 1, 1, 1))
        return too_large("greedy_rows");
    if (check_extent("greedy_rows", "x", &x, need_x) || check_extent("greedy_rows", "w", &w, need_w) ||
        check_extent("greedy_rows", "out", &out, need_out) || check_bias(&ids, &vals, nbias, N))
        return NULL;
    if (M == 0 || N == 0) Py_RETURN_TRUE;
    const isa_ops *ops = tram_isa_current();
    const tram_bias bias = {(const int64_t *)(uintptr_t)ids.ptr, (const float *)(uintptr_t)vals.ptr, (long)nbias};
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = tram_greedy_rows(ops, (const float *)(uintptr_t)x.ptr, (const uint8_t *)(uintptr_t)w.ptr, (long)M, (long)N,
                          (long)K, qtype, &bias, nth, (int64_t *)(uintptr_t)out.ptr);
    Py_END_ALLOW_THREADS
    if (rc < 0) return PyErr_NoMemory();
    return PyBool_FromLong(rc == 0);
}

static PyObject *py_argmax_rows(PyObject *self, PyObject *args) {
    buffer x, out;
    Py_ssize_t M, N;
    int nth;
    size_t need_x, need_out;
    (void)self;
    if (!PyArg_ParseTuple(args, "(Kn)(Kn)nni", &x.ptr, &x.nbytes, &out.ptr, &out.nbytes, &M, &N, &nth)) return NULL;
    if (M < 0 || N <= 0 || nth < 1) return PyErr_Format(PyExc_ValueError, "argmax_rows: bad shape M=%zd N=%zd threads=%d", M, N, nth);
    if (tram_extent(&need_x, 4, M, N, 1, 1) || tram_extent(&need_out, 8, M, 1, 1, 1)) return too_large("argmax_rows");
    if (check_extent("argmax_rows", "x", &x, need_x) || check_extent("argmax_rows", "out", &out, need_out)) return NULL;
    if (out.ptr < x.ptr + need_x && x.ptr < out.ptr + need_out)
        return PyErr_Format(PyExc_ValueError, "argmax_rows: out overlaps x");
    const isa_ops *ops = tram_isa_current();
    Py_BEGIN_ALLOW_THREADS
    tram_argmax_rows(ops, (const float *)(uintptr_t)x.ptr, (long)M, (long)N, (int64_t *)(uintptr_t)out.ptr, nth);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

static PyObject *py_interleave(PyObject *self, PyObject *args) {
    buffer src, dst;
    Py_ssize_t N, K;
    int qtype, to_r8;
    size_t need;
    (void)self;
    if (!PyArg_ParseTuple(args, "(Kn)(Kn)nnip", &src.ptr, &src.nbytes, &dst.ptr, &dst.nbytes, &N, &K, &qtype, &to_r8))
        return NULL;
    const int r8 = tram_type_ok(qtype) ? tram_r8_of(qtype) : -1;
    if (r8 < 0) return PyErr_Format(PyExc_ValueError, "interleave: GGML type %d has no interleaved layout", qtype);
    if (check_common((long)N, (long)K, r8, 1)) return NULL;
    if (tram_packed_extent(&need, qtype, N, K)) return too_large("interleave");
    if (check_extent("interleave", "src", &src, need) || check_extent("interleave", "dst", &dst, need)) return NULL;
    if (src.ptr < dst.ptr + need && dst.ptr < src.ptr + need)
        return PyErr_Format(PyExc_ValueError, "interleave: src and dst overlap");
    Py_BEGIN_ALLOW_THREADS
    tram_interleave_rows((const uint8_t *)(uintptr_t)src.ptr, (uint8_t *)(uintptr_t)dst.ptr, (long)N, (long)K, qtype, to_r8);
    Py_END_ALLOW_THREADS
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------------------------
 * decode_block */

static int is_packed_weight(int i) {
    return i == BUF_WQKV || i == BUF_WO || i == BUF_W13 || i == BUF_W2 || i == BUF_W1E || i == BUF_W3E ||
           i == BUF_WK || i == BUF_WV || i == BUF_W3;
}

/* One entry of the buffers dict: (data_ptr, nbytes), or (data_ptr, nbytes, qtype) for a packed weight;
 * the caches take either (a pair: float32). */
static int parse_entry(PyObject *item, int i, buffer *b, int *qtype) {
    const char *name = tram_block_buffer_names[i];
    const int cache = i == BUF_KC || i == BUF_VC;
    Py_ssize_t want = is_packed_weight(i) ? 3 : 2;
    if (cache && PyTuple_Check(item) && PyTuple_GET_SIZE(item) == 3) want = 3;
    *qtype = T_F32;
    if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != want) {
        PyErr_Format(PyExc_TypeError, "decode_block: buffer %s must be a tuple %s", name,
                     cache ? "(data_ptr, nbytes[, type])" : want == 3 ? "(data_ptr, nbytes, qtype)" : "(data_ptr, nbytes)");
        return -1;
    }
    b->ptr = PyLong_AsUnsignedLongLongMask(PyTuple_GET_ITEM(item, 0));
    if (b->ptr == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    b->nbytes = PyLong_AsSsize_t(PyTuple_GET_ITEM(item, 1));
    if (b->nbytes == -1 && PyErr_Occurred()) return -1;
    if (want == 3) {
        long t = PyLong_AsLong(PyTuple_GET_ITEM(item, 2));
        if (t == -1 && PyErr_Occurred()) return -1;
        *qtype = t < INT_MIN || t > INT_MAX ? -1 : (int)t;
    }
    return 0;
}

/* Names the first key of `dict` that is not a buffer of decode_block. */
static int unknown_key(PyObject *dict) {
    PyObject *key, *value;
    Py_ssize_t pos = 0;
    while (PyDict_Next(dict, &pos, &key, &value)) {
        int known = 0;
        for (int i = 0; i < BUF_COUNT && !known; i++) {
            int eq = PyObject_RichCompareBool(key, g_block_keys[i], Py_EQ);
            if (eq < 0) return -1;
            known = eq;
        }
        if (!known) {
            PyErr_Format(PyExc_ValueError, "decode_block: unknown buffer %R", key);
            return -1;
        }
    }
    return 0;
}

/* Fills b[] and the weights' types in a from the buffers dict. */
static int parse_block_buffers(PyObject *dict, buffer b[BUF_COUNT], block_args *a) {
    int types[BUF_COUNT] = {0};
    for (int i = 0; i < BUF_COUNT; i++) {
        PyObject *item = PyDict_GetItemWithError(dict, g_block_keys[i]);
        if (!item) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_ValueError, "decode_block: buffer %s missing", tram_block_buffer_names[i]);
            return -1;
        }
        if (parse_entry(item, i, &b[i], &types[i])) return -1;
    }
    if (PyDict_GET_SIZE(dict) != BUF_COUNT && unknown_key(dict)) return -1;
    a->tqkv = types[BUF_WQKV];
    a->to = types[BUF_WO];
    a->t13 = types[BUF_W13];
    a->t2 = types[BUF_W2];
    a->t1e = types[BUF_W1E];
    a->t3e = types[BUF_W3E];
    a->tk = types[BUF_WK];
    a->tv = types[BUF_WV];
    a->t3 = types[BUF_W3];
    a->kvt = types[BUF_KC];
    if (types[BUF_VC] != a->kvt || !tram_kv_type_ok(a->kvt)) {
        PyErr_Format(PyExc_ValueError, "decode_block: the cache's keys and values are stored as one of the types "
                     "F32, F16, BF16 or Q8_0 (GGML ids 0, 1, 30, 8), got %d and %d", a->kvt, types[BUF_VC]);
        return -1;
    }
    return 0;
}

/* A packed weight of `rows` rows (per expert) of K elements. */
static int check_type_k(int qtype, long rows, long K, const char *what) {
    if (!tram_type_ok(qtype) || K <= 0 || K % tram_types[qtype].block) {
        PyErr_Format(PyExc_ValueError, "decode_block: %s: GGML type %d cannot hold rows of %ld", what, qtype, K);
        return -1;
    }
    if (tram_r8_base(qtype) >= 0 && rows % 8) {
        PyErr_Format(PyExc_ValueError, "decode_block: %s: interleaved rows come in groups of 8, not %ld", what, rows);
        return -1;
    }
    return 0;
}

/* Shapes: each in [1, INT_MAX] (so that the products below fit in a long), H a multiple of Hkv, D even;
 * a Mixtral block adds E experts and K per token (1 <= K <= min(E, 64)); a dense one has none (or 0, 0);
 * a paged cache adds P pool slots, blocks of bs slots (P a multiple of bs), R tables of T blocks (P = 0:
 * the offline cache). */
static int parse_block_shape(PyObject *shape, block_args *a) {
    Py_ssize_t B, dim, H, Hkv, D, F, S, E = 0, K = 0, P = 0, bs = 1, R = 1, T = 1, L = 0;
    if (!PyArg_ParseTuple(shape, "nnnnnnn|nnnnnnn;decode_block: shape must be (B, dim, H, Hkv, D, F, S[, E, K"
                          "[, P, bs, R, T[, L]]])", &B, &dim, &H, &Hkv, &D, &F, &S, &E, &K, &P, &bs, &R, &T, &L))
        return -1;
    if (L < 0 || L > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "decode_block: bad adapter slot count L=%zd", L);
        return -1;
    }
    a->L = L;
    if (!((E == 0 && K == 0) || (E >= 1 && E <= INT_MAX && K >= 1 && K <= E && K <= 64))) {
        PyErr_Format(PyExc_ValueError, "decode_block: bad experts E=%zd K=%zd (1 <= K <= E, K <= 64)", E, K);
        return -1;
    }
    if (P < 0 || P > INT_MAX || bs < 1 || bs > INT_MAX || P % bs || R < 1 || R > INT_MAX || T < 1 || T > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "decode_block: bad paged cache P=%zd bs=%zd R=%zd T=%zd (P a multiple of "
                     "bs)", P, bs, R, T);
        return -1;
    }
    a->E = E, a->K = K, a->P = P, a->bs = bs, a->R = R, a->T = T;
    const Py_ssize_t dims[] = {B, dim, H, Hkv, D, F, S};
    int ok = 1;
    for (int i = 0; i < 7; i++) ok = ok && dims[i] >= 1 && dims[i] <= INT_MAX;
    ok = ok && H % Hkv == 0 && D % 2 == 0;
    if (!ok) {
        PyErr_Format(PyExc_ValueError, "decode_block: bad block shape B=%zd dim=%zd H=%zd Hkv=%zd D=%zd F=%zd "
                     "S=%zd", B, dim, H, Hkv, D, F, S);
        return -1;
    }
    a->B = B, a->dim = dim, a->H = H, a->Hkv = Hkv, a->D = D, a->F = F, a->S = S;
    return 0;
}

/* The extents of every buffer against what the shapes and types need; then the pointers into a. */
static int check_block_buffers(const buffer b[BUF_COUNT], block_args *a) {
    size_t need[BUF_COUNT];
    tram_block_pieces(a, b[BUF_WK].nbytes != 0, b[BUF_WV].nbytes != 0, b[BUF_W3].nbytes != 0);
    if (check_type_k(a->tqkv, a->rows_qkv[0], a->dim, "wqkv") ||
        (a->rows_qkv[1] && check_type_k(a->tk, a->rows_qkv[1], a->dim, "wk")) ||
        (a->rows_qkv[2] && check_type_k(a->tv, a->rows_qkv[2], a->dim, "wv")) ||
        check_type_k(a->to, a->dim, a->H * a->D, "wo") || check_type_k(a->t2, a->dim, a->F, "w2"))
        return -1;
    if (a->E > 0 ? check_type_k(a->t1e, a->F, a->dim, "w1e") || check_type_k(a->t3e, a->F, a->dim, "w3e")
                 : check_type_k(a->t13, a->rows_13[0], a->dim, "w13") ||
                       (a->rows_13[1] && check_type_k(a->t3, a->rows_13[1], a->dim, "w3")))
        return -1;
    const int unused_ok = tram_type_ok(a->tk) && tram_type_ok(a->tv) && tram_type_ok(a->t3);
    if (!tram_type_ok(a->t13) || !tram_type_ok(a->t1e) || !tram_type_ok(a->t3e) || !unused_ok) {  /* the unused ones are */
        PyErr_SetString(PyExc_ValueError, "decode_block: unsupported GGML type of an unused weight");  /* sized too */
        return -1;
    }
    if (a->D % tram_types[a->kvt].block) {
        PyErr_Format(PyExc_ValueError, "decode_block: a cache of GGML type %d holds rows of a multiple of %d "
                     "elements, not head_dim %ld", a->kvt, tram_types[a->kvt].block, a->D);
        return -1;
    }
    a->mapped = a->P == 0 && b[BUF_SEQ].nbytes > 0;  /* offline rows mapped to cache rows through seq */
    a->prompts = b[BUF_PROMPTS].nbytes > 0 ? (const int32_t *)(uintptr_t)b[BUF_PROMPTS].ptr : NULL;
    if (tram_block_extents(a, need)) {
        too_large("decode_block");
        return -1;
    }
    for (int i = 0; i < BUF_COUNT; i++)
        if (check_extent("decode_block", tram_block_buffer_names[i], &b[i], need[i])) return -1;
    a->x = (float *)(uintptr_t)b[BUF_X].ptr;
    a->norm1 = (const float *)(uintptr_t)b[BUF_NORM1].ptr;
    a->norm2 = (const float *)(uintptr_t)b[BUF_NORM2].ptr;
    a->wqkv = (const uint8_t *)(uintptr_t)b[BUF_WQKV].ptr;
    a->wo = (const uint8_t *)(uintptr_t)b[BUF_WO].ptr;
    a->w13 = (const uint8_t *)(uintptr_t)b[BUF_W13].ptr;
    a->w2 = (const uint8_t *)(uintptr_t)b[BUF_W2].ptr;
    a->cs = (const float *)(uintptr_t)b[BUF_CS].ptr;
    a->kc = (uint8_t *)(uintptr_t)b[BUF_KC].ptr;
    a->vc = (uint8_t *)(uintptr_t)b[BUF_VC].ptr;
    a->kpos = (const int64_t *)(uintptr_t)b[BUF_KPOS].ptr;
    a->qpos = (const int64_t *)(uintptr_t)b[BUF_QPOS].ptr;
    a->gate = (const float *)(uintptr_t)b[BUF_GATE].ptr;
    a->w1e = (const uint8_t *)(uintptr_t)b[BUF_W1E].ptr;
    a->w3e = (const uint8_t *)(uintptr_t)b[BUF_W3E].ptr;
    a->wk = (const uint8_t *)(uintptr_t)b[BUF_WK].ptr;
    a->wv = (const uint8_t *)(uintptr_t)b[BUF_WV].ptr;
    a->w3 = (const uint8_t *)(uintptr_t)b[BUF_W3].ptr;
    a->tables = (const int32_t *)(uintptr_t)b[BUF_TABLES].ptr;
    a->seq = (const int32_t *)(uintptr_t)b[BUF_SEQ].ptr;
    a->lora_row = (const int32_t *)(uintptr_t)b[BUF_LROW].ptr;
    a->lora_cols = (const int32_t *)(uintptr_t)b[BUF_LCOLS].ptr;
    a->lora = (const float *)(uintptr_t)b[BUF_LORA].ptr;
    return 0;
}

/* The adapters' columns and rows in range, and `lora` as large as the columns say. */
static int check_block_lora(const buffer *lora, const block_args *a) {
    size_t need;
    long row;
    if (tram_block_lora_extent(a, &need, &row)) {
        if (row >= 0)
            PyErr_Format(PyExc_ValueError, "decode_block: row %ld: adapter slot %d is out of range (L=%ld)", row,
                         (int)a->lora_row[row], a->L);
        else
            PyErr_SetString(PyExc_ValueError, "decode_block: lora_cols must rise from 0 in each of its 4 rows "
                            "(and be 0 for w13 and w2 of a Mixtral block)");
        return -1;
    }
    return check_extent("decode_block", "lora", lora, need);
}

/* The paged rows in range (a->window set first: it decides each row's span of keys). */
static int check_block_rows(const block_args *a) {
    long row = 0;
    if (tram_block_rows_ok(a, &row)) {
        PyErr_Format(PyExc_ValueError, "decode_block: row %ld (position %lld): its sequence, a block of its table "
                     "or its span of keys is out of range (R=%ld, T=%ld, blocks=%ld, S=%ld)", row,
                     (long long)a->qpos[row], a->R, a->T, a->P / a->bs, a->S);
        return -1;
    }
    return 0;
}

/* One block's buffers (a dict) into a copy of `shape_args`, every extent and row checked. */
static int parse_block(PyObject *buffers, const block_args *shape_args, block_args *a) {
    buffer b[BUF_COUNT];
    if (!PyDict_Check(buffers)) {
        PyErr_Format(PyExc_TypeError, "decode_block: each block's buffers must be a dict, not %.100s",
                     Py_TYPE(buffers)->tp_name);
        return -1;
    }
    *a = *shape_args;
    return parse_block_buffers(buffers, b, a) || check_block_buffers(b, a) || check_block_rows(a) ||
                   check_block_lora(&b[BUF_LORA], a)
               ? -1
               : 0;
}

static PyObject *py_decode_block(PyObject *self, PyObject *args) {
    PyObject *shape, *buffers;
    float eps;
    Py_ssize_t window;
    int nth;
    block_args shape_args;
    (void)self;
    memset(&shape_args, 0, sizeof shape_args);
    if (!PyArg_ParseTuple(args, "O!Ofni", &PyTuple_Type, &shape, &buffers, &eps, &window, &nth)) return NULL;
    if (nth < 1) return PyErr_Format(PyExc_ValueError, "n_threads must be >= 1, got %d", nth);
    int one = PyDict_Check(buffers);
    if (!one && !PyList_Check(buffers))
        return PyErr_Format(PyExc_TypeError, "decode_block: buffers must be a dict (one block) or a list of "
                            "dicts (blocks in order), not %.100s", Py_TYPE(buffers)->tp_name);
    shape_args.eps = eps;
    shape_args.window = window;
    shape_args.threads = nth;
    if (parse_block_shape(shape, &shape_args)) return NULL;
    Py_ssize_t n = one ? 1 : PyList_GET_SIZE(buffers);
    block_args *blocks = PyMem_Calloc(n ? (size_t)n : 1, sizeof *blocks);
    if (!blocks) return PyErr_NoMemory();
    for (Py_ssize_t i = 0; i < n; i++)
        if (parse_block(one ? buffers : PyList_GET_ITEM(buffers, i), &shape_args, &blocks[i])) {
            PyMem_Free(blocks);
            return NULL;
        }
    const isa_ops *ops = tram_isa_current();
    int rc = 0;
    Py_BEGIN_ALLOW_THREADS  /* once for every block: the GIL is taken back after the last one */
    for (Py_ssize_t i = 0; i < n && !rc; i++) rc = tram_run_block(ops, &blocks[i]);
    Py_END_ALLOW_THREADS
    PyMem_Free(blocks);
    if (rc) return PyErr_NoMemory();
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------------------------
 * Instruction sets, build facts, module init */

static PyObject *py_isas(PyObject *self, PyObject *noargs) {
    const char *names[3];
    (void)self;
    (void)noargs;
    int n = tram_isa_names(names);
    PyObject *out = PyTuple_New(n);
    for (int i = 0; out && i < n; i++) {
        PyObject *s = PyUnicode_FromString(names[i]);
        if (!s) {
            Py_DECREF(out);
            return NULL;
        }
        PyTuple_SET_ITEM(out, i, s);
    }
    return out;
}

static PyObject *py_isa(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    return PyUnicode_FromString(tram_isa_current()->name);
}

static PyObject *py_set_isa(PyObject *self, PyObject *args) {
    const char *name;
    (void)self;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    const char *prev = tram_isa_current()->name;
    if (tram_isa_select(name)) return PyErr_Format(PyExc_ValueError, "instruction set %s not available here", name);
    return PyUnicode_FromString(prev);
}

static PyObject *py_set_activations(PyObject *self, PyObject *args) {
    const char *name;
    (void)self;
    if (!PyArg_ParseTuple(args, "s", &name)) return NULL;
    static const char *const names[] = {"f32", "q8", "q16"};
    const char *prev = names[tram_q8()];
    int mode = -1;
    for (int i = 0; i < 3; i++)
        if (!strcmp(name, names[i])) mode = i;
    if (mode < 0) return PyErr_Format(PyExc_ValueError, "activations must be 'q8', 'q16' or 'f32', not '%s'", name);
    tram_set_q8(mode);
    return PyUnicode_FromString(prev);
}

static PyObject *py_tiles_from(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
    return PyLong_FromLong(tram_tiles_from());
}

static PyObject *py_set_tiles(PyObject *self, PyObject *args) {
    int on;
    (void)self;
    if (!PyArg_ParseTuple(args, "p", &on)) return NULL;
    return PyBool_FromLong(tram_set_tiles(on));
}

static PyObject *py_has_openmp(PyObject *self, PyObject *noargs) {
    (void)self;
    (void)noargs;
#ifdef _OPENMP
    Py_RETURN_TRUE;
#else
    Py_RETURN_FALSE;
#endif
}

static PyMethodDef METHODS[] = {
    {"matmul", py_matmul, METH_VARARGS,
     "matmul(x, w, y, M, N, K, qtype, n_threads): y[M,N] = x[M,K] @ W^T, float32, W as N rows of GGML "
     "blocks. x, w, y: (data_ptr, nbytes) tuples, each checked against the extent M, N, K need. With tiles "
     "true, the activations rounded to bfloat16 on AMX-BF16 tiles where tiles_ok(N, K, qtype)."},
    {"tiles_ok", py_tiles_ok, METH_VARARGS,
     "tiles_ok(N, K, qtype): whether matmul(..., tiles=True) runs this matrix on AMX-BF16 tiles here."},
    {"dequantize_rows", py_dequantize_rows, METH_VARARGS,
     "dequantize_rows(w, out, N, K, qtype, n_threads): W -> float32 [N,K]. w, out: (data_ptr, nbytes) "
     "tuples, checked against the extent N, K need."},
    {"lookup_rows", py_lookup_rows, METH_VARARGS,
     "lookup_rows(w, idx, out, N, K, qtype): out[i] = row idx[i] of W [N,K] as float32 (an embedding lookup; "
     "interleaved rows gathered out of their group). idx: int64 (data_ptr, nbytes), every index in [0, N)."},
    {"encode_rows", py_encode_rows, METH_VARARGS,
     "encode_rows(x, out, N, K, type): N float32 rows of K -> rows of a KV cache type (F32, F16, BF16 or Q8_0), "
     "rounded as the compiled step stores keys (the instruction set in use's encoder). x, out: (data_ptr, "
     "nbytes), checked against the extent."},
    {"rms_norm", py_rms_norm, METH_VARARGS,
     "rms_norm(x, w, out, B, n, eps): out[b] = x[b] / sqrt(mean(x[b]^2) + eps) * w, float32, B rows of n (out may "
     "be x itself), as the compiled step's blocks normalise. x, w, out: (data_ptr, nbytes), checked against the extent."},
    {"greedy_rows", py_greedy_rows, METH_VARARGS,
     "greedy_rows(x, w, out, M, N, K, qtype, bias_ids, bias_vals, n_bias, n_threads): out[m] (int64) = the "
     "argmax of row m of matmul's y = x @ W^T plus a bias every row shares, computing only the logits that "
     "can be the largest (a Q8_0 head under q16: greedy.c); returns False, writing nothing, where that does "
     "not apply. Buffers: (data_ptr, nbytes) tuples."},
    {"argmax_rows", py_argmax_rows, METH_VARARGS,
     "argmax_rows(x, out, M, N, n_threads): out[m] (int64) = argmax of row m of float32 x [M,N] (the first maximum, the first NaN)"},
    {"interleave", py_interleave, METH_VARARGS,
     "interleave(src, dst, N, K, qtype, to_r8): N rows of K elements of GGML type qtype (Q4_0, Q4_1, Q8_0, "
     "Q4_K, Q6_K, Q3_K, Q5_0 or Q5_1; N a multiple of 8) -> the interleaved layout its integer kernel reads (type ids 66-73 here; to_r8 "
     "true) or back. src, dst: distinct (data_ptr, nbytes)."},
    {"decode_block", py_decode_block, METH_VARARGS,
     "decode_block(shape, buffers, eps, window, n_threads): one transformer block for one new token per "
     "row, in place on x. shape = (B, dim, H, Hkv, D, F, S); buffers = dict of (data_ptr, nbytes): x "
     "float32 [B,dim], attn_norm and ffn_norm float32 [dim], cos_sin float32 [B,D/2,2], k_cache and "
     "v_cache float32 [B,Hkv,S,D] (or (data_ptr, nbytes, type) with rows of D stored as F16, BF16 or Q8_0), "
     "kpos int64 [B,S], qpos int64 [B]; and of (data_ptr, nbytes, qtype): "
     "wqkv [(H+2Hkv)D rows of dim], wo [dim rows of H*D], w13 [2F rows of dim], w2 [dim rows of F]; wk, wv "
     "and w3 empty, or the k, v and up rows in a type of their own (wqkv and w13 then hold fewer). Each "
     "nbytes is checked against that extent (ValueError naming the buffer). A Mixtral block: shape = (B, dim, "
     "H, Hkv, D, F, S, E, K), gate float32 [E,dim], w1e and w3e [E*F rows of dim], w2 [E*dim rows of F], "
     "w13 empty; a dense one passes gate, w1e and w3e empty. A paged cache: shape = (..., E, K, P, bs, R, "
     "T), k_cache and v_cache float32 [P,Hkv,D] (the pool), tables int32 [R,T] (block ids), seq int32 [B] "
     "(each row's table), S the most keys a row attends, kpos empty; offline, tables are empty, and seq "
     "int32 [B] maps each row to a cache row < R (k_cache, v_cache [R,Hkv,S,D], kpos [R,S]; empty: row b). "
     "LoRA: shape = (..., T, L) with L adapter slots, lora_row int32 [B] (each row's slot, -1 none), "
     "lora_cols int32 [4,L+1] and lora float32 (see block_args in kernels.h); empty when L = 0. prompts int32, "
     "each sequence's prompt length ([R] paged, one per cache row offline; empty: no row is a prompt's): a "
     "prompt of tiles_from() tokens or more computes its prompt rows on the bfloat16 tiles. buffers may "
     "be a list of such dicts: the blocks run in order on x, every one checked first, the GIL released once."},
    {"isas", py_isas, METH_NOARGS, "Instruction sets this CPU can run, best first."},
    {"isa", py_isa, METH_NOARGS, "The instruction set in use."},
    {"set_isa", py_set_isa, METH_VARARGS,
     "set_isa(name): use 'avx512', 'avx2', 'scalar' or 'best' (for tests); returns the previous one."},
    {"set_activations", py_set_activations, METH_VARARGS,
     "set_activations(name): 'q8' rounds the activations of the K-quants' fused kernels to int8 per 256 "
     "(integer dot products), 'f32' keeps them float32 everywhere (the exact path); returns the previous."},
    {"tiles_from", py_tiles_from, METH_NOARGS,
     "The fewest tokens of a prompt whose prompt rows take the bfloat16 tiles (decode_block's prompts; matmul's tiles), "
     "or 0 where none do (no AMX-BF16, another instruction set, the f32 setting, or set_tiles(False))."},
    {"set_tiles", py_set_tiles, METH_VARARGS, "set_tiles(on): allow the bfloat16 tiles or not (for tests); returns "
     "the previous switch."},
    {"has_openmp", py_has_openmp, METH_NOARGS, "Whether the module was built with OpenMP threads."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef MODULE = {PyModuleDef_HEAD_INIT, "_kernels",
                                    "Packed GGUF matmul kernels (see kernels.py).", -1, METHODS,
                                    NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__kernels(void) {
    tram_isa_init();
    for (int i = 0; i < BUF_COUNT; i++)
        if (!g_block_keys[i] && !(g_block_keys[i] = PyUnicode_InternFromString(tram_block_buffer_names[i])))
            return NULL;
    return PyModule_Create(&MODULE);
}
