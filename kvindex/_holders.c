/* The global index's holder table in C: block hash -> bitmask of the instances holding it.
 *
 * kvindex/holders.py documents the type (HolderTable) and keeps the pure-Python equivalent (PyHolders, a
 * dict with the same batch methods); tests/test_holders.py runs both on the same operations.
 *
 * Layout: open addressing with linear probing over one array of (key, mask) slots, capacity a power of
 * two, at most 60 % full; an empty slot has mask 0 (a stored mask is never 0); deletion shifts the
 * following run back (no tombstones). One probe usually touches one cache line, where a dict probe of an
 * int key touches its index, its entry and the key object. Keys are block hashes that fit in int64 (SGLang's
 * and ours do); any other int key lives in a side dict, so the table is exact for every int. Masks fit in
 * uint64: instance ids 0..63 (kvindex.index_core moves to PyHolders before it interns id 64).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

typedef struct {
    uint64_t key;
    uint64_t val; /* 0 = empty slot */
} Slot;

typedef struct {
    PyObject_HEAD
    Slot *slots;
    size_t cap;     /* 0 or a power of two */
    size_t used;
    PyObject *big;  /* dict of int keys outside int64 -> int mask, or NULL */
} HolderTable;

static inline uint64_t mix(uint64_t x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}

/* 1: *k holds the key; 0: an int outside int64 (the side dict's); -1: error set (not an int). */
static inline int key_of(PyObject *o, uint64_t *k) {
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "block hash must be an int, not %.100s", Py_TYPE(o)->tp_name);
        return -1;
    }
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow) return 0;
    if (v == -1 && PyErr_Occurred()) return -1;
    *k = (uint64_t)v;
    return 1;
}

/* A mask argument: an int in 1 .. 2**64 - 1. -1 with an error set otherwise. */
static int mask_of(PyObject *o, uint64_t *m) {
    if (!PyLong_Check(o)) {
        PyErr_Format(PyExc_TypeError, "holder mask must be an int, not %.100s", Py_TYPE(o)->tp_name);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(o);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) return -1;
    if (v == 0) {
        PyErr_SetString(PyExc_ValueError, "holder mask must be nonzero");
        return -1;
    }
    *m = (uint64_t)v;
    return 0;
}

static inline size_t find(const HolderTable *t, uint64_t k) { /* slot of k, or SIZE_MAX */
    if (!t->cap) return SIZE_MAX;
    size_t mask = t->cap - 1, i = (size_t)mix(k) & mask;
    for (;;) {
        if (!t->slots[i].val) return SIZE_MAX;
        if (t->slots[i].key == k) return i;
        i = (i + 1) & mask;
    }
}

static int grow(HolderTable *t) {
    size_t cap = t->cap ? t->cap * 2 : 16;
    Slot *slots = PyMem_Calloc(cap, sizeof(Slot));
    if (!slots) {
        PyErr_NoMemory();
        return -1;
    }
    size_t mask = cap - 1;
    for (size_t j = 0; j < t->cap; j++) {
        if (!t->slots[j].val) continue;
        size_t i = (size_t)mix(t->slots[j].key) & mask;
        while (slots[i].val) i = (i + 1) & mask;
        slots[i] = t->slots[j];
    }
    PyMem_Free(t->slots);
    t->slots = slots;
    t->cap = cap;
    return 0;
}

/* Software prefetch of a key's home slot, PREFETCH keys ahead of the probe: a walk over a request's blocks
 * in a large table is a cache miss a block, and issuing the loads early overlaps them. A hint only: a key
 * that is not a plain int64 is skipped. */
#define PREFETCH 12

static inline void prefetch_u64(const HolderTable *t, uint64_t k) {
    if (t->cap) __builtin_prefetch(&t->slots[(size_t)mix(k) & (t->cap - 1)]);
}

static inline void prefetch_obj(const HolderTable *t, PyObject *o) {
    if (!t->cap || !PyLong_CheckExact(o)) return;
    int overflow = 0;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (overflow || (v == -1 && PyErr_Occurred())) {
        PyErr_Clear();
        return;
    }
    prefetch_u64(t, (uint64_t)v);
}

