"""Store int4 linears as ONNX Runtime ``MatMulNBits`` (4-bit weights, one scale per block of inputs).

quantize-linear (dtype int4) leaves in the graph the dequantized weights ``W = q * scale`` and hands
lowering the scales; here each fp32 ``MatMul(A, W^T)`` (or the pooler's ``Gemm``, plus an ``Add`` for
its bias) whose constant weight is one of them becomes ``MatMulNBits(A, B, scales)`` with
  * ``B``: uint8 [N, K / block, block / 2], ``q`` in [0, 15] two to a byte (low nibble first);
  * ``zero_points``: uint8 [N, ceil(K / block / 2)], 4-bit, two to a byte; omitted when symmetric
    (ONNX Runtime's default zero point is 8);
  * ``scales``: stored as float16 and widened by a ``Cast`` that ONNX Runtime folds when the session
    loads (the pass rounds scales to float16 itself, so the stored model is the validated one);
  * ``accuracy_level`` 4 (int8 activations per block) or 0 (fp32, exact), as the recipe chose.
MatMuls are found by content (the fp32 weight equals the graph's weight transposed), so the
exporter's names do not matter. Runs before int8 quantization, which then leaves these nodes alone.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .fusions import MS_DOMAIN


def pack_int4(q: np.ndarray, block: int) -> np.ndarray:
    """4-bit q in [0, 15], [N, K] -> MatMulNBits' uint8 [N, K / block, block / 2] (low nibble first)."""
    rows, cols = q.shape
    q = q.astype(np.uint8).reshape(rows, cols // block, block)
    return (q[:, :, 0::2] | (q[:, :, 1::2] << 4)).astype(np.uint8)


def pack_zero_points(zeros: np.ndarray) -> np.ndarray:
    """4-bit zero points [N, blocks] -> uint8 [N, ceil(blocks / 2)] (low nibble first), MatMulNBits' layout."""
    rows, blocks = zeros.shape
    padded = np.zeros((rows, blocks + blocks % 2), dtype=np.uint8)
    padded[:, :blocks] = zeros
    return (padded[:, 0::2] | (padded[:, 1::2] << 4)).astype(np.uint8)


def _integers(weight: np.ndarray, scales: np.ndarray, zeros: np.ndarray, block: int) -> tuple[np.ndarray, float]:
    scale = np.repeat(scales.astype(np.float32), block, axis=1)
    zero = np.repeat(zeros.astype(np.float32), block, axis=1)
    q = np.clip(np.rint(weight / scale) + zero, 0, 15)
    drift = float(np.abs((q - zero) * scale - weight).max() / max(float(np.abs(weight).max()), 1e-12))
    return q.astype(np.uint8), drift


def store_int4(path: Path, weights: dict[str, tuple[np.ndarray, dict]]) -> dict:
    """Rewrite the fp32 model at ``path`` in place; ``weights`` maps a target to (W [out, in], pass hint)."""
    path = Path(path)
    model = onnx.load(path)
    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    consumers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            consumers[name] = consumers.get(name, 0) + 1
    by_shape: dict[tuple[int, int], list[str]] = {}
    for target, (weight, _) in weights.items():
        by_shape.setdefault(tuple(weight.shape), []).append(target)

    stored, drifted, reshaped, casts, constants = {}, {}, {}, [], []
    replacements: dict[int, list[onnx.NodeProto]] = {}
    done: dict[str, str] = {}  # B initializer name -> target (a shared weight feeds several MatMuls)
    for index, node in enumerate(graph.node):
        if node.domain not in ("", "ai.onnx") or len(node.input) < 2 or node.input[1] not in initializers:
            continue
        transposed = False
        if node.op_type == "Gemm":  # the pooler: Y = A B' + C
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                continue
            transposed = bool(attrs.get("transB", 0))
        elif node.op_type != "MatMul":
            continue
        tensor = initializers[node.input[1]]
        if len(tensor.dims) != 2:
            continue
        k, n = (int(d) for d in tensor.dims)
        if transposed:
            k, n = n, k
        target = done.get(tensor.name)
        if target is None:
            matrix = numpy_helper.to_array(tensor)
            matrix = matrix if transposed else matrix.T  # [N, K], torch's layout
            target = next((t for t in by_shape.get((n, k), []) if t not in stored
                           and np.array_equal(weights[t][0], matrix)), None)
            if target is None:
                continue
        weight, hint = weights[target]
        block, level = int(hint["block_size"]), int(hint["accuracy_level"])
        prefix = f"{tensor.name}_q4"
        if target not in stored:
            scales = np.asarray(hint["scales"], dtype=np.float32)
            if scales.shape != (n, k // block):  # a later pass reshaped the weight: the scales no longer fit
                reshaped[target] = [n, k]
                continue
            zeros = hint.get("zero_points")
            zeros = np.full(scales.shape, 8, dtype=np.uint8) if zeros is None else np.asarray(zeros, dtype=np.uint8)
            q, drift = _integers(weight, scales, zeros, block)
            if drift > 1e-5:
                drifted[target] = drift
            constants += [numpy_helper.from_array(pack_int4(q, block), f"{prefix}_B"),
                          numpy_helper.from_array(scales.astype(np.float16).reshape(-1), f"{prefix}_scales_fp16")]
            casts.append(helper.make_node("Cast", [f"{prefix}_scales_fp16"], [f"{prefix}_scales"],
                                          to=TensorProto.FLOAT, name=f"{prefix}_scales_cast"))
            if hint.get("zero_points") is not None:
                constants.append(numpy_helper.from_array(pack_zero_points(zeros), f"{prefix}_zero_points"))
            stored[target] = {"shape": [n, k], "block_size": block, "accuracy_level": level,
                              "zero_points": hint.get("zero_points") is not None}
            done[tensor.name] = target
        bias = node.input[2] if node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] else None
        product = f"{node.output[0]}_nbits" if bias else node.output[0]
        inputs = [node.input[0], f"{prefix}_B", f"{prefix}_scales"]
        if hint.get("zero_points") is not None:
            inputs.append(f"{prefix}_zero_points")
        replacements[index] = [helper.make_node("MatMulNBits", inputs, [product],
                                                name=f"{node.name or prefix}_nbits", domain=MS_DOMAIN,
                                                K=k, N=n, bits=4, block_size=block, accuracy_level=level)]
        if bias:
            replacements[index].append(helper.make_node("Add", [product, bias], [node.output[0]],
                                                        name=f"{node.name or prefix}_bias"))
        consumers[tensor.name] -= 1

    if not stored:
        return {"stored": {}, "missing": sorted(set(weights) - set(reshaped)), "drifted": {}, "reshaped": reshaped}
    # Constant-only casts first keeps the node list topologically sorted.
    nodes = casts + [new for index, node in enumerate(graph.node) for new in replacements.get(index, [node])]
    del graph.node[:]
    graph.node.extend(nodes)
    for name, count in consumers.items():
        if count == 0 and name in initializers:
            graph.initializer.remove(initializers[name])
    graph.initializer.extend(constants)
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    onnx.save(model, path)
    return {"stored": stored, "missing": sorted(set(weights) - set(stored) - set(reshaped)), "drifted": drifted,
            "reshaped": reshaped}
