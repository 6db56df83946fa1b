"""bertpress as a build step: the Makefile target, the up-to-date cache, --force, and the report's published schema."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from compiler import cache, compile as compile_module
from compiler.cli import main
from compiler.recipe import load_recipe
from compiler.report_schema import report_json_schema_text
from tests.conftest import write_recipe

ROOT = Path(__file__).parent.parent
SCHEMA_FILE = ROOT / "docs" / "report.schema.json"


def _recipe(folder: Path, model: Path, *, budget: float = 0.5, texts: str = "builtin", name: str = "recipe.yaml") -> Path:
    return write_recipe(folder, f"""
version: 1
model: {model}
calibration: {{texts: {texts}, samples: 16, validation_samples: 8, max_length: 32, batch_size: 8}}
budget: {{metric: cosine, min: {budget}}}
passes:
  - layer-drop: {{layers: [1]}}
  - quantize-linear: {{}}
""", name=name)


def _make(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), f"PYTHON={sys.executable}", *args],
                          capture_output=True, text=True, timeout=600, env=env)


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_dir) -> tuple[Path, Path]:
    """A tiny recipe compiled through the Makefile target, as a CI job would."""
    folder = tmp_path_factory.mktemp("build-step")
    recipe, out = _recipe(folder, tiny_dir), folder / "out"
    done = _make("compile", f"RECIPE={recipe}", f"OUT={out}")
    assert done.returncode == 0, done.stderr[-3000:]
    return recipe, out


def _validate(report: dict) -> None:
    jsonschema = pytest.importorskip("jsonschema")
    jsonschema.validate(report, json.loads(SCHEMA_FILE.read_text()), cls=jsonschema.Draft202012Validator)


def test_make_compile_writes_the_model_and_a_job_summary(built):
    _, out = built
    assert (out / "model.onnx").is_file()
    summary = (out / "report.md").read_text()
    assert summary.startswith("# bertpress report: ok")
    assert "| # | pass |" in summary and "Final ONNX Runtime check passed" in summary


def test_rerun_with_nothing_changed_is_up_to_date_without_loading_the_model(built, monkeypatch, capsys):
    recipe, out = built
    stamp = (out / "model.onnx").stat().st_mtime_ns

    def no_loading(*args, **kwargs):
        raise AssertionError("an up-to-date build must not load the model")

    monkeypatch.setattr(compile_module, "load_model", no_loading)
    assert main(["compile", str(recipe), "--out", str(out)]) == 0
    assert "is up to date" in capsys.readouterr().err
    assert (out / "model.onnx").stat().st_mtime_ns == stamp


def test_make_rerun_says_up_to_date(built):
    recipe, out = built
    done = _make("compile", f"RECIPE={recipe}", f"OUT={out}")
    assert done.returncode == 0 and "up to date" in done.stderr


def test_force_rebuilds(built, capsys):
    recipe, out = built
    stamp = (out / "model.onnx").stat().st_mtime_ns
    assert main(["compile", str(recipe), "--out", str(out), "--force"]) == 0
    assert "up to date" not in capsys.readouterr().err
    assert (out / "model.onnx").stat().st_mtime_ns != stamp
    assert cache.up_to_date(out, json.loads((out / "report.json").read_text())["cache"]["key"]) is not None


def test_changed_recipe_changes_the_key(built, tmp_path, tiny_dir):
    recipe, out = built
    key = json.loads((out / "report.json").read_text())["cache"]["key"]
    assert cache.cache_key(cache.cache_inputs(load_recipe(recipe))) == key
    stricter = _recipe(tmp_path, tiny_dir, budget=0.6)
    assert cache.cache_key(cache.cache_inputs(load_recipe(stricter))) != key
    assert cache.up_to_date(out, cache.cache_key(cache.cache_inputs(load_recipe(stricter)))) is None


def test_changed_model_file_changes_the_key(tmp_path, tiny_dir):
    copy = shutil.copytree(tiny_dir, tmp_path / "model")
    before = cache.cache_inputs(load_recipe(_recipe(tmp_path, copy)))
    config = json.loads((copy / "config.json").read_text())
    config["layer_norm_eps"] = 1e-6
    (copy / "config.json").write_text(json.dumps(config))
    after = cache.cache_inputs(load_recipe(_recipe(tmp_path, copy)))
    assert before["model"] != after["model"] and before["recipe"] == after["recipe"]


def test_changed_calibration_file_changes_the_key(tmp_path, tiny_dir):
    texts = tmp_path / "texts.txt"
    texts.write_text("one sentence\nanother sentence\n")
    recipe = _recipe(tmp_path, tiny_dir, texts="texts.txt")
    before = cache.cache_inputs(load_recipe(recipe))
    texts.write_text("one sentence\nanother, edited sentence\n")
    after = cache.cache_inputs(load_recipe(recipe))
    assert before["calibration"] != after["calibration"] and before["recipe"] == after["recipe"]


def test_missing_output_file_is_not_up_to_date(built, tmp_path):
    _, out = built
    copy = shutil.copytree(out, tmp_path / "copy")
    key = json.loads((copy / "report.json").read_text())["cache"]["key"]
    assert cache.up_to_date(copy, key) is not None
    (copy / "tokenizer.json").unlink()
    assert cache.up_to_date(copy, key) is None


def test_broken_budget_fails_make_and_a_rerun_does_not_hide_it(tmp_path, tiny_dir):
    recipe, out = _recipe(tmp_path, tiny_dir, budget=0.9999), tmp_path / "out"
    for _ in range(2):  # a failed build is never "up to date": the rerun fails again
        done = _make("compile", f"RECIPE={recipe}", f"OUT={out}")
        assert done.returncode != 0 and "FAILED (exit 1)" in done.stderr
        report = json.loads((out / "report.json").read_text())
        assert report["status"] == "check_failed" and report["failure"]["field"] == "passes[0]"
        assert not (out / "model.onnx").exists()
    _validate(report)


def test_real_report_validates_against_the_published_schema(built):
    _, out = built
    _validate(json.loads((out / "report.json").read_text()))


def test_published_schema_is_up_to_date():
    assert SCHEMA_FILE.read_text() == report_json_schema_text(), "run `make report-schema` and commit docs/report.schema.json"


def test_schema_version_matches_the_reports():
    from compiler.report import REPORT_SCHEMA_VERSION

    schema = json.loads(SCHEMA_FILE.read_text())
    assert schema["properties"]["schema_version"]["const"] == REPORT_SCHEMA_VERSION
    assert "schema_version" in schema["required"] and "cache" in schema["required"]


@pytest.mark.parametrize("source, attribute", [("builtin:fortunes-train", "FORTUNES_DIR"),
                                               ("builtin:fortunes-heldout", "FORTUNES_DIR"),
                                               ("builtin:wordnet-pairs", "WORDNET_DIR")])
def test_packaged_corpora_digest_their_folder_bytes(tmp_path, monkeypatch, source, attribute):
    (tmp_path / "subject").write_text("one entry\n%\nanother entry\n")
    monkeypatch.setattr(cache, attribute, tmp_path)
    before = cache.calibration_digest(source, None)
    (tmp_path / "subject").write_text("one entry\n%\nan edited entry\n")
    assert cache.calibration_digest(source, None) != before
    assert cache.calibration_digest("builtin:python-docstrings", None) == "builtin:python-docstrings"


def test_jargon_file_digest_is_of_its_bytes(tmp_path, monkeypatch):
    import gzip

    path = tmp_path / "jargon.dict.dz"
    path.write_bytes(gzip.compress(b"foo\n /foo/, n.\n\n    A sample name for absolutely anything at all.\n"))
    monkeypatch.setattr(cache, "JARGON_FILE", path)
    before = cache.calibration_digest("builtin:jargon", None)
    path.write_bytes(gzip.compress(b"foo\n /foo/, n.\n\n    A sample name for nearly anything at all.\n"))
    assert cache.calibration_digest("builtin:jargon", None) != before


def test_austen_digest_is_of_its_package_folder(tmp_path, monkeypatch):
    (tmp_path / "Rdata.rdb").write_bytes(b"one")
    (tmp_path / "Rdata.rdx").write_bytes(b"index")
    monkeypatch.setattr(cache, "AUSTEN_DIR", tmp_path)
    before = cache.calibration_digest("builtin:austen", None)
    assert before != "builtin:austen"
    (tmp_path / "Rdata.rdb").write_bytes(b"two")
    assert cache.calibration_digest("builtin:austen", None) != before