static inline void prefetch_ahead(const HolderTable *t, PyObject **items, Py_ssize_t j, Py_ssize_t n) {
    if (j == 0)
        for (Py_ssize_t a = 0; a < PREFETCH && a < n; a++) prefetch_obj(t, items[a]);
    if (j + PREFETCH < n) prefetch_obj(t, items[j + PREFETCH]);
}

/* Insert k (absent) with mask v != 0. */
static int insert_new(HolderTable *t, uint64_t k, uint64_t v) {
    if ((t->used + 1) * 10 > t->cap * 6 && grow(t) < 0) return -1;
    size_t mask = t->cap - 1, i = (size_t)mix(k) & mask;
    while (t->slots[i].val) i = (i + 1) & mask;
    t->slots[i].key = k;
    t->slots[i].val = v;
    t->used++;
    return 0;
}

static void delete_at(HolderTable *t, size_t i) { /* backward-shift deletion */
    size_t mask = t->cap - 1, j = i;
    for (;;) {
        j = (j + 1) & mask;
        if (!t->slots[j].val) break;
        size_t h = (size_t)mix(t->slots[j].key) & mask;
        int between = (i <= j) ? (i < h && h <= j) : (i < h || h <= j); /* home in (i, j]: stays */
        if (!between) {
            t->slots[i].key = t->slots[j].key;
            t->slots[i].val = t->slots[j].val;
            i = j;
        }
    }
    t->slots[i].val = 0;
    t->used--;
}

/* ---- the side dict (keys outside int64) ---- */

/* 1 and *v if present, 0 if absent, -1 on error. */
static int big_get(HolderTable *t, PyObject *key, uint64_t *v) {
    if (!t->big) return 0;
    PyObject *m = PyDict_GetItemWithError(t->big, key);
    if (!m) return PyErr_Occurred() ? -1 : 0;
    *v = (uint64_t)PyLong_AsUnsignedLongLong(m);
    return 1;
}

static int big_set(HolderTable *t, PyObject *key, uint64_t v) {
    if (!t->big && !(t->big = PyDict_New())) return -1;
    PyObject *m = PyLong_FromUnsignedLongLong(v);
    if (!m) return -1;
    int r = PyDict_SetItem(t->big, key, m);
    Py_DECREF(m);
    return r;
}

/* ---- one key, either store: get / set / delete ---- */

/* 1 and *v if present, 0 if absent, -1 on error. */
static int tget(HolderTable *t, PyObject *key, uint64_t *v) {
    uint64_t k;
    int r = key_of(key, &k);
    if (r < 0) return -1;
    if (r == 0) return big_get(t, key, v);
    size_t i = find(t, k);
    if (i == SIZE_MAX) return 0;
    *v = t->slots[i].val;
    return 1;
}

/* Set key's mask to v; v == 0 deletes it (absent is fine). */
static int tset(HolderTable *t, PyObject *key, uint64_t v) {
    uint64_t k;
    int r = key_of(key, &k);
    if (r < 0) return -1;
    if (r == 0) {
        if (v) return big_set(t, key, v);
        if (!t->big) return 0;
        r = PyDict_DelItem(t->big, key);
        if (r < 0 && PyErr_ExceptionMatches(PyExc_KeyError)) {
            PyErr_Clear();
            r = 0;
        }
        return r;
    }
    size_t i = find(t, k);
    if (i != SIZE_MAX) {
        if (v)
            t->slots[i].val = v;
        else
            delete_at(t, i);
        return 0;
    }
    return v ? insert_new(t, k, v) : 0;
}

/* ---- type slots ---- */

static PyObject *HT_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    if (PyTuple_GET_SIZE(args) || (kwds && PyDict_GET_SIZE(kwds))) {
        PyErr_SetString(PyExc_TypeError, "HolderTable() takes no arguments");
        return NULL;
    }
    HolderTable *t = (HolderTable *)type->tp_alloc(type, 0);
    return (PyObject *)t;
}

