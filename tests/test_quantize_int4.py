"""quantize-linear dtype int4: GPTQ / round-to-nearest block-wise 4-bit weights, stored as MatMulNBits."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from compiler import cost_model
from compiler.errors import PassRefused
from compiler.frontend import example_inputs
from compiler.gptq import gptq, round_to_nearest
from compiler.graph_edit import get_tensor
from compiler.lowering import lower_to_onnx
from compiler.lowering.nbits import pack_int4, pack_zero_points
from compiler.pass_infra import PassContext, get_pass
from compiler.pass_manager import StructureCache
from compiler.runtime import ort_runner, session
from compiler.simulation import is_simulated, strip_simulation
from compiler.structure import analyze
from compiler.validation import compare, hidden_states, run_batches
from tests.helpers import calibration_for, run_pass


def _correlated_inputs(n: int = 512, k: int = 64, seed: int = 0) -> torch.Tensor:
    """Inputs that live mostly in 16 of 64 directions, as a transformer's hidden states largely do."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 16, generator=gen) @ torch.randn(16, k, generator=gen) + 0.1 * torch.randn(n, k, generator=gen)


@pytest.mark.parametrize("symmetric", [True, False])
def test_block_quantization_is_on_the_4bit_grid_with_float16_scales(symmetric):
    weight = torch.randn(24, 64) + 0.3  # skewed blocks: an asymmetric grid should use its zero points
    x = _correlated_inputs()
    for quantized in (round_to_nearest(weight, 32, symmetric=symmetric, clip_search=True),
                      gptq(weight, x.T @ x, 32, symmetric=symmetric)):
        assert quantized.q.dtype == torch.uint8 and int(quantized.q.max()) <= 15
        assert quantized.scales.shape == quantized.zeros.shape == (24, 2)
        assert torch.equal(quantized.scales, quantized.scales.half().float())  # stored as float16 losslessly
        assert quantized.symmetric == symmetric
        blocks = (quantized.q.reshape(24, 2, 32).float() - quantized.zeros[:, :, None].float()) * quantized.scales[:, :, None]
        assert torch.equal(quantized.dequantize(), blocks.reshape(24, 64))


def test_asymmetric_blocks_and_clip_search_round_closer_than_plain_symmetric():
    weight = torch.randn(64, 128) + 0.2
    error = {}
    for name, options in (("symmetric", {"symmetric": True}), ("asymmetric", {"symmetric": False}),
                          ("asymmetric+clip", {"symmetric": False, "clip_search": True})):
        error[name] = float((round_to_nearest(weight, 32, **options).dequantize() - weight).norm())
    assert error["asymmetric+clip"] <= error["asymmetric"] < error["symmetric"], error


def test_gptq_moves_the_layer_outputs_less_than_rounding_to_nearest():
    x = _correlated_inputs()
    weight = torch.randn(48, 64)
    hessian = (x.T @ x).double()
    errors = {name: float((x @ (q.dequantize() - weight).T).norm())
              for name, q in (("rtn", round_to_nearest(weight, 32)), ("gptq", gptq(weight, hessian, 32)))}
    assert errors["gptq"] < 0.5 * errors["rtn"], errors  # measured 0.35-0.37 over three seeds


