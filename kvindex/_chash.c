/* kvindex._chash: SGLang-compatible chained SHA-256 page hashing over OpenSSL's libcrypto.
 *
 * Theory of operation. For every full page of `page_size` tokens,
 *
 *     digest_k = SHA-256(digest_{k-1} || tokens_k as uint32 little-endian)   (no parent bytes for k = 0,
 *                                                                             or the caller's parent)
 *
 * exactly the pure-Python path of kvindex/hashing.py and SGLang 0.5.23's
 * srt/mem_cache/cpp_utils/hash_binding.cpp for token ids that fit in uint32 (SGLang's "wide" >uint32
 * encoding is not supported: such ids raise struct.error, like the Python path). A trailing partial
 * page is neither hashed nor validated (the Python path slices it off before packing).
 *
 * Work is done in three steps: (1) with the GIL, the token ids are read into one uint32 buffer and
 * validated (a list/tuple/sequence of ints, or zero-copy from a C-contiguous buffer of uint32 such as
 * array('I') or a numpy uint32 array; other integer buffer formats are converted with range checks);
 * (2) without the GIL when the input is long, the chain runs into one n_pages x 32-byte buffer;
 * (3) with the GIL, the results are built as a list of 32-byte bytes or of int64 ints.
 *
 * What must stay true: results bit-identical to the Python path (tests/test_hashing.py runs every test
 * on both, plus a hypothesis comparison), and the same error types: ValueError for page_size <= 0,
 * struct.error for a token id that is negative, >= 2**32 or not an integer.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

/* SHA256_Init/Update/Final are deprecated since OpenSSL 3.0 but remain the cheapest entry point: the
 * EVP interface costs a context set-up per call, which matters at ~100 ns a page. */
#define OPENSSL_SUPPRESS_DEPRECATED
#include <openssl/sha.h>

#include <stdint.h>
#include <string.h>

#if PY_BIG_ENDIAN
#error "kvindex._chash assumes a little-endian host (tokens are hashed as uint32 little-endian)"
#endif

#define DIGEST_LEN 32
/* Inputs of at least this many token bytes are hashed with the GIL released. */
#define NOGIL_BYTES 8192

static PyObject *StructError; /* struct.error, the Python path's error type for bad token ids */

/* ---- token ids -> uint32 buffer ---------------------------------------------------------------- */

typedef struct {
    const uint32_t *data; /* n_tokens validated ids, little-endian */
    uint32_t *owned;      /* PyMem buffer to free, or NULL when data points into view */
    Py_buffer view;
    int has_view;
} Tokens;

static void
tokens_release(Tokens *t)
{
    PyMem_Free(t->owned);
    t->owned = NULL;
    if (t->has_view) {
        PyBuffer_Release(&t->view);
        t->has_view = 0;
    }
}

static int
bad_token(Py_ssize_t i, PyObject *item, const char *why)
{
    PyErr_Format(StructError, "token id at index %zd %s: %R", i, why, item);
    return -1;
}

/* One Python object -> uint32 with the Python path's rules (int or __index__, 0 <= id < 2**32). */
static int
token_of(PyObject *item, Py_ssize_t i, uint32_t *out)
{
    PyObject *num;
    unsigned long long v;

    if (PyLong_CheckExact(item)) {
        v = PyLong_AsUnsignedLongLong(item);
        if (v == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            return bad_token(i, item, "is out of uint32 range");
        }
    }
    else {
        Py_INCREF(item); /* __index__ may run code that mutates the sequence */
        num = PyNumber_Index(item);
        if (num == NULL) {
            PyErr_Clear();
            bad_token(i, item, "is not an integer");
            Py_DECREF(item);
            return -1;
        }
        v = PyLong_AsUnsignedLongLong(num);
        Py_DECREF(num);
        if (v == (unsigned long long)-1 && PyErr_Occurred()) {
            PyErr_Clear();
            bad_token(i, item, "is out of uint32 range");
            Py_DECREF(item);
            return -1;
        }
        Py_DECREF(item);
    }
    if (v > UINT32_MAX) {
        return bad_token(i, item, "is out of uint32 range");
    }
    *out = (uint32_t)v;
    return 0;
}

/* Integer buffer formats ("@", "=" or "<" byte order); returns 1 for unsigned, 0 signed, -1 other. */
static int
int_format(const char *fmt, Py_ssize_t itemsize)
{
    if (fmt == NULL) {
        return itemsize == 1 ? 1 : -1; /* "B" implied */
    }
    if (*fmt == '@' || *fmt == '=' || *fmt == '<') {
        fmt++;
    }
    if (fmt[0] == '\0' || fmt[1] != '\0') {
        return -1;
    }
    if (strchr("BHILQN", fmt[0]) != NULL) {
        return 1;
    }
    if (strchr("bhilqn", fmt[0]) != NULL) {
        return 0;
    }
    return -1;
}