static void HT_dealloc(HolderTable *t) {
    PyMem_Free(t->slots);
    Py_XDECREF(t->big);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static Py_ssize_t HT_len(HolderTable *t) {
    return (Py_ssize_t)t->used + (t->big ? PyDict_GET_SIZE(t->big) : 0);
}

static PyObject *HT_getitem(HolderTable *t, PyObject *key) {
    uint64_t v;
    int r = tget(t, key, &v);
    if (r < 0) return NULL;
    if (!r) {
        PyErr_SetObject(PyExc_KeyError, key);
        return NULL;
    }
    return PyLong_FromUnsignedLongLong(v);
}

static int HT_setitem(HolderTable *t, PyObject *key, PyObject *value) {
    if (!value) { /* del t[key] */
        uint64_t v;
        int r = tget(t, key, &v);
        if (r < 0) return -1;
        if (!r) {
            PyErr_SetObject(PyExc_KeyError, key);
            return -1;
        }
        return tset(t, key, 0);
    }
    uint64_t m;
    if (mask_of(value, &m) < 0) return -1;
    return tset(t, key, m);
}

static int HT_contains(HolderTable *t, PyObject *key) {
    uint64_t v;
    return tget(t, key, &v);
}

/* ---- dict-like methods ---- */

static PyObject *HT_get(HolderTable *t, PyObject *const *args, Py_ssize_t n) {
    if (n < 1 || n > 2) {
        PyErr_SetString(PyExc_TypeError, "get(key, default=None)");
        return NULL;
    }
    uint64_t v;
    int r = tget(t, args[0], &v);
    if (r < 0) return NULL;
    if (r) return PyLong_FromUnsignedLongLong(v);
    PyObject *d = n == 2 ? args[1] : Py_None;
    Py_INCREF(d);
    return d;
}

static PyObject *HT_setdefault(HolderTable *t, PyObject *const *args, Py_ssize_t n) {
    if (n != 2) {
        PyErr_SetString(PyExc_TypeError, "setdefault(key, mask)");
        return NULL;
    }
    uint64_t v;
    int r = tget(t, args[0], &v);
    if (r < 0) return NULL;
    if (r) return PyLong_FromUnsignedLongLong(v);
    if (mask_of(args[1], &v) < 0 || tset(t, args[0], v) < 0) return NULL;
    Py_INCREF(args[1]);
    return args[1];
}

/* kind 0: keys, 1: values, 2: (key, value) pairs. A list (a snapshot). */
static PyObject *listing(HolderTable *t, int kind) {
    PyObject *out = PyList_New(0);
    if (!out) return NULL;
    for (size_t i = 0; i < t->cap; i++) {
        if (!t->slots[i].val) continue;
        PyObject *k = NULL, *v = NULL, *item = NULL;
        if (kind != 1 && !(k = PyLong_FromLongLong((long long)t->slots[i].key))) goto fail;
        if (kind != 0 && !(v = PyLong_FromUnsignedLongLong(t->slots[i].val))) goto fail_k;
        item = kind == 0 ? k : kind == 1 ? v : PyTuple_Pack(2, k, v);
        if (!item) goto fail_kv;
        if (PyList_Append(out, item) < 0) {
            if (kind == 2) Py_DECREF(item);
            goto fail_kv;
        }
        if (kind == 2) Py_DECREF(item);
        Py_XDECREF(k);
        Py_XDECREF(v);
        continue;
    fail_kv:
        Py_XDECREF(v);
    fail_k:
        Py_XDECREF(k);
    fail:
        Py_DECREF(out);
        return NULL;
    }
    if (t->big) {
        PyObject *rest = kind == 0 ? PyDict_Keys(t->big) : kind == 1 ? PyDict_Values(t->big) : PyDict_Items(t->big);
        if (!rest) {
            Py_DECREF(out);
            return NULL;
        }
        Py_ssize_t n = PyList_GET_SIZE(out);
        int r = PyList_SetSlice(out, n, n, rest);
        Py_DECREF(rest);
        if (r < 0) {
            Py_DECREF(out);
            return NULL;
        }
    }
    return out;
}

static PyObject *HT_keys(HolderTable *t, PyObject *unused) { return listing(t, 0); }
static PyObject *HT_values(HolderTable *t, PyObject *unused) { return listing(t, 1); }
static PyObject *HT_items(HolderTable *t, PyObject *unused) { return listing(t, 2); }

static PyObject *HT_iter(HolderTable *t) {
    PyObject *keys = listing(t, 0);
    if (!keys) return NULL;
    PyObject *it = PyObject_GetIter(keys);
    Py_DECREF(keys);
    return it;
}

/* ---- batch methods (the index's hot paths) ---- */

static PyObject *fast_seq(PyObject *o) { return PySequence_Fast(o, "block hashes must be a sequence"); }

static int bit_arg(PyObject *o, uint64_t *m) { return mask_of(o, m); }

static PyObject *HT_masks(HolderTable *t, PyObject *hashes) {
    PyObject *seq = fast_seq(hashes);
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *out = PyList_New(n);
    if (!out) goto fail;
    for (Py_ssize_t j = 0; j < n; j++) {
        uint64_t v = 0;
        prefetch_ahead(t, items, j, n);
        if (tget(t, items[j], &v) < 0) goto fail;
        PyObject *m = PyLong_FromUnsignedLongLong(v);
        if (!m) goto fail;
        PyList_SET_ITEM(out, j, m);
    }
    Py_DECREF(seq);
    return out;
fail:
    Py_XDECREF(out);
    Py_DECREF(seq);
    return NULL;
}

/* The (hashes, mask) arguments of a batch method: the hashes as a fast sequence (a new reference) and the
 * mask in *mask; NULL with an error set if either is wrong. */
static PyObject *seq_and_mask(PyObject *const *args, Py_ssize_t nargs, const char *usage, uint64_t *mask) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, usage);
        return NULL;
    }
    if (bit_arg(args[1], mask) < 0) return NULL;
    return fast_seq(args[0]);
}

