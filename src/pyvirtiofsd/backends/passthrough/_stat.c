/*
 * pyvirtiofsd.backends.passthrough._stat: an inode's attributes from its fd, in C.
 *
 * An optional accelerator of pyvirtiofsd.backends.passthrough.inodes, built only with the
 * compiled variant (setup.py). fstat_attr(fd, flags) is Attr.from_stat(os.fstat(fd), None,
 * flags).raw without the os.stat_result between them: the fuse_attr bytes (88, little-endian,
 * the layout of pyvirtiofsd.fuse.abi.ATTR) made straight from the struct stat. fstat_entry(fd)
 * adds what identifies the inode (st_dev, st_ino, its type), for a lookup.
 *
 * Rules:
 * - Field for field what the Python path gives: times as the kernel's signed seconds in two's
 *   complement with nanoseconds in 0..999,999,999 (a timespec already is that), the link count
 *   and the device number cut to 32 bits; flags must fit 32 bits (else OverflowError, as the
 *   Python path's struct raises an error for it).
 * - It fails as os.fstat fails: OSError with the call's errno.
 * - The GIL is released around the call, as os.fstat releases it: a share on a file system
 *   that blocks (NFS) must not stop the other queues.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>

struct fuse_attr_le {
    uint64_t ino;
    uint64_t size;
    uint64_t blocks;
    uint64_t atime;
    uint64_t mtime;
    uint64_t ctime;
    uint32_t atimensec;
    uint32_t mtimensec;
    uint32_t ctimensec;
    uint32_t mode;
    uint32_t nlink;
    uint32_t uid;
    uint32_t gid;
    uint32_t rdev;
    uint32_t blksize;
    uint32_t flags;
};

_Static_assert(sizeof(struct fuse_attr_le) == 88, "fuse_attr is 88 bytes");

/* fstat(args[0]) into *st, the GIL released around it; 0, or -1 with an exception set. */
static int
do_fstat(PyObject *arg, struct stat *st)
{
    long fd = PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return -1;
    if (fd < INT_MIN || fd > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "fd out of range");
        return -1;
    }
    int rc;
    Py_BEGIN_ALLOW_THREADS
    rc = fstat((int)fd, st);
    Py_END_ALLOW_THREADS
    if (rc != 0) {
        PyErr_SetFromErrno(PyExc_OSError);
        return -1;
    }
    return 0;
}

/* The fuse_attr bytes of *st. */
static PyObject *
attr_bytes(const struct stat *st, uint32_t flags)
{
    struct fuse_attr_le a = {
        .ino = (uint64_t)st->st_ino,
        .size = (uint64_t)st->st_size,
        .blocks = (uint64_t)st->st_blocks,
        .atime = (uint64_t)st->st_atim.tv_sec,
        .mtime = (uint64_t)st->st_mtim.tv_sec,
        .ctime = (uint64_t)st->st_ctim.tv_sec,
        .atimensec = (uint32_t)st->st_atim.tv_nsec,
        .mtimensec = (uint32_t)st->st_mtim.tv_nsec,
        .ctimensec = (uint32_t)st->st_ctim.tv_nsec,
        .mode = (uint32_t)st->st_mode,
        .nlink = (uint32_t)st->st_nlink,
        .uid = (uint32_t)st->st_uid,
        .gid = (uint32_t)st->st_gid,
        .rdev = (uint32_t)st->st_rdev,
        .blksize = (uint32_t)st->st_blksize,
        .flags = flags,
    };
    return PyBytes_FromStringAndSize((const char *)&a, sizeof a);
}

static PyObject *
fstat_attr(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "fstat_attr(fd, flags)");
        return NULL;
    }
    unsigned long flags = PyLong_AsUnsignedLong(args[1]);
    if (flags == (unsigned long)-1 && PyErr_Occurred())
        return NULL;
    if (flags > UINT32_MAX) {
        PyErr_SetString(PyExc_OverflowError, "attribute flags take 32 bits");
        return NULL;
    }
    struct stat st;
    if (do_fstat(args[0], &st) != 0)
        return NULL;
    return attr_bytes(&st, (uint32_t)flags);
}

static PyObject *
fstat_entry(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 1) {
        PyErr_SetString(PyExc_TypeError, "fstat_entry(fd)");
        return NULL;
    }
    struct stat st;
    if (do_fstat(args[0], &st) != 0)
        return NULL;
    PyObject *raw = attr_bytes(&st, 0);
    if (raw == NULL)
        return NULL;
    return Py_BuildValue(
        "(NKKI)", raw, (unsigned long long)st.st_dev, (unsigned long long)st.st_ino,
        (unsigned int)(st.st_mode & S_IFMT));
}

static PyMethodDef methods[] = {
    {"fstat_attr", (PyCFunction)(void (*)(void))fstat_attr, METH_FASTCALL,
     "fstat_attr(fd, flags) -> bytes: the fuse_attr of fstat(fd), flags included."},
    {"fstat_entry", (PyCFunction)(void (*)(void))fstat_entry, METH_FASTCALL,
     "fstat_entry(fd) -> (fuse_attr bytes with flags 0, st_dev, st_ino, S_IFMT(st_mode))."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "pyvirtiofsd.backends.passthrough._stat", NULL, 0, methods,
};

PyMODINIT_FUNC
PyInit__stat(void)
{
    return PyModule_Create(&module);
}
