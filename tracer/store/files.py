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
* An input is never an output (:func:`check_target`): a path that is the same file as one of
  the command's inputs (by inode: a symlink or hard link to it counts) is refused, ``--force``
  or not; only regular files are ever replaced (a folder, device node, FIFO or socket is not).
* Small files (manifests, summaries, figures, cached weights) are written by
  :func:`write_atomic` (partial file, fsync, rename), a set of files that belong together by
  :func:`write_group` (all partials first, then the renames with signals held), so a reader
  never sees half a file or a mix of two runs' files.

Example::

    partial = create_partial(Path("traces/x.h5"))     # traces/x.h5.1234-9f2c01ab.partial, empty
    ...                                                # write it, fsync it
    commit(partial, Path("traces/x.h5"), force=False)  # TracerError if traces/x.h5 appeared
"""

from __future__ import annotations

import contextlib
import errno
import os
import secrets
import signal
import stat
import threading
from pathlib import Path
from typing import Callable, Iterable

from tracer.errors import TracerError

PARTIAL_SUFFIX = ".partial"
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


_COMMITTED: list[Path] = []


def exists(path: str | Path) -> bool:
    """True if anything is at ``path``, a dangling symlink included."""
    return os.path.lexists(path)


def committed() -> list[Path]:
    """The files this process has moved into place so far (what a late signal leaves written);
    files placed in a private build folder (``*.partial``, e.g. a bundle's) are not outputs yet."""
    return [p for p in _COMMITTED if not p.parent.name.endswith(PARTIAL_SUFFIX)]


def _kind(mode: int) -> str | None:
    """What a non-regular file is, in words (``None`` for a regular file)."""
    if stat.S_ISREG(mode):
        return None
    for test, word in ((stat.S_ISDIR, "a folder"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return word
    return "not a regular file"  # pragma: no cover


def not_regular(path: str | Path) -> str | None:
    """What is at ``path`` if it is something other than a regular file (or a link to one), else ``None``.

    Nothing there, or a dangling symlink, is ``None`` too (:func:`refuse_existing` handles those).
    """
    try:
        return _kind(os.stat(path).st_mode)
    except OSError:
        return None


def same_file(a: str | Path, b: str | Path) -> bool:
    """True if ``a`` and ``b`` are the same file (inode), through symlinks and hard links."""
    try:
        return os.path.samefile(a, b)
    except (OSError, ValueError):
        return False


def check_target(path: Path, force: bool, inputs: Iterable[str | Path | None] = (), what: str = "--out") -> None:
    """Refuse, before anything is written, an output ``path`` that would lose something.

    * ``path`` is one of ``inputs`` (same inode, through symlinks and hard links): refused even
      with ``force`` -- an input is never an output;
    * something other than a regular file is there (folder, device, FIFO, socket): refused even
      with ``force``;
    * anything is there and not ``force``: :func:`refuse_existing`.
    """
    for source in inputs:
        if source is not None and exists(path) and same_file(path, source):
            raise TracerError(
                f"{what} {path} is the input {source} (the same file); an input is never an output, "
                f"even with --force; choose another {what}"
            )
    kind = not_regular(path)
    if kind is not None:
        raise TracerError(f"{what} {path} is {kind}; only regular files are ever replaced (--force included); choose another {what}")
    refuse_existing(path, force, what)


def refuse_inputs_inside(folder: Path, inputs: Iterable[str | Path | None], what: str = "--out") -> None:
    """Refuse an output folder that holds (or is) one of ``inputs``, where a command that writes
    its own files into it could replace one (the folder and its ``traces/`` are looked at)."""
    inputs = [i for i in inputs if i is not None]
    if not inputs or not Path(folder).is_dir():
        return
    for source in inputs:
        if same_file(folder, source):
            raise TracerError(f"{what} {folder} is the input {source}; choose another {what}")
    for sub in (Path(folder), Path(folder) / "traces"):
        try:
            entries = list(sub.iterdir()) if sub.is_dir() else []
        except OSError:
            continue
        for entry in entries:
            for source in inputs:
                if same_file(entry, source):
                    raise TracerError(
                        f"{what} {folder} holds {entry.name}, which is the input {source} (the same file); "
                        f"an input is never an output, even with --force; choose another {what}"
                    )


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


def commit(partial: Path, path: Path, force: bool, output: bool = True) -> Path:
    """Move the finished ``partial`` to ``path``; never replaces anything there unless ``force``.

    Without ``force`` the partial is hard-linked to ``path`` (the link fails if ``path`` exists,
    even if it appeared a moment ago) and then unlinked; on file systems without hard links, a
    last existence check and a rename. With ``force``, an atomic ``os.replace``. The folder is
    fsynced afterwards. On refusal the partial is removed and :class:`TracerError` raised.
    """
    if force:
        kind = not_regular(path)  # a folder or a device that appeared meanwhile is never replaced
        if kind is not None:
            partial.unlink(missing_ok=True)
            raise TracerError(f"{path} is {kind}; only regular files are ever replaced; this run's result was discarded")
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
    if output:  # a command's own output (not a cache): what a signal's line reports as written
        _COMMITTED.append(path)
    return path


Writer = Callable[[object], None]
"""Writes a file's content into the binary file object it is given."""


def _writer(content: bytes | str | Writer) -> Writer:
    if isinstance(content, str):
        content = content.encode("utf-8")
    if isinstance(content, bytes):
        return lambda f: f.write(content)
    return content


def _write_partial(path: Path, content: bytes | str | Writer) -> Path:
    """This run's partial file of ``path`` with ``content`` in it, fsynced."""
    partial = create_partial(path)
    try:
        with open(partial, "wb") as f:
            _writer(content)(f)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return partial


def write_atomic(path: Path, content: bytes | str | Writer, inputs: Iterable[str | Path | None] = (), what: str = "--out",
                 output: bool = True) -> Path:
    """Write ``content`` (bytes, text, or ``writer(binary file)``) to ``path`` atomically.

    A partial file next to ``path`` is written, fsynced and renamed over ``path``: a reader sees
    the old file or the new one, never a mix; on any failure or signal the partial is removed.
    What is at ``path`` is replaced only if it is a regular file that is none of ``inputs``
    (:func:`check_target`; callers refuse existing files first where they must).
    """
    path = Path(path)
    check_target(path, True, inputs, what)
    partial = _write_partial(path, content)
    try:
        return commit(partial, path, force=True, output=output)
    finally:
        partial.unlink(missing_ok=True)


def write_group(items: list[tuple[Path, bytes | str | Writer]], inputs: Iterable[str | Path | None] = (), what: str = "-o") -> list[Path]:
    """Write several files that belong together: every partial first, then all the renames with
    signals held (:func:`signals_held`), so an interruption leaves the old set or the new one."""
    inputs = list(inputs)
    for path, _ in items:
        check_target(Path(path), True, inputs, what)
    partials: list[Path] = []
    try:
        for path, content in items:
            partials.append(_write_partial(Path(path), content))
        with signals_held():
            return [commit(partial, Path(path), force=True) for partial, (path, _) in zip(partials, items)]
    finally:
        for partial in partials:
            partial.unlink(missing_ok=True)


HELD_SIGNALS = tuple(s for s in (signal.SIGINT, signal.SIGTERM, getattr(signal, "SIGHUP", None)) if s is not None)


@contextlib.contextmanager
def signals_held():
    """Inside, SIGINT/SIGTERM/SIGHUP are noted, not acted on; on leaving, the first one noted is
    delivered to the handler that was in place (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    noted: list[int] = []
    saved = {s: signal.getsignal(s) for s in HELD_SIGNALS}
    held = [s for s, h in saved.items() if h not in (signal.SIG_IGN, None)]
    for s in held:
        signal.signal(s, lambda signum, frame: noted.append(signum))
    try:
        yield
    finally:
        for s in held:
            signal.signal(s, saved[s])
        if noted:
            signal.raise_signal(noted[0])


def no_space_message(e: OSError, partial: Path, path: Path) -> str | None:
    """The one-line message for a full disk (or quota), or ``None`` if ``e`` is something else."""
    if getattr(e, "errno", None) in NO_SPACE or "No space left" in str(e) or "quota exceeded" in str(e).lower():
        return (
            f"no space left on the device holding {path.parent} while writing {path.name}; "
            f"the partial file was removed{' and the existing ' + str(path) + ' left untouched' if exists(path) else ''}; "
            "free space or choose another --out"
        )
    return None