static PyObject *HT_walk(HolderTable *t, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t alive;
    PyObject *seq = seq_and_mask(args, nargs, "walk(hashes, alive)", &alive);
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), j;
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *drops = PyList_New(0);
    if (!drops) goto fail;
    for (j = 0; j < n; j++) {
        uint64_t v = 0;
        prefetch_ahead(t, items, j, n);
        if (tget(t, items[j], &v) < 0) goto fail;
        uint64_t now = v & alive;
        if (now == alive) continue;
        PyObject *d = Py_BuildValue("(Kn)", (unsigned long long)(alive ^ now), j);
        if (!d || PyList_Append(drops, d) < 0) {
            Py_XDECREF(d);
            goto fail;
        }
        Py_DECREF(d);
        alive = now;
        if (!alive) break;
    }
    Py_DECREF(seq);
    return Py_BuildValue("(nN)", j, drops);
fail:
    Py_XDECREF(drops);
    Py_DECREF(seq);
    return NULL;
}

static PyObject *HT_prefix_with(HolderTable *t, PyObject *const *args, Py_ssize_t nargs) {
    uint64_t bit;
    PyObject *seq = seq_and_mask(args, nargs, "prefix_with(hashes, bit)", &bit);
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq), j;
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (j = 0; j < n; j++) {
        uint64_t v = 0;
        prefetch_ahead(t, items, j, n);
        if (tget(t, items[j], &v) < 0) {
            Py_DECREF(seq);
            return NULL;
        }
        if (!(v & bit)) break;
    }
    Py_DECREF(seq);
    return PyLong_FromSsize_t(j);
}

/* set = 1: OR bit into each hash's mask (inserting missing keys); set = 0: clear it (deleting emptied
 * masks). Returns the list of the hashes whose bit changed, in order (a duplicate changes once). */
