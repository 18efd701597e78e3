/*
 * pyvirtiofsd.virtio._walk: the everyday descriptor chain, walked in C.
 *
 * An optional accelerator of pyvirtiofsd.virtio.chain.read_chain, built only with the compiled
 * variant (setup.py). It serves the chains a Linux driver sends for everyday requests (a direct
 * chain, or one indirect table shorter than the bulk decoding's threshold) whose buffers all lie
 * in the main region of guest memory, and gives up (returns None) on anything else: then the
 * walk in Python runs and decides, so a chain's outcome never depends on which walk took it.
 *
 * Rules:
 * - It answers only what the Python walk would answer in the same way: the same views, each
 *   what slicing the main region's byte view gives (a view onto its export, so each one holds
 *   the mapping, as every view of guest memory must), and their lengths; the caller makes the
 *   Chain. Any violation, an empty buffer, a buffer or a table outside the main region, a region
 *   view other than one contiguous dimension of one-byte items: None, never an error of its own.
 * - Guest memory changes under it: every descriptor is copied out once, behind a compiler
 *   barrier, and only the copy is looked at (an indirect table is copied out whole).
 * - It holds the GIL, but what it allocates may start the garbage collector, hence Python code
 *   and other threads, one of which may retire the main region: it holds no export of the
 *   region's view by then (its slices are the views' own), so the region can be released as
 *   under the Python walk, whose slicing then fails as this one's does. A ring or region
 *   released before it starts is left to the Python walk.
 * - Its arguments are checked as if they came from the guest: no size they give makes it read
 *   outside the buffers it holds.
 * - Readable buffers that add up to SMALL bytes or fewer come as one bytes object, copied out
 *   (SMALL_REQUEST in chain.py, which the module's SMALL must equal), as the Python walk gives
 *   them; more than READ_PIECES of them are left to the Python walk.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#define F_NEXT 1u
#define F_WRITE 2u
#define F_INDIRECT 4u

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

/* One descriptor out of guest memory (little-endian host, as the queue module requires). */
static inline void
load(const unsigned char *at, struct desc *d)
{
    memcpy(d, at, sizeof *d);
    /* The compiler may not read guest memory again in place of the copy. */
    __asm__ __volatile__("" ::: "memory");
}

/* Whether [addr, addr+len) lies inside the main region [base, base+size); off is where. */
static inline int
inside(uint64_t addr, uint64_t len, uint64_t base, uint64_t size, uint64_t *off)
{
    if (addr < base)
        return 0;
    *off = addr - base;
    return *off <= size && len <= size - *off;
}

/* Whether view is a memoryview of one contiguous dimension of one-byte items, nothing more (the
 * item's format is not looked at: a piece of it is what slicing gives whatever the format). */
static int
plain_bytes(PyObject *view)
{
    if (!PyMemoryView_Check(view))
        return 0;
    const Py_buffer *b = PyMemoryView_GET_BUFFER(view);
    return b->ndim == 1 && b->itemsize == 1 && b->shape != NULL && b->strides != NULL &&
           b->strides[0] == 1 && b->suboffsets == NULL;
}

/*
 * Append to list the piece [off, off+len) of view, a plain byte view (plain_bytes) that holds it:
 * a view of its own onto the same export, so it holds the mapping as a slice does. It is cut by
 * hand, a new view of the whole narrowed, which is what slicing does less making a slice object
 * and parsing it; the piece stays one contiguous dimension of bytes, so the flags the new view
 * computed hold for it.
 */
static int
append_piece(PyObject *list, PyObject *view, uint64_t off, uint64_t len)
{
    PyObject *piece = PyMemoryView_FromObject(view);
    if (piece == NULL)
        return -1;
    Py_buffer *b = PyMemoryView_GET_BUFFER(piece);
    b->buf = (char *)b->buf + off;
    b->len = (Py_ssize_t)len;
    b->shape[0] = (Py_ssize_t)len;
    int rc = PyList_Append(list, piece);
    Py_DECREF(piece);
    return rc;
}

