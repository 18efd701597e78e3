/*
 * pyvirtiofsd.fuse._request: a request's header and fixed arguments, decoded in C.
 *
 * An optional accelerator of pyvirtiofsd.fuse.server, built only with the compiled variant
 * (setup.py). split(readable, layouts) decodes the in header and the opcode's fixed arguments
 * in one call, where the server would otherwise make a reader and two struct calls, and returns
 * (length, opcode, unique, nodeid, uid, gid, pid, total_extlen, args, index, offset): args is the
 * tuple of the fixed arguments, or None when the opcode has none in ``layouts`` or they don't lie
 * whole in the buffer after the header (or at the start of the next one, as a Linux driver puts
 * them); index and offset say where the bytes after args begin (the buffer, and the offset in
 * it: the start of the next buffer when args end their own), as a reader that skipped the header
 * and args would have them (0, 0 with no args). A
 * layout ending in "z" has one NUL-terminated name after its fixed fields (LOOKUP, MKDIR...): the
 * name, up to its NUL, is then the last item of args, and the arguments the header declares
 * (its length less the header and the extensions) must all lie in that one buffer and hold a NUL
 * after the fixed fields; what follows the NUL is not looked at, as the server's own decoding
 * does not look at it.
 *
 * Rules:
 * - It decodes; it judges nothing. Lengths, opcodes and whether the arguments are the ones the
 *   request declares are the server's to check, exactly as for what its own decoding gives.
 * - None for what it does not handle (a header not whole in the first buffer, buffers that are
 *   not a list or tuple of contiguous buffers of single bytes, a layout it can't read): the
 *   server then decodes in Python, so a request's outcome never depends on which decoding took
 *   it.
 * - Guest memory changes under it: what it decodes is copied out once, behind a compiler
 *   barrier, and every field comes from the copy. It holds no buffer export while it
 *   allocates (what it allocates may start the garbage collector, hence Python code).
 * - ``layouts`` is the server's: a tuple of 64 entries, None or a struct format of the
 *   characters I, Q and q after "<", optionally ending in "z"; anything else there is treated as
 *   no layout.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "FUSE on virtio is little-endian; this module reads it in place"
#endif

#define HEADER 40
#define OPCODES 64
/* Longer than any fixed argument layout (SETATTR's 88 bytes). */
#define MAX_ARGS 128
/* The longest name decoded here, with its NUL and whatever the request puts after it: longer
 * ones (Linux sends none: NAME_MAX and XATTR_NAME_MAX are 255) are left to the server. */
#define MAX_NAME 1024

/* The size of the fixed fields of a layout "<..." of I, Q and q, maybe ending in z (*named is
 * then set), or -1. */
static Py_ssize_t
layout_size(PyObject *layout, int *named)
{
    if (!PyBytes_CheckExact(layout))
        return -1;
    const char *f = PyBytes_AS_STRING(layout);
    Py_ssize_t n = PyBytes_GET_SIZE(layout), size = 0;
    *named = n > 1 && f[n - 1] == 'z';
    if (*named)
        n--;
    if (n < 1 || f[0] != '<' || (n < 2 && !*named))
        return -1;
    for (Py_ssize_t i = 1; i < n; i++) {
        if (f[i] == 'I')
            size += 4;
        else if (f[i] == 'Q' || f[i] == 'q')
            size += 8;
        else
            return -1;
    }
    return size <= MAX_ARGS ? size : -1;
}

