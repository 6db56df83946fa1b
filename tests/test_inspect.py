"""bertpress inspect: storage and compute per component, estimated by the cost model and measured by ORT."""

from __future__ import annotations

import json

import pytest

from compiler.cli import main
from compiler.inspect import FUSED_ATTENTION, components_by_position, inspect
from tests.conftest import MINILM, compile_tiny_int8

LINEARS = ("linear-before-attention", "linear-after-attention", "feed-forward")


@pytest.fixture(scope="module")
def tiny_breakdown(tiny_dir):
    return inspect(str(tiny_dir), batch=2, seq=16, threads=1, runs=2)


def test_measured_storage_of_every_linear_component_equals_the_estimate(tiny_breakdown):
    # Initializer bytes in the ONNX file, attributed through the exporter's metadata, vs the cost model.
    for component in LINEARS + ("embeddings",):
        assert tiny_breakdown.measured[component]["bytes"] == pytest.approx(
            tiny_breakdown.estimated[component]["bytes"], rel=0.01), component


def test_every_component_gets_measured_time(tiny_breakdown):
    for component in LINEARS + ("attention-core", "embeddings"):
        assert tiny_breakdown.measured[component]["time_us"] > 0, component


def test_shares_of_each_column_sum_to_one(tiny_breakdown):
    shares = tiny_breakdown.shares()
    for column in ("storage_estimated", "storage_measured", "flops_estimated", "latency_estimated", "time_measured"):
        assert sum(row[column] or 0 for row in shares.values()) == pytest.approx(1.0)


def test_components_by_position_segments_a_fused_bert_layer():
    nodes = [("gather", "Gather"), ("eln", "EmbedLayerNormalization"), ("dq", "DynamicQuantizeLinear"),
             ("attn", "QAttention"), ("out", "MatMulInteger"), ("skip1", "SkipLayerNormalization"),
             ("up", "MatMulInteger"), ("gelu", "BiasGelu"), ("down", "MatMulInteger"), ("skip2", "SkipLayerNormalization"),
             ("pool", "Gemm"), ("tanh", "Tanh")]
    assert components_by_position(nodes) == {
        "gather": "embeddings", "eln": "embeddings", "dq": "linear-before-attention", "attn": FUSED_ATTENTION,
        "out": "linear-after-attention", "skip1": "other", "up": "feed-forward", "gelu": "feed-forward",
        "down": "feed-forward", "skip2": "other", "pool": "other", "tanh": "other"}


def test_components_by_position_counts_the_residual_sum_as_other():
    # What the lowering writes instead of SkipLayerNormalization: Sum + LayerNormalization.
    nodes = [("eln", "EmbedLayerNormalization"), ("attn", "QAttention"), ("out", "DynamicQuantizeMatMul"),
             ("sum1", "Sum"), ("ln1", "LayerNormalization"), ("up", "DynamicQuantizeMatMul"), ("gelu", "BiasGelu"),
             ("down", "DynamicQuantizeMatMul"), ("sum2", "Sum"), ("ln2", "LayerNormalization"), ("pool", "Gemm")]
    assert components_by_position(nodes) == {
        "eln": "embeddings", "attn": FUSED_ATTENTION, "out": "linear-after-attention", "sum1": "other", "ln1": "other",
        "up": "feed-forward", "gelu": "feed-forward", "down": "feed-forward", "sum2": "other", "ln2": "other",
        "pool": "other"}


def test_inspect_cli_on_a_compiled_folder_writes_table_png_and_json(tmp_path, tiny_dir, capsys):
    out = compile_tiny_int8(tmp_path, tiny_dir)
    png, figures = tmp_path / "inspect.png", tmp_path / "inspect.json"
    assert main(["inspect", str(out), "--batch", "2", "--seq", "16", "--threads", "1", "--runs", "2",
                 "--png", str(png), "--json", str(figures)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = json.loads(figures.read_text())
    assert result["measured"][FUSED_ATTENTION]["time_us"] > 0  # the int8 model runs QAttention
    assert result["measured"]["embeddings"]["bytes"] > result["measured"]["feed-forward"]["bytes"]
    assert "seed finding" in capsys.readouterr().out


@pytest.mark.minilm
def test_minilm_embeddings_hold_much_storage_and_little_compute():
    breakdown = inspect(MINILM, batch=1, seq=64, threads=2, runs=2)
    shares = breakdown.shares()
    assert shares["embeddings"]["storage_measured"] > 0.4  # 30522 x 384 word table of 22.7 M parameters
    assert shares["embeddings"]["flops_estimated"] < 0.01
    assert shares["feed-forward"]["storage_measured"] == pytest.approx(shares["feed-forward"]["storage_estimated"], rel=0.01)
    assert {f["finding"][:10]: f["holds"] for f in breakdown.findings()}["embeddings"] is True