/* The longest indirect table walked here (the bulk threshold, _BULK in chain.py, is one more). */
#define TABLE_MAX 15
/* Readable bytes copied rather than viewed (chain.SMALL_REQUEST), and the most buffers they
 * may come in here. */
#define SMALL 512
#define READ_PIECES 16

/*
 * walk(table, queue_size, head, indirect, base, size, view, short)
 *
 * table: the descriptor table (a buffer of queue_size entries); head: below queue_size;
 * indirect: whether VIRTIO_F_RING_INDIRECT_DESC was negotiated; base, size, view: the main
 * region's guest address, length and memoryview; short: indirect tables of this many entries
 * or more are not walked here. Returns (readable, writable, writable_len, readable_len), from
 * which the caller makes its Chain (a compiled caller calls its class directly, with no argument
 * parsing), or None.
 */
static PyObject *
walk(PyObject *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)self;
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "walk() takes 8 arguments");
        return NULL;
    }
    Py_ssize_t queue_size = PyLong_AsSsize_t(args[1]);
    Py_ssize_t head = PyLong_AsSsize_t(args[2]);
    int indirect = PyObject_IsTrue(args[3]);
    uint64_t base = PyLong_AsUnsignedLongLong(args[4]);
    uint64_t size = PyLong_AsUnsignedLongLong(args[5]);
    PyObject *view = args[6];
    Py_ssize_t short_table = PyLong_AsSsize_t(args[7]);
    if (PyErr_Occurred())
        return NULL;

    /* A buffer that can't be had (a ring or region released: memory retired under a walk on an
     * old snapshot) is not an error of ours: the Python walk meets it, or not, and decides. */
    Py_buffer tb, mb;
    if (PyObject_GetBuffer(args[0], &tb, PyBUF_SIMPLE) < 0) {
        PyErr_Clear();
        Py_RETURN_NONE;
    }
    PyObject *result = Py_None;
    PyObject *readable = NULL, *writable = NULL;
    /* Sizes compared by division: 16 * queue_size could overflow. */
    if (queue_size <= 0 || queue_size > tb.len / 16 || head < 0 || head >= queue_size)
        goto give_up;

    const unsigned char *table = tb.buf;
    uint64_t limit = (uint64_t)queue_size;
    uint64_t off;
    struct desc d;
    /* An indirect table, copied out whole: the walk then holds no export of the region while it
     * builds the chain (allocation may run the garbage collector, hence Python code, hence
     * another thread that retires the region: its view must then be releasable). */
    unsigned char copy[16 * TABLE_MAX];
    load(table + 16 * head, &d);
    if (d.flags & F_INDIRECT) {
        if (!indirect || d.flags & F_NEXT || d.len == 0 || d.len % 16)
            goto give_up;
        limit = d.len / 16;
        if (limit > TABLE_MAX || short_table <= 0 || limit >= (uint64_t)short_table)
            goto give_up;
        if (PyObject_GetBuffer(view, &mb, PyBUF_SIMPLE) < 0) {
            PyErr_Clear();
            goto give_up;
        }
        int in = (uint64_t)mb.len >= size && inside(d.addr, d.len, base, size, &off);
        if (in) {
            memcpy(copy, (const unsigned char *)mb.buf + off, d.len);
            /* As in load(): only the copy is looked at from here on. */
            __asm__ __volatile__("" ::: "memory");
        }
        PyBuffer_Release(&mb);
        if (!in)
            goto give_up;
        table = copy;
        load(table, &d);
        if (d.flags & F_INDIRECT)
            goto give_up;
    }
    /* Anything but a byte view of the whole main region is left to the Python walk. */
    if (!plain_bytes(view) || (uint64_t)PyMemoryView_GET_BUFFER(view)->len < size)
        goto give_up;
    readable = PyList_New(0);
    writable = PyList_New(0);
    if (readable == NULL || writable == NULL)
        goto fail;
    uint64_t rlen = 0, wlen = 0, count = 1;
    /* Readable buffers are remembered while they may still add up to a copy; once they are
     * more than SMALL bytes they are views, those remembered first. */
    uint64_t piece_off[READ_PIECES], piece_len[READ_PIECES];
    int pieces = 0, as_views = 0;
    for (;;) {
        if (d.len == 0 || !inside(d.addr, d.len, base, size, &off))
            goto give_up;
        if (d.flags & F_WRITE) {
            if (append_piece(writable, view, off, d.len) < 0)
                goto fail;
            wlen += d.len;
        } else {
            if (PyList_GET_SIZE(writable))
                goto give_up;
            rlen += d.len;
            if (!as_views && rlen > SMALL) {
                for (int i = 0; i < pieces; i++)
                    if (append_piece(readable, view, piece_off[i], piece_len[i]) < 0)
                        goto fail;
                as_views = 1;
            }
            if (as_views) {
                if (append_piece(readable, view, off, d.len) < 0)
                    goto fail;
            } else {
                if (pieces == READ_PIECES)
                    goto give_up;
                piece_off[pieces] = off;
                piece_len[pieces] = d.len;
                pieces++;
            }
        }
        if (!(d.flags & F_NEXT))
            break;
        if (d.next >= limit || ++count > limit)
            goto give_up;
        load(table + 16 * (uint64_t)d.next, &d);
        if (d.flags & F_INDIRECT)
            goto give_up;
    }
    if (pieces && !as_views) {
        /* Copied while the region's export is held, then made an object once it is not. */
        unsigned char small[SMALL];
        if (PyObject_GetBuffer(view, &mb, PyBUF_SIMPLE) < 0) {
            PyErr_Clear();
            goto give_up;
        }
        if ((uint64_t)mb.len < size) {
            PyBuffer_Release(&mb);
            goto give_up;
        }
        uint64_t at = 0;
        for (int i = 0; i < pieces; i++) {
            memcpy(small + at, (const unsigned char *)mb.buf + piece_off[i], piece_len[i]);
            at += piece_len[i];
        }
        __asm__ __volatile__("" ::: "memory");
        PyBuffer_Release(&mb);
        PyObject *copy = PyBytes_FromStringAndSize((const char *)small, (Py_ssize_t)at);
        int appended = copy == NULL ? -1 : PyList_Append(readable, copy);
        Py_XDECREF(copy);
        if (appended < 0)
            goto fail;
    }
    PyBuffer_Release(&tb);
    PyObject *w = PyLong_FromUnsignedLongLong(wlen);
    PyObject *r = PyLong_FromUnsignedLongLong(rlen);
    result = w != NULL && r != NULL ? PyTuple_New(4) : NULL;
    if (result == NULL) {
        Py_XDECREF(w);
        Py_XDECREF(r);
        Py_DECREF(readable);
        Py_DECREF(writable);
        return NULL;
    }
    /* The tuple takes the references. */
    PyTuple_SET_ITEM(result, 0, readable);
    PyTuple_SET_ITEM(result, 1, writable);
    PyTuple_SET_ITEM(result, 2, w);
    PyTuple_SET_ITEM(result, 3, r);
    return result;

give_up:
    result = Py_None;
    goto out;
fail:
    result = NULL;
out:
    Py_XDECREF(readable);
    Py_XDECREF(writable);
    PyBuffer_Release(&tb);
    return Py_XNewRef(result);
}

static PyMethodDef methods[] = {
    {"walk", (PyCFunction)(void (*)(void))walk, METH_FASTCALL,
     "walk(table, queue_size, head, indirect, base, size, view, short): the readable and "
     "writable views of the main region and their lengths, or None to leave the chain to the "
     "walk in Python."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pyvirtiofsd.virtio._walk",
    .m_doc = "The everyday descriptor chain, walked in C (see pyvirtiofsd.virtio.chain).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC
PyInit__walk(void)
{
    PyObject *m = PyModule_Create(&module);
    if (m != NULL && PyModule_AddIntConstant(m, "SMALL", SMALL) < 0)
        Py_CLEAR(m);
    return m;
}
