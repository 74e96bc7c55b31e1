"""Writing outputs so that an interrupted write never looks complete.

Every tool that writes something a later step trusts (checkpoints, `latest`, configs, HF exports,
reports) writes it under a temporary name in the same directory and renames it into place only
when it is whole: a rename within one filesystem is atomic, so a reader sees the old version or
the new one, never a half-written file. These are the only helpers for that; nothing else in the
package hand-rolls a temp-name-and-rename.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path
from typing import Callable

INCOMPLETE_SUFFIX = ".incomplete"


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write `text` to `path` via a temporary sibling and a rename (flushed to disk first)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def atomic_write_by(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Let `write(tmp)` create the file under a temporary sibling name, then rename it to `path`.

    For writers that open the file themselves (torch.profiler's export_chrome_trace,
    torch.cuda.memory._dump_snapshot). The temporary name keeps `path`'s last suffix, because such
    writers choose the format by it (export_chrome_trace gzips a ``*.gz`` path)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def staging_path(final: str | os.PathLike) -> Path:
    """Where a directory is built before `publish` renames it to `final` (a hidden sibling)."""
    final = Path(final)
    return final.with_name(f".{final.name}{INCOMPLETE_SUFFIX}")


def publish(staging: str | os.PathLike, final: str | os.PathLike) -> Path:
    """Replace `final` by the finished `staging` directory.

    An existing `final` is first renamed aside and removed only after the new one is in place, so
    an interruption leaves either the old directory or the new one under the final name.
    """
    staging, final = Path(staging), Path(final)
    if final.exists():
        old = final.with_name(f".{final.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        staging.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(final)
    return final


def default_permissions(path: str | os.PathLike) -> Path:
    """Give a file the mode a plain open() would have given it: 0666 less the umask.

    Some writers create their files owner-only (safetensors' save_file writes 0600), which leaves an export or a
    cache on shared storage unreadable to the rest of a team."""
    path = Path(path)
    mask = os.umask(0)
    os.umask(mask)
    path.chmod(0o666 & ~mask)
    return path


def free_bytes(path: str | os.PathLike) -> int | None:
    """Bytes an unprivileged writer may still use on `path`'s filesystem (the nearest existing parent's),
    or None where the filesystem cannot tell. Quotas (EDQUOT) are not seen here: they show as the error."""
    path = Path(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        stats = os.statvfs(path)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


def directory_bytes(path: str | os.PathLike) -> int:
    """The bytes of the files under `path` (0 when it does not exist): what a checkpoint takes on disk."""
    path = Path(path)
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def human_bytes(n: int | float) -> str:
    """1,651,092 -> '1.57 MiB': sizes in messages an operator compares with `df -h`."""
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} bytes" if unit == "bytes" else f"{n:.2f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
_SPACE_TEXTS = ("No space left on device", "Disk quota exceeded")


def out_of_space(err: BaseException | None) -> bool:
    """True when `err`, its causes, or the failures it carries (torch.distributed.checkpoint gathers every
    rank's exceptions into one) say ENOSPC or EDQUOT, by errno or by the OS's text for them."""
    seen = set()
    stack = [err]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno in _SPACE_ERRNOS:
            return True
        if any(text in str(e) for text in _SPACE_TEXTS):
            return True
        stack += [e.__cause__, e.__context__]
        failures = getattr(e, "failures", None)  # CheckpointException: {rank: (exception, traceback)}
        if isinstance(failures, dict):
            for failure in failures.values():  # (exception, traceback) pairs
                stack += [f for f in (failure if isinstance(failure, tuple) else (failure,))
                          if isinstance(f, BaseException)]
    return False


__all__ = ["atomic_write_text", "atomic_write_by", "staging_path", "publish", "default_permissions", "free_bytes",
           "human_bytes", "out_of_space", "INCOMPLETE_SUFFIX"]
