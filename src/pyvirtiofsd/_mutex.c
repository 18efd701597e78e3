/*
 * pyvirtiofsd._mutex: the lock of pyvirtiofsd.mutex, for the compiled build.
 *
 * An optional accelerator, built only with the compiled variant (setup.py). Every request takes
 * a few short locks (the used ring's, an inode's pin count, a file handle's users). CPython 3.11's
 * threading.Lock parses acquire()'s arguments and reads the monotonic clock for a deadline on
 * every acquisition, a free lock included; this one is a semaphore of one tried with a single
 * atomic operation, and waited for, with the GIL released, only when another thread holds it.
 *
 * The module's acquire(lock) and release(lock) are lock.acquire() and lock.release() as plain
 * functions, which a compiled caller calls without looking a method up by name; given any other
 * lock, they call its methods.
 *
 * Rules: it behaves as threading.Lock does for everything the project uses (with, acquire with
 * blocking and timeout, release, locked): not reentrant, released by any thread, RuntimeError
 * for releasing a lock that is not held, ValueError or OverflowError for a timeout threading
 * refuses. While the main thread waits, its signal handlers run, and an exception one raises
 * ends the wait without the lock, as with threading.Lock: a lock can be held across a close()
 * that hangs on a stuck mount, and a SIGTERM must still end the daemon.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <math.h>
#include <semaphore.h>
#include <time.h>

typedef struct {
    PyObject_HEAD
    sem_t sem;
} Mutex;

static PyObject *
mutex_new(PyTypeObject *type, PyObject *args, PyObject *kwds)
{
    if (PyTuple_GET_SIZE(args) || (kwds != NULL && PyDict_GET_SIZE(kwds))) {
        PyErr_SetString(PyExc_TypeError, "Mutex() takes no arguments");
        return NULL;
    }
    Mutex *self = (Mutex *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    if (sem_init(&self->sem, 0, 1) != 0) {
        Py_DECREF(self);
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    return (PyObject *)self;
}

static void
mutex_dealloc(Mutex *self)
{
    sem_destroy(&self->sem);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* Take the lock: at once if it is free, else waiting with the GIL released; timeout < 0 waits
 * for good. Returns 1 when taken, 0 when the timeout passed first, -1 with an exception set when
 * a signal handler raised one meanwhile (the main thread runs its handlers while it waits, as
 * threading.Lock lets it: a SIGTERM must never wait for a lock). */
static int
take(Mutex *self, double timeout)
{
    if (sem_trywait(&self->sem) == 0)
        return 1;
    if (timeout == 0)
        return 0;
    struct timespec until;
    if (timeout > 0) {
        clock_gettime(CLOCK_MONOTONIC, &until);
        double whole = floor(timeout);
        until.tv_sec += (time_t)whole;
        until.tv_nsec += (long)((timeout - whole) * 1e9);
        if (until.tv_nsec >= 1000000000L) {
            until.tv_sec += 1;
            until.tv_nsec -= 1000000000L;
        }
    }
    for (;;) {
        int rc, err;
        Py_BEGIN_ALLOW_THREADS
        rc = timeout < 0 ? sem_wait(&self->sem)
                         : sem_clockwait(&self->sem, CLOCK_MONOTONIC, &until);
        err = errno;
        Py_END_ALLOW_THREADS
        if (rc == 0)
            return 1;
        if (err == ETIMEDOUT)
            return 0;
        if (err != EINTR) {
            errno = err;
            PyErr_SetFromErrno(PyExc_OSError);
            return -1;
        }
        /* Only the main thread runs handlers; elsewhere this does nothing. */
        if (PyErr_CheckSignals() < 0)
            return -1;
    }
}

static PyObject *
mutex_enter(Mutex *self, PyObject *unused)
{
    (void)unused;
    if (take(self, -1) < 0)
        return NULL;
    Py_RETURN_TRUE;
}

/* acquire()'s answer from take(): True, False, or the exception a signal handler raised. */
static PyObject *
taken(int rc)
{
    return rc < 0 ? NULL : PyBool_FromLong(rc);
}

