"""The machine roofline (measured once, cached, refreshable) and the cost model's latency estimate built on it."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from compiler import cost_model, roofline
from compiler.frontend import example_inputs, trace
from compiler.pass_manager import PassManager
from compiler.recipe import load_recipe_text
from compiler.structure import analyze
from tests.helpers import calibration_for

# A made-up machine for the estimate's arithmetic: int8 GEMMs 4x fp32, as on CPUs with VNNI.
MACHINE = roofline.Machine(fp32_gflops=50.0, int8_gflops=200.0, bandwidth_gbs=10.0, overhead_us=2.0, threads=2,
                           onnxruntime="test", cpu="test", measured_at="test")


@pytest.fixture()
def cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    return roofline.measure(1, runs=2)


def test_measured_roofline_has_positive_peaks(measured):
    assert measured.fp32_gflops > 0 and measured.int8_gflops > 0
    assert measured.bandwidth_gbs > 0 and measured.overhead_us > 0
    assert measured.threads == 1


def test_roofline_is_cached_under_xdg_cache_home_and_read_back_without_measuring(cache_home, measured, monkeypatch):
    monkeypatch.setattr(roofline, "measure", lambda threads: dataclasses.replace(measured, threads=threads))
    first = roofline.machine(1)
    assert roofline.cache_path() == cache_home / "bertpress" / "roofline.json"
    assert len(json.loads(roofline.cache_path().read_text())) == 1
    monkeypatch.setattr(roofline, "measure", lambda threads: pytest.fail("a cached roofline was measured again"))
    assert roofline.machine(1) == first


def test_refresh_measures_again_and_thread_counts_are_cached_apart(cache_home, measured, monkeypatch):
    calls = []
    monkeypatch.setattr(roofline, "measure", lambda threads: calls.append(threads) or dataclasses.replace(measured, threads=threads))
    roofline.machine(1)
    roofline.machine(1, refresh=True)
    roofline.machine(2)
    assert calls == [1, 1, 2]
    assert len(json.loads(roofline.cache_path().read_text())) == 2


def test_corrupt_cache_is_measured_again(cache_home, measured, monkeypatch):
    roofline.cache_path().parent.mkdir(parents=True)
    roofline.cache_path().write_text("{not json")
    monkeypatch.setattr(roofline, "measure", lambda threads: measured)
    assert roofline.machine(1) == measured
    assert json.loads(roofline.cache_path().read_text())


def _cost(gm, **kwargs):
    return cost_model.estimate(gm, batch=8, seq=32, component_of=analyze(gm).node_component, machine=MACHINE, **kwargs)


def test_latency_per_component_adds_up_to_the_total(tiny_gm):
    cost = _cost(tiny_gm)
    per_component = sum(figures.get("latency_ns", 0) for figures in cost.by_component.values())
    assert cost.latency_s > 0
    assert per_component == pytest.approx(cost.latency_s * 1e9, rel=1e-3)
    assert cost.as_dict()["latency_ms"] == pytest.approx(cost.latency_s * 1e3, rel=1e-3)


def test_int8_linears_are_estimated_faster_than_fp32(tiny_gm):
    structure = analyze(tiny_gm)
    int8 = {lin.weight for layer in structure.layers for lin in (layer.ffn.up, layer.ffn.down)}
    fp32, quantized = _cost(tiny_gm), _cost(tiny_gm, int8_weights=int8)
    assert quantized.by_component["feed-forward"]["latency_ns"] < fp32.by_component["feed-forward"]["latency_ns"]
    assert quantized.by_component["embeddings"] == fp32.by_component["embeddings"]


def test_estimate_without_machine_has_no_latency(tiny_gm):
    cost = cost_model.estimate(tiny_gm, batch=2, seq=16)
    assert cost.latency_s is None and "latency_ms" not in cost.as_dict()


def test_pass_manager_rolls_back_a_lossy_pass_that_does_not_pay(tiny, monkeypatch):
    # Low-rank above break-even (forced) makes every FFN linear bigger and slower: nothing is gained.
    monkeypatch.setattr(roofline, "machine", lambda threads, refresh=False: MACHINE)
    text = ("budget: {min: 0.5}\npasses:\n  - low-rank: {target: ffn, rank: 28, force: true,"
            " reason: test, on_fail: skip}\n  - layer-drop: {layers: [1]}\n")
    manager = PassManager(load_recipe_text(text, file="t.yaml"), calibration_for(tiny), tiny.model, tiny.tokenizer, tiny.config)
    gm = trace(tiny.model, example_inputs(tiny.tokenizer), tiny.max_length)
    _, records = manager.run(gm)
    assert [r.status for r in records] == ["skipped", "applied"]
    assert "does not pay" in records[0].reason
    assert records[1].cost_after["latency_ms"] < records[1].cost_before["latency_ms"]


def test_peaks_are_the_best_run_so_noise_on_a_shared_machine_does_not_lower_them(monkeypatch):
    clock = [0.0]  # a fake clock: each run advances it by its duration, so nothing here is timed for real
    monkeypatch.setattr(roofline.time, "perf_counter", lambda: clock[0])

    class Session:  # a warm-up, then runs of 5, 1, 9 and 3 ms
        durations = iter([0.007, 0.005, 0.001, 0.009, 0.003])

        def run(self, outputs, feeds):
            clock[0] += next(self.durations)

    assert roofline._best_seconds(Session(), {}, runs=4) == pytest.approx(0.001)


def test_roofline_command_shows_the_cached_figures_and_warns_when_measured_busy(cache_home, measured, monkeypatch, capsys):
    from compiler import cli

    busy = dataclasses.replace(measured, threads=2, load_average=5.0)
    monkeypatch.setattr(roofline, "measure", lambda threads: busy)
    assert cli.main(["roofline", "--threads", "2"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["fp32_gflops"] == busy.fp32_gflops
    assert str(roofline.cache_path()) in err and "was busy" in err and "--refresh" in err
    idle = dataclasses.replace(busy, load_average=0.1, fp32_gflops=busy.fp32_gflops * 2)
    monkeypatch.setattr(roofline, "measure", lambda threads: idle)
    assert cli.main(["roofline", "--threads", "2"]) == 0  # cached: not measured again
    assert json.loads(capsys.readouterr()[0])["fp32_gflops"] == busy.fp32_gflops
    assert cli.main(["roofline", "--threads", "2", "--refresh"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["fp32_gflops"] == idle.fp32_gflops and "was busy" not in err


def test_measured_roofline_records_the_load_average(measured):
    if hasattr(os, "getloadavg"):
        assert measured.load_average is not None and measured.load_average >= 0
    else:
        assert measured.load_average is None


ZEN3 = "processor\t: 0\nvendor_id\t: AuthenticAMD\ncpu family\t: 25\nmodel\t\t: 1\nmodel name\t: AMD EPYC\nflags\t\t: fpu sse2 avx avx2 fma\n"
ZEN4 = ZEN3.replace("model\t\t: 1", "model\t\t: 17").replace("avx2 fma", "avx2 fma avx512f avx512_vnni")


def test_cpus_sharing_a_model_name_get_their_own_roofline():
    # Two "AMD EPYC"s: int8 GEMMs run ~3.5x fp32 with VNNI and under 2x without, so a cached roofline of one
    # must never be read back on the other.
    assert roofline._cpu_name(ZEN3) == "AMD EPYC (family 25 model 1, avx2)"
    assert roofline._cpu_name(ZEN4) == "AMD EPYC (family 25 model 17, avx512_vnni)"
    assert roofline._cpu_name("") and roofline._cpu_name("model name : Some CPU\n") == "Some CPU"
