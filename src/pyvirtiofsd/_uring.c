/*
 * pyvirtiofsd._uring: io_uring_enter(2) for pyvirtiofsd.uring, without ctypes.
 *
 * An optional accelerator, built only with the compiled variant (setup.py); without it the
 * ring enters the kernel through ctypes, which costs about a microsecond more per call: the
 * call is made once per FUSE request a queue serves.
 *
 * enter(fd, to_submit, min_complete, flags) -> int: the system call with no signal mask, the
 * GIL released while it runs. Returns what it returns (the entries submitted); 0 when a signal
 * ended the wait (EINTR: the caller looks at its completions and enters again); OSError for
 * any other error.
 *
 * stage(entry) -> int and finish(entry, reply) -> int: the two steps of
 * pyvirtiofsd.transport.fuse_uring's queue around the server, on an entry's buffer (the kernel's
 * header page, then the payload), exactly as that module's Python does them (see its
 * _stage_py and _finish_py): stage puts the request together at SCRATCH (the in header, the
 * fixed arguments, and a payload of up to SMALL bytes) and returns how many bytes it put there,
 * or -1 for a request whose sizes do not add up; finish stores the reply's payload size (an
 * EIO header first for a reply shorter than a header) and returns the commit id.
 *
 * Rules: no allocation but the exception's; arguments out of range are a ValueError, never
 * passed on truncated. A buffer shorter than the header page and the payload size it claims is
 * a ValueError: nothing is read or written outside it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#ifndef __NR_io_uring_enter
#define __NR_io_uring_enter 426
#endif

static PyObject *
enter(PyObject *module, PyObject *const *argv, Py_ssize_t argc)
{
    (void)module;
    if (argc != 4) {
        PyErr_SetString(PyExc_TypeError, "enter(fd, to_submit, min_complete, flags) takes 4 arguments");
        return NULL;
    }
    unsigned long v[4];
    for (int i = 0; i < 4; i++) {
        v[i] = PyLong_AsUnsignedLong(argv[i]);
        if (v[i] == (unsigned long)-1 && PyErr_Occurred())
            return NULL;
        if (v[i] > UINT32_MAX) {
            PyErr_SetString(PyExc_ValueError, "enter: an argument does not fit 32 bits");
            return NULL;
        }
    }
    long result;
    int err;
    Py_BEGIN_ALLOW_THREADS
    result = syscall(__NR_io_uring_enter, (unsigned int)v[0], (unsigned int)v[1],
                     (unsigned int)v[2], (unsigned int)v[3], NULL, (size_t)0);
    err = errno;
    Py_END_ALLOW_THREADS
    if (result < 0) {
        if (err == EINTR)
            return PyLong_FromLong(0);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return PyLong_FromLong(result);
}

/* The layout of pyvirtiofsd.transport.fuse_uring (kept equal by its tests). */
#define PAGE 4096
#define IN_SIZE 40
#define OUT_SIZE 16
#define OP_IN 128
#define COMMIT_ID 264
#define PAYLOAD_SZ 272
#define SCRATCH 512
#define SMALL 1024

static int
entry_buffer(PyObject *obj, Py_buffer *b)
{
    if (PyObject_GetBuffer(obj, b, PyBUF_WRITABLE) < 0)
        return -1;
    if (b->len < PAGE) {
        PyBuffer_Release(b);
        PyErr_SetString(PyExc_ValueError, "an entry's buffer is at least a page");
        return -1;
    }
    return 0;
}

static PyObject *
stage(PyObject *module, PyObject *entry)
{
    (void)module;
    Py_buffer b;
    if (entry_buffer(entry, &b) < 0)
        return NULL;
    unsigned char *p = b.buf;
    uint32_t length, payload_len;
    memcpy(&length, p, 4);
    memcpy(&payload_len, p + PAYLOAD_SZ, 4);
    long args_len = (long)length - IN_SIZE - (long)payload_len;
    long staged = -1;
    if (args_len >= 0 && args_len <= OP_IN && payload_len <= (uint64_t)(b.len - PAGE)) {
        memcpy(p + SCRATCH, p, IN_SIZE);
        memcpy(p + SCRATCH + IN_SIZE, p + OP_IN, (size_t)args_len);
        staged = IN_SIZE + args_len;
        if (payload_len <= SMALL) {
            memcpy(p + SCRATCH + staged, p + PAGE, payload_len);
            staged += payload_len;
        }
    }
    PyBuffer_Release(&b);
    return PyLong_FromLong(staged);
}

static PyObject *
finish(PyObject *module, PyObject *const *argv, Py_ssize_t argc)
{
    (void)module;
    if (argc != 2) {
        PyErr_SetString(PyExc_TypeError, "finish(entry, reply) takes 2 arguments");
        return NULL;
    }
    long reply = PyLong_AsLong(argv[1]);
    if (reply == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer b;
    if (entry_buffer(argv[0], &b) < 0)
        return NULL;
    if (reply > (long)(b.len - PAGE + OUT_SIZE)) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "finish: a reply longer than the entry's buffers");
        return NULL;
    }
    unsigned char *p = b.buf;
    if (reply < OUT_SIZE) {
        uint32_t len = OUT_SIZE;
        int32_t error = -EIO;
        memcpy(p, &len, 4);
        memcpy(p + 4, &error, 4);  /* the unique at 8 stays the request's */
        reply = OUT_SIZE;
    }
    uint32_t size = (uint32_t)(reply - OUT_SIZE);
    memcpy(p + PAYLOAD_SZ, &size, 4);
    uint64_t commit_id;
    memcpy(&commit_id, p + COMMIT_ID, 8);
    PyBuffer_Release(&b);
    return PyLong_FromUnsignedLongLong(commit_id);
}

static PyMethodDef methods[] = {
    {"stage", stage, METH_O, "stage(entry): put the request together; bytes staged, or -1."},
    {"finish", (PyCFunction)(void (*)(void))finish, METH_FASTCALL,
     "finish(entry, reply): store the payload size; the commit id."},
    {"enter", (PyCFunction)(void (*)(void))enter, METH_FASTCALL,
     "enter(fd, to_submit, min_complete, flags): io_uring_enter(2), the GIL released."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pyvirtiofsd._uring", NULL, 0, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__uring(void)
{
    return PyModule_Create(&module);
}
