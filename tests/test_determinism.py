"""Same inputs, same bytes: two compiles of one recipe into different folders give identical outputs.

The recipe distills through torch.compile on two threads, where Inductor's atomic scatter-adds once made every
build's weights differ (compiler.distillation.deterministic_kernels).

The second compile runs from another working directory into a differently named folder, so any
path, timestamp or process-dependent name that leaked into model.onnx would show up as a diff.
"""

from __future__ import annotations

import json
import os

import onnx
import torch

from compiler.cli import main
from tests.conftest import write_recipe


def test_two_compiles_give_byte_identical_outputs(tmp_path, tiny_dir, monkeypatch):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        _two_compiles(tmp_path, tiny_dir, monkeypatch)
    finally:
        torch.set_num_threads(threads)


def _two_compiles(tmp_path, tiny_dir, monkeypatch):
    recipe = write_recipe(tmp_path, f"""
version: 1
model: {tiny_dir}
calibration: {{texts: builtin, samples: 16, validation_samples: 8, max_length: 32, batch_size: 8, seed: 3}}
budget: {{metric: cosine, min: 0.5}}
passes:
  - layer-drop: {{count: 1}}
  - distill: {{steps: 6, batch_size: 8, max_length: 32, monitor_every: 3, texts: builtin, samples: 200, qat: true, compile: true}}
  - quantize-linear: {{}}
""")
    first, second = tmp_path / "first", tmp_path / "elsewhere" / "second-build"
    assert main(["compile", str(recipe), "--out", str(first)]) == 0
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert main(["compile", str(recipe), "--out", str(second)]) == 0

    produced = sorted(p.name for p in first.iterdir())
    assert produced == sorted(p.name for p in second.iterdir())
    for name in produced:
        if name not in ("report.json", "report.md"):  # the reports hold timings
            assert (first / name).read_bytes() == (second / name).read_bytes(), name
    model = onnx.load(first / "model.onnx", load_external_data=False)
    text = str(model)
    assert str(tmp_path) not in text and os.path.basename(str(tmp_path)) not in text
    # The reports agree on everything but time: same recipe, same decisions, same checks.
    reports = [json.loads((folder / "report.json").read_text()) for folder in (first, second)]
    for report in reports:
        report.pop("timings")
        report.pop("latency")  # holds a measured latency
        report["lowering"].pop("seconds")
        for row in report["passes"]:
            row.pop("seconds")
            for key in ("seconds", "seconds_per_step", "seconds_per_step_steady"):  # distill's pace
                row.get("details", {}).pop(key, None)
    assert reports[0] == reports[1]
