"""Whole-folder atomic commit of a checkpoint on a POSIX file system, and the writer's lock.

The new checkpoint is built in a hidden sibling folder, ``.NAME.dcp-hf-new-SAVEID`` (created
by ``mkdir``, so it is ours; files in it are created with ``O_EXCL|O_NOFOLLOW``). The user's
other files in the folder (config, tokenizer, ...) are hard-linked into it, then one
``renameat2(RENAME_EXCHANGE)`` swaps it with the folder: at every instant the folder's path
names either the whole old folder or the whole new one, for any reader (dcp-hf, transformers,
safetensors), whether it switches between one file and shards or not. The old folder, now at
the hidden name, is removed afterwards.

Where the exchange is not supported (not Linux, or a file system such as NFS that refuses
it), the fallback is two renames (folder -> ``.NAME.dcp-hf-old-SAVEID``, new -> folder): the
folder is briefly absent (a reader fails with a clear error, never a mix), and a save killed
in that window leaves the old checkpoint under the hidden name, which the next save into the
folder puts back first. Where no sibling can be made (a read-only parent, a mount point) the
files are committed inside the folder one by one; the save ids in every file then make a
reader refuse a mix (the guarantee of object stores).

Every mutating step calls :func:`step`, where a test can kill the process (``DCP_HF_KILL_AT``).
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
from dataclasses import dataclass

from dcp_hf.errors import CheckpointBusyError, DcpHfError, StorageError
from dcp_hf.format.index import CHECKPOINT_FILE

logger = logging.getLogger("dcp_hf")

MARKER = ".dcp-hf-staging"  # in a staging folder until it is exchanged into place
LOCK_INSIDE = ".dcp-hf-lock"  # the lock, where the parent folder is not writable
_SIBLING = re.compile(r"^\.(?P<name>.+)\.dcp-hf-(?P<kind>new|old)-(?P<id>[0-9a-f]{12})$")
_OWN_HIDDEN = re.compile(r"^\..+\.([0-9a-f]{12}\.partial|[0-9a-f]{16}\.tmp)$")

# -- test hook ---------------------------------------------------------------------------------
_steps = 0


def step(what: str) -> None:
    """Called before each mutating step of a commit. ``DCP_HF_KILL_AT=N`` SIGKILLs the process
    just before its N-th step; ``DCP_HF_STEP_LOG=FILE`` appends each step's name to FILE."""
    global _steps
    at, log = os.environ.get("DCP_HF_KILL_AT"), os.environ.get("DCP_HF_STEP_LOG")
    if at is None and log is None:
        return
    _steps += 1
    if log:
        with open(log, "a") as f:
            f.write(f"{_steps} {what}\n")
    if at is not None and _steps == int(at):
        os.kill(os.getpid(), signal.SIGKILL)


def reset_steps() -> None:
    global _steps
    _steps = 0


# -- files created only by us ------------------------------------------------------------------
@dataclass(frozen=True)
class FileId:
    """A file's identity, recorded by the rank that created it and checked by every rank that
    opens it by name (so a link swapped in at the name is never written through)."""

    dev: int
    ino: int


_CREATE = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)


def create_file(path: str) -> tuple[int, FileId]:
    """Create a new file at ``path`` (never an existing one, never through a link)."""
    fd = os.open(path, _CREATE, 0o644)
    st = os.fstat(fd)
    return fd, FileId(st.st_dev, st.st_ino)


