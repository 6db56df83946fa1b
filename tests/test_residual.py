"""Residual + LayerNorm lowering: SkipLayerNormalization written as Sum + LayerNormalization.

Each case builds a small ONNX graph around one SkipLayerNormalization, rewrites it, and runs both in
ONNX Runtime: same numbers, and the rewritten graph must stay unfused after ORT's own optimizer.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from compiler.lowering.residual import unfuse_skip_layer_norm

H = 16


def _model(*, beta: bool, bias: bool, matmul: bool, sum_output: bool, mean_output: bool = False,
           epsilon: float = 1e-12) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=H).astype(np.float32), n) for n in ("gamma", "beta", "bias")]
    inits.append(numpy_helper.from_array(rng.normal(size=(H, H)).astype(np.float32), "w"))
    nodes = []
    first = "x"
    if matmul:
        nodes.append(helper.make_node("MatMul", ["x", "w"], ["xw"]))
        first = "xw"
    skip_outputs = ["y", "", "", "sum"] if sum_output else (["y", "mean"] if mean_output else ["y"])
    nodes.append(helper.make_node("SkipLayerNormalization",
                                  [first, "skip", "gamma", "beta" if beta else "", "bias" if bias else ""],
                                  skip_outputs, domain="com.microsoft", epsilon=epsilon))
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", H])]
    if sum_output:
        outputs.append(helper.make_tensor_value_info("sum", TensorProto.FLOAT, ["b", "s", H]))
    if mean_output:
        outputs.append(helper.make_tensor_value_info("mean", TensorProto.FLOAT, None))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "s", H])
                                           for n in ("x", "skip")], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def _rewrite(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, int, list[str]]:
    model = ir.from_proto(proto)
    count, notes = unfuse_skip_layer_norm(model)
    return ir.to_proto(model), count, notes


def _run(proto: onnx.ModelProto, feeds: dict, optimized_path=None) -> list[np.ndarray]:
    options = ort.SessionOptions()
    if optimized_path is not None:
        options.optimized_model_filepath = str(optimized_path)
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _feeds(batch: int = 2, seq: int = 5, scale: float = 1.0) -> dict:
    rng = np.random.default_rng(1)
    return {n: (scale * rng.normal(size=(batch, seq, H))).astype(np.float32) for n in ("x", "skip")}


@settings(max_examples=20, deadline=None)
@given(beta=st.booleans(), bias=st.booleans(), matmul=st.booleans(), sum_output=st.booleans(),
       epsilon=st.sampled_from([1e-12, 1e-5]), scale=st.sampled_from([1e-3, 1.0, 100.0]))
def test_rewrite_computes_what_skip_layer_norm_computes(beta, bias, matmul, sum_output, epsilon, scale):
    proto = _model(beta=beta, bias=bias, matmul=matmul, sum_output=sum_output, epsilon=epsilon)
    rewritten, count, _ = _rewrite(proto)
    assert count == 1
    assert [n.op_type for n in rewritten.graph.node if n.op_type in ("Sum", "LayerNormalization")] == ["Sum", "LayerNormalization"]
    assert [o.name for o in rewritten.graph.output] == [o.name for o in proto.graph.output]  # public names kept
    feeds = _feeds(scale=scale)
    for want, got in zip(_run(proto, feeds), _run(rewritten, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * max(1.0, float(np.abs(want).max())))


def test_bias_after_a_weight_matmul_becomes_its_own_add_and_ort_does_not_refuse_it(tmp_path):
    rewritten, _, _ = _rewrite(_model(beta=True, bias=True, matmul=True, sum_output=False))
    ops = [n.op_type for n in rewritten.graph.node]
    assert ops == ["MatMul", "Add", "Sum", "LayerNormalization"]
    optimized = tmp_path / "optimized.onnx"
    _run(rewritten, _feeds(), optimized)
    # ORT's SkipLayerNormFusion only matches Add -> LayerNormalization; the Sum keeps the fast kernels.
    assert "SkipLayerNormalization" not in {n.op_type for n in onnx.load(optimized).graph.node}


def test_plain_adds_would_be_fused_back_by_onnx_runtime(tmp_path):
    # Why the rewrite uses Sum: ORT (level extended, its default) turns Add -> LayerNormalization back into
    # SkipLayerNormalization at load. If this starts failing, ORT changed and the Sum is no longer needed.
    nodes = [helper.make_node("Add", ["x", "skip"], ["s"]),
             helper.make_node("LayerNormalization", ["s", "gamma", "beta"], ["y"], axis=-1, epsilon=1e-12)]
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.normal(size=H).astype(np.float32), n) for n in ("gamma", "beta")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["b", "s", H])
                                           for n in ("x", "skip")],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", H])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    optimized = tmp_path / "optimized.onnx"
    _run(proto, _feeds(), optimized)
    assert "SkipLayerNormalization" in {n.op_type for n in onnx.load(optimized).graph.node}


def test_a_node_whose_mean_output_is_used_stays_fused():
    proto = _model(beta=True, bias=False, matmul=False, sum_output=False, mean_output=True)
    rewritten, count, notes = _rewrite(proto)
    assert count == 0 and "SkipLayerNormalization" in {n.op_type for n in rewritten.graph.node}
    assert any("kept fused" in note for note in notes)


@pytest.mark.parametrize("quantize", [False, True])
def test_lowered_bert_has_no_skip_layer_norm_after_ort_optimizes_it(tiny, tiny_gm, tmp_path, quantize):
    from compiler.frontend import example_inputs
    from compiler.lowering import QuantizeSpec, lower_to_onnx

    result = lower_to_onnx(tiny_gm, example_inputs(tiny.tokenizer), tmp_path / "out",
                           quantize=QuantizeSpec() if quantize else None)
    assert result.op_counts.get("Sum") == result.op_counts.get("LayerNormalization") == 2 * tiny.config.num_hidden_layers
    assert any("written as Sum + LayerNormalization" in note for note in result.notes)
    optimized = tmp_path / "optimized.onnx"
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(optimized)
    ort.InferenceSession(str(result.model_path), options, providers=["CPUExecutionProvider"])
    ops = {n.op_type for n in onnx.load(optimized).graph.node}
    assert "SkipLayerNormalization" not in ops
    if quantize:
        # Each output projection's bias Add is folded into ORT's quantized MatMul at load.
        assert "Add" not in ops and "DynamicQuantizeMatMul" in ops


def test_skip_layer_norm_can_be_kept_and_both_forms_agree(tiny, tiny_gm, tmp_path):
    from compiler.frontend import example_inputs
    from compiler.lowering import lower_to_onnx
    from compiler.lowering.verify import ort_outputs, padded_batch

    example = example_inputs(tiny.tokenizer)
    fused = lower_to_onnx(tiny_gm, example, tmp_path / "fused", quantize=None, skip_layer_norm=True)
    summed = lower_to_onnx(tiny_gm, example, tmp_path / "summed", quantize=None)
    assert fused.fusions.get("SkipLayerNormalization") == 2 * tiny.config.num_hidden_layers
    assert "Sum" not in fused.op_counts and "SkipLayerNormalization" not in summed.fusions
    batch = padded_batch(example)
    np.testing.assert_allclose(ort_outputs(summed.model_path, batch), ort_outputs(fused.model_path, batch), atol=1e-5)
