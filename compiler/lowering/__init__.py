"""ONNX lowering: dynamo export -> ORT transformer fusions -> QAttention-ready attention, fast residual norms -> int8.

Public API: `export_onnx`, `lower_to_onnx`, `QuantizeSpec`, `LoweringResult`.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import torch

from . import verify
from .attention_bias import attention_bias_note
from .embed import fuse_embed_layer_norm
from .export import export_ir, export_onnx
from .fusions import fused_op_counts, op_counts, run_ort_fusions
from .io import save_model
from .nbits import store_int4
from .packed_attention import pack_attention
from .quantize import QuantizeSpec, plan_exclusions, quantize_file, quantized_counts
from .residual import unfuse_skip_layer_norm

__all__ = ["QuantizeSpec", "LoweringResult", "export_onnx", "lower_to_onnx"]

# fp32 fused graph vs PyTorch. Fusions reorder float math (~1e-5); a wrong mask rewrite is O(1).
FP32_TOLERANCE = 1e-3


@dataclass
class LoweringResult:
    model_path: Path
    fusions: dict[str, int]  # fused (contrib) op type -> count in the final model
    op_counts: dict[str, int]  # op_type -> count in the final model
    quantized: dict[str, int]  # quantized op type -> count
    notes: list[str] = field(default_factory=list)
    fp32_max_abs_error: float | None = None  # fused fp32 graph vs PyTorch, real tokens
    lowered_min_cosine: float | None = None  # int8/fp16 model vs PyTorch, mean-pooled, worst sentence


def _softmax_count(model: ir.Model) -> int:
    return sum(1 for n in model.graph if n.op_type == "Softmax")


def _build_fp32(module, example_inputs, *, fuse: bool, pack: bool, notes: list[str],
                attention_fusion: bool = True, skip_layer_norm: bool = False) -> ir.Model:
    model = export_ir(module, example_inputs)
    if not fuse:
        return model
    rules = run_ort_fusions(model, attention=attention_fusion)
    if not attention_fusion:
        notes.append("fusions: attention kept as MultiHeadAttention with separate q/k/v MatMuls (int4 q/k/v weights)")
    notes.append(f"fusions: onnxscript ort_fusions rules fired {rules}")
    leftover = _softmax_count(model)
    if leftover:
        notes.append(f"fusions: {leftover} attention layer(s) left unfused (onnxscript did not match them); "
                     "their q/k/v/out linears are still plain MatMuls and quantize as such")
    if pack:
        # Our own rewrites (see packed_attention.py / embed.py); `pack=False` is the conservative
        # fallback that keeps only onnxscript's fusions.
        if attention_fusion:
            packed, pack_notes = pack_attention(model)
            notes.extend(pack_notes)
            if packed:
                notes.append(f"attention: {packed} Attention node(s) rewritten to packed QKV weight + 2-D mask_index "
                             "(QAttention-quantizable)")
        _, embed_note = fuse_embed_layer_norm(model)
        if embed_note:
            notes.append(embed_note)
        if not skip_layer_norm:
            _, residual_notes = unfuse_skip_layer_norm(model)
            notes.extend(residual_notes)
    common_passes.RemoveUnusedNodesPass()(model)
    # Unique node names: quantize_dynamic's nodes_to_exclude addresses nodes by name.
    common_passes.NameFixPass()(model)
    return model


def lower_to_onnx(module: torch.nn.Module, example_inputs: dict[str, torch.Tensor], out_dir: Path, *,
                  quantize: QuantizeSpec | None, fuse: bool = True, fp16: bool = False,
                  int4: dict[str, tuple] | None = None, attention_fusion: bool = True,
                  skip_layer_norm: bool = False) -> LoweringResult:
    """Export `module` and lower it for ONNX Runtime CPU; writes `out_dir/model.onnx`.

    ``int4`` maps weight targets to (W [out, in] as in `module`, quantize-linear's hint): those
    MatMuls become MatMulNBits before any int8 quantization. ``attention_fusion=False`` keeps
    attention as MultiHeadAttention so int4 q/k/v MatMuls stay reachable. ``skip_layer_norm=True`` keeps
    onnxscript's fused SkipLayerNormalization (slower on CPU; see residual.py) instead of Sum + LayerNormalization.
    """
    if fp16 and quantize is not None:
        raise ValueError("lower_to_onnx: fp16 and int8 quantization are mutually exclusive")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / "model.onnx"
    check_inputs = verify.padded_batch(example_inputs, second_segment=verify.token_type_count(module) >= 2)
    reference = verify.torch_outputs(module, check_inputs)
    mask = check_inputs["attention_mask"].numpy()

    with tempfile.TemporaryDirectory(prefix="bertpress-lower-") as tmp:
        fp32_path = Path(tmp) / "fp32.onnx"
        error = None
        for pack in (True, False) if fuse else (False,):
            notes: list[str] = []
            model = _build_fp32(module, example_inputs, fuse=fuse, pack=pack, notes=notes,
                                attention_fusion=attention_fusion, skip_layer_norm=skip_layer_norm)
            excluded, q_notes = plan_exclusions(model, quantize) if quantize else ([], [])
            save_model(model, fp32_path)
            error = verify.max_abs_error(verify.ort_outputs(fp32_path, check_inputs), reference, mask)
            if error <= FP32_TOLERANCE or not pack:
                break
            # Our mask_index rewrite assumes BERT's key-padding mask; if the graph disagrees,
            # fall back to onnxscript's own Attention (correct, but its q/k/v stay fp32 under int8).
        notes.append(f"verify: fp32 {'fused ' if fuse else ''}graph vs PyTorch max abs error {error:.2e} on a padded batch")
        if error > FP32_TOLERANCE:
            notes.append(f"verify: WARNING error above {FP32_TOLERANCE:g}")
        elif fuse and not pack:
            notes.append("attention: packed/mask_index + EmbedLayerNormalization rewrites failed verification; kept "
                         "onnxscript's Attention (attention_bias form, which the quantizer leaves fp32)")

        if int4:
            stored = store_int4(fp32_path, int4)
            levels = sorted({v["accuracy_level"] for v in stored["stored"].values()})
            notes.append(f"int4: {len(stored['stored'])} of {len(int4)} weight(s) stored as MatMulNBits "
                         f"(4-bit, float16 block scales, accuracy_level {levels})")
            if stored["missing"]:
                notes.append(f"int4: WARNING no MatMul found for {stored['missing']}; they stay fp32")
            if stored["reshaped"]:
                notes.append(f"int4: WARNING weights changed shape after quantize-linear (a later pass pruned them?); "
                             f"they stay fp32: {sorted(stored['reshaped'])}")
            if stored["drifted"]:
                notes.append(f"int4: WARNING weights changed after quantize-linear (a later pass trained them?) and "
                             f"were re-rounded to its scales: {sorted(stored['drifted'])}")
        if fp16:
            _to_fp16(fp32_path, final)
            notes.append("fp16: weights/activations converted to float16 with fp32 graph I/O (slow on most CPUs)")
        elif quantize is not None:
            notes.extend(q_notes)
            q_path = Path(tmp) / "int8.onnx"
            quantize_file(fp32_path, q_path, quantize, excluded)
            save_model(ir.load(q_path), final)
        else:
            save_model(ir.load(fp32_path), final)

    result_model = ir.load(final)
    result = LoweringResult(
        model_path=final,
        fusions=fused_op_counts(result_model),
        op_counts=op_counts(result_model),
        quantized=quantized_counts(result_model),
        notes=notes,
        fp32_max_abs_error=error,
    )
    bias_note = attention_bias_note(result_model)
    if bias_note:
        result.notes.append(bias_note)
    if quantize is not None or fp16 or int4:
        cos = verify.pooled_cosine(verify.ort_outputs(final, check_inputs), reference, mask)
        result.lowered_min_cosine = float(cos.min())
        result.notes.append(f"verify: lowered model vs PyTorch mean-pooled cosine min {cos.min():.5f} "
                            f"mean {cos.mean():.5f} on the example batch")
        if quantize is not None:
            fp32_left = sum(1 for n in result_model.graph if n.op_type == "MatMul"
                            and n.inputs[1] is not None and n.inputs[1].const_value is not None)
            if fp32_left:
                result.notes.append(f"quantize: {fp32_left} weight MatMul(s) left fp32 (excluded or not quantizable)")
            if result.op_counts.get("Attention"):
                result.notes.append(f"quantize: {result.op_counts['Attention']} Attention node(s) left fp32 "
                                    "(excluded, or not in QAttention form)")
            if result.op_counts.get("MultiHeadAttention"):
                result.notes.append(f"quantize: {result.op_counts['MultiHeadAttention']} layer(s) use MultiHeadAttention "
                                    "(q/k/v not packable: low-rank, or an attention bias QAttention cannot take);"
                                    " their q/k/v MatMuls are quantized separately")
    return result


def _to_fp16(src: Path, dst: Path) -> None:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    model = convert_float_to_float16(onnx.load(src), keep_io_types=True)
    save_model(ir.from_proto(model), dst)
