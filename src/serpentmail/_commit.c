/* serpentmail._commit: the delivery journal's durable append and the renames that follow it,
 * in one call that does not take the interpreter's lock back in between.
 *
 * Why: the committer thread (storage/maildir.py) appends a batch's records to the journal
 * with one direct, synchronous write, then closes each message's temp file and renames (or
 * links) it into its mailbox. Each of those system calls, made from Python, gives the
 * interpreter's lock up and must take it back afterwards; on a busy server the event loop
 * holds it nearly all the time, so each return costs the committer a sleep and a wake-up
 * (and the event loop, whose lock the committer then holds for a moment, as much). Here the
 * write and the file operations run one after the other with the lock released once.
 *
 * write_then(fd, buffer, length, offset, flags, ops, jobs) -> (result, errors)
 *
 *   pwritev2(fd, buffer[:length], offset, flags); if the whole length was written, runs
 *   ``ops`` in order: tuples (kind, job, a, b) with kind 0 close(a: fd), 1 rename(a, b),
 *   2 link(a, b), 3 unlink(a) (its failure ignored: a leftover temp name is harmless), a and b
 *   paths as bytes. After an operation of job k fails, the other operations of job k are
 *   skipped (as a Python function raising at its first failure would). ``result`` is the
 *   number of octets written, or -errno; ``errors`` has one errno per job (0: all done), all
 *   0 when the write failed (then nothing ran). Linux only (pwritev2).
 *
 * create_files(directory, names) -> list: the spool pool's refill, the same way (below).
 *
 * gather(buffer, pieces, block) -> int: the journal's record copied into its direct-write
 * buffer (below).
 *
 * The module is optional, like serpentmail._scan: without it storage/journal.py and
 * storage/maildir.py make the same calls from Python.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>
#if defined(__linux__)
#include <sys/uio.h>

enum { OP_CLOSE = 0, OP_RENAME = 1, OP_LINK = 2, OP_UNLINK = 3 };

typedef struct {
    int kind;
    Py_ssize_t job;
    int fd;
    const char *a;
    const char *b;
} op_t;

static int
parse_path(PyObject *obj, const char **out)
{
    if (!PyBytes_Check(obj)) {
        PyErr_SetString(PyExc_TypeError, "write_then: paths must be bytes");
        return -1;
    }
    *out = PyBytes_AS_STRING(obj);
    if (strlen(*out) != (size_t)PyBytes_GET_SIZE(obj)) {
        PyErr_SetString(PyExc_ValueError, "write_then: embedded null byte in a path");
        return -1;
    }
    return 0;
}

static PyObject *
write_then(PyObject *module, PyObject *args)
{
    int fd, flags;
    Py_buffer buf;
    Py_ssize_t length, njobs;
    long long offset;
    PyObject *ops_arg;
    if (!PyArg_ParseTuple(args, "iy*nLiOn", &fd, &buf, &length, &offset, &flags, &ops_arg, &njobs))
        return NULL;
    PyObject *ops = NULL, *result = NULL, *errors = NULL;
    op_t *parsed = NULL;
    int *failed = NULL;
    if (length < 0 || length > buf.len || njobs < 0) {
        PyErr_SetString(PyExc_ValueError, "write_then: length or job count out of range");
        goto done;
    }
    /* A tuple of our own: its items (and their bytes) stay alive while the lock is released. */
    ops = PySequence_Tuple(ops_arg);
    if (ops == NULL)
        goto done;
    Py_ssize_t nops = PyTuple_GET_SIZE(ops);
    parsed = PyMem_Calloc((size_t)(nops > 0 ? nops : 1), sizeof(op_t));
    failed = PyMem_Calloc((size_t)(njobs > 0 ? njobs : 1), sizeof(int));
    if (parsed == NULL || failed == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < nops; i++) {
        PyObject *item = PyTuple_GET_ITEM(ops, i);
        if (!PyTuple_Check(item) || PyTuple_GET_SIZE(item) != 4) {
            PyErr_SetString(PyExc_TypeError, "write_then: each operation is (kind, job, a, b)");
            goto done;
        }
        op_t *op = &parsed[i];
        op->kind = (int)PyLong_AsLong(PyTuple_GET_ITEM(item, 0));
        if (op->kind == -1 && PyErr_Occurred())
            goto done;
        op->job = PyLong_AsSsize_t(PyTuple_GET_ITEM(item, 1));
        if (op->job == -1 && PyErr_Occurred())
            goto done;
        if (op->job < 0 || op->job >= njobs) {
            PyErr_SetString(PyExc_ValueError, "write_then: job index out of range");
            goto done;
        }
        PyObject *a = PyTuple_GET_ITEM(item, 2), *b = PyTuple_GET_ITEM(item, 3);
        switch (op->kind) {
        case OP_CLOSE:
            op->fd = (int)PyLong_AsLong(a);
            if (op->fd == -1 && PyErr_Occurred())
                goto done;
            break;
        case OP_RENAME:
        case OP_LINK:
            if (parse_path(a, &op->a) < 0 || parse_path(b, &op->b) < 0)
                goto done;
            break;
        case OP_UNLINK:
            if (parse_path(a, &op->a) < 0)
                goto done;
            break;
        default:
            PyErr_SetString(PyExc_ValueError, "write_then: unknown operation");
            goto done;
        }
    }

    ssize_t n;
    int err = 0;
    Py_BEGIN_ALLOW_THREADS
    struct iovec iov = {buf.buf, (size_t)length};
    do {
        n = pwritev2(fd, &iov, 1, (off_t)offset, flags);
    } while (n < 0 && errno == EINTR);
    if (n < 0)
        err = errno;
    else if (n == length) {
        for (Py_ssize_t i = 0; i < nops; i++) {
            const op_t *op = &parsed[i];
            if (failed[op->job])
                continue;
            int rc = 0;
            switch (op->kind) {
            case OP_CLOSE:
                rc = close(op->fd);
                break;
            case OP_RENAME:
                rc = rename(op->a, op->b);
                break;
            case OP_LINK:
                rc = link(op->a, op->b);
                break;
            case OP_UNLINK:
                (void)unlink(op->a);
                break;
            }
            if (rc < 0)
                failed[op->job] = errno ? errno : EIO;
        }
    }
    Py_END_ALLOW_THREADS

    errors = PyList_New(njobs);
    if (errors == NULL)
        goto done;
    for (Py_ssize_t k = 0; k < njobs; k++) {
        PyObject *v = PyLong_FromLong(failed[k]);
        if (v == NULL) {
            Py_CLEAR(errors);
            goto done;
        }
        PyList_SET_ITEM(errors, k, v);
    }
    result = Py_BuildValue("(nO)", n < 0 ? (Py_ssize_t)-err : (Py_ssize_t)n, errors);

