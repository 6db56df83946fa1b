"""Run a lowered model in ONNX Runtime with the target's thread count, batch by batch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def session(model_path: Path, threads: int = 2, config: dict[str, str] | None = None):
    """An ONNX Runtime CPU session; ``config``: session config entries (e.g. {"session.x64quantprecision": "1"})."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    for key, value in (config or {}).items():
        options.add_session_config_entry(key, value)
    return ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])


def ort_runner(sess):
    """A runner giving the first output, or a QA model's start and end logits stacked [batch, seq, 2]
    (as compiler.tasks.model_output does for the traced graph)."""
    names = {i.name for i in sess.get_inputs()}
    outputs = [o.name for o in sess.get_outputs()]
    span = outputs[:2] == ["start_logits", "end_logits"]

    def run(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        feeds = {k: v.numpy().astype(np.int64) for k, v in batch.items() if k in names}
        if span:
            return torch.from_numpy(np.stack(sess.run(outputs[:2], feeds), axis=-1))
        return torch.from_numpy(np.asarray(sess.run(None, feeds)[0]))

    return run
