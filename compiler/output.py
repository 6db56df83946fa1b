"""Atomic output folders: build everything in a temporary sibling, then move it into place.

A compile killed at any point leaves either the previous output or nothing, never a mix: the
temporary folder is a hidden sibling of the target (same filesystem, so the move is a rename).

Ctrl-C (SIGINT) is remembered, not only raised: Python turns it into a KeyboardInterrupt at the next
bytecode, and when that bytecode belongs to a ``__del__`` or a weakref callback (torch.export and the
ONNX exporter collect many such objects) the exception is printed as "ignored" and the compile goes
on. Under :func:`interrupts_remembered` the handler also sets a flag, and :func:`commit` refuses to
move an interrupted compile's output into place; the two renames of a commit run with the
interrupt deferred, so a Ctrl-C cannot leave the target moved away and the new output not yet in.
Tracing and the ONNX export run deferred too (:func:`interrupts_deferred`): a KeyboardInterrupt
raised inside torch.export's Python callbacks once aborted the process from C++ (SIGABRT) and once
left numpy half-imported (RecursionError); deferred, the compile stops cleanly when they return. A
second Ctrl-C while deferred stops at once.
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
        self.seen = False  # a SIGINT arrived (even if its KeyboardInterrupt was swallowed)
        self.deferring = False  # remember, do not raise (yet)
        self.committing = False  # inside a commit's renames: not even a second Ctrl-C raises


_interrupts = _Interrupts()


def _on_sigint(signum, frame) -> None:
    again = _interrupts.seen
    _interrupts.seen = True
    if not _interrupts.deferring or (again and not _interrupts.committing):
        raise KeyboardInterrupt


@contextmanager
def interrupts_deferred():
    """Hold a Ctrl-C back while library code that mishandles asynchronous exceptions runs; raise it after."""
    outer = _interrupts.deferring
    _interrupts.deferring = True
    try:
        yield
    finally:
        _interrupts.deferring = outer
    if not outer:
        raise_if_interrupted()


@contextmanager
def interrupts_remembered():
    """Run a compile with a SIGINT handler that also remembers the interrupt (see the module docstring).

    Outside the main thread (where Python cannot install signal handlers) this changes nothing.
    """
    if threading.current_thread() is not threading.main_thread():
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
    """Raise KeyboardInterrupt if a SIGINT arrived whose own exception was swallowed on the way."""
    if _interrupts.seen:
        raise KeyboardInterrupt


def commit(staging: Path, target: Path) -> None:
    """Replace ``target`` with ``staging`` by renames; the old output is deleted only afterwards.

    An interrupted compile never commits; an interrupt that arrives during the renames is deferred
    until they are done (the output is then complete and in place).
    """
    target = target.resolve()
    raise_if_interrupted()
    deferring, _interrupts.deferring, _interrupts.committing = _interrupts.deferring, True, True
    try:
        raise_if_interrupted()
        old = None
        if target.exists():
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(staging, target)
    finally:
        _interrupts.deferring, _interrupts.committing = deferring, False
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