done:
    Py_XDECREF(errors);
    Py_XDECREF(ops);
    PyMem_Free(parsed);
    PyMem_Free(failed);
    PyBuffer_Release(&buf);
    return result;
}
#endif /* __linux__ */

/* create_files(directory, names, /) -> list: each name created in ``directory`` (bytes
 * paths) with O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC and mode 0600, as SpoolFile does one at a
 * time; per name its descriptor, or -errno. One release of the interpreter's lock for the
 * spool pool's whole refill (storage/maildir.py, SpoolPool.make) instead of one per file. */
static PyObject *
create_files(PyObject *module, PyObject *args)
{
    PyObject *dir_obj, *names_arg;
    if (!PyArg_ParseTuple(args, "OO", &dir_obj, &names_arg))
        return NULL;
    const char *dir;
    if (!PyBytes_Check(dir_obj)) {
        PyErr_SetString(PyExc_TypeError, "create_files: the directory must be bytes");
        return NULL;
    }
    dir = PyBytes_AS_STRING(dir_obj);
    if (strlen(dir) != (size_t)PyBytes_GET_SIZE(dir_obj)) {
        PyErr_SetString(PyExc_ValueError, "create_files: embedded null byte in the directory");
        return NULL;
    }
    PyObject *names = PySequence_Tuple(names_arg);
    if (names == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(names);
    const char **paths = PyMem_Calloc((size_t)(n > 0 ? n : 1), sizeof(char *));
    int *fds = PyMem_Calloc((size_t)(n > 0 ? n : 1), sizeof(int));
    PyObject *result = NULL;
    if (paths == NULL || fds == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *name = PyTuple_GET_ITEM(names, i);
        if (!PyBytes_Check(name) || strlen(PyBytes_AS_STRING(name)) != (size_t)PyBytes_GET_SIZE(name)
                || memchr(PyBytes_AS_STRING(name), '/', (size_t)PyBytes_GET_SIZE(name)) != NULL
                || PyBytes_GET_SIZE(name) == 0) {
            PyErr_SetString(PyExc_ValueError, "create_files: each name is a non-empty bytes file name");
            goto done;
        }
        paths[i] = PyBytes_AS_STRING(name);
    }
    Py_BEGIN_ALLOW_THREADS
    int dfd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    int derr = dfd < 0 ? errno : 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        if (dfd < 0) {
            fds[i] = -derr;
            continue;
        }
        int fd = openat(dfd, paths[i], O_RDWR | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        fds[i] = fd >= 0 ? fd : -errno;
    }
    if (dfd >= 0)
        close(dfd);
    Py_END_ALLOW_THREADS
    result = PyList_New(n);
    if (result == NULL) {  /* the files stay: the caller cannot have them, so close them */
        for (Py_ssize_t i = 0; i < n; i++)
            if (fds[i] >= 0)
                close(fds[i]);
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = PyLong_FromLong(fds[i]);
        if (v == NULL) {
            for (Py_ssize_t k = i; k < n; k++)
                if (fds[k] >= 0)
                    close(fds[k]);
            Py_CLEAR(result);
            goto done;
        }
        PyList_SET_ITEM(result, i, v);
    }
done:
    Py_DECREF(names);
    PyMem_Free(paths);
    PyMem_Free(fds);
    return result;
}

/* gather(buffer, pieces, block) -> length
 *
 * Copies the bytes-like ``pieces`` one after the other into the writable ``buffer`` from its
 * start, then zeros up to the next multiple of ``block`` (a direct write covers whole
 * blocks). Returns the length copied, before the zeros; ValueError (nothing copied) if they
 * do not fit. For Journal._append_direct (storage/journal.py): the same copy in Python is a
 * memoryview, two slices and an item assignment per piece, run on every message. */
static PyObject *
gather(PyObject *self, PyObject *args)
{
    PyObject *buffer_arg, *pieces_arg;
    Py_ssize_t block;
    if (!PyArg_ParseTuple(args, "OOn:gather", &buffer_arg, &pieces_arg, &block))
        return NULL;
    if (block <= 0) {
        PyErr_SetString(PyExc_ValueError, "gather: block must be positive");
        return NULL;
    }
    PyObject *pieces = PySequence_Fast(pieces_arg, "gather: pieces must be a sequence");
    if (pieces == NULL)
        return NULL;
    Py_buffer out;
    if (PyObject_GetBuffer(buffer_arg, &out, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0) {
        Py_DECREF(pieces);
        return NULL;
    }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(pieces);
    PyObject **items = PySequence_Fast_ITEMS(pieces);
    Py_buffer *views = PyMem_Calloc((size_t)(n > 0 ? n : 1), sizeof(Py_buffer));
    Py_ssize_t got = 0, total = 0;
    PyObject *result = NULL;
    if (views == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (; got < n; got++) {
        if (PyObject_GetBuffer(items[got], &views[got], PyBUF_C_CONTIGUOUS) < 0)
            goto done;
        total += views[got].len;
    }
    Py_ssize_t padded = total % block ? total + (block - total % block) : total;
    if (padded > out.len) {
        PyErr_Format(PyExc_ValueError, "gather: %zd octets do not fit in a buffer of %zd", padded, out.len);
        goto done;
    }
    char *dst = (char *)out.buf;
    for (Py_ssize_t i = 0; i < n; i++) {
        memcpy(dst, views[i].buf, (size_t)views[i].len);
        dst += views[i].len;
    }
    memset(dst, 0, (size_t)(padded - total));
    result = PyLong_FromSsize_t(total);
done:
    for (Py_ssize_t i = 0; i < got; i++)
        PyBuffer_Release(&views[i]);
    PyMem_Free(views);
    PyBuffer_Release(&out);
    Py_DECREF(pieces);
    return result;
}

static PyMethodDef commit_methods[] = {
#if defined(__linux__)
    {"write_then", write_then, METH_VARARGS,
     "write_then(fd, buffer, length, offset, flags, ops, jobs, /)\n--\n\n"
     "pwritev2 of buffer[:length], then the file operations ops if it was whole; see _commit.c."},
#endif
    {"gather", gather, METH_VARARGS,
     "gather(buffer, pieces, block, /)\n--\n\n"
     "Copy pieces into buffer from its start, zeros to a multiple of block; the length copied. See _commit.c."},
    {"create_files", create_files, METH_VARARGS,
     "create_files(directory, names, /)\n--\n\n"
     "Create each name in directory (O_EXCL, mode 0600); its descriptor or -errno; see _commit.c."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef commit_module = {
    PyModuleDef_HEAD_INIT, "serpentmail._commit",
    "The journal's append and the renames after it without the interpreter's lock in between (see _commit.c).",
    -1, commit_methods,
};

PyMODINIT_FUNC
PyInit__commit(void)
{
    return PyModule_Create(&commit_module);
}
