"""Split lowering of a decoupled (decouple-attention) graph: ``lower.onnx`` + ``upper.onnx``.

- ``lower.onnx``: inputs ``input_ids, attention_mask, token_type_ids`` of ONE segment (segment B
  alone: its tokens, token type 1, positions from 0), output ``hidden_states`` after the k decoupled
  layers. Since those layers only look within a segment, a segment's states are the same whether it
  is encoded alone or inside a pair, so passages can be encoded once and cached.
- ``upper.onnx``: inputs ``hidden_states`` (segment states concatenated along the sequence) and
  ``attention_mask``; outputs ``last_hidden_state`` (and ``pooler_output``) of the joint layers.

Both are cut out of the same fx graph that ``model.onnx`` is exported from, lowered with the same
fusions (and quantization, if any), and :func:`check_split` measures how far composing them is from
``model.onnx``; see ``compiler/split_runtime.py`` for the composition.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import torch
from torch.export import Dim
from torch.fx import Graph, GraphModule, Node
from torch.fx.node import map_arg

from ..structure import SEGMENT_MASK, analyze
from . import verify
from .export import OPSET, _max_sequence
from .fusions import fused_op_counts, op_counts, run_ort_fusions
from .io import save_model
from .packed_attention import pack_attention
from .quantize import QuantizeSpec, plan_exclusions, quantize_file
from .quiet import quiet

aten = torch.ops.aten
# Composing lower+upper must reproduce model.onnx like an exact rewrite (fp32: fusions reorder
# float math by ~1e-6). Dynamic int8 scales are computed per activation tensor, i.e. over a
# different set of tokens in the split and in the monolithic model, so quantized forms are judged
# by the pooled cosine instead.
SPLIT_TOLERANCE = 1e-4
QUANTIZED_MIN_COSINE = 0.999


@dataclass
class SplitResult:
    layers: int  # decoupled layers in lower.onnx
    lower_path: Path
    upper_path: Path
    op_counts: dict[str, dict[str, int]]
    fusions: dict[str, dict[str, int]]
    notes: list[str] = field(default_factory=list)


def decoupled_layer_count(gm: GraphModule) -> int:
    """How many of the lowest layers attend through decouple-attention's segment mask."""
    count = 0
    for layer in analyze(gm).layers:
        core = layer.attention.core
        mask = core.args[3] if len(core.args) > 3 else core.kwargs.get("attn_mask")
        if not (isinstance(mask, Node) and mask.meta.get(SEGMENT_MASK)):
            break
        count += 1
    return count


def _copy_needed(gm: GraphModule, graph: Graph, env: dict[Node, Node], outputs) -> None:
    """Copy into ``graph`` every node ``outputs`` depend on that ``env`` does not provide yet."""
    needed, stack = set(), [n for n in _nodes(outputs)]
    while stack:
        node = stack.pop()
        if node in needed or node in env:
            continue
        needed.add(node)
        stack += node.all_input_nodes
    for node in gm.graph.nodes:
        if node in needed:
            env[node] = graph.node_copy(node, lambda n: env[n])


def _nodes(arg) -> list[Node]:
    found: list[Node] = []
    map_arg(arg, lambda n: found.append(n))
    return found


