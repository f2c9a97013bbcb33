"""Output files that never clobber: unique partial files, commits that do not replace, durable renames.

The rules every tracer command follows when it writes something a user will trust:

* Something *exists* at a path if :func:`exists` says so: a dangling symlink counts
  (``os.path.lexists``), so it is never silently replaced.
* Work in progress goes to a partial file that is unique to this run and created exclusively
  (``<name>.<pid>-<random>.partial`` in the target's folder, ``O_EXCL``): two runs with the
  same ``--out`` never share one.
* :func:`commit` moves the finished partial into place without replacing a file that appeared
  meanwhile (a hard link, which fails if the name exists; then the partial is unlinked), unless
  ``force``; then it fsyncs the folder so the rename itself survives a crash.
* Only files this run created are ever removed.

Example::

    partial = create_partial(Path("traces/x.h5"))     # traces/x.h5.1234-9f2c01ab.partial, empty
    ...                                                # write it, fsync it
    commit(partial, Path("traces/x.h5"), force=False)  # TracerError if traces/x.h5 appeared
"""

from __future__ import annotations

import errno
import os
import secrets
from pathlib import Path

from tracer.errors import TracerError

PARTIAL_SUFFIX = ".partial"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def exists(path: str | Path) -> bool:
    """True if anything is at ``path``, a dangling symlink included."""
    return os.path.lexists(path)


def refuse_existing(path: Path, force: bool, what: str = "--out") -> None:
    """The one-line refusal to replace something that exists (unless ``force``)."""
    if exists(path) and not force:
        kind = "a dangling symlink" if path.is_symlink() and not path.exists() else None
        what_is = f" ({kind})" if kind else ""
        raise TracerError(f"{path} exists{what_is}; pass --force to overwrite it or {what} to choose another path")


def partial_name(path: Path) -> str:
    """A name for this run's partial file of ``path``: ``<name>.<pid>-<8 hex>.partial``."""
    return f"{path.name}.{os.getpid()}-{secrets.token_hex(4)}{PARTIAL_SUFFIX}"


def partials_of(path: Path) -> list[Path]:
    """Partial files that runs writing ``path`` left (or are writing) next to it."""
    try:
        return sorted(p for p in path.parent.glob(f"{path.name}.*{PARTIAL_SUFFIX}") if p.is_file())
    except OSError:
        return []


def create_partial(path: Path) -> Path:
    """Create this run's empty partial file of ``path`` exclusively (``O_EXCL``); returns it.

    The folder is created if needed. Raises :class:`TracerError` when it cannot be written.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise TracerError(f"cannot create the folder {path.parent}: {e.strerror or e}") from None
    for _ in range(8):
        partial = path.with_name(partial_name(path))
        try:
            fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        except OSError as e:
            raise TracerError(f"cannot write in {path.parent}: {e.strerror or e}") from None
        os.close(fd)
        return partial
    raise TracerError(f"could not create a unique partial file next to {path}")  # pragma: no cover


def fsync_dir(folder: Path) -> None:
    """Make a rename or link in ``folder`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def commit(partial: Path, path: Path, force: bool) -> Path:
    """Move the finished ``partial`` to ``path``; never replaces anything there unless ``force``.

    Without ``force`` the partial is hard-linked to ``path`` (the link fails if ``path`` exists,
    even if it appeared a moment ago) and then unlinked; on file systems without hard links, a
    last existence check and a rename. With ``force``, an atomic ``os.replace``. The folder is
    fsynced afterwards. On refusal the partial is removed and :class:`TracerError` raised.
    """
    if force:
        os.replace(partial, path)
    else:
        try:
            os.link(partial, path, follow_symlinks=False)
        except FileExistsError:
            partial.unlink(missing_ok=True)
            raise TracerError(
                f"{path} appeared while this run was writing (another run with the same --out?); "
                "this run's result was discarded; pass --force to overwrite, or choose another --out"
            ) from None
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS):
                raise
            if exists(path):  # no hard links here: a last check, then rename
                partial.unlink(missing_ok=True)
                raise TracerError(f"{path} appeared while this run was writing; pass --force to overwrite it") from None
            os.rename(partial, path)
        else:
            partial.unlink()
    fsync_dir(path.parent)
    return path


def no_space_message(e: OSError, partial: Path, path: Path) -> str | None:
    """The one-line message for a full disk (or quota), or ``None`` if ``e`` is something else."""
    if getattr(e, "errno", None) in NO_SPACE or "No space left" in str(e) or "quota exceeded" in str(e).lower():
        return (
            f"no space left on the device holding {path.parent} while writing {path.name}; "
            f"the partial file was removed{' and the existing ' + str(path) + ' left untouched' if exists(path) else ''}; "
            "free space or choose another --out"
        )
    return None