/* Try the buffer protocol: 1 = done (t filled, *len set), 0 = not a usable buffer, -1 = error. */
static int
tokens_from_buffer(PyObject *obj, Py_ssize_t page_size, Py_ssize_t max_pages, Tokens *t,
                   Py_ssize_t *n_pages)
{
    Py_buffer *v = &t->view;
    Py_ssize_t n, i, size, n_tokens;
    int is_unsigned;

    if (!PyObject_CheckBuffer(obj) || PyBytes_Check(obj) || PyByteArray_Check(obj)) {
        return 0; /* bytes are a sequence of small ints here, like any Sequence[int] */
    }
    if (PyObject_GetBuffer(obj, v, PyBUF_FORMAT | PyBUF_C_CONTIGUOUS) < 0) {
        PyErr_Clear(); /* e.g. a strided numpy view: read it as a sequence instead */
        return 0;
    }
    t->has_view = 1;
    size = v->itemsize;
    is_unsigned = int_format(v->format, size);
    if (v->ndim != 1 || is_unsigned < 0 || (size != 1 && size != 2 && size != 4 && size != 8)) {
        PyBuffer_Release(v);
        t->has_view = 0;
        return 0;
    }
    n = v->len / size;
    *n_pages = n / page_size;
    if (max_pages >= 0 && *n_pages > max_pages) {
        *n_pages = max_pages;
    }
    n_tokens = *n_pages * page_size;
    if (size == 4 && is_unsigned) {
        t->data = (const uint32_t *)v->buf; /* zero copy */
        return 1;
    }
    t->owned = PyMem_Malloc((size_t)(n_tokens ? n_tokens : 1) * sizeof(uint32_t));
    if (t->owned == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    for (i = 0; i < n_tokens; i++) {
        long long sv = 0;
        unsigned long long uv = 0;
        const char *p = (const char *)v->buf + i * size;
        switch (size) {
        case 1: if (is_unsigned) uv = *(const uint8_t *)p; else sv = *(const int8_t *)p; break;
        case 2: if (is_unsigned) { uint16_t x; memcpy(&x, p, 2); uv = x; }
                else { int16_t x; memcpy(&x, p, 2); sv = x; } break;
        case 4: { int32_t x; memcpy(&x, p, 4); sv = x; } break;
        default: if (is_unsigned) memcpy(&uv, p, 8); else memcpy(&sv, p, 8); break;
        }
        if (!is_unsigned) {
            if (sv < 0) {
                PyErr_Format(StructError, "token id at index %zd is out of uint32 range: %lld", i, sv);
                return -1;
            }
            uv = (unsigned long long)sv;
        }
        if (uv > UINT32_MAX) {
            PyErr_Format(StructError, "token id at index %zd is out of uint32 range: %llu", i, uv);
            return -1;
        }
        t->owned[i] = (uint32_t)uv;
    }
    t->data = t->owned;
    return 1;
}

/* Fill t with the first n_pages * page_size validated token ids of obj. 0 on success, -1 on error.
 * max_pages < 0 means no bound. */
static int
tokens_load(PyObject *obj, Py_ssize_t page_size, Py_ssize_t max_pages, Tokens *t, Py_ssize_t *n_pages)
{
    PyObject *seq;
    Py_ssize_t i, n_tokens;
    int r;

    memset(t, 0, sizeof(*t));
    r = tokens_from_buffer(obj, page_size, max_pages, t, n_pages);
    if (r != 0) {
        return r < 0 ? -1 : 0;
    }
    if (!PyList_Check(obj) && !PyTuple_Check(obj) && !PySequence_Check(obj)) {
        PyErr_Format(PyExc_TypeError, "token_ids must be a sequence of ints, not %.100s",
                     Py_TYPE(obj)->tp_name);
        return -1;
    }
    seq = PySequence_Fast(obj, "token_ids must be a sequence of ints");
    if (seq == NULL) {
        return -1;
    }
    *n_pages = PySequence_Fast_GET_SIZE(seq) / page_size;
    if (max_pages >= 0 && *n_pages > max_pages) {
        *n_pages = max_pages;
    }
    n_tokens = *n_pages * page_size;
    t->owned = PyMem_Malloc((size_t)(n_tokens ? n_tokens : 1) * sizeof(uint32_t));
    if (t->owned == NULL) {
        Py_DECREF(seq);
        PyErr_NoMemory();
        return -1;
    }
    for (i = 0; i < n_tokens; i++) {
        if (i >= PySequence_Fast_GET_SIZE(seq)) { /* shrunk by an item's __index__ */
            Py_DECREF(seq);
            PyErr_SetString(PyExc_RuntimeError, "token_ids changed size while being hashed");
            return -1;
        }
        if (token_of(PySequence_Fast_GET_ITEM(seq, i), i, &t->owned[i]) < 0) {
            Py_DECREF(seq);
            return -1;
        }
    }
    Py_DECREF(seq);
    t->data = t->owned;
    return 0;
}

/* ---- the chain --------------------------------------------------------------------------------- */

static void
chain(const unsigned char *raw, size_t step, Py_ssize_t n_pages, const unsigned char *parent,
      size_t parent_len, unsigned char *out)
{
    SHA256_CTX c;
    const unsigned char *prev = parent;
    size_t prev_len = parent_len;
    Py_ssize_t k;

    for (k = 0; k < n_pages; k++) {
        SHA256_Init(&c);
        if (prev_len) {
            SHA256_Update(&c, prev, prev_len);
        }
        SHA256_Update(&c, raw + (size_t)k * step, step);
        SHA256_Final(out + (size_t)k * DIGEST_LEN, &c);
        prev = out + (size_t)k * DIGEST_LEN;
        prev_len = DIGEST_LEN;
    }
}

/* Run chain() over raw, releasing the GIL for long inputs. */
static void
chain_maybe_nogil(const unsigned char *raw, size_t step, Py_ssize_t n_pages, Py_buffer *parent,
                  unsigned char *out)
{
    const unsigned char *p = parent ? (const unsigned char *)parent->buf : NULL;
    size_t plen = parent ? (size_t)parent->len : 0;

    if ((size_t)n_pages * step >= NOGIL_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        chain(raw, step, n_pages, p, plen, out);
        Py_END_ALLOW_THREADS
    }
    else {
        chain(raw, step, n_pages, p, plen, out);
    }
}

/* ---- results ----------------------------------------------------------------------------------- */

static PyObject *
digest_list(const unsigned char *d, Py_ssize_t n)
{
    PyObject *list = PyList_New(n), *item;
    Py_ssize_t k;

    if (list == NULL) {
        return NULL;
    }
    for (k = 0; k < n; k++) {
        item = PyBytes_FromStringAndSize((const char *)d + k * DIGEST_LEN, DIGEST_LEN);
        if (item == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, k, item);
    }
    return list;
}

static int64_t
published(const unsigned char *d)
{
    uint64_t v = 0;
    int i;

    for (i = 0; i < 8; i++) {
        v = (v << 8) | d[i];
    }
    return (int64_t)v;
}

static PyObject *
hash_list(const unsigned char *d, Py_ssize_t n)
{
    PyObject *list = PyList_New(n), *item;
    Py_ssize_t k;

    if (list == NULL) {
        return NULL;
    }
    for (k = 0; k < n; k++) {
        item = PyLong_FromLongLong(published(d + k * DIGEST_LEN));
        if (item == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, k, item);
    }
    return list;
}

/* ---- argument helpers -------------------------------------------------------------------------- */

/* parent: None or any bytes-like object (its bytes are the chain's first input). */
static int
get_parent(PyObject *obj, Py_buffer *view, Py_buffer **out)
{
    *out = NULL;
    if (obj == Py_None) {
        return 0;
    }
    if (PyObject_GetBuffer(obj, view, PyBUF_SIMPLE) < 0) {
        return -1;
    }
    *out = view;
    return 0;
}

static int
get_max_pages(PyObject *obj, Py_ssize_t *out)
{
    Py_ssize_t v;

    *out = -1;
    if (obj == Py_None) {
        return 0;
    }
    v = PyNumber_AsSsize_t(obj, PyExc_OverflowError);
    if (v == -1 && PyErr_Occurred()) {
        return -1;
    }
    *out = v < 0 ? 0 : v; /* the Python path clamps at 0 */
    return 0;
}

static int
check_page_size(Py_ssize_t page_size)
{
    if (page_size <= 0) {
        PyErr_Format(PyExc_ValueError, "page_size must be positive, got %zd", page_size);
        return -1;
    }
    return 0;
}

/* ---- module functions -------------------------------------------------------------------------- */

enum { WANT_DIGESTS, WANT_HASHES };

static PyObject *
hash_tokens(PyObject *args, PyObject *kwargs, int want)
{
    static char *kwlist[] = {"token_ids", "page_size", "parent", "max_pages", NULL};
    PyObject *obj, *parent_obj = Py_None, *max_obj = Py_None, *result = NULL;
    Py_ssize_t page_size, max_pages, n_pages;
    Py_buffer pview, *parent;
    Tokens t;
    unsigned char *out;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "On|OO", kwlist, &obj, &page_size, &parent_obj,
                                     &max_obj)) {
        return NULL;
    }
    if (check_page_size(page_size) < 0 || get_max_pages(max_obj, &max_pages) < 0) {
        return NULL;
    }
    if (get_parent(parent_obj, &pview, &parent) < 0) {
        return NULL;
    }
    if (tokens_load(obj, page_size, max_pages, &t, &n_pages) < 0) {
        tokens_release(&t);
        if (parent) {
            PyBuffer_Release(parent);
        }
        return NULL;
    }
    out = PyMem_Malloc((size_t)(n_pages ? n_pages : 1) * DIGEST_LEN);
    if (out == NULL) {
        PyErr_NoMemory();
    }
    else {
        chain_maybe_nogil((const unsigned char *)t.data, 4 * (size_t)page_size, n_pages, parent, out);
        result = want == WANT_DIGESTS ? digest_list(out, n_pages) : hash_list(out, n_pages);
        PyMem_Free(out);
    }
    tokens_release(&t);
    if (parent) {
        PyBuffer_Release(parent);
    }
    return result;
}

