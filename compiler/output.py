"""Atomic output folders: build everything in a temporary sibling, then move it into place.

A compile killed at any point leaves either the previous output or nothing, never a mix: the
temporary folder is a hidden sibling of the target (same filesystem, so the move is a rename).

Ctrl-C (SIGINT) during a compile stops it at the next safe point rather than wherever Python
happens to be. Raised asynchronously, a KeyboardInterrupt can land where it cannot be handled: a
sweep of the signal's timing over a small compile found it aborting the process inside torch's
dispatcher, called back from C++ while the cost model interpreted the graph (SIGABRT, "terminate
called after throwing an instance of 'pybind11::error_already_set'"), and leaving numpy half-imported;
and inside a ``__del__`` or weakref callback Python prints it as "ignored" and carries on, which would
let the compile commit. So under :func:`interrupts_remembered` the first Ctrl-C only sets a flag (and
says so on stderr); :func:`raise_if_interrupted` turns it into a KeyboardInterrupt at the safe points
(every pass-manager event, including each step of a long pass, around tracing and lowering, and first
thing in :func:`commit`). A second Ctrl-C raises at once, except during the two renames of a commit.
A process that started with SIGINT ignored (a background job of a non-interactive shell) keeps
ignoring it, as Python itself does.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

from .errors import BertpressError


@contextmanager
def staging_dir(target: Path):
    """Yield a fresh temporary folder next to ``target``; remove it unless it was committed."""
    parent = target.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        _remove_abandoned(parent, target.name)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=parent))
    except OSError as exc:
        raise BertpressError(f"cannot create the output folder next to {target}: {exc.strerror}.",
                             field="--out", fix="choose a writable location for --out.") from None
    try:
        yield staging
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def _remove_abandoned(parent: Path, name: str) -> None:
    """Delete staging folders left by compiles that were killed (their process no longer exists)."""
    for leftover in parent.glob(f".{name}.partial-*"):
        pid = leftover.name.split("partial-", 1)[1].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(leftover, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _Interrupts:
    """What the SIGINT handler installed by :func:`interrupts_remembered` has seen."""

    def __init__(self) -> None:
        self.seen = False  # a SIGINT arrived
        self.committing = False  # inside a commit's renames: not even a second Ctrl-C raises


_interrupts = _Interrupts()


def _on_sigint(signum, frame) -> None:
    if _interrupts.seen and not _interrupts.committing:
        raise KeyboardInterrupt  # the second Ctrl-C: now
    _interrupts.seen = True
    os.write(2, b"\nbertpress: interrupted; stopping at the next safe point (Ctrl-C again to stop at once)\n")


@contextmanager
def interrupts_remembered():
    """Run a compile with a SIGINT handler that also remembers the interrupt (see the module docstring).

    Outside the main thread (where Python cannot install signal handlers), or when SIGINT is ignored,
    this changes nothing.
    """
    ignored = signal.getsignal(signal.SIGINT) is signal.SIG_IGN
    if threading.current_thread() is not threading.main_thread() or ignored:
        yield
        return
    previous = signal.signal(signal.SIGINT, _on_sigint)
    _interrupts.seen = False
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        _interrupts.seen = False


def raise_if_interrupted() -> None:
    """A safe point: raise KeyboardInterrupt if Ctrl-C was pressed since the compile started."""
    if _interrupts.seen:
        raise KeyboardInterrupt


def commit(staging: Path, target: Path) -> None:
    """Replace ``target`` with ``staging`` by renames; the old output is deleted only afterwards.

    An interrupted compile never commits; an interrupt that arrives during the renames is only noted
    (the output is then complete and in place).
    """
    target = target.resolve()
    _interrupts.committing = True
    try:
        raise_if_interrupted()
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(staging, target)
    finally:
        _interrupts.committing = False
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