@pytest.mark.parametrize("with_zero_points", [False, True])
def test_packed_weights_run_exactly_in_onnx_runtime_matmulnbits(with_zero_points):
    import onnxruntime as ort

    rng = np.random.default_rng(0)
    n, k, block = 40, 96, 32  # 3 blocks per row: an odd count exercises the zero points' padding nibble
    q = rng.integers(0, 16, size=(n, k)).astype(np.uint8)
    zeros = rng.integers(0, 16, size=(n, k // block)).astype(np.uint8) if with_zero_points else np.full((n, k // block), 8, np.uint8)
    scales = rng.uniform(0.01, 0.1, size=(n, k // block)).astype(np.float16).astype(np.float32)
    weight = ((q.reshape(n, k // block, block).astype(np.float32) - zeros[:, :, None]) * scales[:, :, None]).reshape(n, k)
    inputs = ["A", "B", "S"] + (["Z"] if with_zero_points else [])
    initializers = [numpy_helper.from_array(pack_int4(q, block), "B"), numpy_helper.from_array(scales.reshape(-1), "S")]
    if with_zero_points:
        initializers.append(numpy_helper.from_array(pack_zero_points(zeros), "Z"))
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=4,
                            block_size=block, accuracy_level=0)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("A", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["m", n])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    a = rng.standard_normal((6, k)).astype(np.float32)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"A": a})[0]
    np.testing.assert_allclose(got, a @ weight.T, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("compute", ["fp32", "int8"])
def test_int4_lowers_every_linear_to_matmulnbits_and_onnx_runtime_matches_the_graph(tiny, tiny_gm, tmp_path, compute):
    structure = analyze(tiny_gm)
    result = run_pass("quantize-linear", {"dtype": "int4", "block_size": 16, "compute": compute,
                                          "symmetric": compute == "int8"}, tiny_gm, tiny)
    hints = result.lowering["int4_weights"]
    assert len(hints) == len(structure.linears) and result.details["method"] == "gptq"
    assert sum(is_simulated(n) for n in result.graph_module.graph.nodes) == (0 if compute == "fp32" else 4 * 2 + 1)  # q/k/v share one input
    batch = example_inputs(tiny.tokenizer)
    simulated = hidden_states(result.graph_module)(batch)
    final = copy.deepcopy(result.graph_module)
    strip_simulation(final)
    int4 = {t: (get_tensor(final, t).detach().numpy(), h) for t, h in hints.items()}
    lowered = lower_to_onnx(final, batch, tmp_path, quantize=None, int4=int4, attention_fusion=False)
    ops = [n.op_type for n in onnx.load(lowered.model_path).graph.node]
    assert ops.count("MatMulNBits") == len(hints) and "MatMul" not in ops and "Gemm" not in ops
    assert ops.count("MultiHeadAttention") == 2 and "Attention" not in ops
    deployed = ort_runner(session(lowered.model_path, 1))(batch)
    tolerance = 1e-4 if compute == "fp32" else 2e-2  # int8 activations: ORT's rounding, not the grid, differs
    assert float((deployed - simulated).abs().max()) < tolerance


def test_int4_then_int8_keeps_the_int4_weights_and_quantizes_the_rest(tiny, tiny_gm, tmp_path):
    ctx = PassContext(structure_of=StructureCache(), calibration=calibration_for(tiny), reference=tiny.model,
                      tokenizer=tiny.tokenizer, model_config=tiny.config, lowering={})
    cls = get_pass("quantize-linear")
    first = cls(cls.Config.model_validate({"dtype": "int4", "block_size": 16, "method": "rtn",
                                          "exclude": ["attention", "pooler"]}))
    result = first.run(tiny_gm, ctx)
    ctx.lowering = result.lowering
    second = cls(cls.Config.model_validate({}))
    mixed = second.run(result.graph_module, ctx)
    assert sorted(mixed.details["kept_int4"]) == sorted(
        f"encoder.layer.{i}.{m}" for i in range(2) for m in ("intermediate.dense", "output.dense"))
    assert mixed.details["quantized_linears"] == 2 * 4 + 1  # q, k, v, output per layer + pooler
    assert not set(mixed.lowering["int8_weights"]) & set(result.lowering["int4_weights"])
    # Lowered: FFN in MatMulNBits, attention still packed into QAttention, the rest MatMulInteger.
    from compiler.compile import _int4_weights, _quantize_spec
    from compiler.pass_manager import _merge

    hints = _merge(result.lowering, mixed.lowering)
    final = copy.deepcopy(mixed.graph_module)
    strip_simulation(final)
    int4, attention_fusion = _int4_weights(final, hints, analyze(final))
    assert attention_fusion  # no q/k/v weight is int4
    batch = example_inputs(tiny.tokenizer)
    lowered = lower_to_onnx(final, batch, tmp_path, quantize=_quantize_spec(hints), int4=int4,
                            attention_fusion=attention_fusion)
    assert lowered.quantized["MatMulNBits"] == 4 and lowered.quantized["QAttention"] == 2
    assert lowered.quantized["MatMulInteger"] == 2 + 1  # attention output projections + pooler
    assert lowered.lowered_min_cosine > 0.99


def test_int8_then_int4_is_refused(tiny, tiny_gm):
    ctx = PassContext(structure_of=StructureCache(), calibration=calibration_for(tiny), reference=tiny.model,
                      tokenizer=tiny.tokenizer, model_config=tiny.config, lowering={})
    cls = get_pass("quantize-linear")
    gm = cls(cls.Config.model_validate({})).run(tiny_gm, ctx).graph_module
    with pytest.raises(PassRefused, match="already quantized"):
        cls(cls.Config.model_validate({"dtype": "int4", "block_size": 16})).run(gm, ctx)


def test_a_block_size_that_does_not_divide_the_inputs_is_refused(tiny, tiny_gm):
    with pytest.raises(PassRefused, match="block_size 64 does not divide"):
        run_pass("quantize-linear", {"dtype": "int4", "block_size": 64}, tiny_gm, tiny)  # hidden size 32


def test_cost_model_counts_half_a_byte_per_int4_weight_plus_float16_block_scales(tiny, tiny_gm):
    result = run_pass("quantize-linear", {"dtype": "int4", "block_size": 16, "method": "rtn"}, tiny_gm, tiny)
    gm = result.graph_module
    structure = analyze(gm)
    blocks = {t: (16, True) for t in result.lowering["int4_weights"]}  # block 16, zero points
    before = cost_model.estimate(gm, batch=1, seq=8, component_of=structure.node_component)
    after = cost_model.estimate(gm, batch=1, seq=8, component_of=structure.node_component, int4_weights=blocks)
    count = sum(get_tensor(gm, t).numel() for t in blocks)
    stored = count // 2 + 2 * (count // 16) + count // 16 // 2  # nibbles, float16 scales, 4-bit zero points
    assert before.bytes - after.bytes == 4 * count - stored
    assert result.details["stored_bytes"] == stored


@pytest.mark.minilm
def test_minilm_gptq_int4_keeps_held_out_cosine_and_beats_round_to_nearest(minilm, minilm_gm):
    cal = calibration_for(minilm, samples=32, validation=16, max_length=64)
    reference = run_batches(hidden_states(minilm.model), cal.heldout_batches)
    cosine = {}
    for method in ("rtn", "gptq"):
        gm = copy.deepcopy(minilm_gm)
        result = run_pass("quantize-linear", {"dtype": "int4", "method": method, "calibration_batches": 4}, gm, minilm,
                          calibration=cal)
        got = run_batches(hidden_states(result.graph_module), cal.heldout_batches)
        cosine[method] = compare(reference, got, cal.heldout_batches).cosine
    assert cosine["gptq"] > 0.97 and cosine["gptq"] > cosine["rtn"] + 0.01, cosine


def test_int4_and_the_decoupled_split_form_refuse_each_other(tiny, tiny_gm):
    ctx = PassContext(structure_of=StructureCache(), calibration=calibration_for(tiny), reference=tiny.model,
                      tokenizer=tiny.tokenizer, model_config=tiny.config, lowering={"split": {"layers": 1}})
    cls = get_pass("quantize-linear")
    with pytest.raises(PassRefused, match="split form"):
        cls(cls.Config.model_validate({"dtype": "int4", "block_size": 16})).run(tiny_gm, ctx)
    ctx.lowering = {"int4_weights": {"encoder.layer.0.output.dense.weight": {}}}
    decouple = get_pass("decouple-attention")
    with pytest.raises(PassRefused, match="split form"):
        decouple(decouple.Config.model_validate({"layers": 1})).run(tiny_gm, ctx)


def test_int4_options_fill_in_for_int4_and_are_an_error_for_other_dtypes():
    from compiler.errors import RecipeError
    from compiler.recipe import load_recipe_text

    recipe = load_recipe_text("version: 1\npasses:\n  - quantize-linear: {}\n  - quantize-linear: {dtype: int4}\n", file="r.yaml")
    int8, int4 = (step["quantize-linear"] for step in recipe.normalized()["passes"])
    assert "block_size" not in int8 and int4["block_size"] == 32 and int4["method"] == "gptq" and int4["symmetric"] is False
    with pytest.raises(RecipeError) as info:
        load_recipe_text("version: 1\npasses:\n  - quantize-linear: {block_size: 64}\n", file="r.yaml")
    text = info.value.render()
    assert "r.yaml" in text and "passes[0]" in text and "block_size applies to dtype int4 only" in text


def test_lowering_keeps_fp32_and_says_so_when_a_later_pass_changed_an_int4_weight(tiny, tiny_gm, tmp_path):
    result = run_pass("quantize-linear", {"dtype": "int4", "block_size": 16, "method": "rtn", "compute": "fp32"}, tiny_gm, tiny)
    hints = result.lowering["int4_weights"]
    final = copy.deepcopy(result.graph_module)
    structure = analyze(final)
    up, down = structure.layers[0].ffn.up.weight, structure.layers[0].ffn.down.weight
    get_tensor(final, down).data.add_(1e-3)  # trained after quantization: off the 4-bit grid
    int4 = {t: (get_tensor(final, t).detach().numpy(), h) for t, h in hints.items()}
    int4[up] = (int4[up][0], {**hints[up], "scales": hints[up]["scales"][:, :1]})  # scales of another shape
    lowered = lower_to_onnx(final, example_inputs(tiny.tokenizer), tmp_path, quantize=None, int4=int4,
                            attention_fusion=False)
    notes = " ".join(lowered.notes)
    assert "re-rounded to its scales" in notes and down in notes
    assert "changed shape" in notes and up in notes
    assert lowered.quantized["MatMulNBits"] == len(hints) - 1