PyDoc_STRVAR(digests_doc,
"digests(token_ids, page_size, parent=None, max_pages=None) -> list[bytes]\n\n"
"32-byte chained SHA-256 digests of every full page; see kvindex.hashing.chained_digests.");

static PyObject *
py_digests(PyObject *self, PyObject *args, PyObject *kwargs)
{
    return hash_tokens(args, kwargs, WANT_DIGESTS);
}

PyDoc_STRVAR(hashes_doc,
"hashes(token_ids, page_size, parent=None, max_pages=None) -> list[int]\n\n"
"Published int64 block hashes of every full page; see kvindex.hashing.block_hashes.");

static PyObject *
py_hashes(PyObject *self, PyObject *args, PyObject *kwargs)
{
    return hash_tokens(args, kwargs, WANT_HASHES);
}

PyDoc_STRVAR(digests_packed_doc,
"digests_packed(raw, page_size, parent=None) -> list[bytes]\n\n"
"Digests of tokens already packed as uint32 little-endian (4 * page_size bytes a page, a trailing\n"
"partial page ignored); see kvindex.hashing.chained_digests_packed.");

static PyObject *
py_digests_packed(PyObject *self, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"raw", "page_size", "parent", NULL};
    PyObject *parent_obj = Py_None, *result = NULL;
    Py_ssize_t page_size, n_pages;
    Py_buffer raw, pview, *parent;
    unsigned char *out;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "y*n|O", kwlist, &raw, &page_size, &parent_obj)) {
        return NULL;
    }
    if (check_page_size(page_size) < 0 || get_parent(parent_obj, &pview, &parent) < 0) {
        PyBuffer_Release(&raw);
        return NULL;
    }
    n_pages = raw.len / (4 * page_size);
    out = PyMem_Malloc((size_t)(n_pages ? n_pages : 1) * DIGEST_LEN);
    if (out == NULL) {
        PyErr_NoMemory();
    }
    else {
        chain_maybe_nogil((const unsigned char *)raw.buf, 4 * (size_t)page_size, n_pages, parent, out);
        result = digest_list(out, n_pages);
        PyMem_Free(out);
    }
    PyBuffer_Release(&raw);
    if (parent) {
        PyBuffer_Release(parent);
    }
    return result;
}

