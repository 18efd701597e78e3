/*
 * pyvirtiofsd.backends.passthrough._stat: an inode's attributes from its fd, in C.
 *
 * An optional accelerator of pyvirtiofsd.backends.passthrough.inodes, built only with the
 * compiled variant (setup.py). fstat_attr(fd, flags) is Attr.from_stat(os.fstat(fd), None,
 * flags).raw without the os.stat_result between them: the fuse_attr bytes (88, little-endian,
 * the layout of pyvirtiofsd.fuse.abi.ATTR) made straight from the struct stat. fstat_entry(fd)
 * adds what identifies the inode (st_dev, st_ino, its type), for a lookup. open_at(dir_fd,
 * name, flags) is os.open(name, flags, dir_fd=dir_fd) that answers a failure with minus its
 * errno instead of an OSError: a name that is not there is a lookup's everyday answer, and an
 * exception raised through the compiled frames above costs more than the rest of the lookup.
 * reopen(proc_fd_dir, fd, flags) is open_at(proc_fd_dir, b"%d" % fd, flags), the file fd refers
 * to opened anew through its /proc/self/fd link, without making the name in Python.
 * dir_entries(fd, size) is one getdents64(fd) of up to size bytes, its records taken apart:
 * a list of (d_ino, d_off, d_type, name), empty at the end of the directory.
 *
 * Rules:
 * - Field for field what the Python path gives: times as the kernel's signed seconds in two's
 *   complement with nanoseconds in 0..999,999,999 (a timespec already is that), the link count
 *   and the device number cut to 32 bits; flags must fit 32 bits (else OverflowError, as the
 *   Python path's struct raises an error for it).
 * - It fails as os.fstat fails: OSError with the call's errno (open_at: only for arguments that
 *   os.open would refuse before the call, with the same exception type).
 * - The GIL is released around the call, as os.fstat releases it: a share on a file system
 *   that blocks (NFS) must not stop the other queues.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <unistd.h>

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

/* An int argument that must fit a C int, as os.open's are. */
static int
int_arg(PyObject *arg, int *out)
{
    long v = PyLong_AsLong(arg);
    if (v == -1 && PyErr_Occurred())
        return -1;
    if (v < INT_MIN || v > INT_MAX) {
        PyErr_SetString(PyExc_OverflowError, "signed integer is out of range for a C int");
        return -1;
    }
    *out = (int)v;
    return 0;
}

/* openat(dir_fd, name, flags | O_CLOEXEC) with the GIL released and EINTR retried: the new fd
 * as an int, or minus the errno of the failure. Mode 0: nothing is made (the callers refuse
 * O_CREAT and O_TMPFILE). */
static PyObject *
opened(int dir_fd, const char *name, int flags)
{
    int fd, err = 0;
    Py_BEGIN_ALLOW_THREADS
    do {
        fd = openat(dir_fd, name, flags | O_CLOEXEC, 0);
    } while (fd < 0 && (err = errno) == EINTR);
    Py_END_ALLOW_THREADS
    if (fd < 0)
        /* Never 0: that would read as a descriptor. */
        return PyLong_FromLong(err ? -err : -EIO);
    PyObject *result = PyLong_FromLong(fd);
    if (result == NULL)
        close(fd);
    return result;
}

static PyObject *
open_at(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "open_at(dir_fd, name, flags)");
        return NULL;
    }
    int dir_fd, flags;
    if (int_arg(args[0], &dir_fd) != 0 || int_arg(args[2], &flags) != 0)
        return NULL;
    if (flags & (O_CREAT | (O_TMPFILE & ~O_DIRECTORY))) {
        PyErr_SetString(PyExc_ValueError, "open_at never makes a file");
        return NULL;
    }
    if (!PyBytes_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "open_at: the name is bytes");
        return NULL;
    }
    const char *name = PyBytes_AS_STRING(args[1]);
    if (strlen(name) != (size_t)PyBytes_GET_SIZE(args[1])) {
        PyErr_SetString(PyExc_ValueError, "embedded null byte");
        return NULL;
    }
    return opened(dir_fd, name, flags);
}

