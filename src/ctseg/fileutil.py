"""Files that appear whole or not at all: write under a unique temporary name beside the target, then rename.

`atomic_path` is the one implementation; every writer in ctseg (volumes, DICOM, PNG, JSON/YAML/CSV,
checkpoints, cache arrays, figures) goes through it. The temporary name keeps the target's suffix, since
several writers (nibabel, SimpleITK, matplotlib, numpy) choose the format from it, and starts with a
dot so that folder listings and globs for results skip it. On any failure the temporary is removed and
an existing target is left as it was. A target that is a device node, FIFO or socket is refused
(naming it): a rename would replace the node with a regular file.

`output_lock` gives one process at a time a folder to write (train, cv, phantom, preprocess, report, stress);
`content_signature` keys caches and runs on the bytes of their input files.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import shutil
import stat
import uuid
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from ctseg.errors import CtsegError

#: Bytes of each input file hashed by `content_signature` (the header, and more for small files).
SIGNATURE_HEAD = 64 * 1024


#: errno values that mean "this output cannot be written here", whatever the writer.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EFBIG, errno.EDQUOT, errno.EROFS, errno.EIO}


class WriteError(CtsegError, OSError):
    """An output that could not be written (disk full, ...): a CtsegError naming the output, and still an
    OSError for code that handles failed writes."""


def _write_error(exc: OSError, path: Path, tmp: Path | None = None) -> OSError:
    """`exc` as a WriteError naming `path` when it is a failed write or names the temporary `tmp` (a message
    must name the user's file, never `.tmp-…`), else `exc` itself."""
    about_tmp = tmp is not None and exc.filename is not None and Path(os.fsdecode(exc.filename)) == tmp
    if isinstance(exc, CtsegError) or not (exc.errno in _WRITE_ERRNOS or about_tmp):
        return exc
    return WriteError(f"cannot write ({exc.strerror or exc})", path)


@contextmanager
def removed_on_failure(folder: str | Path) -> Iterator[None]:
    """Remove what the block added under `folder` (files and folders that were not there before; `folder`
    itself if it did not exist) when the block raises, so that a failed run leaves no partial output. Files
    that existed are left to the atomic writers: each is the old or the new version, whole."""
    folder = Path(folder)
    existed = folder.exists()
    before = set(folder.rglob("*")) if existed else set()
    try:
        yield
    except BaseException:
        if not existed:
            shutil.rmtree(folder, ignore_errors=True)
        elif folder.is_dir():
            for path in sorted(set(folder.rglob("*")) - before, key=lambda p: len(p.parts), reverse=True):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        raise


def refuse_special_file(path: str | Path) -> None:
    """CtsegError when `path` exists and is not a regular file or a folder (a device node, FIFO or socket):
    writers rename a regular file onto their target, which would replace the node."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise CtsegError("is a device, FIFO or socket, not a regular file: refusing to replace it; "
                         "give the path of a file", path)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `path` to write; renamed onto `path` when the block succeeds.

    Creates the parent folder. The temporary is unique per call (concurrent writers never share it)
    and is deleted if the block raises. A full disk, a file-size or quota limit, a read-only or failing
    file system become a `WriteError` naming `path` (not the temporary).
    """
    path = Path(path)
    refuse_special_file(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _write_error(exc, path) from exc
    tmp = path.with_name(f".tmp-{uuid.uuid4().hex[:8]}-{path.name}")
    try:
        yield tmp
        os.replace(tmp, path)
    except OSError as exc:
        raise _write_error(exc, path, tmp) from exc
    finally:
        with suppress(OSError):  # e.g. a name too long to exist: the error above says what went wrong
            tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def refuse_overlap(out: str | Path, dataset: str | Path, option: str) -> None:
    """CtsegError when the output `out` (given as `option`) is the dataset folder, lies inside it or contains it:
    ctseg never writes into a dataset, and a dataset inside an output folder would be mixed with results."""
    o, d = Path(out).resolve(), Path(dataset).resolve()
    if o == d or d in o.parents:
        raise CtsegError(f"{option} is inside the dataset folder {dataset}: the output would be written into the "
                         "dataset; give a folder outside it", out)
    if o in d.parents:
        raise CtsegError(f"{option} contains the dataset folder {dataset}: outputs would be mixed with the data; "
                         "give a folder beside it", out)


def _lock_path(folder: Path) -> Path:
    folder = folder.resolve()
    return folder.parent / f".{folder.name}.ctseg-lock"


@contextmanager
def output_lock(folder: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on the output folder `folder` while the block runs (its parent is created; the
    folder itself is left to the writer).

    The lock is an `flock` on a hidden sibling file, `.<name>.ctseg-lock`, removed on exit (so a killed
    process leaves only a stale, unlocked file that the next run takes over). A second process asking for
    the same folder gets a CtsegError naming the folder and the holder's pid, at once, instead of writing
    into it too.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise CtsegError("is a file; give a folder", folder)
    lock = _lock_path(folder)
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise CtsegError(f"another ctseg process (pid {holder}) is writing into this folder; wait for it "
                                 "to finish or choose another folder", folder) from None
            raise
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino  # not unlinked by a holder leaving meanwhile
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        try:
            os.unlink(lock)
        finally:
            os.close(fd)


def content_signature(files: Iterable[Path], root: Path | None = None) -> str:
    """16 hex digits over each file's name (relative to `root`), size, modification time and the CRC-32 of
    its first `SIGNATURE_HEAD` bytes: changes when any input file is edited, replaced, added or removed."""
    h = hashlib.sha256()
    for path in sorted(Path(f) for f in files):
        st = path.stat()
        with open(path, "rb") as f:
            head = zlib.crc32(f.read(SIGNATURE_HEAD))
        name = os.path.relpath(path, root) if root is not None else path.name
        h.update(f"{name}\0{st.st_size}\0{st.st_mtime_ns}\0{head:08x}\n".encode())
    return h.hexdigest()[:16]
