/*
 * pyvirtiofsd.fuse._buffers: a reply's bytes stored into the guest's buffer in C.
 *
 * An optional accelerator of pyvirtiofsd.fuse.buffers.ReplyWriter, built only with the compiled
 * variant (setup.py). A store through a memoryview slice (``view[a:b] = data``) makes a slice
 * object, a view of it and a buffer request of each side before its one memcpy; packing the out
 * header with struct parses its arguments by format. These do the copy alone:
 *
 * - put(view, offset, data): data's bytes into view at offset;
 * - put_header(view, length, error, unique): the FUSE out header (u32 len, s32 error,
 *   u64 unique, little-endian) at the start of view;
 * - pread_into(view, start, size, fd, offset): a READ's data read from the file straight into
 *   one view, where os.preadv would take a list of views, each a slice made for it, and build
 *   an iovec array from it. It releases the GIL for the read and makes it again after a
 *   signal, as os.preadv does (PEP 475), and raises OSError with the read's errno.
 *
 * Rules: the target is a contiguous writable buffer of single bytes, the data a contiguous
 * buffer of single bytes, and what is stored lies inside the target; anything else is an error
 * (ValueError, TypeError, BufferError, OverflowError) and nothing is stored. That is what the
 * transports give (contiguous byte views) and what the server stores (bytes); a slice store
 * takes some other buffers too (a strided target), but never data of wider items, which it
 * refuses as this does. put and put_header hold the GIL throughout, and none runs Python code
 * while it holds a buffer.
 */
#include "../_cio.h"
#include <stdint.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "FUSE on virtio is little-endian; this module writes it in place"
#endif

static PyObject *
put(PyObject *module, PyObject *const *argv, Py_ssize_t argc)
{
    (void)module;
    if (argc != 3) {
        PyErr_SetString(PyExc_TypeError, "put(view, offset, data) takes 3 arguments");
        return NULL;
    }
    Py_ssize_t offset = PyLong_AsSsize_t(argv[1]);
    if (offset == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer src;
    if (!bytes_of(argv[2], &src, 0))
        return NULL;
    Py_buffer dst;
    if (!bytes_of(argv[0], &dst, PyBUF_WRITABLE)) {
        PyBuffer_Release(&src);
        return NULL;
    }
    int fits = offset >= 0 && offset <= dst.len && src.len <= dst.len - offset;
    if (fits)
        memmove((char *)dst.buf + offset, src.buf, src.len);
    PyBuffer_Release(&dst);
    PyBuffer_Release(&src);
    if (!fits) {
        PyErr_SetString(PyExc_ValueError, "put: the data does not fit where it goes");
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyObject *
put_header(PyObject *module, PyObject *const *argv, Py_ssize_t argc)
{
    (void)module;
    if (argc != 4) {
        PyErr_SetString(PyExc_TypeError, "put_header(view, length, error, unique) takes 4 arguments");
        return NULL;
    }
    unsigned long length = PyLong_AsUnsignedLong(argv[1]);
    if (length == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    long error = PyLong_AsLong(argv[2]);
    if (error == -1 && PyErr_Occurred())
        return NULL;
    unsigned long long unique = PyLong_AsUnsignedLongLong(argv[3]);
    if (unique == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (length > UINT32_MAX || error < INT32_MIN || error > INT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "put_header: a field does not fit its width");
        return NULL;
    }
    Py_buffer dst;
    if (!bytes_of(argv[0], &dst, PyBUF_WRITABLE))
        return NULL;
    if (dst.len < 16) {
        PyBuffer_Release(&dst);
        PyErr_SetString(PyExc_ValueError, "put_header: the buffer is shorter than the header");
        return NULL;
    }
    uint32_t len32 = (uint32_t)length;
    int32_t err32 = (int32_t)error;
    uint64_t unique64 = (uint64_t)unique;
    memcpy((char *)dst.buf, &len32, 4);
    memcpy((char *)dst.buf + 4, &err32, 4);
    memcpy((char *)dst.buf + 8, &unique64, 8);
    PyBuffer_Release(&dst);
    Py_RETURN_NONE;
}

static PyObject *
pread_into(PyObject *module, PyObject *const *argv, Py_ssize_t argc)
{
    (void)module;
    if (argc != 5) {
        PyErr_SetString(PyExc_TypeError, "pread_into(view, start, size, fd, offset) takes 5 arguments");
        return NULL;
    }
    Py_ssize_t start = PyLong_AsSsize_t(argv[1]);
    if (start == -1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t size = PyLong_AsSsize_t(argv[2]);
    if (size == -1 && PyErr_Occurred())
        return NULL;
    int fd;
    if (!fd_of(argv[3], &fd))
        return NULL;
    long long offset = PyLong_AsLongLong(argv[4]);
    if (offset == -1 && PyErr_Occurred())
        return NULL;
    if (offset < 0) {
        PyErr_SetString(PyExc_ValueError, "pread_into: a negative offset");
        return NULL;
    }
    Py_buffer dst;
    if (!bytes_of(argv[0], &dst, PyBUF_WRITABLE))
        return NULL;
    if (start < 0 || size < 0 || start > dst.len || size > dst.len - start) {
        PyBuffer_Release(&dst);
        PyErr_SetString(PyExc_ValueError, "pread_into: the range is not inside the buffer");
        return NULL;
    }
    PyObject *n = io_call(pread, fd, (char *)dst.buf + start, (size_t)size, (off_t)offset);
    PyBuffer_Release(&dst);
    return n;
}

static PyMethodDef methods[] = {
    {"put", (PyCFunction)(void (*)(void))put, METH_FASTCALL,
     "put(view, offset, data): store data's bytes into view at offset."},
    {"put_header", (PyCFunction)(void (*)(void))put_header, METH_FASTCALL,
     "put_header(view, length, error, unique): store the FUSE out header at view's start."},
    {"pread_into", (PyCFunction)(void (*)(void))pread_into, METH_FASTCALL,
     "pread_into(view, start, size, fd, offset): pread(2) size bytes of fd at offset into view "
     "at start, the GIL released; the byte count."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pyvirtiofsd.fuse._buffers", NULL, 0, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__buffers(void)
{
    return PyModule_Create(&module);
}
