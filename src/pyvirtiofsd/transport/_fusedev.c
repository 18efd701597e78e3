/*
 * pyvirtiofsd.transport._fusedev: a /dev/fuse worker's read and write in C.
 *
 * An optional accelerator of pyvirtiofsd.transport.fusedev, built only with the compiled
 * variant (setup.py). os.readv builds an iovec array from a list for each request, and a reply
 * written with os.write needs a slice of the worker's buffer (a slice object and a memoryview)
 * and a buffer request before its one system call. These do the system call alone:
 *
 * - receive(fd, buf): read(2) of one request into buf, the GIL released while it waits; the
 *   byte count;
 * - send(fd, buf, length): write(2) of buf's first length bytes, one reply, the GIL released;
 *   the byte count.
 *
 * Rules: buf is a contiguous buffer of single bytes (writable for receive) and length lies
 * within it; anything else is an error (ValueError, TypeError, BufferError) and nothing is read
 * or written. A failed system call raises OSError with its errno, and one a signal interrupts
 * is made again once the signal's handlers have run, as os.read and os.write do (PEP 475).
 * Both let go of the GIL during the system call. Writing a reply never waits for another
 * process, but it wakes the reply's caller, whose next request then wakes another worker: that
 * worker must find the GIL free (held through the write, create/stat/unlink through a mount
 * took about a tenth more CPU and more context switches: that worker waited for it).
 */
#include "../_cio.h"

static ssize_t
read_at(int fd, void *buf, size_t len, off_t offset)
{
    (void)offset;
    return read(fd, buf, len);
}

static ssize_t
write_at(int fd, void *buf, size_t len, off_t offset)
{
    (void)offset;
    return write(fd, buf, len);
}

static PyObject *
receive(PyObject *module, PyObject *const *argv, Py_ssize_t argc)
{
    (void)module;
    if (argc != 2) {
        PyErr_SetString(PyExc_TypeError, "receive(fd, buf)");
        return NULL;
    }
    int fd;
    if (!fd_of(argv[0], &fd))
        return NULL;
    Py_buffer b;
    if (!bytes_of(argv[1], &b, PyBUF_WRITABLE))
        return NULL;
    PyObject *n = io_call(read_at, fd, b.buf, (size_t)b.len, 0);
    PyBuffer_Release(&b);
    return n;
}

static PyObject *
send(PyObject *module, PyObject *const *argv, Py_ssize_t argc)
{
    (void)module;
    if (argc != 3) {
        PyErr_SetString(PyExc_TypeError, "send(fd, buf, length)");
        return NULL;
    }
    int fd;
    if (!fd_of(argv[0], &fd))
        return NULL;
    Py_ssize_t length = PyLong_AsSsize_t(argv[2]);
    if (length == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer b;
    if (!bytes_of(argv[1], &b, PyBUF_SIMPLE))
        return NULL;
    if (length < 0 || length > b.len) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "length outside the buffer");
        return NULL;
    }
    PyObject *n = io_call(write_at, fd, b.buf, (size_t)length, 0);
    PyBuffer_Release(&b);
    return n;
}

static PyMethodDef methods[] = {
    {"receive", (PyCFunction)(void (*)(void))receive, METH_FASTCALL,
     "receive(fd, buf): read one request into buf (the GIL released); the byte count."},
    {"send", (PyCFunction)(void (*)(void))send, METH_FASTCALL,
     "send(fd, buf, length): write buf's first length bytes; the byte count."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pyvirtiofsd.transport._fusedev", NULL, 0, methods, NULL, NULL, NULL,
    NULL,
};

PyMODINIT_FUNC
PyInit__fusedev(void)
{
    return PyModule_Create(&module);
}