/* ---- PrefixCache: reuse of digests across requests that share a token prefix --------------------
 *
 * A multi-turn prompt repeats most of the previous turn's prompt, and the chain makes digest k a
 * function of pages 0..k only, so the digests of a shared prefix can be copied instead of rehashed.
 *
 * Layout. The cache keeps whole requests ("runs": the packed tokens, the digests, the parent and the
 * page size), in LRU order, within max_bytes. A hash table maps a cheap seeded 64-bit key of each
 * prefix that ends on a *boundary* (every `stride` pages, stride = ceil(128 / page_size)) to the most
 * recent run holding that prefix. Keys are chained like the digests: key_b = mix(key_{b-1}, H(chunk_b)),
 * key_0 = mix(seed, page_size, parent), so one pass over the request's bytes gives all its keys.
 *
 * Lookup. Gallop then bisect over the boundaries for the deepest key present (a request sharing
 * nothing misses on the first probe); take that key's run R.
 *
 * Verification (why a key collision can never return a wrong digest): R's page size and parent must be
 * equal and R's packed tokens must equal the request's byte for byte (memcmp) over the whole reused
 * prefix. The key only chooses the candidate; equality of the inputs is checked exactly, and equal
 * inputs have equal digests. The reuse is then extended page by page (memcmp) to the exact longest
 * common prefix with R, and only the pages after it are hashed.
 *
 * Costs: a key is ~0.1 ns a byte and memcmp ~0.05 ns a byte where SHA-256 of a 16-token page costs
 * ~1 ns a byte, so a hit is cheaper than the hashing it replaces; a miss costs the keys, one probe and
 * the copy into the cache.
 *
 * Concurrency: the cache is only touched with the GIL held. The tail may be hashed without the GIL
 * (into a private buffer); a generation counter tells whether another thread changed the cache
 * meanwhile, in which case R is not touched again. */

#define STRIDE_TOKENS 128
#define P1 0x9E3779B185EBCA87ULL
#define P2 0xC2B2AE3D27D4EB4FULL
#define P3 0x165667B19E3779F9ULL
#define P4 0x85EBCA77C2B2AE63ULL

static inline uint64_t
rotl64(uint64_t x, int r)
{
    return (x << r) | (x >> (64 - r));
}

static inline uint64_t
fmix64(uint64_t k)
{
    k ^= k >> 33;
    k *= 0xff51afd7ed558ccdULL;
    k ^= k >> 33;
    k *= 0xc4ceb9fe1a85ec53ULL;
    k ^= k >> 33;
    return k;
}

/* Non-cryptographic seeded hash of n bytes, four independent lanes for instruction-level parallelism.
 * Its only job is to pick a candidate; see "Verification" above. */