def open_created(path: str, ident: FileId) -> int:
    """Open for writing the file another rank created, checking it is that very file."""
    fd = os.open(path, os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    st = os.fstat(fd)
    if (st.st_dev, st.st_ino) != (ident.dev, ident.ino) or not stat.S_ISREG(st.st_mode):
        os.close(fd)
        raise DcpHfError(f"{path}: not the file this save created (replaced during the save); not writing through it")
    return fd


def write_new_file(folder: str, name: str, data: bytes) -> None:
    """Write a small file: created under an unpredictable hidden name, fsynced, renamed to
    ``name``. Errors name the file."""
    path = os.path.join(folder, name)
    tmp = os.path.join(folder, f".{name}.{secrets.token_hex(8)}.tmp")
    try:
        fd, _ = create_file(tmp)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)
        step(f"rename {name}")
        os.rename(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise StorageError(e.errno, f"writing {path}: {e.strerror}") from e


# -- the in-folder commit of an HF checkpoint --------------------------------------------------
JOURNAL = ".dcp-hf-commit"  # in the folder, while a save changes its visible files
RENAME_NOREPLACE = 1


def place(src: str, dst: str) -> None:
    """Rename ``src`` to ``dst``, never replacing a file at ``dst`` (``RENAME_NOREPLACE``;
    where the file system lacks it, a check then a rename: the folder is locked)."""
    try:
        try:
            _renameat2(src, dst, RENAME_NOREPLACE)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise
            if os.path.lexists(dst):
                raise OSError(errno.EEXIST, os.strerror(errno.EEXIST)) from None
            os.rename(src, dst)
    except OSError as e:
        why = "appeared during the save; not replacing it" if e.errno == errno.EEXIST else e.strerror
        raise StorageError(e.errno, f"{dst}: {why}") from e


@dataclass(frozen=True)
class Committed:
    """The checkpoint readers of a folder load now: the save that wrote it (None: another tool,
    or none) and the checkpoint files it consists of."""

    save_id: str | None
    names: frozenset[str]


def committed(folder: str) -> Committed:
    """What readers load from ``folder`` (:func:`dcp_hf.storage.reader.in_effect`)."""
    from dcp_hf.format import SINGLE_FILE_NAME
    from dcp_hf.storage.reader import in_effect
    from dcp_hf.storage.stores import LocalStore

    found = in_effect(LocalStore(folder))
    if found is None:
        return Committed(None, frozenset())
    if found.indexes:
        names = {name for name, _ in found.indexes}
        names.update(f for _, index in found.indexes for f in index.weight_map.values())
        return Committed(found.indexes[0][1].save_id, frozenset(names))
    return Committed(written_by(folder, SINGLE_FILE_NAME), frozenset([SINGLE_FILE_NAME]))


def written_by(folder: str, name: str) -> str | None:
    """The save id a checkpoint file of ``folder`` records (None: none, or not readable)."""
    from dcp_hf.format import SAVE_ID_KEY, read_header
    from dcp_hf.format.index import decode_index_record

    path = os.path.join(folder, name)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        if name.endswith(".json"):
            return decode_index_record(os.pread(fd, 64 << 20, 0), path).save_id
        header = read_header(lambda off, n: os.pread(fd, n, off), path, os.fstat(fd).st_size)
        return (header.metadata or {}).get(SAVE_ID_KEY)
    except (DcpHfError, OSError):
        return None
    finally:
        os.close(fd)


def begin_commit(folder: str, save_id: str, before: set[str]) -> None:
    """Before a save changes any visible name in ``folder``: record which checkpoint files
    were there (``before``), so that whoever finds the record (:func:`finish_commit`) knows
    which files belong to the interrupted save and which to the checkpoint it replaced."""
    record = {"save_id": save_id, "before": sorted(before)}
    write_new_file(folder, JOURNAL, json.dumps(record).encode())
    fsync_dir(folder)


def finish_commit(folder: str) -> None:
    """Finish an interrupted (or just completed) commit into ``folder`` from its record: if
    readers load that save's checkpoint, remove the replaced checkpoint's files it does not
    name (roll forward); else remove the files the save made visible (roll back). Only
    checkpoint files (``CHECKPOINT_FILE``) are ever removed, never one readers load now, and
    rolling back removes only files that record the save's id."""
    try:
        fd = os.open(os.path.join(folder, JOURNAL), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK)
    except FileNotFoundError:
        return
    try:
        record = json.loads(os.read(fd, 16 << 20))
        save_id, before = record["save_id"], set(record["before"])
    except (ValueError, KeyError, TypeError, OSError):
        logger.warning("%s: not a commit record dcp-hf writes; removing it", os.path.join(folder, JOURNAL))
        save_id, before = None, None
    finally:
        os.close(fd)
    if before is not None:
        now = committed(folder)
        present = {n for n in os.listdir(folder) if CHECKPOINT_FILE.match(n)}
        if now.save_id == save_id:  # committed: the replaced checkpoint's files go
            doomed = before - now.names
        else:  # not committed: the files this save made visible go (only those: its id is in them)
            doomed = {n for n in present - before - now.names if written_by(folder, n) == save_id}
        for name in sorted(doomed):
            remove_checkpoint_file(folder, name)
        fsync_dir(folder)
    step("remove commit record")
    os.unlink(os.path.join(folder, JOURNAL))
    fsync_dir(folder)


def remove_checkpoint_file(folder: str, name: str) -> None:
    """Remove a replaced checkpoint file (a file or link; anything else is left, with a warning)."""
    path = os.path.join(folder, name)
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not (stat.S_ISREG(mode) or stat.S_ISLNK(mode)):
        logger.warning("%s: not a file; not removing it", path)
        return
    step(f"remove {name}")
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def remove_own_hidden(folder: str) -> None:
    """Remove the hidden files interrupted saves left in ``folder`` (partial weights files and
    small-file temporaries, under names only dcp-hf makes)."""
    try:
        names = os.listdir(folder)
    except (FileNotFoundError, NotADirectoryError):
        return
    for name in names:
        if _OWN_HIDDEN.match(name):
            try:
                os.unlink(os.path.join(folder, name))
            except FileNotFoundError:
                pass


# -- the destination ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Destination:
    """Where a local save builds its files (``work``) and the folder it commits to (``path``)."""

    path: str  # the checkpoint folder, symlinks resolved
    work: str  # the staging folder, or ``path`` itself when committing in place

    @property
    def staged(self) -> bool:
        return self.work != self.path


def _split(path: str) -> tuple[str, str]:
    real = os.path.realpath(path)
    return os.path.dirname(real), os.path.basename(real)


def sibling(path: str, kind: str, save_id: str) -> str:
    parent, name = _split(path)
    return os.path.join(parent, f".{name}.dcp-hf-{kind}-{save_id}")


def prepare(path: str, save_id: str) -> Destination:
    """Make the folder the save builds in: a staging sibling where possible, else ``path``."""
    real = os.path.realpath(path)
    parent = os.path.dirname(real)
    os.makedirs(parent, exist_ok=True)
    if os.path.isdir(real) and os.path.ismount(real):
        logger.warning("%s is a mount point: committing its files one by one", real)
    else:
        work = sibling(real, "new", save_id)
        try:
            os.mkdir(work, 0o700)
        except OSError as e:
            if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                raise StorageError(e.errno, f"creating {work}: {e.strerror}") from e
            logger.warning("cannot create %s (%s): committing the files of %s one by one", work, e.strerror, real)
        else:
            try:
                os.close(create_file(os.path.join(work, MARKER))[0])
            except OSError as e:
                os.rmdir(work)  # unmarked, the next save would take it for a replaced folder
                raise StorageError(e.errno, f"creating {os.path.join(work, MARKER)}: {e.strerror}") from e
            return Destination(real, work)
    os.makedirs(real, exist_ok=True)
    return Destination(real, real)


def _entries_to_carry(path: str, work: str) -> list[str]:
    """The folder's entries that are not part of a checkpoint: they go to the new folder."""
    taken = set(os.listdir(work))
    return [
        n
        for n in os.listdir(path)
        if n not in taken
        and not CHECKPOINT_FILE.match(n)
        and not _OWN_HIDDEN.match(n)
        and n not in (MARKER, LOCK_INSIDE)
    ]


def _renameat2(src: str, dst: str, flags: int) -> None:
    if sys.platform != "linux" or os.environ.get("DCP_HF_NO_EXCHANGE"):
        raise OSError(errno.ENOSYS, "renameat2 is not available")
    libc = ctypes.CDLL(None, use_errno=True)
    fn = getattr(libc, "renameat2", None)
    at_fdcwd = -100
    if fn is not None:
        fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        rc = fn(at_fdcwd, os.fsencode(src), at_fdcwd, os.fsencode(dst), flags)
    else:  # glibc < 2.28: the raw system call
        number = {"x86_64": 316, "aarch64": 276}.get(os.uname().machine)
        if number is None:
            raise OSError(errno.ENOSYS, "renameat2 is not available")
        libc.syscall.restype = ctypes.c_long
        rc = libc.syscall(
            ctypes.c_long(number),
            ctypes.c_int(at_fdcwd),
            ctypes.c_char_p(os.fsencode(src)),
            ctypes.c_int(at_fdcwd),
            ctypes.c_char_p(os.fsencode(dst)),
            ctypes.c_uint(flags),
        )
    if rc != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


RENAME_EXCHANGE = 2


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def commit(dest: Destination, save_id: str) -> None:
    """Make the staging folder (its files complete and fsynced) the checkpoint folder."""
    path, work = dest.path, dest.work
    parent = os.path.dirname(path)
    mode = 0o777 & ~_umask()
    # The marker lists what this save wrote: old files of those names are replaced ones.
    write_new_file(work, MARKER, json.dumps(sorted(set(os.listdir(work)) - {MARKER})).encode())
    if os.path.isdir(path):
        mode = stat.S_IMODE(os.stat(path).st_mode)
        others = []
        for name in _entries_to_carry(path, work):
            st = os.lstat(os.path.join(path, name))
            if stat.S_ISREG(st.st_mode) or stat.S_ISLNK(st.st_mode):
                step(f"link {name}")  # the same inode in both folders: nothing is copied
                os.link(os.path.join(path, name), os.path.join(work, name), follow_symlinks=False)
            else:
                others.append(name)  # folders and the like move after the exchange
        os.chmod(work, mode)
        fsync_dir(work)
        try:
            step("exchange")
            _renameat2(work, path, RENAME_EXCHANGE)
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
                raise StorageError(e.errno, f"exchanging {work} with {path}: {e.strerror}") from e
            old = sibling(path, "old", save_id)
            step("rename old")
            os.rename(path, old)
            step("rename new")
            os.rename(work, path)
        else:
            old = work
        fsync_dir(parent)
        for name in others:
            step(f"move {name}")
            os.rename(os.path.join(old, name), os.path.join(path, name))
        remove_old(old, path, _written(path))
        step("remove marker")
        os.unlink(os.path.join(path, MARKER))
    else:
        os.chmod(work, mode)
        fsync_dir(work)
        step("rename new")
        os.rename(work, path)
        fsync_dir(parent)
        step("remove marker")
        os.unlink(os.path.join(path, MARKER))
    fsync_dir(path)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _written(path: str) -> set[str]:
    """The names the last commit into ``path`` wrote, from its marker (while it is there)."""
    try:
        fd = os.open(os.path.join(path, MARKER), os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK)
    except OSError:
        return set()
    try:
        names = json.loads(os.read(fd, 1 << 20) or b"[]")
    except ValueError:
        return set()
    finally:
        os.close(fd)
    return {n for n in names if isinstance(n, str)} if isinstance(names, list) else set()


def remove_old(old: str, path: str, replaced: set[str]) -> None:
    """Remove a replaced folder: its checkpoint files, the files the new save wrote again
    (``replaced``), and the files also in ``path`` (the same inode, linked there). Anything
    else is moved back to ``path`` if the name is free there, else kept (with a warning),
    never deleted."""
    kept = []
    for name in sorted(os.listdir(old)):
        src, dst = os.path.join(old, name), os.path.join(path, name)
        st = os.lstat(src)
        try:
            other = os.lstat(dst)
        except FileNotFoundError:
            other = None
        if (
            CHECKPOINT_FILE.match(name)
            or _OWN_HIDDEN.match(name)
            or name in replaced
            or name == MARKER
            or (other is not None and (other.st_dev, other.st_ino) == (st.st_dev, st.st_ino))
        ):
            if stat.S_ISDIR(st.st_mode):
                kept.append(name)
                continue
            step(f"remove old {name}")
            os.unlink(src)
        elif other is None:
            step(f"move back {name}")
            os.rename(src, dst)
        else:
            kept.append(name)
    if kept:
        logger.warning("%s: kept %s (not in %s under the same name); remove it by hand", old, ", ".join(kept), path)
        return
    step("remove old folder")
    os.rmdir(old)


def clean_leftovers(path: str) -> None:
    """Before a save: finish what interrupted saves into ``path`` left. An old folder moved
    aside by the two-rename fallback goes back into place if the folder is missing; staging
    folders (still marked) are deleted; replaced folders are removed as after a commit."""
    parent, name = _split(path)
    real = os.path.join(parent, name)
    try:
        entries = os.listdir(parent)
    except FileNotFoundError:
        return
    leftovers = [
        (m.group("kind"), os.path.join(parent, e))
        for e in sorted(entries)
        if (m := _SIBLING.match(e)) and m.group("name") == name
    ]
    if not os.path.lexists(real):
        for kind, folder in leftovers:
            if kind == "old":
                logger.warning(
                    "%s: an interrupted save left the previous checkpoint at %s; putting it back", real, folder
                )
                os.rename(folder, real)
                break
    replaced = _written(real)  # a commit killed between its exchange and its clean-up
    for kind, folder in leftovers:
        if not os.path.isdir(folder) or os.path.islink(folder):
            continue
        if os.path.lexists(os.path.join(folder, MARKER)):
            shutil.rmtree(folder)
        elif os.path.isdir(real):
            remove_old(folder, real, replaced)
    if os.path.isdir(real) and os.path.lexists(os.path.join(real, MARKER)):
        os.unlink(os.path.join(real, MARKER))


def moved_aside(path: str) -> str | None:
    """For a missing checkpoint folder: where an interrupted save left the old one, if it did."""
    parent, name = _split(path)
    try:
        entries = os.listdir(parent)
    except OSError:
        return None
    for e in sorted(entries):
        m = _SIBLING.match(e)
        if m and m.group("name") == name and m.group("kind") == "old":
            return os.path.join(parent, e)
    return None


def nearest_existing(path: str) -> str:
    """``path``, or its nearest ancestor that exists."""
    while not os.path.lexists(path):
        path = os.path.dirname(path)
    return path


def folder_creation_error(place: str) -> OSError | None:
    """Why no folder can be made in ``place`` (None: one can). Tried, not asked: ``os.access``
    cannot tell (root passes it on /proc)."""
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".dcp-hf-probe-", dir=place))
        return None
    except OSError as e:
        return e


