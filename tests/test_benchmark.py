"""bertpress bench: compiled vs reference, interleaved, medians and p90; the compile report's estimated vs measured latency."""

from __future__ import annotations

import json

import pytest

from compiler.benchmark import bench, synthetic_batch
from compiler.cli import main
from tests.conftest import compile_tiny_int8


@pytest.fixture(scope="module")
def compiled(tmp_path_factory, tiny_dir):
    return compile_tiny_int8(tmp_path_factory.mktemp("bench"), tiny_dir)


def test_compile_report_shows_estimated_and_measured_latency(compiled):
    report = json.loads((compiled / "report.json").read_text())
    latency = report["latency"]
    assert (latency["batch"], latency["seq"], latency["threads"]) == (2, 16, 2)
    assert latency["estimated_ms"] == report["cost"]["compiled"]["latency_ms"] > 0
    assert latency["measured_ms"] > 0 and latency["runs"] == 3
    assert report["cost"]["reference"]["latency_ms"] > 0
    assert "measured" in (compiled / "report.md").read_text()


def test_bench_against_the_plain_export_reports_both_models(compiled):
    result = bench(compiled, batch=2, seq=16, threads=1, rounds=3, warmup=1)
    for side in ("compiled", "reference"):
        row = result[side]
        assert row["runs"] == 3
        assert 0 < row["min_ms"] <= row["median_ms"] <= row["p90_ms"]
        assert row["throughput_per_s"] == pytest.approx(2 / (row["median_ms"] / 1e3), rel=1e-2)
    assert result["reference"]["path"] == "plain fp32 export of the original model"
    # The int8 model is smaller than the plain fp32 export it is compared with.
    assert result["compiled_bytes"] < result["reference_bytes"]
    assert result["speedup_median"] == pytest.approx(result["reference"]["median_ms"] / result["compiled"]["median_ms"], rel=1e-2)


def test_bench_cli_writes_json_against_a_given_reference(compiled, tmp_path):
    out = tmp_path / "bench.json"
    code = main(["bench", str(compiled), "--against", str(compiled / "model.onnx"), "--batch", "1", "--seq", "8",
                 "--threads", "1", "--rounds", "2", "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())
    assert (result["batch"], result["seq"], result["threads"], result["rounds"]) == (1, 8, 1, 2)
    assert result["reference"]["path"] == str(compiled / "model.onnx")
    assert result["compiled_bytes"] == result["reference_bytes"]


def test_bench_of_a_folder_without_a_model_is_a_clear_error(tmp_path, capsys):
    assert main(["bench", str(tmp_path)]) == 2
    assert "no model.onnx" in capsys.readouterr().err


def test_synthetic_batch_stays_inside_a_small_vocabulary():
    batch = synthetic_batch(4, 16, vocab=300)
    assert batch["input_ids"].max() < 300 and batch["input_ids"].min() >= 0
    assert batch["attention_mask"].all()


def test_interleaved_runs_pause_so_one_sessions_spinning_workers_do_not_slow_the_next(compiled, monkeypatch):
    import compiler.benchmark as benchmark

    pauses = []
    monkeypatch.setattr(benchmark.time, "sleep", pauses.append)
    models = {"a": compiled / "model.onnx", "b": compiled / "model.onnx"}
    timings = benchmark.interleaved(models, synthetic_batch(1, 8, 1000), threads=1, rounds=3, warmup=0)
    assert [len(t.seconds) for t in timings] == [3, 3]
    assert pauses == [benchmark.SETTLE_SECONDS] * 6  # before every timed run
    pauses.clear()
    benchmark.interleaved({"a": compiled / "model.onnx"}, synthetic_batch(1, 8, 1000), threads=1, rounds=3, warmup=0)
    assert pauses == []  # one model alone: nothing to wait for
