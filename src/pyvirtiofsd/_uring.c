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
 * Rules: no allocation but the exception's; arguments out of range are a ValueError, never
 * passed on truncated.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <stdint.h>
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

static PyMethodDef methods[] = {
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