def check_destination(path: str) -> None:
    """Before a save touches anything: ``path`` is a folder, or can be made one (its nearest
    existing ancestor is a folder a folder can be made in). Errors name ``path``."""
    real = os.path.realpath(path)
    if os.path.lexists(real) and not os.path.isdir(real):
        raise StorageError(errno.ENOTDIR, f"{path}: exists and is not a folder; give a folder to save into")
    if os.path.isdir(real):
        if (error := folder_creation_error(real)) is not None:  # the commit would leave its marker
            raise StorageError(
                error.errno or errno.EACCES,
                f"{path}: cannot save into it ({error.strerror}); make it writable first (e.g. chmod u+w)",
            )
        return
    ancestor = nearest_existing(os.path.dirname(real))
    if not os.path.isdir(ancestor):
        raise StorageError(errno.ENOTDIR, f"{path}: cannot create it: {ancestor} is not a folder")
    error = folder_creation_error(ancestor)
    if error is not None:
        raise StorageError(error.errno or errno.EACCES, f"{path}: cannot create it in {ancestor} ({error.strerror})")


# -- the writer's lock -------------------------------------------------------------------------
def lock_path(path: str) -> str:
    """The lock beside the folder: ``.NAME.dcp-hf-lock``, or, where that name would be too
    long for the file system with the temporary name it is written under (a folder name of
    over 220 bytes), a digest of NAME in its place."""
    parent, name = _split(path)
    lock = f".{name}.dcp-hf-lock"
    if len(os.fsencode(lock)) + len(".0123456789abcdef.tmp") > 255:
        lock = f".{hashlib.sha256(os.fsencode(name)).hexdigest()[:32]}.dcp-hf-lock"
    return os.path.join(parent, lock)


