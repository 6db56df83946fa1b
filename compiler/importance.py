"""Importance of attention heads and feed-forward neurons, and the statistics pruning compensates with.

Scores are computed on *calibration* batches (never the held-out slice the pass manager validates
on). Data-driven scores run the traced graph through an ``Interpreter`` that can read or rescale
chosen nodes' outputs, so nothing in the graph is edited to measure it.

- ``l1``: weight norm of each head's q/k/v rows and output columns (each FFN neuron's up row and
  down column). No data needed.
- ``gradient`` (heads; Michel et al. 2019): a mask xi_h multiplies each head's attention output and
  the fidelity loss is L = 1 - cos(pooled(xi), pooled_reference). Pruning head h moves xi_h from 1
  to 0, so the expected loss increase is, to second order, ``-dL/dxi_h + 1/2 * G_hh`` where G is the
  Gauss-Newton curvature of L. While the graph still equals the reference, dL/dxi is exactly zero
  (L is at its minimum), which is why the first-order score of the paper alone cannot rank heads
  here and the curvature term is needed; G_hh = E||d e / d xi_h||^2 (e = unit-norm pooled embedding)
  is estimated with random projections (Hutchinson), a few backward passes per batch.
  A task model (a classifier, tagger, QA or reranker head) is scored on its head's output instead: the
  expected KL increase of its label distributions, ``1/2 * F_hh`` with F the Fisher information of
  the logits (estimated with labels sampled from the model's own predictions, v = onehot(y) - p);
  for a num_labels-1 score, the Gauss-Newton curvature of its squared error.
- ``entropy`` (heads): mean entropy of each head's attention distribution over real query tokens,
  recomputed from q, k and the mask; a diffuse (high-entropy) head is scored less important.
- ``activation`` (FFN): mean |activation| of each neuron times the norm of its down-projection column.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch.fx import GraphModule, Interpreter, Node

from .graph_edit import get_tensor
from .structure import BertStructure
from .tasks import task_of_model
from .validation import hidden_states, pool

Hook = Callable[[Node, torch.Tensor, "Probe"], torch.Tensor]


class Probe(Interpreter):
    """Run a graph; hooks see (and may replace) the outputs of chosen nodes."""

    def __init__(self, gm: GraphModule, hooks: dict[Node, Hook]):
        super().__init__(gm)
        self.hooks = hooks

    def run_node(self, node: Node):
        out = super().run_node(node)
        hook = self.hooks.get(node)
        return hook(node, out, self) if hook is not None else out

    def value(self, node) -> torch.Tensor:
        return self.env[node] if isinstance(node, Node) else node

    def hidden(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        names = [n.name for n in self.module.graph.nodes if n.op == "placeholder"]
        out = self.run(*[batch[name] for name in names])
        return out[0] if not isinstance(out, torch.Tensor) else out


def _real_tokens(batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return batch["attention_mask"].bool()


@dataclass
class HeadStats:
    """Per layer: importance of each head and the mean attention output of each head ([H, D])."""

    scores: list[torch.Tensor]
    mean_output: list[torch.Tensor]


@dataclass
class NeuronStats:
    scores: list[torch.Tensor]
    mean_activation: list[torch.Tensor]


def head_l1(gm: GraphModule, structure: BertStructure) -> list[torch.Tensor]:
    scores = []
    for layer in structure.layers:
        a = layer.attention
        heads, size = a.num_heads, a.head_size
        total = torch.zeros(heads)
        for lin in (a.query, a.key, a.value):
            total += get_tensor(gm, lin.weight).detach().abs().reshape(heads, size, -1).sum(dim=(1, 2))
        out = get_tensor(gm, a.output.weight).detach().abs()
        total += out.reshape(out.shape[0], heads, size).sum(dim=(0, 2))
        scores.append(total)
    return scores


def head_mean_outputs(gm: GraphModule, structure: BertStructure, batches) -> list[torch.Tensor]:
    """Mean attention output of each head over real tokens, [H, D] per layer."""
    sums = [torch.zeros(l.attention.num_heads, l.attention.head_size) for l in structure.layers]
    count = 0
    cores = {layer.attention.core: i for i, layer in enumerate(structure.layers)}
    current: dict = {}

    def record(node, out, probe):
        real = current["mask"]  # [B, S]
        # sdpa output is [B, H, S, D]
        sums[cores[node]] += (out.detach() * real[:, None, :, None]).sum(dim=(0, 2))
        return out

    probe = Probe(gm, {core: record for core in cores})
    with torch.no_grad():
        for batch in batches:
            current["mask"] = _real_tokens(batch).float()
            count += int(_real_tokens(batch).sum())
            probe.hidden(batch)
    return [s / max(count, 1) for s in sums]


def head_entropy(gm: GraphModule, structure: BertStructure, batches) -> list[torch.Tensor]:
    """Importance = log(S) - mean attention entropy: focused heads score high, uniform ones low."""
    totals = [torch.zeros(l.attention.num_heads) for l in structure.layers]
    cores = {layer.attention.core: i for i, layer in enumerate(structure.layers)}
    current: dict = {}

    def record(node, out, probe):
        q, k = probe.value(node.args[0]), probe.value(node.args[1])
        scale = node.kwargs.get("scale") or 1.0 / math.sqrt(q.shape[-1])
        scores = (q @ k.transpose(-1, -2)) * scale  # [B, H, S, S]
        keys = current["mask"][:, None, None, :]
        scores = scores.masked_fill(~keys, float("-inf"))
        probs = scores.softmax(-1)
        entropy = -(probs * torch.log(probs.clamp_min(1e-12))).sum(-1)  # [B, H, S]
        lengths = current["mask"].sum(-1).float().clamp_min(2.0)  # normalize by the row's max entropy
        normalized = entropy / torch.log(lengths)[:, None, None]
        real = current["mask"][:, None, :].float()
        totals[cores[node]] += (1.0 - normalized).mul(real).sum(dim=(0, 2)) / real.sum()
        return out

    probe = Probe(gm, {core: record for core in cores})
    with torch.no_grad():
        for batch in batches:
            current["mask"] = _real_tokens(batch)
            probe.hidden(batch)
    return [t / max(len(batches), 1) for t in totals]


def _unit_pooled(hidden: torch.Tensor, batch) -> torch.Tensor:
    return torch.nn.functional.normalize(pool(hidden, batch["attention_mask"]), dim=-1)


def head_gradient(gm: GraphModule, structure: BertStructure, batches, reference: torch.nn.Module,
                  probes: int = 4, seed: int = 0) -> list[torch.Tensor]:
    """Expected fidelity-loss increase of masking each head (see the module docstring)."""
    masks = [torch.ones(l.attention.num_heads, requires_grad=True) for l in structure.layers]
    cores = {layer.attention.core: i for i, layer in enumerate(structure.layers)}

    def scale(node, out, probe):
        return out * masks[cores[node]].view(1, -1, 1, 1)

    probe = Probe(gm, {core: scale for core in cores})
    task = task_of_model(reference)
    if task != "feature-extraction":
        return _head_fisher(probe, masks, batches, task, probes, seed)
    reference_run = hidden_states(reference)
    generator = torch.Generator().manual_seed(seed)
    first = [torch.zeros_like(m) for m in masks]
    curvature = [torch.zeros_like(m) for m in masks]
    for batch in batches:
        with torch.no_grad():
            target = _unit_pooled(reference_run(batch).float(), batch)
        with torch.enable_grad():
            embedded = _unit_pooled(probe.hidden(batch), batch)
            loss = (1.0 - (embedded * target).sum(-1)).sum()
            grads = torch.autograd.grad(loss, masks, retain_graph=True)
            for acc, g in zip(first, grads):
                acc += g
            for p in range(probes):
                # E_v[(v^T J_h)^2] = ||J_h||^2 summed over texts (independent v per text).
                v = torch.randn(embedded.shape, generator=generator)
                projected = torch.autograd.grad((embedded * v).sum(), masks, retain_graph=p < probes - 1)
                for acc, g in zip(curvature, projected):
                    acc += g.pow(2) / probes
    # For L = 1 - cos on unit vectors, L = 1/2 ||e - t||^2, so its Gauss-Newton curvature is J^T J.
    return [(-f + 0.5 * c).detach() for f, c in zip(first, curvature)]


def _head_fisher(probe: Probe, masks: list[torch.Tensor], batches, task: str, probes: int, seed: int) -> list[torch.Tensor]:
    """Expected KL increase of a task head's output from masking each head (see the module docstring)."""
    generator = torch.Generator().manual_seed(seed)
    curvature = [torch.zeros_like(m) for m in masks]
    for batch in batches:
        with torch.enable_grad():
            names = [n.name for n in probe.module.graph.nodes if n.op == "placeholder"]
            out = probe.run(*[batch[name] for name in names])
            logits = torch.stack(out[:2], dim=1) if task == "question-answering" else out[0]  # QA: [batch, 2, seq]
            real = batch["attention_mask"].bool()
            if task == "question-answering":
                logits = logits.masked_fill(~real.unsqueeze(1), torch.finfo(logits.dtype).min)
            for p in range(probes):
                if logits.shape[-1] == 1:  # a single score: E_v[(v J)^2] = ||J||^2 with v ~ N(0, 1)
                    v = torch.randn(logits.shape, generator=generator)
                else:  # v = onehot(y) - p with y ~ p: E[v v^T] is the Fisher matrix of the softmax
                    probs = torch.softmax(logits.detach(), dim=-1)
                    flat = probs.reshape(-1, probs.shape[-1])
                    drawn = torch.multinomial(flat, 1, generator=generator).squeeze(-1)
                    v = (torch.nn.functional.one_hot(drawn, probs.shape[-1]).to(probs.dtype) - flat).reshape(probs.shape)
                    if task == "token-classification":
                        v = v * real.unsqueeze(-1)
                    v = torch.nan_to_num(v)
                projected = torch.autograd.grad((logits * v).sum(), masks, retain_graph=p < probes - 1)
                for acc, g in zip(curvature, projected):
                    acc += g.pow(2) / probes
    return [(0.5 * c).detach() for c in curvature]


