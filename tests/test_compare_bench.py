"""bench/compare.py's texts of other domains: never a text some recipe in the run calibrates or trains on."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from compiler.calibration import FORTUNES_DIR, WORDNET_DIR, load_texts, prepare_calibration
from compiler.recipe import load_recipe

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(not (WORDNET_DIR / "data.noun").is_file(), reason="wordnet-base not installed")


@pytest.fixture(scope="module")
def compare():
    spec = importlib.util.spec_from_file_location("bench_compare", ROOT / "bench" / "compare.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_compare"] = module
    spec.loader.exec_module(module)
    return module


def test_python_docs_sample_leaves_out_calibration_and_training_texts(compare, tiny):
    names = ["minilm-small", "minilm-fast", "minilm-distill"]
    texts, label = compare.other_domain_texts(names, "builtin:python-docs", "Python-documentation texts")
    cal = load_recipe(str(ROOT / "recipes" / "minilm-small.yaml")).file.calibration
    calibrated = prepare_calibration(tiny.tokenizer, source=cal.texts, samples=cal.samples,
                                     validation_samples=cal.validation_samples, max_length=cal.max_length,
                                     batch_size=cal.batch_size, seed=cal.seed, model_max_length=512).texts
    assert calibrated == compare.sample_calibration_texts(cal.texts, samples=cal.samples,
                                                          validation_samples=cal.validation_samples, seed=cal.seed)[0]
    docstrings = set(load_texts("builtin:python-docstrings"))
    assert 0 < len(texts) <= 256 and len(set(texts)) == len(texts)
    assert not set(texts) & set(calibrated)
    assert not set(texts) & docstrings  # minilm-fast distills on the docstrings; two of them are docs sentences
    # minilm-distill trains on the Python docs themselves: the sample cannot avoid that, so the label says so.
    assert "bench/experiments/recipes/minilm-distill.yaml trains on builtin:python-docs" in label
    assert "minilm-fast.yaml trains" not in label
    again, _ = compare.other_domain_texts(names, "builtin:python-docs", "Python-documentation texts")
    assert again == texts  # seeded


def test_pass_text_sources_reads_every_texts_field(compare):
    assert compare._pass_text_sources("minilm-fast") >= {"builtin:wordnet", "builtin:python-docstrings",
                                                         "builtin:fortunes-train"}
    assert "builtin:jargon" in compare._pass_text_sources("minilm-fast-jargon")
    assert "builtin:python-docstrings" not in compare._pass_text_sources("minilm-fast-wordnet")


@pytest.mark.skipif(not FORTUNES_DIR.is_dir(), reason="Debian package fortunes not installed")
def test_fortunes_sample_is_of_subjects_no_recipe_trains_on(compare):
    texts, label = compare.other_domain_texts(["minilm-fast", "minilm-fast-wordnet-docstrings"], "builtin:fortunes-heldout",
                                              "fortunes on everyday life")
    assert len(texts) == 256 and not set(texts) & set(load_texts("builtin:fortunes-train"))
    assert set(texts) <= set(load_texts("builtin:fortunes-heldout")) and "trains on" not in label


@pytest.mark.skipif(not FORTUNES_DIR.is_dir(), reason="Debian package fortunes not installed")
def test_too_few_texts_left_to_measure_on_is_a_clear_stop(compare, monkeypatch):
    # A recipe that distills on every fortune leaves none of the everyday-life subjects unseen.
    monkeypatch.setattr(compare, "_pass_text_sources", lambda name: {"builtin:fortunes"})
    with pytest.raises(SystemExit, match="too few to measure fidelity on"):
        compare.other_domain_texts(["minilm-fast"], "builtin:fortunes-heldout", "fortunes on everyday life")


def test_unknown_recipe_name_is_a_clear_usage_error(compare, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["compare.py", "--recipes", "minilm-fast", "--sample-also", "minilm-fats"])
    with pytest.raises(SystemExit) as stop:
        compare.main()
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "no recipe named minilm-fats in recipes/ or bench/experiments/recipes/" in err and "minilm-fast-jargon" in err


def test_a_default_run_leaves_searchable_recipes_to_bertpress_tune(compare, monkeypatch, tmp_path, capsys):
    recipes, experiments = tmp_path / "recipes", tmp_path / "experiments"
    recipes.mkdir()
    experiments.mkdir()
    (recipes / "plain.yaml").write_text("version: 1\npasses:\n  - quantize-linear: {dtype: int8}\n")
    (recipes / "searched.yaml").write_text("version: 1\npasses:\n  - layer-drop: {count: {search: [1, 2]}}\n")
    (experiments / "variant.yaml").write_text("version: 1\npasses:\n  - layer-drop: {count: 1}\n")
    monkeypatch.setattr(compare, "ROOT", tmp_path)
    monkeypatch.setattr(compare, "RECIPE_DIRS", (recipes, experiments))
    assert list(compare.default_recipes()) == ["plain"]
    assert list(compare.known_recipes()) == ["plain", "searched", "variant"]
    monkeypatch.setattr(sys, "argv", ["compare.py", "--recipes", "searched"])
    with pytest.raises(SystemExit) as stop:
        compare.main()
    assert stop.value.code == 2 and "searched is a searchable recipe: `bertpress tune`" in capsys.readouterr().err


@pytest.mark.skipif(not FORTUNES_DIR.is_dir(), reason="fortunes not installed")
def test_held_out_fidelity_scores_the_reference_as_itself_and_a_perturbed_model_lower(compare, tiny):
    # The one measuring loop compare.py, fidelity_check.py, domain_ablation.py and loss_ablation.py share.
    import copy

    import torch

    names = ["minilm-fast", "minilm-fast-wordnet"]
    held_out = compare.HeldOut(names, tiny.model.eval(), tiny.tokenizer)
    assert list(held_out.samples) == list(compare.SAMPLES)
    assert [texts for texts, _ in held_out.samples.values()] == \
        [texts for texts, _ in compare.heldout_samples(names).values()]  # seeded: every script measures the same texts
    assert all(len(texts) == 256 for texts, _ in held_out.samples.values())
    itself = held_out.measure(compare.torch_run(tiny.model), tiny.tokenizer)
    for key, scores in itself.items():
        assert scores["cosine"] == pytest.approx(1.0, abs=1e-5) and scores["overlap10"] == 1.0, key
    perturbed = copy.deepcopy(tiny.model)
    with torch.no_grad():
        for param in perturbed.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    worse = held_out.measure(compare.torch_run(perturbed), tiny.tokenizer)
    for key in compare.SAMPLES:
        assert worse[key]["cosine"] < itself[key]["cosine"] - 0.01 and worse[key]["overlap10"] < 1.0, key
    cells = held_out.cells(worse).split(" | ")
    assert len(cells) == 3 and cells[0] == f"{worse['wordnet']['cosine']:.4f} / {worse['wordnet']['overlap10']:.3f}"


def test_a_partial_run_writes_its_own_chart_not_the_main_results_one(compare, tmp_path):
    assert compare.chart_path(tmp_path / "RESULTS.md") == tmp_path / "tradeoff.png"
    assert compare.chart_path(tmp_path / "RESULTS-jargon.md") == tmp_path / "tradeoff-jargon.png"
    assert compare.chart_path(tmp_path / "mine.md") == tmp_path / "tradeoff-mine.png"


def test_the_chart_labels_every_model_on_every_panel_and_no_two_labels_overlap(compare, tmp_path):
    """bench/results/RESULTS.json's rows (two baselines at 1x, flagships 0.0004 apart): one panel per held-out sample and
    measure, every model named on each, no label drawn over another, and --replot writes the chart from the JSON."""
    import json
    import shutil

    import matplotlib.pyplot as plt

    rows = json.loads((ROOT / "bench" / "results" / "RESULTS.json").read_text())["rows"]
    plain = next(r for r in rows if r["name"] == "plain fp32 ONNX export")
    figure = compare.tradeoff_figure(rows, plain)
    try:
        renderer = figure.canvas.get_renderer()
        assert len(figure.axes) == 2 * len(compare.SAMPLES)
        short = [r["name"].replace("recipe ", "") for r in rows if not r["name"].startswith("peer")]
        for axis in figure.axes:
            labels = [text.get_text() for text in axis.texts]
            named = [name for label in labels for name in label.split(" / ")]
            assert sorted(named) == sorted(short + ["peer pipeline"]), axis.get_title()
            boxes = [text.get_window_extent(renderer) for text in axis.texts]
            overlapping = [(labels[i], labels[j]) for i in range(len(boxes)) for j in range(i + 1, len(boxes))
                           if boxes[i].overlaps(boxes[j])]
            assert not overlapping, (axis.get_title(), overlapping)
    finally:
        plt.close(figure)
    shutil.copy(ROOT / "bench" / "results" / "RESULTS.json", tmp_path / "RESULTS.json")
    assert compare.replot(tmp_path / "RESULTS.md") == tmp_path / "tradeoff.png"
    assert (tmp_path / "tradeoff.png").stat().st_size > 10_000


def _capacity_ablation(monkeypatch):
    """bench/experiments/capacity_ablation.py as a module (it imports bench/compare.py as ``compare``)."""
    monkeypatch.setenv("BERTPRESS_PASS_STORE", "off")  # the script sets it at import; undone after the test
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_capacity_ablation", ROOT / "bench" / "experiments" / "capacity_ablation.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_every_capacity_ablation_variant_is_a_recipe_that_validates(monkeypatch):
    import yaml

    from compiler.recipe import load_recipe_text

    module = _capacity_ablation(monkeypatch)
    base = yaml.safe_load(module.FLAGSHIP.read_text())
    for key, variant in module.VARIANTS.items():
        recipe = module.variant_recipe(base, variant, 123)
        steps = load_recipe_text(yaml.safe_dump(recipe, sort_keys=False), file=key, base_dir=module.FLAGSHIP.parent).steps
        names = [step.name for step in steps]
        assert dict((s.name, s.config) for s in steps)["distill"].steps == 123
        if key in ("int4rows", "rank256", "table4"):  # int8 position/token-type tables, then the int4 word table last
            *_, int8, int4 = steps
            assert (int8.name, int8.config.dtype, int8.config.tables) == ("quantize-embeddings", "int8", ["position", "token_type"])
            assert (int4.name, int4.config.dtype, int4.config.tables) == ("quantize-embeddings", "int4", ["word"])
            assert ("low-rank" in names) == (key != "table4")
    assert base == yaml.safe_load(module.FLAGSHIP.read_text())  # variants are copies


@pytest.mark.parametrize("recipe, key", [("minilm-fast-r256", "rank256"), ("minilm-fast-deep256", "deep256")])
def test_recipes_written_out_from_a_capacity_variant_are_that_variant_at_the_flagships_steps(monkeypatch, recipe, key):
    """minilm-fast-r256 and minilm-fast-deep256 quote the builds capacity_ablation.py made of these variants: if the
    flagship or the variant changes, the recipe file must change with it (or stop quoting that build)."""
    import yaml

    module = _capacity_ablation(monkeypatch)
    base = yaml.safe_load(module.FLAGSHIP.read_text())
    written = yaml.safe_load((ROOT / "bench" / "experiments" / "recipes" / f"{recipe}.yaml").read_text())
    steps = next(step["distill"]["steps"] for step in base["passes"] if "distill" in step)
    assert written == module.variant_recipe(base, module.VARIANTS[key], steps)