static PyObject *
mutex_release(Mutex *self, PyObject *unused)
{
    (void)unused;
    int value;
    /* A lock that is held has the value 0; releasing a free one is the caller's bug. */
    if (sem_getvalue(&self->sem, &value) != 0 || value > 0) {
        PyErr_SetString(PyExc_RuntimeError, "release unlocked lock");
        return NULL;
    }
    sem_post(&self->sem);
    Py_RETURN_NONE;
}

static PyObject *
mutex_exit(Mutex *self, PyObject *const *args, Py_ssize_t nargs)
{
    (void)args;
    (void)nargs;
    return mutex_release(self, NULL);
}

static PyObject *
mutex_acquire(Mutex *self, PyObject *args, PyObject *kwds)
{
    static char *names[] = {"blocking", "timeout", NULL};
    int blocking = 1;
    double timeout = -1;
    /* acquire() as the request path calls it: nothing to parse. */
    if (PyTuple_GET_SIZE(args) == 0 && (kwds == NULL || PyDict_GET_SIZE(kwds) == 0))
        return taken(take(self, -1));
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|pd:acquire", names, &blocking, &timeout))
        return NULL;
    if (!blocking && timeout != -1) {
        PyErr_SetString(PyExc_ValueError, "can't specify a timeout for a non-blocking call");
        return NULL;
    }
    if (isnan(timeout) || (timeout < 0 && timeout != -1)) {
        PyErr_SetString(PyExc_ValueError, "timeout value must be a non-negative number");
        return NULL;
    }
    /* threading.TIMEOUT_MAX: the longest wait threading.Lock takes. */
    if (timeout > (double)PY_TIMEOUT_MAX / 1e6) {
        PyErr_SetString(PyExc_OverflowError, "timeout value is too large");
        return NULL;
    }
    return taken(take(self, blocking ? timeout : 0));
}

static PyObject *
mutex_locked(Mutex *self, PyObject *unused)
{
    (void)unused;
    int value = 1;
    sem_getvalue(&self->sem, &value);
    return PyBool_FromLong(value <= 0);
}

static PyMethodDef mutex_methods[] = {
    {"__enter__", (PyCFunction)mutex_enter, METH_NOARGS, "Take the lock, waiting if need be."},
    {"__exit__", (PyCFunction)(void (*)(void))mutex_exit, METH_FASTCALL, "Release the lock."},
    {"acquire", (PyCFunction)(void (*)(void))mutex_acquire, METH_VARARGS | METH_KEYWORDS,
     "acquire(blocking=True, timeout=-1): as threading.Lock.acquire."},
    {"release", (PyCFunction)mutex_release, METH_NOARGS, "Release the lock."},
    {"locked", (PyCFunction)mutex_locked, METH_NOARGS, "Whether the lock is held."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject MutexType;

/* acquire(lock): lock.acquire(), waiting as long as it takes; returns True. */
static PyObject *
module_acquire(PyObject *module, PyObject *lock)
{
    (void)module;
    if (Py_TYPE(lock) != &MutexType)
        return PyObject_CallMethod(lock, "acquire", NULL);
    return taken(take((Mutex *)lock, -1));
}

/* release(lock): lock.release(). */
static PyObject *
module_release(PyObject *module, PyObject *lock)
{
    (void)module;
    if (Py_TYPE(lock) != &MutexType)
        return PyObject_CallMethod(lock, "release", NULL);
    return mutex_release((Mutex *)lock, NULL);
}

static PyMethodDef module_methods[] = {
    {"acquire", (PyCFunction)module_acquire, METH_O, "acquire(lock): lock.acquire()."},
    {"release", (PyCFunction)module_release, METH_O, "release(lock): lock.release()."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject MutexType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pyvirtiofsd._mutex.Mutex",
    .tp_basicsize = sizeof(Mutex),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "A lock as threading.Lock, taken at the cost of one atomic operation when free.",
    .tp_new = mutex_new,
    .tp_dealloc = (destructor)mutex_dealloc,
    .tp_methods = mutex_methods,
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pyvirtiofsd._mutex",
    .m_doc = "The lock of pyvirtiofsd.mutex, in C.",
    .m_size = -1,
    .m_methods = module_methods,
};

PyMODINIT_FUNC
PyInit__mutex(void)
{
    if (PyType_Ready(&MutexType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    Py_INCREF(&MutexType);
    if (PyModule_AddObject(m, "Mutex", (PyObject *)&MutexType) < 0) {
        Py_DECREF(&MutexType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