# Save ids of the locks this process holds: a lock of this pid is live exactly when its save id
# is here (threads, or saves on two process groups, in one process), else a failed earlier save
# left it. The guard makes the threads of a process take a lock one at a time.
_HELD: set[str] = set()
_HELD_GUARD = threading.Lock()
UNREADABLE_LOCK_AGE = 10.0  # seconds after which an empty or unreadable lock file is not being written


def acquire_lock(path: str, save_id: str) -> str:
    """Take the folder's save lock (a file beside it, appearing whole) or fail at once naming
    its owner. A lock that is not live is taken over: left by a dead process on this host, by
    this process (a failed earlier save), or empty or unreadable for longer than a lock takes
    to write. Anything else at the lock's name (a folder, a symlink) is refused, never followed."""
    check_destination(path)
    lock = lock_path(path)
    try:
        os.makedirs(os.path.dirname(lock), exist_ok=True)
    except OSError as e:
        raise StorageError(e.errno, f"{path}: cannot create its parent folder: {e.strerror}") from e
    me = {"pid": os.getpid(), "host": socket.gethostname(), "save_id": save_id, "since": time.time()}
    with _HELD_GUARD:
        for _ in range(3):
            try:
                _create_lock(lock, json.dumps(me).encode())
            except PermissionError:
                if lock != lock_path(path):
                    raise StorageError(
                        errno.EACCES, f"{lock}: cannot create the save lock (permission denied)"
                    ) from None
                lock = os.path.join(os.path.realpath(path), LOCK_INSIDE)  # read-only parent
                os.makedirs(os.path.dirname(lock), exist_ok=True)
                continue
            except FileExistsError:
                stale = _not_live(lock, os.path.realpath(path))
                if stale:
                    logger.warning("%s: %s; taking it over", lock, stale)
                    try:
                        os.unlink(lock)
                    except FileNotFoundError:
                        pass
                continue
            _HELD.add(save_id)
            return lock
    raise CheckpointBusyError(f"{lock}: could not take the save lock")