/* Copies n bytes at off of buffer object obj into dst; 0 when it isn't a buffer that long. */
static int
copy_out(PyObject *obj, Py_ssize_t off, Py_ssize_t n, unsigned char *dst, Py_ssize_t *len)
{
    Py_buffer b;
    if (PyObject_GetBuffer(obj, &b, PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0) {
        PyErr_Clear();
        return 0;
    }
    /* Only plain bytes: the Python decoding counts a buffer's length in items (len()), and
     * for these alone that is its length in bytes. */
    const char *f = b.format;
    if (b.ndim > 1 || b.itemsize != 1 ||
        (f != NULL && strcmp(f, "B") && strcmp(f, "b") && strcmp(f, "c"))) {
        PyBuffer_Release(&b);
        return 0;
    }
    *len = b.len;
    int ok = b.len >= off && b.len - off >= n;
    if (ok) {
        memcpy(dst, (const unsigned char *)b.buf + off, n);
        /* The compiler may not read guest memory again in place of the copy. */
        __asm__ __volatile__("" ::: "memory");
    }
    PyBuffer_Release(&b);
    return ok;
}

static inline uint32_t
u32(const unsigned char *at)
{
    uint32_t v;
    memcpy(&v, at, sizeof v);
    return v;
}

static inline uint64_t
u64(const unsigned char *at)
{
    uint64_t v;
    memcpy(&v, at, sizeof v);
    return v;
}

/* The fixed fields of format f (count of them) at at, and name (name_len bytes) after them
 * when name is not NULL. */
static PyObject *
decode_args(const char *f, Py_ssize_t count, const unsigned char *at, const unsigned char *name,
            Py_ssize_t name_len)
{
    PyObject *args = PyTuple_New(count + (name != NULL));
    if (args == NULL)
        return NULL;
    if (name != NULL) {
        PyObject *v = PyBytes_FromStringAndSize((const char *)name, name_len);
        if (v == NULL) {
            Py_DECREF(args);
            return NULL;
        }
        PyTuple_SET_ITEM(args, count, v);
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *v;
        if (f[i] == 'I') {
            v = PyLong_FromUnsignedLong(u32(at));
            at += 4;
        } else if (f[i] == 'Q') {
            v = PyLong_FromUnsignedLongLong(u64(at));
            at += 8;
        } else {
            v = PyLong_FromLongLong((int64_t)u64(at));
            at += 8;
        }
        if (v == NULL) {
            Py_DECREF(args);
            return NULL;
        }
        PyTuple_SET_ITEM(args, i, v);
    }
    return args;
}

static PyObject *
split(PyObject *module, PyObject *const *argv, Py_ssize_t argc)
{
    (void)module;
    if (argc != 2) {
        PyErr_SetString(PyExc_TypeError, "split(readable, layouts) takes two arguments");
        return NULL;
    }
    PyObject *readable = argv[0], *layouts = argv[1];
    if (!PyTuple_CheckExact(layouts) || PyTuple_GET_SIZE(layouts) != OPCODES) {
        PyErr_SetString(PyExc_TypeError, "layouts must be a tuple of 64 entries");
        return NULL;
    }
    if (!PyList_CheckExact(readable) && !PyTuple_CheckExact(readable))
        Py_RETURN_NONE;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(readable);
    if (count < 1)
        Py_RETURN_NONE;

    unsigned char raw[HEADER + MAX_ARGS + MAX_NAME];
    Py_ssize_t first_len = 0, next_len = 0;
    /* Strong references: nothing here runs Python code, but the list is the caller's. */
    PyObject *first = PySequence_Fast_ITEMS(readable)[0];
    PyObject *next = count > 1 ? PySequence_Fast_ITEMS(readable)[1] : NULL;
    Py_INCREF(first);
    Py_XINCREF(next);
    int have_args = 0, named = 0;
    PyObject *layout = NULL;
    Py_ssize_t size = -1, fixed = 0;
    if (!copy_out(first, 0, HEADER, raw, &first_len)) {
        Py_DECREF(first);
        Py_XDECREF(next);
        Py_RETURN_NONE;
    }
    uint32_t opcode = u32(raw + 4);
    if (opcode < OPCODES) {
        layout = PyTuple_GET_ITEM(layouts, opcode);
        size = fixed = layout_size(layout, &named);
    }
    if (named && size >= 0) {
        /* All the arguments the header declares, from the copy of the header. */
        uint16_t ext;
        memcpy(&ext, raw + 36, sizeof ext);
        int64_t declared = (int64_t)u32(raw) - HEADER - 8 * (int64_t)ext;
        size = declared > fixed && declared - fixed <= MAX_NAME ? (Py_ssize_t)declared : -1;
    }
    /* Where the bytes after the arguments begin: buffer index and offset. */
    Py_ssize_t rest_index = 0, rest_offset = 0;
    if (size > 0) {
        if (first_len > HEADER) {
            have_args = copy_out(first, HEADER, size, raw + HEADER, &first_len);
            rest_index = 0;
            rest_offset = HEADER + size;
            if (rest_offset == first_len) {
                rest_index = 1;
                rest_offset = 0;
            }
        } else if (next != NULL) {
            have_args = copy_out(next, 0, size, raw + HEADER, &next_len);
            rest_index = 1;
            rest_offset = size;
            if (rest_offset == next_len) {
                rest_index = 2;
                rest_offset = 0;
            }
        }
    }

    Py_DECREF(first);
    Py_XDECREF(next);

    /* Every byte is in raw now; no export is held from here on. */
    const unsigned char *name = NULL, *nul = NULL;
    if (have_args && named) {
        name = raw + HEADER + fixed;
        nul = memchr(name, 0, (size_t)(size - fixed));
        have_args = nul != NULL;
    }
    if (!have_args)
        rest_index = rest_offset = 0;
    PyObject *args;
    if (have_args) {
        args = decode_args(PyBytes_AS_STRING(layout) + 1,
                           PyBytes_GET_SIZE(layout) - 1 - named, raw + HEADER, name,
                           named ? nul - name : 0);
        if (args == NULL)
            return NULL;
    } else {
        args = Py_NewRef(Py_None);
    }
    uint16_t extlen;
    memcpy(&extlen, raw + 36, sizeof extlen);
    PyObject *out = PyTuple_New(11);
    if (out == NULL) {
        Py_DECREF(args);
        return NULL;
    }
    PyObject *fields[8] = {
        PyLong_FromUnsignedLong(u32(raw)),      PyLong_FromUnsignedLong(opcode),
        PyLong_FromUnsignedLongLong(u64(raw + 8)), PyLong_FromUnsignedLongLong(u64(raw + 16)),
        PyLong_FromUnsignedLong(u32(raw + 24)), PyLong_FromUnsignedLong(u32(raw + 28)),
        PyLong_FromUnsignedLong(u32(raw + 32)), PyLong_FromUnsignedLong(extlen),
    };
    int failed = 0;
    for (int i = 0; i < 8; i++) {
        if (fields[i] == NULL)
            failed = 1;
        PyTuple_SET_ITEM(out, i, fields[i] != NULL ? fields[i] : Py_NewRef(Py_None));
    }
    PyTuple_SET_ITEM(out, 8, args);
    PyObject *where[2] = {PyLong_FromSsize_t(rest_index), PyLong_FromSsize_t(rest_offset)};
    for (int i = 0; i < 2; i++) {
        if (where[i] == NULL)
            failed = 1;
        PyTuple_SET_ITEM(out, 9 + i, where[i] != NULL ? where[i] : Py_NewRef(Py_None));
    }
    if (failed) {
        Py_DECREF(out);
        return NULL;
    }
    return out;
}

static PyMethodDef methods[] = {
    {"split", (PyCFunction)(void (*)(void))split, METH_FASTCALL,
     "split(readable, layouts): (length, opcode, unique, nodeid, uid, gid, pid, total_extlen, "
     "args or None, index, offset), or None when the server must decode the request itself."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pyvirtiofsd.fuse._request", NULL, 0, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__request(void)
{
    return PyModule_Create(&module);
}
