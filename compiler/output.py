"""Atomic output folders: build everything in a temporary sibling, then move it into place.

A compile killed at any point leaves either the previous output or nothing, never a mix: the
temporary folder is a hidden sibling of the target (same filesystem, so the move is a rename).
"""

from __future__ import annotations

import os
import shutil
import tempfile
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


def commit(staging: Path, target: Path) -> None:
    """Replace ``target`` with ``staging`` by renames; the old output is deleted only afterwards."""
    target = target.resolve()
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