def neuron_l1(gm: GraphModule, structure: BertStructure) -> list[torch.Tensor]:
    scores = []
    for layer in structure.layers:
        up = get_tensor(gm, layer.ffn.up.weight).detach().abs().sum(dim=1)
        down = get_tensor(gm, layer.ffn.down.weight).detach().abs().sum(dim=0)
        scores.append(up + down)
    return scores


def neuron_activations(gm: GraphModule, structure: BertStructure, batches) -> NeuronStats:
    """Per neuron: mean |activation| x ||down column|| (importance) and mean activation (for compensation)."""
    acts = {layer.ffn.act: i for i, layer in enumerate(structure.layers)}
    abs_sums = [torch.zeros(l.ffn.intermediate) for l in structure.layers]
    sums = [torch.zeros(l.ffn.intermediate) for l in structure.layers]
    current: dict = {}

    def record(node, out, probe):
        real = out.detach()[current["mask"]]  # [tokens, I]
        abs_sums[acts[node]] += real.abs().sum(0)
        sums[acts[node]] += real.sum(0)
        return out

    probe = Probe(gm, {act: record for act in acts})
    count = 0
    with torch.no_grad():
        for batch in batches:
            current["mask"] = _real_tokens(batch)
            count += int(current["mask"].sum())
            probe.hidden(batch)
    scores = []
    for i, layer in enumerate(structure.layers):
        column_norm = get_tensor(gm, layer.ffn.down.weight).detach().norm(dim=0)
        scores.append(abs_sums[i] / max(count, 1) * column_norm)
    return NeuronStats(scores, [s / max(count, 1) for s in sums])