/* reopen(proc_fd_dir, fd, flags): the file the descriptor fd refers to, opened anew through
 * its magic link in proc_fd_dir (an fd of /proc/self/fd), without formatting its name in
 * Python: the new fd, or minus the errno. */
static PyObject *
reopen(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "reopen(proc_fd_dir, fd, flags)");
        return NULL;
    }
    int dir_fd, fd, flags;
    if (int_arg(args[0], &dir_fd) != 0 || int_arg(args[1], &fd) != 0 ||
        int_arg(args[2], &flags) != 0)
        return NULL;
    if (flags & (O_CREAT | (O_TMPFILE & ~O_DIRECTORY))) {
        PyErr_SetString(PyExc_ValueError, "reopen never makes a file");
        return NULL;
    }
    if (fd < 0)
        return PyLong_FromLong(-EBADF);
    char name[16];
    snprintf(name, sizeof name, "%d", fd);
    return opened(dir_fd, name, flags);
}

/* The head of a linux_dirent64, as getdents64 lays it out. */
struct dirent64_head {
    uint64_t d_ino;
    int64_t d_off;
    unsigned short d_reclen;
    unsigned char d_type;
    char d_name[];
};

static PyObject *
dir_entries(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "dir_entries(fd, size)");
        return NULL;
    }
    int fd, size;
    if (int_arg(args[0], &fd) != 0 || int_arg(args[1], &size) != 0)
        return NULL;
    if (size < 1024 || size > (1 << 24)) {
        PyErr_SetString(PyExc_ValueError, "dir_entries: size out of range");
        return NULL;
    }
    char *buf = malloc((size_t)size);
    if (buf == NULL)
        return PyErr_NoMemory();
    long n;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    do {
        n = syscall(SYS_getdents64, fd, buf, (size_t)size);
    } while (n < 0 && (err = errno) == EINTR);
    Py_END_ALLOW_THREADS
    if (n < 0) {
        free(buf);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError);
    }
    PyObject *list = PyList_New(0);
    if (list == NULL) {
        free(buf);
        return NULL;
    }
    long pos = 0;
    while (pos < n) {
        const struct dirent64_head *d = (const struct dirent64_head *)(buf + pos);
        size_t head = offsetof(struct dirent64_head, d_name);
        /* The kernel's records are whole and NUL-terminated; a short one would be its bug,
         * and ends the list rather than reading past it. */
        if (d->d_reclen <= head || pos + d->d_reclen > n)
            break;
        size_t room = d->d_reclen - head;
        size_t len = strnlen(d->d_name, room);
        PyObject *item = Py_BuildValue(
            "(KLBy#)", (unsigned long long)d->d_ino, (long long)d->d_off,
            (unsigned char)d->d_type, d->d_name, (Py_ssize_t)len);
        if (item == NULL || PyList_Append(list, item) != 0) {
            Py_XDECREF(item);
            Py_DECREF(list);
            free(buf);
            return NULL;
        }
        Py_DECREF(item);
        pos += d->d_reclen;
    }
    free(buf);
    return list;
}

static PyMethodDef methods[] = {
    {"fstat_attr", (PyCFunction)(void (*)(void))fstat_attr, METH_FASTCALL,
     "fstat_attr(fd, flags) -> bytes: the fuse_attr of fstat(fd), flags included."},
    {"fstat_entry", (PyCFunction)(void (*)(void))fstat_entry, METH_FASTCALL,
     "fstat_entry(fd) -> (fuse_attr bytes with flags 0, st_dev, st_ino, S_IFMT(st_mode))."},
    {"open_at", (PyCFunction)(void (*)(void))open_at, METH_FASTCALL,
     "open_at(dir_fd, name, flags) -> int: the new fd, or minus the errno of the failure."},
    {"reopen", (PyCFunction)(void (*)(void))reopen, METH_FASTCALL,
     "reopen(proc_fd_dir, fd, flags) -> int: fd opened anew, or minus the errno."},
    {"dir_entries", (PyCFunction)(void (*)(void))dir_entries, METH_FASTCALL,
     "dir_entries(fd, size) -> [(d_ino, d_off, d_type, name)]: one getdents64 of fd."},
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
