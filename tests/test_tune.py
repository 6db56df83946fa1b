"""bertpress tune: searchable recipes, the local search end to end, --resume, successive halving, and Ray."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from compiler.cli import main
from tests.conftest import write_recipe

MODEL_FILES_SKIPPED = ("report.json", "report.md")


def _recipe(folder: Path, tiny_dir: Path, passes: str, *, tune: str = "{batch: 2, seq: 16}", threads: int = 1,
            name: str = "search.yaml", extra: str = "") -> Path:
    return write_recipe(folder, f"""
version: 1
model: {tiny_dir}
calibration: {{texts: builtin, samples: 16, validation_samples: 8, max_length: 32, batch_size: 8}}
budget: {{metric: cosine, min: 0.9}}
target: {{threads: {threads}}}
tune: {tune}
{extra}passes:
{passes}
""", name)


# Three candidates: prune-ffn keeping 8 of 64 neurons is estimated cheapest, 64 (nothing pruned) dearest; with a
# margin of 5% the first one within budget screens the dearest out.
SPACE = "  - prune-ffn: {keep: {search: [8, 16, 64]}}\n  - quantize-linear: {dtype: int8}"
TUNE = "{batch: 2, seq: 16, margin: 0.05}"


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "trials.jsonl").read_text().splitlines()]


def _frontier(out: Path) -> list[tuple]:
    points = json.loads((out / "frontier.json").read_text())["frontier"]
    return [(json.dumps(p["options"], sort_keys=True), p["objective"], round(p["fidelity"], 4)) for p in points]


# The Ray tests run the same search with a pass that kills the first trial's process (whoever creates the marker
# file); here the marker exists already, since a local trial runs in this process.
CRASHING = SPACE + "\n  - crash-once: {marker: MARKER}"


def _crashing_recipe(folder: Path, tiny_dir: Path) -> Path:
    return _recipe(folder, tiny_dir, CRASHING.replace("MARKER", str(folder / "crashed")), tune=TUNE,
                   extra="plugins: [tests.tune_passes]\n")


@pytest.fixture(scope="module")
def local_tune(tmp_path_factory, tiny_dir):
    folder = tmp_path_factory.mktemp("tune-local")
    recipe = _crashing_recipe(folder, tiny_dir)
    (folder / "crashed").touch()
    out = folder / "out"
    assert main(["tune", str(recipe), "--out", str(out)]) == 0
    return recipe, out


def test_validate_accepts_a_searchable_recipe_and_counts_its_candidates(tmp_path, tiny_dir, capsys):
    recipe = _recipe(tmp_path, tiny_dir, "  - prune-ffn: {keep: {search: {low: 16, high: 64, step: 16}}}\n"
                                         "  - quantize-linear: {dtype: {search: [int8, fp16]}}")
    assert main(["validate", str(recipe)]) == 0
    err = capsys.readouterr().err
    assert "8 candidates over 2 options" in err and "passes[0].prune-ffn.keep (4)" in err and "bertpress tune" in err


def test_validate_names_the_choice_its_pass_config_refuses(tmp_path, tiny_dir, capsys):
    recipe = _recipe(tmp_path, tiny_dir, "  - prune-ffn: {keep: {search: [16, 0]}}")
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "choice 0 of passes[0].prune-ffn.keep is not valid" in err and str(recipe) in err


def test_validate_refuses_a_fractional_range_without_step(tmp_path, tiny_dir, capsys):
    recipe = _recipe(tmp_path, tiny_dir, "  - prune-ffn: {keep_fraction: {search: {low: 0.25, high: 1.0}}}")
    assert main(["validate", str(recipe)]) == 2
    assert "needs a step" in capsys.readouterr().err


def test_compile_refuses_a_searchable_recipe_naming_bertpress_tune(tmp_path, tiny_dir, capsys):
    recipe = _recipe(tmp_path, tiny_dir, SPACE)
    out = tmp_path / "out"
    assert main(["compile", str(recipe), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "passes[0].prune-ffn.keep is a search space" in err and f"bertpress tune {recipe}" in err
    assert not out.exists()


def test_recipe_schema_with_search_spaces_imports_no_torch():
    code = "import sys, compiler.recipe, compiler.search_space; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parent.parent)


def test_local_tune_writes_trials_frontier_and_best(local_tune):
    _, out = local_tune
    records = _records(out)
    assert len(records) == 3 and {r["status"] for r in records} <= {"ok", "check_failed", "pruned"}
    for record in records:
        assert record["estimated_latency_ms"] > 0 and "seconds" in record and record["options"]
    compiled = [r for r in records if r["status"] == "ok"]
    assert compiled and all(r["measured_latency_ms"] > 0 and r["size_bytes"] > 0 and r["fidelity"] >= 0.9 for r in compiled)
    summary = json.loads((out / "frontier.json").read_text())
    assert summary["frontier"] and summary["best"]["key"] == summary["frontier"][0]["key"]
    assert (out / "frontier.png").stat().st_size > 10_000
    assert (out / "best" / "model.onnx").is_file() and "{search" not in (out / "best.yaml").read_text()


def test_tune_does_not_compile_a_candidate_dominated_by_one_within_budget(local_tune):
    _, out = local_tune
    records = {r["options"]["passes[0].prune-ffn.keep"]: r for r in _records(out)}
    assert records[64]["status"] == "pruned" and "within budget" in records[64]["reason"]
    assert not (out / "trials" / records[64]["key"]).exists()
    assert records[8]["status"] == "ok" and records[8]["estimated_latency_ms"] < records[64]["estimated_latency_ms"]


def test_best_yaml_compiles_to_the_same_files_byte_for_byte(local_tune, tmp_path):
    _, out = local_tune
    again = tmp_path / "again"
    assert main(["compile", str(out / "best.yaml"), "--out", str(again)]) == 0
    tuned = {p.relative_to(out / "best") for p in (out / "best").rglob("*") if p.is_file() and p.name not in MODEL_FILES_SKIPPED}
    assert tuned == {p.relative_to(again) for p in again.rglob("*") if p.is_file() and p.name not in MODEL_FILES_SKIPPED}
    for name in tuned:
        assert (out / "best" / name).read_bytes() == (again / name).read_bytes(), name


def test_resume_after_an_interrupt_recomputes_nothing_finished(local_tune, tmp_path):
    recipe, out = local_tune
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    lines = (resumed / "trials.jsonl").read_text().splitlines()
    # The run was cut after its first trial: the other two lines were never written.
    (resumed / "trials.jsonl").write_text(lines[0] + "\n")
    assert main(["tune", str(recipe), "--out", str(resumed), "--resume"]) == 0
    summary = json.loads((resumed / "frontier.json").read_text())
    assert summary["reused_from_previous_run"] == 1 and summary["compiled_this_run"] == 1  # the other is pruned again
    assert (resumed / "trials.jsonl").read_text().splitlines()[0] == lines[0]
    assert _frontier(resumed) == _frontier(out)


def test_resume_of_a_finished_search_compiles_nothing(local_tune, tmp_path):
    recipe, out = local_tune
    resumed = tmp_path / "resumed"
    shutil.copytree(out, resumed)
    assert main(["tune", str(recipe), "--out", str(resumed), "--resume"]) == 0
    summary = json.loads((resumed / "frontier.json").read_text())
    assert summary["compiled_this_run"] == 0 and summary["reused_from_previous_run"] == 3
    assert (resumed / "best" / "model.onnx").read_bytes() == (out / "best" / "model.onnx").read_bytes()


def test_ctrl_c_stops_between_safe_points_and_resume_finishes_the_search(tmp_path, tiny_dir):
    import signal

    recipe = _recipe(tmp_path, tiny_dir, SPACE, tune=TUNE)
    out = tmp_path / "out"
    tune = subprocess.Popen([sys.executable, "-m", "compiler.cli", "tune", str(recipe), "--out", str(out)],
                            cwd=Path(__file__).parent.parent, stderr=subprocess.PIPE, text=True)
    for line in tune.stderr:  # the first trial is recorded and the second is compiling
        if line.strip().startswith("[2/3] compiling"):
            tune.send_signal(signal.SIGINT)
            break
    rest = tune.stderr.read()
    assert tune.wait(timeout=600) == 130 and "--resume" in rest
    assert len(_records(out)) == 1 and not (out / "best.yaml").exists()
    assert not list(out.glob("trials/.*partial*"))
    assert main(["tune", str(recipe), "--out", str(out), "--resume"]) == 0
    summary = json.loads((out / "frontier.json").read_text())
    assert summary["reused_from_previous_run"] == 1 and len(_records(out)) == 3


def test_tune_into_a_folder_with_a_search_needs_resume(local_tune, capsys):
    recipe, out = local_tune
    assert main(["tune", str(recipe), "--out", str(out)]) == 2
    assert "--resume" in capsys.readouterr().err


def test_tpe_strategy_compiles_each_candidate_once_however_often_it_is_proposed(tmp_path, tiny_dir):
    recipe = _recipe(tmp_path, tiny_dir, SPACE, tune="{batch: 2, seq: 16, margin: 0.05, strategy: tpe, trials: 5, seed: 3}")
    out = tmp_path / "out"
    assert main(["tune", str(recipe), "--out", str(out)]) == 0
    keys = [r["key"] for r in _records(out)]
    assert len(keys) == len(set(keys)) <= 3
    summary = json.loads((out / "frontier.json").read_text())
    assert summary["compiles"] == summary["compiled_this_run"] == sum(1 for r in _records(out) if r["status"] == "ok")


def test_successive_halving_gives_full_distill_steps_only_to_the_better_half(tmp_path, tiny_dir):
    # on_fail: skip, because distilling a random tiny model for a few steps may not heal it: this is about the steps.
    recipe = _recipe(tmp_path, tiny_dir, "  - prune-ffn: {keep: {search: [8, 16]}}\n"
                                         "  - distill: {steps: 6, batch_size: 8, max_length: 32, on_fail: skip}",
                     tune="{batch: 2, seq: 16, eta: 2, rungs: 2, margin: 10}")
    recipe.write_text(recipe.read_text().replace("samples: 16,", "samples: 96,"))
    out = tmp_path / "out"
    assert main(["tune", str(recipe), "--out", str(out)]) == 0
    records = _records(out)
    assert sorted(r["distill_steps"] for r in records) == [3, 3, 6]
    short = {r["options"]["passes[0].prune-ffn.keep"]: r for r in records if r["distill_steps"] == 3}
    (full,) = [r for r in records if r["distill_steps"] == 6]
    assert full["options"] == max(short.values(), key=lambda r: (r["meets_budget"], -r["estimated_latency_ms"]))["options"]
    assert "steps: 6" in (out / "best.yaml").read_text()


# -- Ray ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_cluster():
    """A real local Ray cluster of 2 CPUs for this module's Ray tests, shut down after them."""
    ray = pytest.importorskip("ray")
    pytest.importorskip("ray.tune")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_tune(tmp_path_factory, tiny_dir, ray_cluster):
    """local_tune's search on the Ray cluster (two trials at a time, one CPU each); its first trial crashes."""
    folder = tmp_path_factory.mktemp("tune-ray")
    recipe = _crashing_recipe(folder, tiny_dir)
    out = folder / "out"
    assert main(["tune", str(recipe), "--out", str(out), "--executor", "ray"]) == 0
    return out


