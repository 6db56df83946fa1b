"""Store mostly-zero weights of a lowered model as ONNX sparse initializers (COO, values + indices).

ONNX Runtime accepts ``graph.sparse_initializer`` and densifies it when the session loads, so the
file shrinks while the kernels (and therefore FLOPs and latency) stay dense. An initializer is
converted only when its sparse form is smaller than its dense bytes: values plus one int32 linear
index per nonzero (int16 when the tensor has fewer than 32768 elements).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

_INT16_LIMIT = 2**15 - 1


def _sparse_form(array: np.ndarray, name: str) -> onnx.SparseTensorProto | None:
    flat = array.reshape(-1)
    nonzero = np.flatnonzero(flat)
    index_dtype = np.int16 if flat.size <= _INT16_LIMIT else np.int32
    sparse_bytes = nonzero.size * (flat.itemsize + np.dtype(index_dtype).itemsize)
    if sparse_bytes >= flat.nbytes:
        return None
    values = numpy_helper.from_array(flat[nonzero], name=name)
    indices = numpy_helper.from_array(nonzero.astype(index_dtype), name=f"{name}_indices")
    return helper.make_sparse_tensor(values, indices, list(array.shape))


def store_sparse(path: Path) -> dict:
    """Rewrite the model at ``path`` in place with sparse initializers where they are smaller."""
    path = Path(path)
    model = onnx.load(path)
    graph = model.graph
    before = path.stat().st_size
    converted, kept = [], []
    for tensor in list(graph.initializer):
        array = numpy_helper.to_array(tensor)
        if array.ndim < 2:
            continue  # biases and scales are tiny and dense
        sparse = _sparse_form(array, tensor.name)
        if sparse is None:
            if (array == 0).mean() > 0.25:
                kept.append(tensor.name)  # sparse, but not sparse enough to be smaller stored as COO
            continue
        graph.initializer.remove(tensor)
        graph.sparse_initializer.append(sparse)
        converted.append(tensor.name)
    onnx.save(model, path)
    return {"sparse_initializers": len(converted), "bytes_before": before, "bytes_after": path.stat().st_size,
            "left_dense": kept,
            "note": "ONNX Runtime densifies sparse initializers at load: smaller file, same FLOPs and latency."}


def sparse_bytes(numel: int, nonzero: int, element_size: int) -> int:
    """Bytes a weight takes on disk after `store_sparse` (whichever of dense and sparse is smaller)."""
    index = 2 if numel <= _INT16_LIMIT else 4
    return min(numel * element_size, nonzero * (element_size + index))