def input_grams(gm: GraphModule, nodes: list[Node], batches) -> list[torch.Tensor]:
    """X^T X of each node's output over real tokens, with a trailing ones column (for the bias), float64."""
    index = {node: i for i, node in enumerate(nodes)}
    grams: list[torch.Tensor | None] = [None] * len(nodes)
    current: dict = {}

    def record(node, out, probe):
        x = out.detach()[current["mask"]].double()  # [tokens, features]
        x = torch.cat([x, torch.ones(x.shape[0], 1, dtype=x.dtype)], dim=1)
        gram = x.T @ x
        i = index[node]
        grams[i] = gram if grams[i] is None else grams[i] + gram
        return out

    probe = Probe(gm, {node: record for node in nodes})
    with torch.no_grad():
        for batch in batches:
            current["mask"] = _real_tokens(batch)
            probe.hidden(batch)
    return grams


def refit_columns(weight: torch.Tensor, bias: torch.Tensor | None, gram: torch.Tensor, keep: torch.Tensor,
                  ridge: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Least-squares weights (and bias) on the kept input columns that best reproduce the full layer.

    Minimizes ||X W^T + b - (X_k W_k'^T + b')||^2 over calibration tokens, given G = [X 1]^T [X 1]:
    the removed columns' contribution is re-expressed through the kept ones where they correlate,
    and through the bias where it is constant (which subsumes mean-output bias compensation).
    """
    n = weight.shape[1]
    if bias is None:  # no intercept to absorb into: fit on the kept inputs alone
        gram, cols, full = gram[:n, :n], keep, weight.double()
    else:
        cols = torch.cat([keep, torch.tensor([n])])  # kept inputs + the ones column
        full = torch.cat([weight.double(), bias.double()[:, None]], 1)
    g_kk = gram[cols][:, cols]
    damp = torch.zeros(len(cols), dtype=gram.dtype)
    damp[:len(keep)] = ridge * g_kk.diagonal()[:len(keep)].mean()
    solution = torch.linalg.solve(g_kk + torch.diag(damp), gram[cols] @ full.T).T  # [out, k (+ 1)]
    new_weight = solution[:, :len(keep)].to(weight.dtype).contiguous()
    new_bias = solution[:, -1].to(weight.dtype).contiguous() if bias is not None else None
    return new_weight, new_bias
