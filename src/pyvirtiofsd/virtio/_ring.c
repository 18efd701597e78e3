/*
 * pyvirtiofsd.virtio._ring: the stores and the barrier of pyvirtiofsd.virtio.queue, in C.
 *
 * An optional accelerator, built only with the compiled variant (setup.py); without it the
 * queue does the same through memoryview casts and a lock.
 *
 * - fence(): a full memory barrier. The queue needs a store to guest memory to be visible
 *   before a following load (the event index published, then the available index read again;
 *   the used index published, then the driver's used_event read). Without this module, taking
 *   and releasing a lock gives that barrier; this is one sequentially consistent fence.
 * - push(used, slot, head, length, idx): a used entry and the used index, stored as
 *   SplitQueue.push_used stores them: the entry's two 32-bit words at 32-bit slot ``slot`` of
 *   the used ring, then the 16-bit index at byte 2 with release order, so the driver never sees
 *   the index before the entry. One call instead of three item stores through casts.
 *
 * Rules: the used ring is a writable buffer of the caller's; an entry or index outside it is a
 * ValueError, never a store. On an aligned ring (as the spec places it) each field is one
 * store, never torn. No allocation.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#if !defined(__BYTE_ORDER__) || __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "virtqueues are little-endian; this module stores to them in place"
#endif

static PyObject *
fence(PyObject *module, PyObject *unused)
{
    (void)module;
    (void)unused;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    Py_RETURN_NONE;
}

static PyObject *
push(PyObject *module, PyObject *const *argv, Py_ssize_t argc)
{
    (void)module;
    if (argc != 5) {
        PyErr_SetString(PyExc_TypeError, "push(used, slot, head, length, idx) takes 5 arguments");
        return NULL;
    }
    Py_ssize_t slot = PyLong_AsSsize_t(argv[1]);
    if (slot == -1 && PyErr_Occurred())
        return NULL;
    unsigned long head = PyLong_AsUnsignedLong(argv[2]);
    if (head == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    unsigned long length = PyLong_AsUnsignedLong(argv[3]);
    if (length == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    unsigned long idx = PyLong_AsUnsignedLong(argv[4]);
    if (idx == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    if (head > UINT32_MAX || length > UINT32_MAX || idx > UINT16_MAX) {
        PyErr_SetString(PyExc_ValueError, "push: a field does not fit its width");
        return NULL;
    }
    Py_buffer b;
    if (PyObject_GetBuffer(argv[0], &b, PyBUF_WRITABLE) < 0)
        return NULL;
    if (slot < 1 || b.len < 8 || slot > (b.len - 8) / 4) {
        PyBuffer_Release(&b);
        PyErr_SetString(PyExc_ValueError, "push: the entry lies outside the used ring");
        return NULL;
    }
    if (((uintptr_t)b.buf & 3) == 0) {
        uint32_t *entry = (uint32_t *)b.buf + slot;
        __atomic_store_n(entry, (uint32_t)head, __ATOMIC_RELAXED);
        __atomic_store_n(entry + 1, (uint32_t)length, __ATOMIC_RELAXED);
        __atomic_store_n((uint16_t *)b.buf + 1, (uint16_t)idx, __ATOMIC_RELEASE);
    } else {
        /* A ring the driver misplaced (the spec aligns it): stored as the casts store it. */
        uint32_t words[2] = {(uint32_t)head, (uint32_t)length};
        uint16_t index = (uint16_t)idx;
        memcpy((unsigned char *)b.buf + 4 * slot, words, sizeof words);
        __atomic_thread_fence(__ATOMIC_RELEASE);
        memcpy((unsigned char *)b.buf + 2, &index, sizeof index);
    }
    PyBuffer_Release(&b);
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"fence", fence, METH_NOARGS, "fence(): a full memory barrier (loads and stores)."},
    {"push", (PyCFunction)(void (*)(void))push, METH_FASTCALL,
     "push(used, slot, head, length, idx): store a used entry, then the used index."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pyvirtiofsd.virtio._ring", NULL, 0, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC
PyInit__ring(void)
{
    return PyModule_Create(&module);
}
