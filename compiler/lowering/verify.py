"""Numerical checks of a lowered model against the PyTorch module it came from."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..model_inputs import feed
from ..tasks import model_output
from .export import INPUT_NAMES


def padded_batch(example_inputs: dict[str, torch.Tensor], second_segment: bool = False) -> dict[str, torch.Tensor]:
    """The example batch with right-padding on alternate rows, so masks are exercised.

    ``second_segment`` makes the second half of the other rows segment 1 (token_type_ids), so
    rewrites that depend on segments (decouple-attention's block-diagonal mask) are checked too.
    """
    batch = {n: example_inputs[n].clone().to(torch.int64) for n in INPUT_NAMES}
    if batch["input_ids"].shape[0] < 2:
        batch = {n: t.repeat(2, 1) for n, t in batch.items()}
    seq = batch["input_ids"].shape[1]
    mask = batch["attention_mask"]
    keep = max(1, seq // 2)
    mask[1::2, keep:] = 0
    batch["input_ids"][1::2, keep:] = 0
    if second_segment:
        batch["token_type_ids"][0::2, keep:] = 1
    return batch


def token_type_count(module: torch.nn.Module) -> int:
    """Rows of the token-type embedding table (1 for models without segments)."""
    for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
        if name.endswith("token_type_embeddings.weight"):
            return int(tensor.shape[0])
    return 1


def torch_outputs(module, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    with torch.no_grad():
        out = module(**feed(module, inputs))
    return model_output(out).float().numpy()


def ort_session(path: Path, threads: int = 1):
    """Verification runs single-threaded so it stays cheap beside other work."""
    from ..runtime import session

    return session(path, threads)


def ort_outputs(path_or_session, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    sess = ort_session(path_or_session) if isinstance(path_or_session, (str, Path)) else path_or_session
    names = {i.name for i in sess.get_inputs()}
    feeds = {n: inputs[n].numpy().astype(np.int64) for n in INPUT_NAMES if n in names}
    outputs = [o.name for o in sess.get_outputs()]
    if outputs[:2] == ["start_logits", "end_logits"]:  # stacked as compiler.tasks.model_output stacks them
        return np.stack(sess.run(outputs[:2], feeds), axis=-1)
    return sess.run(None, feeds)[0]


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    m = mask.astype(np.float32)[..., None]
    return (hidden * m).sum(1) / np.maximum(m.sum(1), 1e-9)


def pooled_cosine(a: np.ndarray, b: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Per-sentence cosine of attention-mask mean-pooled embeddings (a classifier's [batch, labels] logits: as they are)."""
    pa, pb = (a, b) if a.ndim == 2 else (mean_pool(a, mask), mean_pool(b, mask))
    return (pa * pb).sum(1) / (np.linalg.norm(pa, axis=1) * np.linalg.norm(pb, axis=1) + 1e-12)


def max_abs_error(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    diff = np.abs(a - b)
    if mask is not None and diff.shape[:2] == mask.shape:
        # Padded positions' hidden states are not meaningful to anyone; compare real tokens.
        diff = diff[mask.astype(bool)]
    return float(diff.max())