static PyObject *change_bit(HolderTable *t, PyObject *const *args, Py_ssize_t nargs, int set) {
    uint64_t bit;
    PyObject *seq = seq_and_mask(args, nargs, set ? "or_bit(hashes, bit)" : "clear_bit(hashes, bit)", &bit);
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *out = PyList_New(0);
    if (!out) goto fail;
    for (Py_ssize_t j = 0; j < n; j++) {
        PyObject *key = items[j];
        uint64_t k, v = 0;
        prefetch_ahead(t, items, j, n);
        int r = key_of(key, &k);
        if (r < 0) goto fail;
        if (r == 1) { /* inline fast path */
            size_t i = find(t, k);
            v = i == SIZE_MAX ? 0 : t->slots[i].val;
            if (set ? (v & bit) != 0 : (v & bit) == 0) continue;
            if (set) {
                if (i == SIZE_MAX) {
                    if (insert_new(t, k, bit) < 0) goto fail;
                } else {
                    t->slots[i].val = v | bit;
                }
            } else if (v ^ bit) {
                t->slots[i].val = v ^ bit;
            } else {
                delete_at(t, i);
            }
        } else {
            int found = big_get(t, key, &v);
            if (found < 0) goto fail;
            if (set ? (v & bit) != 0 : (v & bit) == 0) continue;
            if (tset(t, key, set ? v | bit : v ^ bit) < 0) goto fail;
        }
        if (PyList_Append(out, key) < 0) goto fail;
    }
    Py_DECREF(seq);
    return out;
fail:
    Py_XDECREF(out);
    Py_DECREF(seq);
    return NULL;
}

static PyObject *HT_or_bit(HolderTable *t, PyObject *const *args, Py_ssize_t n) { return change_bit(t, args, n, 1); }
static PyObject *HT_clear_bit(HolderTable *t, PyObject *const *args, Py_ssize_t n) { return change_bit(t, args, n, 0); }

/* flags(hashes, bit) -> bytes: 1 where the hash's mask has bit, else 0. hashes: a C-contiguous buffer of
 * int64 (array('q'), a numpy int64 array: read in place) or any sequence of ints. */
static int int64_format(const Py_buffer *v) {
    const char *f = v->format ? v->format : "B";
    if (*f == '@' || *f == '=' || *f == '<') f++;
    return v->itemsize == 8 && (strcmp(f, "q") == 0 || strcmp(f, "l") == 0);
}

static PyObject *HT_flags(HolderTable *t, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "flags(hashes, bit)");
        return NULL;
    }
    uint64_t bit;
    if (bit_arg(args[1], &bit) < 0) return NULL;
    if (PyObject_CheckBuffer(args[0])) {
        Py_buffer v;
        if (PyObject_GetBuffer(args[0], &v, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) return NULL;
        if (!int64_format(&v)) {
            PyBuffer_Release(&v);
            PyErr_SetString(PyExc_TypeError, "flags(): a buffer of hashes must hold int64");
            return NULL;
        }
        Py_ssize_t n = v.len / 8;
        PyObject *out = PyBytes_FromStringAndSize(NULL, n);
        if (out) {
            char *o = PyBytes_AS_STRING(out);
            const int64_t *h = (const int64_t *)v.buf;
            for (Py_ssize_t j = 0; j < PREFETCH && j < n; j++) prefetch_u64(t, (uint64_t)h[j]);
            for (Py_ssize_t j = 0; j < n; j++) {
                if (j + PREFETCH < n) prefetch_u64(t, (uint64_t)h[j + PREFETCH]);
                size_t i = find(t, (uint64_t)h[j]);
                o[j] = i != SIZE_MAX && (t->slots[i].val & bit) ? 1 : 0;
            }
        }
        PyBuffer_Release(&v);
        return out;
    }
    PyObject *seq = fast_seq(args[0]);
    if (!seq) return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *out = PyBytes_FromStringAndSize(NULL, n);
    if (out) {
        char *o = PyBytes_AS_STRING(out);
        for (Py_ssize_t j = 0; j < n; j++) {
            uint64_t m = 0;
            prefetch_ahead(t, items, j, n);
            if (tget(t, items[j], &m) < 0) {
                Py_CLEAR(out);
                break;
            }
            o[j] = (m & bit) ? 1 : 0;
        }
    }
    Py_DECREF(seq);
    return out;
}

/* == and != as dicts (a HolderTable equals a dict, or another table, with the same items). */
static PyObject *as_dict(PyObject *o);

static PyObject *HT_richcompare(PyObject *a, PyObject *b, int op) {
    if (op != Py_EQ && op != Py_NE) Py_RETURN_NOTIMPLEMENTED;
    PyObject *da = as_dict(a), *db = da ? as_dict(b) : NULL;
    PyObject *r = db ? PyObject_RichCompare(da, db, op) : NULL;
    Py_XDECREF(da);
    Py_XDECREF(db);
    return r;
}

