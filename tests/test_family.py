"""The BERT family through bertpress: tiny random checkpoints of each member (tests/family_checkpoints.py)."""

from __future__ import annotations

import json
from pathlib import Path

import onnxruntime as ort
import pytest

from compiler.cli import main
from tests.family_checkpoints import make_family_checkpoint

CALIBRATION = "calibration: {texts: builtin, samples: 16, validation_samples: 8, max_length: 32, batch_size: 8}"


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    """member -> its checkpoint folder, built on first use and shared by the module's tests."""
    made: dict[str, Path] = {}

    def folder(member: str) -> Path:
        if member not in made:
            made[member] = make_family_checkpoint(member, tmp_path_factory.mktemp(member))
        return made[member]

    return folder


def compile_member(folder: Path, model: Path, passes: str, budget: float = 0.5) -> tuple[int, Path]:
    recipe = folder / "recipe.yaml"
    recipe.write_text(f"model: {model}\n{CALIBRATION}\nbudget: {{min: {budget}}}\ncost: {{batch: 2, seq: 16}}\n"
                      f"passes:\n{passes}\n")
    out = folder / "out"
    return main(["compile", str(recipe), "--out", str(out)]), out


def test_distilbert_is_traced_lowered_and_shipped_without_token_type_ids(family, tmp_path):
    code, out = compile_member(tmp_path, family("distilbert"), "  - quantize-linear: {dtype: int8}")
    assert code == 0
    inputs = [i.name for i in ort.InferenceSession(str(out / "model.onnx")).get_inputs()]
    assert inputs == ["input_ids", "attention_mask"]
    config = json.loads((out / "config.json").read_text())
    assert config["bertpress"]["inputs"] == inputs
    assert json.loads((out / "tokenizer_config.json").read_text())["model_input_names"] == inputs
    assert json.loads((out / "report.json").read_text())["final_check"]["passed"]