def split_modules(gm: GraphModule, k: int) -> tuple[GraphModule, GraphModule]:
    """Cut the graph after layer k-1: (lower: ids -> states, upper: states + mask -> outputs)."""
    structure = analyze(gm)
    if not 0 < k < len(structure.layers):
        raise ValueError(f"split_modules: need 0 < k < {len(structure.layers)}, got {k}")
    placeholders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    cut = structure.layers[k].input

    lower = Graph()
    env = {placeholders[name]: lower.placeholder(name) for name in verify.INPUT_NAMES}
    _copy_needed(gm, lower, env, cut)
    lower.output(env[cut])

    upper = Graph()
    hidden = upper.placeholder("hidden_states")
    env = {cut: hidden, placeholders["attention_mask"]: upper.placeholder("attention_mask")}
    # Batch and sequence sizes were read off the id inputs, which upper.onnx does not have.
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target == aten.sym_size.int and node.args[0] in (
                placeholders["input_ids"], placeholders["token_type_ids"]):
            env[node] = upper.call_function(aten.sym_size.int, (hidden, node.args[1]))
    output = next(n for n in gm.graph.nodes if n.op == "output")
    results = output.args[0]
    _copy_needed(gm, upper, env, results)
    leaked = [n.name for n in upper.nodes if n.op == "placeholder" and n.name not in ("hidden_states", "attention_mask")]
    if leaked:
        raise ValueError(f"split_modules: the upper layers read {leaked} besides the states and the attention mask")
    upper.output(map_arg(results, lambda n: env[n]))
    lower.lint()
    upper.lint()
    return GraphModule(gm, lower), GraphModule(gm, upper)


def _export(module: GraphModule, kwargs: dict[str, torch.Tensor], output_names: list[str], max_seq: int) -> ir.Model:
    batch, seq = Dim("batch"), Dim("seq", max=max_seq)
    with quiet():
        program = torch.onnx.export(module, (), kwargs=kwargs, dynamo=True, opset_version=OPSET,
                                    input_names=list(kwargs), output_names=output_names,
                                    dynamic_shapes={name: {0: batch, 1: seq} for name in kwargs},
                                    optimize=True, verbose=False)
    return program.model


def _lower_part(module: GraphModule, kwargs: dict, check: dict, output_names: list[str], max_seq: int, path: Path,
                *, fuse: bool, quantize: QuantizeSpec | None, notes: list[str], label: str) -> Path:
    """Export, fuse (packed attention only if it verifies on `check`), quantize; write `path`."""
    with torch.no_grad():
        reference = module(**check)
    reference = (reference[0] if isinstance(reference, tuple) else reference).numpy()
    mask = check["attention_mask"].numpy()
    with tempfile.TemporaryDirectory(prefix="bertpress-split-") as tmp:
        fp32 = Path(tmp) / "fp32.onnx"
        for pack in (True, False) if fuse else (False,):
            model = _export(module, kwargs, output_names, max_seq)
            if fuse:
                run_ort_fusions(model)
                if pack:
                    pack_attention(model)
            common_passes.RemoveUnusedNodesPass()(model)
            common_passes.NameFixPass()(model)
            save_model(model, fp32)
            session = verify.ort_session(fp32)
            got = session.run(None, {n: v.numpy() for n, v in check.items()})[0]
            error = verify.max_abs_error(got, reference, mask)
            if error <= 1e-3 or not pack:
                break
        notes.append(f"split: {label} fp32 {'fused ' if fuse else ''}graph vs PyTorch max abs error {error:.2e}"
                     + ("" if pack or not fuse else " (packed attention failed verification; kept onnxscript's)"))
        if quantize is not None:
            excluded, _ = plan_exclusions(model, quantize)
            quantize_file(fp32, path, quantize, excluded)
        else:
            shutil.copyfile(fp32, path)
    return path