static PyObject *HT_nbytes(HolderTable *t, PyObject *unused) {
    return PyLong_FromSize_t(t->cap * sizeof(Slot));
}

static PyMethodDef HT_methods[] = {
    {"get", (PyCFunction)(void (*)(void))HT_get, METH_FASTCALL, "get(hash, default=None): the mask, or default."},
    {"setdefault", (PyCFunction)(void (*)(void))HT_setdefault, METH_FASTCALL, "setdefault(hash, mask) as dict's."},
    {"keys", (PyCFunction)HT_keys, METH_NOARGS, "A list of the hashes (a snapshot)."},
    {"values", (PyCFunction)HT_values, METH_NOARGS, "A list of the masks (a snapshot)."},
    {"items", (PyCFunction)HT_items, METH_NOARGS, "A list of (hash, mask) pairs (a snapshot)."},
    {"masks", (PyCFunction)HT_masks, METH_O, "masks(hashes): each hash's mask, 0 if absent (a list)."},
    {"walk", (PyCFunction)(void (*)(void))HT_walk, METH_FASTCALL,
     "walk(hashes, alive) -> (depth, [(gone_mask, index), ...]): AND each mask into alive, in order."},
    {"prefix_with", (PyCFunction)(void (*)(void))HT_prefix_with, METH_FASTCALL,
     "prefix_with(hashes, bit): how many leading hashes have bit set."},
    {"or_bit", (PyCFunction)(void (*)(void))HT_or_bit, METH_FASTCALL,
     "or_bit(hashes, bit): set bit on each; the hashes whose bit was newly set, in order."},
    {"clear_bit", (PyCFunction)(void (*)(void))HT_clear_bit, METH_FASTCALL,
     "clear_bit(hashes, bit): clear bit on each (dropping emptied masks); the hashes it was set on."},
    {"flags", (PyCFunction)(void (*)(void))HT_flags, METH_FASTCALL,
     "flags(hashes, bit) -> bytes: 1 where the mask has bit; hashes may be an int64 buffer."},
    {"nbytes", (PyCFunction)HT_nbytes, METH_NOARGS, "Bytes of the open-addressing arrays."},
    {NULL, NULL, 0, NULL},
};

static PyMappingMethods HT_as_mapping = {(lenfunc)HT_len, (binaryfunc)HT_getitem, (objobjargproc)HT_setitem};
static PySequenceMethods HT_as_sequence = {.sq_contains = (objobjproc)HT_contains};

static PyTypeObject HolderTableType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "kvindex._holders.HolderTable",
    .tp_basicsize = sizeof(HolderTable),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Block hash (int) -> nonzero holder mask (int < 2**64); see kvindex/holders.py.",
    .tp_new = HT_new,
    .tp_dealloc = (destructor)HT_dealloc,
    .tp_as_mapping = &HT_as_mapping,
    .tp_as_sequence = &HT_as_sequence,
    .tp_iter = (getiterfunc)HT_iter,
    .tp_richcompare = HT_richcompare,
    .tp_hash = PyObject_HashNotImplemented,
    .tp_methods = HT_methods,
};

static PyObject *as_dict(PyObject *o) {
    if (!PyObject_TypeCheck(o, &HolderTableType)) {
        Py_INCREF(o);
        return o;
    }
    PyObject *items = listing((HolderTable *)o, 2);
    if (!items) return NULL;
    PyObject *d = PyObject_CallOneArg((PyObject *)&PyDict_Type, items);
    Py_DECREF(items);
    return d;
}

static struct PyModuleDef holders_module = {
    PyModuleDef_HEAD_INIT, "kvindex._holders", "The global index's holder table in C (kvindex/holders.py).", -1, NULL,
};

PyMODINIT_FUNC PyInit__holders(void) {
    if (PyType_Ready(&HolderTableType) < 0) return NULL;
    PyObject *m = PyModule_Create(&holders_module);
    if (!m) return NULL;
    Py_INCREF(&HolderTableType);
    if (PyModule_AddObject(m, "HolderTable", (PyObject *)&HolderTableType) < 0) {
        Py_DECREF(&HolderTableType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
