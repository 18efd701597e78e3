/*
 * pyvirtiofsd.virtio._barrier: a full memory barrier for pyvirtiofsd.virtio.queue.
 *
 * An optional accelerator, built only with the compiled variant (setup.py). The queue needs a
 * store to guest memory to be visible before a following load (the event index published, then
 * the available index read again; the used index published, then the driver's used_event read).
 * Without this module, taking and releasing a lock gives that barrier; this one is a single
 * sequentially consistent fence, without the lock's argument parsing and deadline arithmetic.
 *
 * Rules: no arguments, no errors, no allocation; it only orders this thread's memory accesses.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

static PyObject *
fence(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"fence", fence, METH_NOARGS, "fence(): a full memory barrier (loads and stores)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pyvirtiofsd.virtio._barrier", NULL, 0, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__barrier(void)
{
    return PyModule_Create(&module);
}