def _create_lock(lock: str, content: bytes) -> None:
    """Create the lock file with its content, appearing whole: written under a hidden name,
    then hard-linked to the lock's name (``link`` fails if the name exists, follows nothing).
    Where hard links are not supported, ``O_EXCL`` and a write."""
    tmp = f"{lock}.{secrets.token_hex(8)}.tmp"
    try:
        _create_with(tmp, content)
        try:
            os.link(tmp, lock, follow_symlinks=False)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS):
                raise
            _create_with(lock, content)
    except (FileExistsError, PermissionError):
        raise
    except OSError as e:
        raise StorageError(e.errno, f"{lock}: cannot write the save lock: {e.strerror}") from e
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _create_with(path: str, content: bytes) -> None:
    """Create a new file at ``path`` (:func:`create_file`) holding ``content``."""
    fd, _ = create_file(path)
    try:
        view = memoryview(content)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


def _not_live(lock: str, path: str) -> str | None:
    """Why the lock file at ``lock`` is not a live lock (None: it is gone). A live one, or
    anything that is not a lock file, raises ``CheckpointBusyError`` naming it."""
    try:
        st = os.lstat(lock)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "a symlink" if stat.S_ISLNK(st.st_mode) else "not a file"
        raise CheckpointBusyError(
            f"{path}: its save lock {lock} is {kind}, not a lock file dcp-hf writes; not following "
            f"or removing it. If no save into {path} is running, remove it (rm -r '{lock}')"
        )
    owner = _read_lock(lock)
    if owner is None:
        return None
    if not (isinstance(owner.get("pid"), int) and isinstance(owner.get("host"), str)):
        if time.time() - st.st_mtime >= UNREADABLE_LOCK_AGE:
            return "the lock file is empty or not a dcp-hf lock"
        raise CheckpointBusyError(
            f"{path}: its save lock {lock} is empty or unreadable (another save may be writing "
            f"it). If no save into {path} is running, remove it (rm '{lock}')"
        )
    if owner["host"] == socket.gethostname():
        if owner["pid"] == os.getpid() and owner.get("save_id") not in _HELD:
            return "left by a failed earlier save of this process"
        if owner["pid"] != os.getpid() and not _alive(owner["pid"]):
            return f"its process {owner['pid']} is gone"
    since = owner.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
    raise CheckpointBusyError(
        f"{path}: another save into this folder is running (pid {owner['pid']} on "
        f"{owner['host']}, since {when}; lock {lock}). If it is not, remove the lock file"
    )


def _read_lock(lock: str) -> dict | None:
    """The lock's content ({} when unreadable, None when gone)."""
    try:
        fd = os.open(lock, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | os.O_NONBLOCK)
    except FileNotFoundError:
        return None
    except OSError:
        return {}
    try:
        owner = json.loads(os.read(fd, 4096) or b"{}")
    except (ValueError, OSError):
        return {}
    finally:
        os.close(fd)
    return owner if isinstance(owner, dict) else {}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, ValueError):
        return True
    return True


def release_lock(lock: str | None, save_id: str) -> None:
    with _HELD_GUARD:
        _HELD.discard(save_id)
    if lock is None:
        return
    owner = _read_lock(lock)
    if owner and owner.get("save_id") == save_id:
        try:
            os.unlink(lock)
        except FileNotFoundError:
            pass