static uint64_t
cheap_hash(const unsigned char *p, size_t n, uint64_t seed)
{
    uint64_t a = seed ^ P1, b = seed ^ P2, c = seed ^ P3, d = seed ^ P4, w[4];
    size_t i = 0;

    for (; i + 32 <= n; i += 32) {
        memcpy(w, p + i, 32);
        a = rotl64(a ^ (w[0] * P1), 31) * P2;
        b = rotl64(b ^ (w[1] * P1), 31) * P2;
        c = rotl64(c ^ (w[2] * P1), 31) * P2;
        d = rotl64(d ^ (w[3] * P1), 31) * P2;
    }
    for (; i + 8 <= n; i += 8) {
        memcpy(w, p + i, 8);
        a = rotl64(a ^ (w[0] * P1), 31) * P2;
    }
    for (; i < n; i++) {
        a = rotl64(a ^ (p[i] * P3), 11) * P1;
    }
    return fmix64(a ^ rotl64(b, 17) ^ rotl64(c, 31) ^ rotl64(d, 47) ^ (uint64_t)n);
}

typedef struct Run {
    struct Run *prev, *next; /* LRU list; the cache's head is the most recently used */
    Py_ssize_t page_size, n_pages, n_keys;
    int has_parent;
    unsigned char parent[DIGEST_LEN];
    size_t nbytes;           /* what this run counts against max_bytes */
    uint32_t *tokens;        /* n_pages * page_size */
    unsigned char *digests;  /* n_pages * 32 */
    uint64_t *keys;          /* keys[b - 1] = key of the prefix of b * stride pages */
} Run;

typedef struct {
    uint64_t key; /* 0 = empty slot */
    Run *run;
    Py_ssize_t bound;
} Slot;

typedef struct {
    PyObject_HEAD
    Run *head, *tail;
    Slot *slots;
    size_t mask; /* capacity - 1, capacity a power of two */
    size_t used, max_slots_used, bytes, max_bytes;
    uint64_t seed, gen, key_mask; /* key_mask: all ones except in tests that force collisions */
    /* counters */
    unsigned long long requests, hits, reused_pages, hashed_pages, evictions, collisions;
} PrefixCache;

static Py_ssize_t
stride_of(Py_ssize_t page_size)
{
    return page_size >= STRIDE_TOKENS ? 1 : (STRIDE_TOKENS + page_size - 1) / page_size;
}

static uint64_t
key_root(const PrefixCache *c, Py_ssize_t page_size, const unsigned char *parent)
{
    uint64_t k = c->seed ^ fmix64((uint64_t)page_size * P3 + (parent != NULL));
    if (parent != NULL) {
        k ^= cheap_hash(parent, DIGEST_LEN, c->seed);
    }
    return fmix64(k);
}

/* keys[b - 1] for b = 1 .. n_keys, over the packed tokens. */
static void
compute_keys(const PrefixCache *c, const uint32_t *tokens, Py_ssize_t page_size, const unsigned char *parent,
             Py_ssize_t n_keys, uint64_t *keys)
{
    size_t chunk = 4 * (size_t)page_size * (size_t)stride_of(page_size);
    uint64_t k = key_root(c, page_size, parent);
    Py_ssize_t b;

    for (b = 0; b < n_keys; b++) {
        k = fmix64(k * P1 ^ cheap_hash((const unsigned char *)tokens + (size_t)b * chunk, chunk, c->seed));
        keys[b] = (k & c->key_mask) | 1; /* never 0, the empty-slot marker */
    }
}

static Slot *
slot_find(PrefixCache *c, uint64_t key)
{
    size_t i = (size_t)fmix64(key) & c->mask;

    while (c->slots[i].key != 0) {
        if (c->slots[i].key == key) {
            return &c->slots[i];
        }
        i = (i + 1) & c->mask;
    }
    return NULL;
}

static void
slot_put(PrefixCache *c, uint64_t key, Run *run, Py_ssize_t bound)
{
    size_t i = (size_t)fmix64(key) & c->mask;

    while (c->slots[i].key != 0 && c->slots[i].key != key) {
        i = (i + 1) & c->mask;
    }
    if (c->slots[i].key == 0) {
        c->used++;
    }
    c->slots[i].key = key;
    c->slots[i].run = run; /* the newest run holding this prefix */
    c->slots[i].bound = bound;
}

/* Linear probing deletion by backward shift (no tombstones). */
static void
slot_delete(PrefixCache *c, Slot *s)
{
    size_t i = (size_t)(s - c->slots), j = i, home;

    for (;;) {
        j = (j + 1) & c->mask;
        if (c->slots[j].key == 0) {
            break;
        }
        home = (size_t)fmix64(c->slots[j].key) & c->mask;
        /* move j into the hole i unless its home lies cyclically in (i, j] */
        if ((j > i && (home <= i || home > j)) || (j < i && (home <= i && home > j))) {
            c->slots[i] = c->slots[j];
            i = j;
        }
    }
    c->slots[i].key = 0;
    c->slots[i].run = NULL;
    c->used--;
}

