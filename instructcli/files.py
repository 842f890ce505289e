"""Writing without half-written results: one atomic write (temp sibling, then rename) for files and dirs,
the JSONL writer, and the output-dir checks."""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import json
import os
import shutil
import sys
from pathlib import Path

from instructcli.errors import InstructError


def temp_sibling(path: str | Path, kind: str = "tmp") -> Path:
    """Where `path` is built before it is renamed into place: a hidden sibling named for this process."""
    path = Path(path)
    return path.parent / f".{path.name}.{kind}-{os.getpid()}"


def replace_dir(src: Path, target: Path) -> None:
    """Rename `src` to `target`, replacing a `target` dir that is there (moved aside first, then removed)."""
    old = None
    if target.exists():
        old = temp_sibling(target, "old")
        os.rename(target, old)
    os.rename(src, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_dir(target: str | Path, replace: bool = False, tmp: Path | None = None):
    """Build a dir in a temp sibling (yielded) and rename it to `target` only when the block succeeds, so a dir
    that exists is complete; on failure the temp is removed. A `target` already there is replaced when
    `replace` or empty; otherwise it is kept and the new copy dropped (a cache another process built first)."""
    target = Path(target)
    tmp = tmp or temp_sibling(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if target.is_dir() and (replace or not any(target.iterdir())):
        replace_dir(tmp, target)
        return
    try:
        os.rename(tmp, target)
    except OSError:  # built by another process meanwhile
        shutil.rmtree(tmp, ignore_errors=True)


def atomic_write_text(path: str | Path, text: str, mode_of: str | Path | None = None) -> None:
    """Write a whole file through a temp sibling and os.replace, so a reader sees the old or the new file,
    never half of one. `mode_of`: keep that file's permission bits (a rewrite of it)."""
    tmp = temp_sibling(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if mode_of is not None:
            os.chmod(tmp, os.stat(mode_of).st_mode & 0o7777)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


_held: dict[str, "Lock"] = {}  # this process's locks: a stage run again in one process (tests) takes its own


class Lock:
    """One writer per output: an exclusive flock on a hidden sibling `.<name>.lock`, held until release() or
    the process ends. A second instruct on the same output is refused up front (exit 2) naming the holder's
    pid; the kernel drops a dead process's flock, so a stale lock file never blocks."""

    def __init__(self, target: str | Path, flag: str = "-o", make_parent: bool = False):
        target = Path(target)
        self.path = target.parent / f".{target.name}.lock"
        self.key, self.fd = str(self.path.absolute()), None
        if self.key in _held:  # this process holds it (a stage run again in the same process): take it over
            self.fd = _held[self.key].fd
            _held[self.key] = self
            return
        if make_parent:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        elif not self.path.parent.is_dir():
            return  # nothing can be written there: the caller's own check says so
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise InstructError(f"{flag} {target}: another instruct (pid {holder}) is writing it; wait for it "
                                    f"to end or choose another {flag}", 2) from None
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # its last holder removed the file meanwhile: lock the one now there
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        _held[self.key] = self
        atexit.register(self.release)

    def release(self) -> None:
        if self.fd is None or _held.get(self.key) is not self:
            return
        del _held[self.key]
        try:
            if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
                os.unlink(self.path)
        except OSError:
            pass
        os.close(self.fd)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()
        return False


def release_locks() -> None:
    """At the end of a command, however it ended: its outputs are free for the next writer."""
    for lock in list(_held.values()):
        lock.release()


def no_space(e: OSError, path: str | Path, needed: int) -> InstructError | None:
    """The one-line error for a write that ran out of disk space (else None): the path, the space it needed
    and the space there is."""
    import errno

    if e.errno != errno.ENOSPC:
        return None
    try:
        free = shutil.disk_usage(Path(path).parent if not Path(path).exists() else path).free
    except OSError:
        free = 0
    return InstructError(f"{path}: no space left on device (about {needed / 2**20:.1f} MB needed, "
                         f"{free / 2**20:.1f} MB free); free some space and run it again (--resume continues "
                         "a training run from its last checkpoint)", 1)


def check_output_file(path: str) -> str:
    """Refuse an output path that cannot be written (before any work is done); returns its folder."""
    d = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise InstructError(f"{path}: is a directory, expected an output file", 2)
    if not os.path.isdir(d):
        raise InstructError(f"{path}: the folder {d} does not exist", 2)
    return d


class JsonlWriter:
    """Write rows to a file atomically (temp sibling renamed on success) or stream them to stdout for `-`."""

    def __init__(self, path: str):
        import jsonlines

        self.path = path
        if path == "-":
            self.f, self.tmp = sys.stdout, None
        else:
            check_output_file(path)
            self.tmp = temp_sibling(path)
            self.f = open(self.tmp, "w", encoding="utf-8")
        # through a pipe each row is flushed as it is made, so the reader sees it at once
        self.w = jsonlines.Writer(self.f, dumps=lambda row: json.dumps(row, ensure_ascii=False), flush=self.tmp is None)

    def write(self, row: dict) -> None:
        self.w.write(row)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if self.tmp is None:
            return False
        self.f.close()
        if exc_type is None:
            os.replace(self.tmp, self.path)
        else:
            os.unlink(self.tmp)
        return False


def _alive(pid: str) -> bool:
    try:
        os.kill(int(pid), 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    return True


class ResultDir:
    """A results dir (eval, report) built in a temp sibling and renamed into place when complete, so a
    dir that exists is whole. `with ResultDir(out, overwrite) as d:` write into `d` (a Path)."""

    OURS = ("summary.json", "report.md")  # what marks a dir as ours, so --overwrite may replace it

    def __init__(self, out: str, overwrite: bool = False):
        self.out = Path(out)
        if str(out) in ("", "-"):
            raise InstructError("an output directory is required", 2)
        full = self.out.resolve()
        if not self.out.name or full == Path.cwd().resolve() or full in Path.cwd().resolve().parents:
            raise InstructError(f"{out}: give a new or results directory, not the current one or above it", 2)
        if self.out.exists() and not self.out.is_dir():
            raise InstructError(f"{out}: exists and is not a directory", 2)
        if self.out.is_dir() and any(self.out.iterdir()):
            if not overwrite:
                raise InstructError(f"{out}: not empty; pass --overwrite to replace it", 2)
            if not any((self.out / f).exists() for f in self.OURS):  # never wipe a run dir or a home
                raise InstructError(f"{out}: not a results directory written by instruct; --overwrite only "
                                    "replaces those", 2)
        self._build = None
        self.lock = Lock(self.out, "--out")

    def __enter__(self):
        for old in self.out.parent.glob(f".{self.out.name}.tmp-*"):  # left by a killed run
            if not _alive(old.name.rsplit("-", 1)[-1]):
                shutil.rmtree(old, ignore_errors=True)
        self._build = atomic_dir(self.out, replace=True)
        return self._build.__enter__()

    def __exit__(self, exc_type, exc, tb):
        try:
            return self._build.__exit__(exc_type, exc, tb)
        finally:
            self.lock.release()
