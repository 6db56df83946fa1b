"""Peak memory (max resident set size) of compiling a recipe, measured on the compile's own process.

    python bench/peak_memory.py [recipes/minilm-int8.yaml]
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    recipe = sys.argv[1] if len(sys.argv) > 1 else str(ROOT / "recipes/minilm-int8.yaml")
    out = Path(tempfile.mkdtemp(prefix="bertpress-mem-")) / "out"
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "compiler.cli", "compile", recipe, "--out", str(out), "--force"], check=True)
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss  # Linux reports KiB
    print(f"{recipe}: peak resident memory {peak_kib / 1024 ** 2:.2f} GiB, wall {time.perf_counter() - started:.0f}s")


if __name__ == "__main__":
    main()