static void
lru_unlink(PrefixCache *c, Run *r)
{
    if (r->prev) r->prev->next = r->next; else c->head = r->next;
    if (r->next) r->next->prev = r->prev; else c->tail = r->prev;
    r->prev = r->next = NULL;
}

static void
lru_push_front(PrefixCache *c, Run *r)
{
    r->prev = NULL;
    r->next = c->head;
    if (c->head) c->head->prev = r; else c->tail = r;
    c->head = r;
}

static void
run_drop(PrefixCache *c, Run *r)
{
    Py_ssize_t b;
    Slot *s;

    for (b = 0; b < r->n_keys; b++) {
        s = slot_find(c, r->keys[b]);
        if (s != NULL && s->run == r) {
            slot_delete(c, s);
        }
    }
    lru_unlink(c, r);
    c->bytes -= r->nbytes;
    PyMem_Free(r);
    c->gen++;
}

static void
cache_clear_all(PrefixCache *c)
{
    while (c->tail != NULL) {
        run_drop(c, c->tail);
    }
}

/* Store the request as a run (tokens, digests, keys copied). Silently skipped when it would not fit. */
static void
run_insert(PrefixCache *c, const uint32_t *tokens, Py_ssize_t page_size, Py_ssize_t n_pages,
           const unsigned char *parent, const unsigned char *digests, const uint64_t *keys, Py_ssize_t n_keys)
{
    size_t tok_b = 4 * (size_t)page_size * (size_t)n_pages, dig_b = DIGEST_LEN * (size_t)n_pages;
    size_t key_b = sizeof(uint64_t) * (size_t)n_keys;
    size_t nbytes = sizeof(Run) + tok_b + dig_b + key_b + 2 * sizeof(Slot) * (size_t)n_keys;
    Run *r;
    Py_ssize_t b;

    if (n_keys == 0 || nbytes > c->max_bytes || (size_t)n_keys > c->max_slots_used) {
        return; /* would not fit even in an empty cache */
    }
    while (c->tail != NULL && (c->bytes + nbytes > c->max_bytes || c->used + (size_t)n_keys > c->max_slots_used)) {
        run_drop(c, c->tail);
        c->evictions++;
    }
    r = PyMem_Malloc(sizeof(Run) + dig_b + key_b + tok_b); /* digests and keys first: 8-byte aligned */
    if (r == NULL) {
        return; /* the cache is an optimisation: out of memory just means no caching */
    }
    memset(r, 0, sizeof(Run));
    r->page_size = page_size;
    r->n_pages = n_pages;
    r->n_keys = n_keys;
    r->has_parent = parent != NULL;
    if (parent != NULL) {
        memcpy(r->parent, parent, DIGEST_LEN);
    }
    r->nbytes = nbytes;
    r->digests = (unsigned char *)(r + 1);
    r->keys = (uint64_t *)(r->digests + dig_b);
    r->tokens = (uint32_t *)((unsigned char *)r->keys + key_b);
    memcpy(r->digests, digests, dig_b);
    memcpy(r->keys, keys, key_b);
    memcpy(r->tokens, tokens, tok_b);
    for (b = 0; b < n_keys; b++) {
        slot_put(c, keys[b], r, b + 1);
    }
    lru_push_front(c, r);
    c->bytes += nbytes;
    c->gen++;
}

/* Does the run's prefix of n_tokens equal the request's (same page size, parent and tokens)? */
static int
run_matches(const Run *r, Py_ssize_t page_size, const unsigned char *parent, const uint32_t *tokens,
            Py_ssize_t n_tokens)
{
    if (r->page_size != page_size || r->has_parent != (parent != NULL)) {
        return 0;
    }
    if (parent != NULL && memcmp(r->parent, parent, DIGEST_LEN) != 0) {
        return 0;
    }
    return n_tokens <= r->n_pages * page_size && memcmp(r->tokens, tokens, 4 * (size_t)n_tokens) == 0;
}

