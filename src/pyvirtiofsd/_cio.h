/*
 * What the hand-written C modules that move bytes between buffers and file descriptors share
 * (fuse/_buffers.c, transport/_fusedev.c): included, not linked, so each stays one extension.
 *
 * - bytes_of(obj, &b, flags): obj's contiguous buffer of single bytes (writable if flags say so);
 * - fd_of(obj, &fd): a file descriptor (0 to INT_MAX);
 * - io_call(fn, fd, buf, len, offset): one read or write system call, the GIL released, made
 *   again after a signal whose handlers return, as os.read and os.write do (PEP 475).
 *
 * Rules: each returns 0 or NULL with an exception set when it fails (ValueError for a buffer of
 * wider items or a negative descriptor, OSError with the system call's errno), and releases
 * nothing it did not acquire: the caller releases the buffer after io_call.
 */
#ifndef PYVIRTIOFSD_CIO_H
#define PYVIRTIOFSD_CIO_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <string.h>
#include <sys/types.h>
#include <unistd.h>

static int
bytes_of(PyObject *obj, Py_buffer *b, int flags)
{
    if (PyObject_GetBuffer(obj, b, flags | PyBUF_C_CONTIGUOUS | PyBUF_FORMAT) < 0)
        return 0;
    const char *f = b->format;
    if (b->ndim > 1 || b->itemsize != 1 || (f != NULL && strcmp(f, "B") && strcmp(f, "b") &&
                                            strcmp(f, "c"))) {
        PyBuffer_Release(b);
        PyErr_SetString(PyExc_ValueError, "a buffer of single bytes is needed");
        return 0;
    }
    return 1;
}

static int
fd_of(PyObject *obj, int *fd)
{
    long v = PyLong_AsLong(obj);
    if (v == -1 && PyErr_Occurred())
        return 0;
    if (v < 0 || v > INT_MAX) {
        PyErr_SetString(PyExc_ValueError, "not a file descriptor");
        return 0;
    }
    *fd = (int)v;
    return 1;
}

/* A read or write system call in pread's shape (the offset unused by read and write). */
typedef ssize_t (*io_fn)(int fd, void *buf, size_t len, off_t offset);

static PyObject *
io_call(io_fn fn, int fd, void *buf, size_t len, off_t offset)
{
    ssize_t n;
    int err;
    do {
        Py_BEGIN_ALLOW_THREADS
        n = fn(fd, buf, len, offset);
        err = errno;
        Py_END_ALLOW_THREADS
    } while (n < 0 && err == EINTR && PyErr_CheckSignals() == 0);
    if (n >= 0)
        return PyLong_FromSsize_t(n);
    if (PyErr_Occurred())
        return NULL; /* a signal handler raised */
    errno = err;
    return PyErr_SetFromErrno(PyExc_OSError);
}

#endif
