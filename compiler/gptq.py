"""Block-wise 4-bit weight quantization: round-to-nearest and GPTQ (Frantar et al. 2022).

Both produce, per linear weight ``W`` [out, in], integers ``q`` in [0, 15] and, per block of ``block``
consecutive inputs of a row, a scale and a zero point, so that ``W_hat = (q - zero) * scale``. That is
ONNX Runtime's ``MatMulNBits`` layout (its default zero point, 8, is the symmetric case); the lowering
packs ``q`` and the zero points two to a byte.

GPTQ quantizes one input column at a time and spreads the rounding error of each column over the
columns not yet quantized, weighted by the inverse Hessian ``H = X^T X`` of the layer's inputs on
calibration text, so the *outputs* of the layer move as little as possible rather than the weights.
It is applied in graph order: each group of linears that read the same input is quantized with the
inputs the already-quantized graph produces, so later layers correct the error of earlier ones.
During development, a one-off experiment on MiniLM's Hugging Face model (blocks of 32, 256 Python-docs
calibration texts, 200 held-out docs; not a bench of this repo) kept a mean cosine of 0.957 with
round-to-nearest symmetric, 0.989 GPTQ symmetric, 0.991 with clip search, 0.9924 asymmetric and
0.9925 asymmetric with clip search: hence the defaults. `python bench/small_model.py` measures the
compiled recipe; `--encoder-precision` there reproduces the round-to-nearest rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.fx import GraphModule, Node

from .importance import Probe

LEVELS = 15  # 4-bit: q in [0, 15]


@dataclass
class BlockQuantized:
    """``q`` uint8 [out, in] in [0, 15]; per block of ``block`` inputs of a row an fp32 ``scales`` and an
    integer ``zeros`` [out, in // block] (8 everywhere when symmetric): ``W_hat = (q - zero) * scale``."""

    q: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    block: int

    @property
    def symmetric(self) -> bool:
        return bool((self.zeros == 8).all())

    def dequantize(self) -> torch.Tensor:
        rows, cols = self.q.shape
        blocks = self.q.reshape(rows, cols // self.block, self.block).float() - self.zeros[:, :, None].float()
        return (blocks * self.scales[:, :, None]).reshape(rows, cols)


def stored_bytes(count: int, block: int, zero_points: bool) -> int:
    """Bytes of ``count`` 4-bit weights as lowering stores them: nibbles, a float16 scale per block and,
    with zero points, a nibble per block."""
    return count // 2 + 2 * (count // block) + (count // block // 2 if zero_points else 0)


def _to_stored(scale: torch.Tensor) -> torch.Tensor:
    """Scales are stored as float16: round them here so the graph holds exactly the deployed weights."""
    return scale.clamp(min=1e-7, max=6e4).half().to(scale.dtype)


CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


def _grid(values: torch.Tensor, *, symmetric: bool, clip_search: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point per row of a [rows, block] slice.

    Symmetric: zero 8 and the largest magnitude maps to 7 (levels -8..7 around it). Asymmetric: the
    row's [min, max] (always containing 0) spans the 16 levels, so a skewed block wastes none. With
    ``clip_search`` each row also tries shrinking its range and keeps the ratio with the least
    squared rounding error (an outlier then costs one clipped weight, not the resolution of all).
    """
    best_scale = best_zero = best_error = None
    for ratio in CLIP_RATIOS if clip_search else (1.0,):
        if symmetric:
            scale = _to_stored(values.abs().amax(dim=1) * ratio / 7)
            zero = torch.full_like(scale, 8.0)
        else:
            low = (values.amin(dim=1) * ratio).clamp(max=0)
            high = (values.amax(dim=1) * ratio).clamp(min=0)
            scale = _to_stored((high - low) / LEVELS)
            zero = torch.clamp(torch.round(-low / scale), 0, LEVELS)
        error = ((_dequant(_round(values, scale[:, None], zero[:, None]), scale[:, None], zero[:, None]) - values) ** 2).sum(1)
        if best_error is None:
            best_scale, best_zero, best_error = scale, zero, error
        else:
            better = error < best_error
            best_scale = torch.where(better, scale, best_scale)
            best_zero = torch.where(better, zero, best_zero)
            best_error = torch.where(better, error, best_error)
    return best_scale, best_zero


def _round(values: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return torch.clamp(torch.round(values / scale) + zero, 0, LEVELS)


def _dequant(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    return (q - zero) * scale


def round_to_nearest(weight: torch.Tensor, block: int, *, symmetric: bool = True, clip_search: bool = False) -> BlockQuantized:
    rows, cols = weight.shape
    flat = weight.detach().float().reshape(rows * (cols // block), block)
    scale, zero = _grid(flat, symmetric=symmetric, clip_search=clip_search)
    q = _round(flat, scale[:, None], zero[:, None])
    shape = (rows, cols // block)
    return BlockQuantized(q.reshape(rows, cols).to(torch.uint8), scale.reshape(shape), zero.reshape(shape).to(torch.uint8), block)


def gptq(weight: torch.Tensor, hessian: torch.Tensor, block: int, damp: float = 0.01, *, symmetric: bool = True,
         clip_search: bool = False) -> BlockQuantized:
    """GPTQ with one scale (and zero) per block of ``block`` columns, taken from the block's updated weights."""
    W = weight.detach().double().clone()
    H = hessian.double().clone()
    rows, cols = W.shape
    dead = torch.diag(H) == 0  # inputs that were always zero: their weights cannot matter
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += damp * torch.mean(torch.diag(H)) * torch.eye(cols, dtype=H.dtype)
    # Upper Cholesky factor of H^-1: row i holds the update coefficients of column i.
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    q = torch.zeros(rows, cols, dtype=torch.uint8)
    scales = torch.zeros(rows, cols // block, dtype=torch.float64)
    zeros = torch.zeros(rows, cols // block, dtype=torch.uint8)
    for start in range(0, cols, block):
        end = start + block
        W1 = W[:, start:end].clone()
        H1 = Hinv[start:end, start:end]
        errors = torch.zeros_like(W1)
        scale, zero = _grid(W1, symmetric=symmetric, clip_search=clip_search)
        scales[:, start // block] = scale
        zeros[:, start // block] = zero.to(torch.uint8)
        for i in range(block):
            column = W1[:, i]
            rounded = _round(column, scale, zero)
            q[:, start + i] = rounded.to(torch.uint8)
            error = (column - _dequant(rounded, scale, zero)) / H1[i, i]
            W1[:, i:] -= error[:, None] * H1[i, i:][None, :]
            errors[:, i] = error
        W[:, end:] -= errors @ Hinv[start:end, end:]
    return BlockQuantized(q, scales.float(), zeros, block)


class _Seen(Exception):
    """Raised by a probe hook to stop the forward pass once every input it needs was recorded."""


def input_hessians(gm: GraphModule, inputs: list[Node], batches: list[dict[str, torch.Tensor]]) -> dict[Node, torch.Tensor]:
    """``sum X^T X`` over the real (non-padding) tokens of each input node, running only as far as needed."""
    sums: dict[Node, torch.Tensor] = {}
    seen: set[Node] = set()
    current: dict[str, torch.Tensor] = {}

    def record(node, out, probe):
        x = out.detach()
        mask = current["mask"]
        if x.dim() == 3 and tuple(x.shape[:2]) == tuple(mask.shape):
            x = x[mask]
        x = x.reshape(-1, x.shape[-1]).double()
        sums[node] = sums.get(node, 0) + x.T @ x
        seen.add(node)
        if len(seen) == len(inputs):
            raise _Seen
        return out

    probe = Probe(gm, {node: record for node in inputs})
    with torch.no_grad():
        for batch in batches:
            current["mask"] = batch["attention_mask"].bool()
            seen.clear()
            try:
                probe.hidden(batch)
            except _Seen:
                pass
    return sums