def test_ray_executor_gives_the_same_frontier_as_local(ray_tune, local_tune):
    remote, (_, local) = ray_tune, local_tune
    assert _frontier(remote) == _frontier(local)
    assert json.loads((remote / "frontier.json").read_text())["best"]["key"] == json.loads((local / "frontier.json").read_text())["best"]["key"]
    assert {r["executor"] for r in _records(remote)} == {"ray"}


def test_ray_records_a_crashed_trial_and_retries_it_once(ray_tune):
    remote = ray_tune
    records = _records(remote)
    failed = [r for r in records if r["status"] == "failed"]
    assert len(failed) == 1 and failed[0]["retried"] and failed[0]["attempt"] == 1
    again = [r for r in records if r["key"] == failed[0]["key"] and r is not failed[0]]
    assert len(again) == 1 and again[0]["status"] == "ok" and again[0]["attempt"] == 2


def test_on_fail_defer_keeps_a_pass_that_breaks_the_budget_only_when_a_distill_follows(tiny):
    from compiler.frontend import example_inputs, trace
    from compiler.pass_manager import PassCheckFailed, PassManager
    from compiler.recipe import load_recipe_text
    from tests.helpers import calibration_for

    calibration = calibration_for(tiny, samples=96)

    def run(passes: str):
        recipe = load_recipe_text(f"budget: {{min: 0.99999}}\npasses:\n{passes}\n", file="t.yaml")
        manager = PassManager(recipe, calibration, tiny.model, tiny.tokenizer, tiny.config)
        gm = trace(tiny.model, example_inputs(tiny.tokenizer), max_length=tiny.max_length)
        try:
            return manager.run(gm)[1]
        except PassCheckFailed as failed:
            return failed.records

    # Keeping 2 of 64 FFN neurons breaks a 0.99999 budget: alone, defer stops like stop does.
    alone = run("  - prune-ffn: {keep: 2, on_fail: defer}")
    assert alone[0].status == "rolled_back" and "fidelity budget broken" in alone[0].reason
    healed = run("  - prune-ffn: {keep: 2, on_fail: defer}\n  - distill: {steps: 2, batch_size: 8, max_length: 32}")
    assert healed[0].status == "applied" and "0.99999" in healed[0].checks["budget_deferred"]
    assert healed[1].name == "distill"  # its own check (and the final one) judge the budget from here


def test_ray_records_every_distill_rung_a_trial_reaches_under_asha(tmp_path, tiny_dir, ray_cluster):
    recipe = _recipe(tmp_path, tiny_dir, "  - prune-ffn: {keep: {search: [8, 16]}}\n"
                                         "  - distill: {steps: 4, batch_size: 8, max_length: 32, on_fail: skip}",
                     tune="{batch: 2, seq: 16, eta: 2, rungs: 2, margin: 10}")
    recipe.write_text(recipe.read_text().replace("samples: 16,", "samples: 96,"))
    out = tmp_path / "out"
    assert main(["tune", str(recipe), "--out", str(out), "--executor", "ray"]) == 0
    records = _records(out)
    short = {r["key"] for r in records if r["distill_steps"] == 2}
    full = [r for r in records if r["distill_steps"] == 4]
    assert len(short) == 2 and full and all(r["status"] == "ok" for r in records)
    assert "steps: 4" in (out / "best.yaml").read_text()