static PyObject *
cache_hash(PrefixCache *c, PyObject *args, PyObject *kwargs, int want)
{
    static char *kwlist[] = {"token_ids", "page_size", "parent", NULL};
    PyObject *obj, *parent_obj = Py_None, *result = NULL;
    Py_ssize_t page_size, n_pages, n_keys, stride, lo, hi, mid, k = 0;
    Py_buffer pview, *pbuf;
    const unsigned char *parent = NULL, *prev;
    unsigned char *out = NULL;
    uint64_t *keys = NULL, gen;
    size_t step;
    Slot *s;
    Run *r = NULL;
    Tokens t;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "On|O", kwlist, &obj, &page_size, &parent_obj)) {
        return NULL;
    }
    if (check_page_size(page_size) < 0 || get_parent(parent_obj, &pview, &pbuf) < 0) {
        return NULL;
    }
    if (pbuf != NULL && pbuf->len != DIGEST_LEN) {
        PyErr_Format(PyExc_ValueError, "parent must be a 32-byte digest or None, got %zd bytes",
                     pbuf->len);
        PyBuffer_Release(pbuf);
        return NULL;
    }
    if (tokens_load(obj, page_size, -1, &t, &n_pages) < 0) {
        goto done;
    }
    if (pbuf != NULL) {
        parent = (const unsigned char *)pbuf->buf;
    }
    step = 4 * (size_t)page_size;
    stride = stride_of(page_size);
    n_keys = n_pages / stride;
    out = PyMem_Malloc((size_t)(n_pages ? n_pages : 1) * DIGEST_LEN);
    keys = PyMem_Malloc((size_t)(n_keys ? n_keys : 1) * sizeof(uint64_t));
    if (out == NULL || keys == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    c->requests++;
    compute_keys(c, t.data, page_size, parent, n_keys, keys);

    /* deepest boundary present: gallop (1, 2, 4, ...) then bisect; lo = deepest known hit */
    lo = 0;
    hi = n_keys + 1;
    for (mid = 1; mid <= n_keys; mid *= 2) {
        if (slot_find(c, keys[mid - 1]) == NULL) {
            hi = mid;
            break;
        }
        lo = mid;
    }
    while (hi - lo > 1) {
        mid = lo + (hi - lo) / 2;
        if (slot_find(c, keys[mid - 1]) != NULL) lo = mid; else hi = mid;
    }
    if (lo > 0) {
        s = slot_find(c, keys[lo - 1]);
        r = s->run;
        if (run_matches(r, page_size, parent, t.data, lo * stride * page_size)) {
            k = lo * stride;
            while (k < n_pages && k < r->n_pages
                   && memcmp((const unsigned char *)r->tokens + (size_t)k * step,
                             (const unsigned char *)t.data + (size_t)k * step, step) == 0) {
                k++;
            }
            memcpy(out, r->digests, (size_t)k * DIGEST_LEN);
            c->hits++;
            c->reused_pages += (unsigned long long)k;
        }
        else {
            c->collisions++; /* a key collision: the verification caught it */
            r = NULL;
        }
    }
    c->hashed_pages += (unsigned long long)(n_pages - k);

    /* hash the pages after the reused prefix */
    prev = k > 0 ? out + (size_t)(k - 1) * DIGEST_LEN : parent;
    gen = c->gen;
    if ((size_t)(n_pages - k) * step >= NOGIL_BYTES) {
        Py_BEGIN_ALLOW_THREADS
        chain((const unsigned char *)t.data + (size_t)k * step, step, n_pages - k, prev,
              prev ? DIGEST_LEN : 0, out + (size_t)k * DIGEST_LEN);
        Py_END_ALLOW_THREADS
    }
    else {
        chain((const unsigned char *)t.data + (size_t)k * step, step, n_pages - k, prev,
              prev ? DIGEST_LEN : 0, out + (size_t)k * DIGEST_LEN);
    }
    if (c->gen != gen) {
        r = NULL; /* another thread changed the cache while this one hashed: R may be gone */
    }

    if (r != NULL && k == n_pages && n_pages <= r->n_pages) {
        lru_unlink(c, r); /* the request is a prefix of R: nothing new to keep */
        lru_push_front(c, r);
    }
    else {
        if (r != NULL && k == r->n_pages) {
            run_drop(c, r); /* the request extends R: its run supersedes R's */
        }
        run_insert(c, t.data, page_size, n_pages, parent, out, keys, n_keys);
    }
    result = want == WANT_DIGESTS ? digest_list(out, n_pages) : hash_list(out, n_pages);

done:
    PyMem_Free(out);
    PyMem_Free(keys);
    tokens_release(&t);
    if (pbuf != NULL) {
        PyBuffer_Release(pbuf);
    }
    return result;
}

static PyObject *
cache_hashes(PyObject *self, PyObject *args, PyObject *kwargs)
{
    return cache_hash((PrefixCache *)self, args, kwargs, WANT_HASHES);
}

static PyObject *
cache_digests(PyObject *self, PyObject *args, PyObject *kwargs)
{
    return cache_hash((PrefixCache *)self, args, kwargs, WANT_DIGESTS);
}

static PyObject *
cache_stats(PyObject *self, PyObject *unused)
{
    PrefixCache *c = (PrefixCache *)self;
    Py_ssize_t runs = 0;
    Run *r;

    for (r = c->head; r != NULL; r = r->next) {
        runs++;
    }
    return Py_BuildValue("{s:K,s:K,s:K,s:K,s:K,s:K,s:n,s:n,s:n,s:n}", "requests", c->requests, "hits", c->hits,
                         "reused_pages", c->reused_pages, "hashed_pages", c->hashed_pages, "evictions",
                         c->evictions, "collisions", c->collisions, "runs", runs, "keys", (Py_ssize_t)c->used,
                         "bytes", (Py_ssize_t)c->bytes, "max_bytes", (Py_ssize_t)c->max_bytes);
}

