"""Files a user names: read only when they are regular files, written atomically, arrays loaded
with one error rule.

- `open_regular(path, what, error)`: open for reading, refusing anything but a regular file. A FIFO
  or a device would block `open()` or stream without end, so the path is opened non-blocking
  (which never waits for a FIFO's writer), checked with fstat, and only then used.
- `atomic_write(path)`: write beside the target under a recognisable name
  (`.<name>.nadoo-tmp-<pid>`), fsync, rename over the target. Until the rename nothing exists
  under the target name; an error, Ctrl-C or SIGTERM/SIGHUP removes the temporary file, and a later
  write to the same target removes ones whose process is dead (SIGKILL cannot be caught). The file
  gets the usual mode for new files (0666 minus the umask).
- `load_arrays(path, what, error)`: an .npz (→ {name: array}) or .npy (→ array), told apart by its
  content; whatever zipfile, zlib or NumPy raise on a bad file becomes one `error` line, and a
  header declaring more data than the file holds is refused before anything is allocated.
- `refuse_overwrite(out, inputs)`: an output that is one of the command's own inputs.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import stat
import threading

from .errors import InputError, NadooError

_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"))


def _not_regular(mode: int) -> str:
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


# -- reading -------------------------------------------------------------------------------------
def open_regular(path, what: str, error: type[NadooError] = InputError) -> int:
    """A read-only file descriptor for `path`, which must be a regular file; else `error` with one line.
    `what` names the file in messages ("bundle", "input file", ...)."""
    path = os.fspath(path)
    nonblock = getattr(os, "O_NONBLOCK", 0)
    flags = os.O_RDONLY | nonblock | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise error(f"no such {what}: {path}") from None
    except IsADirectoryError:
        raise error(f"{path} is a directory; the {what} must be a regular file") from None
    except OSError as e:
        raise error(f"cannot open {what} {path}: {e.strerror or e}") from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise error(f"{path} is a directory; the {what} must be a regular file")
        if not stat.S_ISREG(mode):
            raise error(f"{path} is {_not_regular(mode)}; the {what} must be a regular file")
        if nonblock:  # a regular file never blocks, but later readers should see ordinary blocking I/O
            import fcntl

            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~nonblock)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_regular_file(path, what: str, error: type[NadooError] = InputError):
    """`open_regular` as a binary file object."""
    return os.fdopen(open_regular(path, what, error), "rb")


def read_text(path, what: str, error: type[NadooError] = InputError) -> str:
    """The whole of a regular file as UTF-8 text (calibration text, a perplexity corpus)."""
    with open_regular_file(path, what, error) as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} {path} is not UTF-8 text ({e.reason} at byte {e.start})") from None


def mapped_read(mm, fd: int, offset: int, length: int) -> bytes:
    """`mm[offset:offset+length]` of a read-only mapping of `fd`, refusing to touch pages past the
    file's current end: reading those raises SIGBUS and kills the process, which happens when the file
    is truncated while mapped. A truncation between this check and the copy can still do that,
    which is why positioned reads (no mapping) are the default."""
    from .errors import BundleError

    size = os.fstat(fd).st_size
    if offset + length > size:
        raise BundleError(f"bundle shrank to {size} bytes while open (wanted {length} bytes at offset {offset})")
    return mm[offset : offset + length]


# -- writing -------------------------------------------------------------------------------------
_TMP_TAG = ".nadoo-tmp-"
_TMP_PID = re.compile(re.escape(_TMP_TAG) + r"(\d+)(?:-\d+)?$")
_live: set[str] = set()  # temporary files this process is writing
_lock = threading.Lock()
_FATAL = tuple(getattr(signal, s) for s in ("SIGTERM", "SIGHUP") if hasattr(signal, s))
_installed: dict = {}  # signal -> handler it replaced, while our cleanup handler is installed


def _on_fatal(signum, frame) -> None:
    # Runs in the main thread between bytecodes: remove what is half written, then die of the same
    # signal as if no handler had been installed (exit status and parent's view unchanged).
    for p in list(_live):
        try:
            os.unlink(p)
        except OSError:
            pass
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _register(tmp: str) -> None:
    with _lock:
        _live.add(tmp)
        # Signal handlers can only be set from the main thread; a write from another thread still
        # gets cleaned up on errors and by the stale-file sweep. A handler the host program
        # installed itself is left alone.
        if _installed or threading.current_thread() is not threading.main_thread():
            return
        for s in _FATAL:
            try:
                if signal.getsignal(s) == signal.SIG_DFL:
                    _installed[s] = signal.signal(s, _on_fatal)
            except (ValueError, OSError):
                pass


def _unregister(tmp: str) -> None:
    with _lock:
        _live.discard(tmp)
        if _live or not _installed or threading.current_thread() is not threading.main_thread():
            return
        for s, prev in list(_installed.items()):
            try:
                if signal.getsignal(s) is _on_fatal:
                    signal.signal(s, prev)
            except (ValueError, OSError):
                pass
            del _installed[s]


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists, owned by someone else
        return True
    return True


def remove_stale_temps(directory: str, name: str) -> None:
    """Remove `.<name>.nadoo-tmp-<pid>` files left in `directory` by processes that no longer exist."""
    if os.name != "posix":  # os.kill(pid, 0) is not a liveness probe elsewhere
        return
    prefix = f".{name}{_TMP_TAG}"
    try:
        entries = [e for e in os.scandir(directory) if e.name.startswith(prefix)]
    except OSError:
        return
    for e in entries:
        m = _TMP_PID.search(e.name)
        if m and e.name[: m.start()] == f".{name}" and not _pid_alive(int(m.group(1))):
            try:
                os.unlink(e.path)
            except OSError:
                pass


class AtomicFile:
    """A binary file (`.file`, its temporary path `.tmp`) that becomes `path` on `commit()`.
    As a context manager: commit when the block succeeds, abort when it raises."""

    def __init__(self, path):
        self.path = os.path.abspath(os.fspath(path))
        self.directory, name = os.path.split(self.path)
        try:
            if not stat.S_ISREG(os.stat(self.path).st_mode):
                # a rename would replace the device node / socket itself (e.g. --output /dev/null as root)
                raise NadooError(f"refusing to replace {self.path}: it is not a regular file")
        except FileNotFoundError:
            pass
        remove_stale_temps(self.directory, name)
        base = os.path.join(self.directory, f".{name}{_TMP_TAG}{os.getpid()}")
        k = 0
        while True:
            self.tmp = base if k == 0 else f"{base}-{k}"
            try:
                # "x": O_CREAT | O_EXCL with mode 0666, so the umask applies as for any new file
                self.file = open(self.tmp, "xb")
                break
            except FileExistsError:  # another write of this process to the same target
                k += 1
        _register(self.tmp)
        self.done = False

    def commit(self) -> None:
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
            self.file.close()
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self.done = True
        _unregister(self.tmp)
        _fsync_dir(self.directory)

    def abort(self) -> None:
        """Drop the temporary file; the target is left exactly as it was."""
        if not self.file.closed:
            self.file.close()
        if not self.done:
            try:
                os.unlink(self.tmp)
            except FileNotFoundError:
                pass
            self.done = True
        _unregister(self.tmp)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def atomic_write(path) -> AtomicFile:
    """`with atomic_write(path) as a: a.file.write(...)`: `path` appears whole or not at all."""
    return AtomicFile(path)


def _fsync_dir(directory: str) -> None:
    # Makes the rename itself durable; not every platform lets a directory be opened, hence the guard.
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def same_file(a, b) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return os.path.realpath(a) == os.path.realpath(b)


def refuse_overwrite(out, inputs: dict, option: str = "--output") -> None:
    """InputError when the output path `out` is one of `inputs` ({what: path}, None entries ignored)."""
    if out is None:
        return
    for what, p in inputs.items():
        if p is not None and same_file(out, p):
            raise InputError(f"{option} {out} is the {what}; refusing to overwrite the command's own input")


# -- arrays --------------------------------------------------------------------------------------
_NPY_MAGIC = b"\x93NUMPY"


def load_arrays(path, what: str = "input file", error: type[NadooError] = InputError):
    """{name: array} for an .npz, one array for an .npy (decided by content, not by name). Raises `error`
    with one line for anything else: missing, not a regular file, empty, corrupt, truncated, pickled."""
    path = os.fspath(path)
    with open_regular_file(path, what, error) as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            raise error(f"{what} {path} is empty")
        head = f.read(len(_NPY_MAGIC))
        f.seek(0)
        if head == _NPY_MAGIC:
            with _array_errors(path, what, ".npy", error):
                return _read_npy(f, size, path, what, error)
        if head.startswith(b"PK"):
            with _array_errors(path, what, ".npz", error):
                return _read_npz(f, path, what, error)
    raise error(f"cannot read {what} {path}: not a valid .npz or .npy file (save it with np.savez or np.save)")


def _read_npz(f, path: str, what: str, error) -> dict:
    import zipfile

    import numpy as np

    out = {}
    with zipfile.ZipFile(f) as z:
        for info in z.infolist():
            if info.is_dir():
                continue
            with z.open(info) as m:  # the header alone, checked against the member's size
                _check_header(m, info.file_size, path, what, error, member=info.filename)
            with z.open(info) as m:
                key = info.filename[:-4] if info.filename.endswith(".npy") else info.filename
                out[key] = np.lib.format.read_array(m, allow_pickle=False)
                while m.read(1 << 20):  # on to the member's end, where zipfile checks its CRC-32
                    pass
    return out


def _read_npy(f, size: int, path: str, what: str, error):
    import numpy as np

    _check_header(f, size, path, what, error)
    f.seek(0)
    return np.lib.format.read_array(f, allow_pickle=False)


def _check_header(fp, size: int, path: str, what: str, error, member: str | None = None) -> None:
    """Refuse an .npy stream of `size` bytes whose header declares an object array or more data than
    follows it, before NumPy allocates the declared array."""
    import numpy as np

    fmt = np.lib.format
    version = fmt.read_magic(fp)
    # 3.0 headers differ from 2.0 only in being UTF-8: read as 2.0 the shape and item size are the same
    shape, _, dtype = (fmt.read_array_header_1_0 if version == (1, 0) else fmt.read_array_header_2_0)(fp)
    where = f" (member {member})" if member else ""
    if dtype.hasobject:
        raise error(f"{what} {path}{where} holds an object (pickled) array; save plain numeric arrays")
    n = 1
    for d in shape:
        n *= int(d)
    need, have = n * dtype.itemsize, size - fp.tell()
    if need > have:
        raise error(f"cannot read {what} {path}{where}: truncated (its header declares {need} bytes for "
                    f"{dtype}{list(shape)}, {max(have, 0)} follow)")


@contextlib.contextmanager
def _array_errors(path: str, what: str, kind: str, error):
    """One `error` line for whatever zipfile, zlib or NumPy raise on a bad file (BadZipFile, Bad
    CRC-32, zlib.error, EOFError, ValueError from a garbled header, ...)."""
    try:
        yield
    except NadooError:
        raise
    except MemoryError:
        raise error(f"{what} {path} is too large to load") from None
    except Exception as e:
        detail = " ".join(str(e).split()) or type(e).__name__
        if len(detail) > 200:
            detail = detail[:197] + "..."
        raise error(f"cannot read {what} {path}: not a valid {kind} ({detail})") from None