def lower_split(gm: GraphModule, example_inputs: dict[str, torch.Tensor], out_dir: Path, *,
                quantize: QuantizeSpec | None, fuse: bool = True) -> SplitResult:
    """Write ``out_dir/lower.onnx`` and ``out_dir/upper.onnx`` for a decoupled graph."""
    k = decoupled_layer_count(gm)
    if k == 0:
        raise ValueError("lower_split: the graph has no decoupled layers (run decouple-attention first)")
    lower, upper = split_modules(gm, k)
    out_dir = Path(out_dir)
    max_seq = _max_sequence(gm)
    ids = {n: example_inputs[n].to(torch.int64) for n in verify.INPUT_NAMES}
    notes: list[str] = []
    # lower.onnx must stay right on pairs too (it is the decoupled model's bottom), so check on one.
    lower_check = verify.padded_batch(ids, second_segment=True)
    lower_path = _lower_part(lower, ids, lower_check, ["hidden_states"], max_seq, out_dir / "lower.onnx",
                             fuse=fuse, quantize=quantize, notes=notes, label="lower.onnx")
    with torch.no_grad():
        states = {"hidden_states": lower(**ids), "attention_mask": ids["attention_mask"]}
        check_states = {"hidden_states": lower(**lower_check), "attention_mask": lower_check["attention_mask"]}
        outputs = upper(**states)
    names = ["last_hidden_state", "pooler_output"][:len(outputs) if isinstance(outputs, tuple) else 1]
    upper_path = _lower_part(upper, states, check_states, names, max_seq, out_dir / "upper.onnx",
                             fuse=fuse, quantize=quantize, notes=notes, label="upper.onnx")
    models = {"lower": ir.load(lower_path), "upper": ir.load(upper_path)}
    return SplitResult(k, lower_path, upper_path, {n: op_counts(m) for n, m in models.items()},
                       {n: fused_op_counts(m) for n, m in models.items()}, notes)


def check_split(model_path: Path, split: SplitResult, batches: list[dict[str, torch.Tensor]], *, quantized: bool,
                threads: int = 1) -> dict:
    """Compose lower+upper on `batches` (each row's segments encoded apart) and compare with model.onnx."""
    from ..split_runtime import SplitModel

    whole = verify.ort_session(model_path, threads)
    parts = SplitModel(split.lower_path, split.upper_path, threads=threads)
    max_abs, cosines = 0.0, []
    for batch in batches:
        feeds = {n: batch[n].numpy().astype(np.int64) for n in verify.INPUT_NAMES}
        expected = whole.run(None, feeds)[0]
        got = parts.compose(feeds["input_ids"], feeds["attention_mask"], feeds["token_type_ids"])[0]
        mask = feeds["attention_mask"]
        max_abs = max(max_abs, verify.max_abs_error(got, expected, mask))
        cosines.append(verify.pooled_cosine(got, expected, mask))
    cosine_min = float(np.concatenate(cosines).min())
    segments = sum(int((b["token_type_ids"] * b["attention_mask"]).amax(1).gt(0).sum()) for b in batches)
    passed = cosine_min >= QUANTIZED_MIN_COSINE if quantized else max_abs <= SPLIT_TOLERANCE
    return {"layers": split.layers, "max_abs_error": max_abs, "cosine_min": round(cosine_min, 6),
            "criterion": f"cosine_min >= {QUANTIZED_MIN_COSINE}" if quantized else f"max_abs_error <= {SPLIT_TOLERANCE:g}",
            "rows": sum(len(b["input_ids"]) for b in batches), "two_segment_rows": segments, "passed": passed}


def write_split(gm: GraphModule, example_inputs: dict[str, torch.Tensor], out_dir: Path, *,
                quantize: QuantizeSpec | None, fuse: bool, batches: list[dict[str, torch.Tensor]],
                threads: int) -> dict:
    """The driver's step for a ``split`` lowering hint: write both parts, check them, return the report entry.

    The check runs on `batches` (the held-out text) plus the two-segment padded example batch, so
    segment boundaries are exercised even when the held-out text is single-segment.
    """
    ids = {n: example_inputs[n].to(torch.int64) for n in verify.INPUT_NAMES}
    split = lower_split(gm, ids, out_dir, quantize=quantize, fuse=fuse)
    check = check_split(out_dir / "model.onnx", split, list(batches) + [verify.padded_batch(ids, second_segment=True)],
                        quantized=quantize is not None, threads=threads)
    return {"layers": split.layers, "files": ["lower.onnx", "upper.onnx"], "op_counts": split.op_counts,
            "fusions": split.fusions, "notes": split.notes, "check": check}