static PyObject *
cache_clear(PyObject *self, PyObject *unused)
{
    cache_clear_all((PrefixCache *)self);
    Py_RETURN_NONE;
}

static PyObject *
cache_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    static char *kwlist[] = {"max_bytes", "_key_bits", NULL};
    Py_ssize_t max_bytes = 8 << 20, max_keys;
    int key_bits = 64;
    size_t cap = 16;
    PrefixCache *c;
    PyObject *os, *rnd;

    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "|ni", kwlist, &max_bytes, &key_bits)) {
        return NULL;
    }
    if (key_bits < 1 || key_bits > 64) {
        PyErr_Format(PyExc_ValueError, "_key_bits must be in [1, 64], got %d", key_bits);
        return NULL;
    }
    if (max_bytes <= 0) {
        PyErr_Format(PyExc_ValueError, "max_bytes must be positive, got %zd", max_bytes);
        return NULL;
    }
    /* Every key is charged 2 slots in a run's nbytes, so the table needs at most max_bytes / 48 keys;
     * half full at most keeps linear probing short. */
    max_keys = max_bytes / (Py_ssize_t)(2 * sizeof(Slot)) + 1;
    while (cap < 2 * (size_t)max_keys) {
        cap *= 2;
    }
    c = (PrefixCache *)type->tp_alloc(type, 0);
    if (c == NULL) {
        return NULL;
    }
    c->slots = PyMem_Calloc(cap, sizeof(Slot));
    if (c->slots == NULL) {
        Py_DECREF(c);
        return PyErr_NoMemory();
    }
    c->mask = cap - 1;
    c->max_slots_used = cap / 2;
    c->max_bytes = (size_t)max_bytes;
    /* Tests pass a few key bits to make key collisions common and check that verification rejects
     * them; production keeps 64. */
    c->key_mask = key_bits == 64 ? ~(uint64_t)0 : (((uint64_t)1 << key_bits) - 1);
    os = PyImport_ImportModule("os");
    rnd = os ? PyObject_CallMethod(os, "urandom", "i", 8) : NULL;
    Py_XDECREF(os);
    if (rnd == NULL) {
        Py_DECREF(c);
        return NULL;
    }
    memcpy(&c->seed, PyBytes_AS_STRING(rnd), 8);
    Py_DECREF(rnd);
    return (PyObject *)c;
}

static void
cache_dealloc(PyObject *self)
{
    PrefixCache *c = (PrefixCache *)self;

    if (c->slots != NULL) {
        cache_clear_all(c);
        PyMem_Free(c->slots);
    }
    Py_TYPE(self)->tp_free(self);
}

static PyMethodDef cache_methods[] = {
    {"hashes", (PyCFunction)(void (*)(void))cache_hashes, METH_VARARGS | METH_KEYWORDS,
     "hashes(token_ids, page_size, parent=None) -> list[int]: block hashes, reusing a cached prefix."},
    {"digests", (PyCFunction)(void (*)(void))cache_digests, METH_VARARGS | METH_KEYWORDS,
     "digests(token_ids, page_size, parent=None) -> list[bytes]: digests, reusing a cached prefix."},
    {"stats", cache_stats, METH_NOARGS, "stats() -> dict of counters and sizes."},
    {"clear", cache_clear, METH_NOARGS, "clear() -> None: forget every run."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject PrefixCacheType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "kvindex._chash.PrefixCache",
    .tp_basicsize = sizeof(PrefixCache),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "PrefixCache(max_bytes=8 MiB): chained page hashing that reuses the digests of a verified "
              "shared prefix with an earlier request; see the theory of operation in _chash.c.",
    .tp_new = cache_new,
    .tp_dealloc = cache_dealloc,
    .tp_methods = cache_methods,
};

static PyMethodDef methods[] = {
    {"digests", (PyCFunction)(void (*)(void))py_digests, METH_VARARGS | METH_KEYWORDS, digests_doc},
    {"hashes", (PyCFunction)(void (*)(void))py_hashes, METH_VARARGS | METH_KEYWORDS, hashes_doc},
    {"digests_packed", (PyCFunction)(void (*)(void))py_digests_packed, METH_VARARGS | METH_KEYWORDS,
     digests_packed_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "kvindex._chash",
    "SGLang-compatible chained SHA-256 page hashing in C over OpenSSL (see kvindex/hashing.py).", -1,
    methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__chash(void)
{
    PyObject *m, *st;

    st = PyImport_ImportModule("struct");
    if (st == NULL) {
        return NULL;
    }
    StructError = PyObject_GetAttrString(st, "error");
    Py_DECREF(st);
    if (StructError == NULL) {
        return NULL;
    }
    if (PyType_Ready(&PrefixCacheType) < 0) {
        return NULL;
    }
    m = PyModule_Create(&module);
    if (m == NULL) {
        Py_CLEAR(StructError);
        return NULL;
    }
    Py_INCREF(&PrefixCacheType);
    if (PyModule_AddObject(m, "PrefixCache", (PyObject *)&PrefixCacheType) < 0) {
        Py_DECREF(&PrefixCacheType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
