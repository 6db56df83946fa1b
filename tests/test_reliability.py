"""Faults: killed compiles, unwritable targets, and the guarantee that nothing half-written is left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from compiler.cli import main
from tests.conftest import write_recipe


def _recipe(tmp_path, tiny_dir) -> Path:
    return write_recipe(tmp_path, f"""
model: {tiny_dir}
calibration: {{samples: 16, validation_samples: 8, max_length: 32, batch_size: 8}}
budget: {{min: 0.5}}
passes:
  - quantize-linear: {{}}
""")


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGINT])
def test_killed_compile_leaves_the_previous_output_untouched(tmp_path, tiny_dir, signum):
    recipe = _recipe(tmp_path, tiny_dir)
    out = tmp_path / "out"
    assert main(["compile", str(recipe), "--out", str(out)]) == 0
    before = _snapshot(out)
    proc = subprocess.Popen([sys.executable, "-m", "compiler.cli", "compile", str(recipe), "--out", str(out), "--force"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    # Kill it once it is past tracing, while it is running passes or lowering (a staging folder exists). Waiting for
    # the staged model.onnx instead left too small a window on a loaded machine: the compile could commit first.
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".out.partial-*")) and proc.poll() is None:
        time.sleep(0.02)
    assert proc.poll() is None, "the compile finished before it could be killed"
    proc.send_signal(signum)
    proc.wait(timeout=60)
    assert _snapshot(out) == before  # the previous output, byte for byte
    if signum == signal.SIGINT:
        assert not list(tmp_path.glob(".out.partial-*"))  # cleaned up on the way out
    # A killed compile's staging folder is hidden and removed by the next compile of that target.
    assert main(["compile", str(recipe), "--out", str(out), "--force"]) == 0
    assert not list(tmp_path.glob(".out.partial-*"))


def test_killed_first_compile_leaves_nothing(tmp_path, tiny_dir):
    recipe = _recipe(tmp_path, tiny_dir)
    out = tmp_path / "fresh"
    proc = subprocess.Popen([sys.executable, "-m", "compiler.cli", "compile", str(recipe), "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and not list(tmp_path.glob(".fresh.partial-*")) and proc.poll() is None:
        time.sleep(0.05)
    proc.kill()
    proc.wait(timeout=60)
    assert not out.exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_target_is_a_clear_error(tmp_path, tiny_dir, capsys):
    recipe = _recipe(tmp_path, tiny_dir)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert main(["compile", str(recipe), "--out", str(locked / "out")]) == 2
        assert "writable" in capsys.readouterr().err
    finally:
        locked.chmod(0o700)


def test_full_disk_while_writing_is_a_clear_error_and_leaves_nothing(tmp_path, tiny_dir, capsys, monkeypatch):
    import errno

    import compiler.report as report_io

    def disk_full(report, folder):
        raise OSError(errno.ENOSPC, "No space left on device", str(folder / "report.json"))

    monkeypatch.setattr(report_io, "write", disk_full)
    out = tmp_path / "out"
    assert main(["compile", str(_recipe(tmp_path, tiny_dir)), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "No space left on device" in err and "Nothing was written" in err
    assert not out.exists() and not list(tmp_path.glob(".out.partial-*"))


def test_target_that_is_a_file_is_a_clear_error(tmp_path, tiny_dir, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    assert main(["compile", str(_recipe(tmp_path, tiny_dir)), "--out", str(blocker / "out")]) == 2
    assert "writable" in capsys.readouterr().err
    assert blocker.read_text() == "not a folder"
