"""Knowledge-distillation machinery: probe graphs, transfer losses, the LR schedule, training text.

A *probe* is a copy of a traced graph whose output is extended with what distillation compares:
every layer's output (the residual stream after its last layer norm) and every attention op's
query, key and mask inputs. It shares its parameters with the graph it was copied from, so
training the probe trains that graph; no hooks are needed and the graph itself is never edited.

Attention distributions are recomputed from the query/key inputs (softmax(q k^T * scale + mask))
because the fused scaled_dot_product_attention op never materializes them.
"""

from __future__ import annotations

import contextlib
import math
import random
import warnings
from dataclasses import dataclass

import torch
from torch.fx import Graph, GraphModule, Node

from .calibration import tokenize_batches
from .simulation import (fake_quant_activation_uint8, fake_quant_weight_int8, is_simulated, is_straight_through,
                         round_weight_int8, straight_through)
from .structure import BertStructure
from .tasks import output_divergence
from .validation import pool


@contextlib.contextmanager
def deterministic_kernels():
    """Run a distillation with torch's deterministic algorithms on (warn-only), and restore the caller's setting.

    Inductor writes the backward of an embedding lookup (an accumulating index_put) as a parallel scatter-add with
    atomic adds, so on two or more threads a compiled distillation would sum the tables' gradients in a different
    order on every run: the same recipe built twice would give different weights (and held-out figures that move in
    the fourth decimal). In deterministic mode Inductor hands that op to ATen's sorted implementation instead. Lowering
    reads the flag when torch.compile first runs the graph, so the first call must happen inside this context. Eager
    training is deterministic either way.

    Warn-only, because an op with no deterministic kernel (a plugin's, say) should not stop a build; but then rebuilds
    may differ. Yields a list that collects the names of such ops as torch warns about them (each warning is passed on
    as well), so the pass can report them instead of leaving them in a log."""
    enabled, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    nondeterministic: list[str] = []
    show = warnings.showwarning

    def record(message, category, filename, lineno, file=None, line=None):
        text = str(message)
        if NONDETERMINISTIC_WARNING in text:
            op = text.split(NONDETERMINISTIC_WARNING)[0].strip()
            if op not in nondeterministic:
                nondeterministic.append(op)
        show(message, category, filename, lineno, file, line)

    try:
        with warnings.catch_warnings():
            # torch warns once per op and call site; "always" lets each op of this run reach the recorder even if an
            # earlier run in this process already warned about it.
            warnings.filterwarnings("always", message=f".*{NONDETERMINISTIC_WARNING}")
            warnings.showwarning = record
            yield nondeterministic
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)


# torch's message for an op with no deterministic kernel under use_deterministic_algorithms(True, warn_only=True).
NONDETERMINISTIC_WARNING = "does not have a deterministic implementation"


def _straight_through_weight_int8(weight: torch.Tensor) -> torch.Tensor:
    return weight + (round_weight_int8(weight) - weight).detach()


def straight_through_of(fn):
    """The straight-through-estimator twin of a simulated op: its value forward, identity gradient back
    (see ``compiler.simulation.straight_through``)."""
    # The weight's own twin skips fake_quant_weight_int8's cache of rounded weights, which training would only churn;
    # every other simulated op (activations, quantize-linear's table and fp16 ops, quantize-embeddings' rows, int4
    # linears' activation blocks, a plugin's) gets simulation's generic twin.
    return _straight_through_weight_int8 if fn is fake_quant_weight_int8 else straight_through(fn)


@dataclass
class ProbeLayer:
    heads: int
    scale: float


def build_probe(gm: GraphModule, structure: BertStructure, *, fake_quant_linears: bool = False,
                training: bool = False) -> tuple[GraphModule, list[ProbeLayer]]:
    """Copy ``gm``'s graph with layer outputs and attention q/k/mask as outputs (parameters shared).

    ``training`` swaps simulated ops for their straight-through twins; ``fake_quant_linears``
    additionally simulates int8 on every linear that is not simulated yet (quantization-aware training).
    """
    graph = Graph()
    mapping: dict[Node, Node] = {}
    copied = graph.graph_copy(gm.graph, mapping)
    # The graph's own outputs (a task model's logits; QA's start and end logits), for the logits loss.
    outputs = [value for value in (copied if isinstance(copied, (tuple, list)) else (copied,)) if isinstance(value, Node)]
    if training:
        for node in list(graph.nodes):
            if is_simulated(node):
                node.target = straight_through_of(node.target)
    if fake_quant_linears:
        for linear in structure.linears:
            node = mapping[linear.node]
            x, weight = node.args[0], node.args[1]
            if _is_quantized(x):
                # An earlier quantize-linear simulates this linear already (int8, or int4: weights rounded in place,
                # activations in blocks); train it as that pass made it, not rounded a second time to int8.
                continue
            with graph.inserting_before(node):
                x = graph.call_function(straight_through(fake_quant_activation_uint8), (x,))
                if not _is_quantized(weight):
                    weight = graph.call_function(_straight_through_weight_int8, (weight,))
            node.args = (x, weight, *node.args[2:])
    layers, queries, keys, masks = [], [], [], []
    info = []
    for layer in structure.layers:
        core = layer.attention.core
        layers.append(mapping[layer.output])
        queries.append(mapping[core.args[0]])
        keys.append(mapping[core.args[1]])
        mask = core.args[3] if len(core.args) > 3 else core.kwargs.get("attn_mask")
        masks.append(mapping[mask] if isinstance(mask, Node) else None)
        scale = core.kwargs.get("scale") or 1.0 / math.sqrt(layer.attention.head_size)
        info.append(ProbeLayer(layer.attention.num_heads, float(scale)))
    graph.output({"layers": layers, "queries": queries, "keys": keys, "masks": masks, "outputs": outputs})
    graph.lint()
    return GraphModule(gm, graph), info


def _is_quantized(node) -> bool:
    return isinstance(node, Node) and node.op == "call_function" and (
        is_simulated(node) or is_straight_through(node) or node.target is _straight_through_weight_int8)


def uniform_layer_map(student_layers: int, teacher_layers: int) -> list[int]:
    """TinyBERT's uniform map: student layer j reads teacher layer floor((j+1)*T/S)-1; top maps to top."""
    return [(j + 1) * teacher_layers // student_layers - 1 for j in range(student_layers)]


def attention_log_probs(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min) if mask.dtype == torch.bool else scores + mask
    return torch.log_softmax(scores, dim=-1)


def attention_kl(teacher_log: torch.Tensor, student_log: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per query over keys, averaged over heads and real query tokens.

    When the head counts differ (pruned heads), both sides are averaged over heads first: the
    distribution of "where does this layer look", which does not depend on which heads survived.
    """
    if teacher_log.shape[1] != student_log.shape[1]:
        teacher_log = teacher_log.exp().mean(1, keepdim=True).clamp(min=1e-12).log()
        student_log = student_log.exp().mean(1, keepdim=True).clamp(min=1e-12).log()
    keys = token_mask[:, None, None, :].bool()
    # Padded keys have probability 0 on both sides; zero their logs so 0 * (-inf - -inf) never appears.
    difference = torch.where(keys, teacher_log - student_log, torch.zeros_like(teacher_log))
    per_query = (teacher_log.exp() * difference).sum(-1)  # [batch, heads, queries]
    queries = token_mask[:, None, :].to(per_query.dtype).expand_as(per_query)
    return (per_query * queries).sum() / queries.sum().clamp(min=1.0)


def hidden_mse(teacher: torch.Tensor, student: torch.Tensor, token_mask: torch.Tensor) -> torch.Tensor:
    per_token = (teacher - student).pow(2).mean(-1)
    weights = token_mask.to(per_token.dtype)
    return (per_token * weights).sum() / weights.sum().clamp(min=1.0)


def output_loss(teacher_last: torch.Tensor, student_last: torch.Tensor, token_mask: torch.Tensor,
                kind: str, pooling: str) -> torch.Tensor:
    t = pool(teacher_last, token_mask, pooling)
    s = pool(student_last, token_mask, pooling)
    if kind == "cosine":
        return (1.0 - torch.nn.functional.cosine_similarity(t, s, dim=-1)).mean()
    return (t - s).pow(2).mean()


def logits_loss(teacher: list[torch.Tensor], student: list[torch.Tensor], token_mask: torch.Tensor, task: str,
                temperature: float) -> torch.Tensor:
    """A task head's output loss (compiler.tasks.output_divergence) from the probe's graph outputs."""
    t, s = (torch.stack(o[:2], dim=-1) if task == "question-answering" else o[0] for o in (teacher, student))
    return output_divergence(t, s, token_mask, task, temperature)


def similarity_loss(teacher_last: torch.Tensor, student_last: torch.Tensor, token_mask: torch.Tensor,
                    pooling: str) -> torch.Tensor:
    """MSE between the in-batch cosine-similarity matrices of teacher and student pooled embeddings.

    The diagonal (always 1) is left out; a batch of one text has no pairs and contributes 0.
    """
    t = torch.nn.functional.normalize(pool(teacher_last, token_mask, pooling), dim=-1)
    s = torch.nn.functional.normalize(pool(student_last, token_mask, pooling), dim=-1)
    n = t.shape[0]
    if n < 2:
        return s.sum() * 0.0
    off = ~torch.eye(n, dtype=torch.bool, device=t.device)
    return ((t @ t.T - s @ s.T)[off]).pow(2).mean()


def lr_lambda(steps: int, warmup: float, schedule: str):
    """Linear warmup over the first ``warmup`` fraction of steps, then constant, linear or cosine decay to 0."""
    warm = max(int(round(steps * warmup)), 0)

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if schedule == "constant":
            return 1.0
        progress = (step - warm) / max(steps - warm, 1)
        if schedule == "linear":
            return max(1.0 - progress, 0.0)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))

    return factor


class TextStream:
    """Seeded, reshuffled-every-epoch batches of training texts, tokenized on demand.

    ``pack`` joins consecutive texts into one sequence of about ``max_length`` tokens: short texts
    (WordNet glosses are ~15 tokens) would otherwise never train the later positions that longer
    inputs use.

    ``bucket`` batches texts of similar length together (as ``group_by_length`` does in HF's Trainer):
    each epoch's shuffled order is cut into windows of ``BUCKET_WINDOW`` batches, each window is sorted
    by length and cut into batches, and the batches are shuffled. A batch is padded to its longest
    text, so random batches of short, varied texts compute on many padding tokens (2x the real ones
    for 16 WordNet glosses); bucketed batches carry almost none, for the same texts per epoch.
    """

    BUCKET_WINDOW = 64

    def __init__(self, texts: list[str], tokenizer, batch_size: int, max_length: int, seed: int, pack: bool = False,
                 bucket: bool = False):
        if pack and bucket:
            raise ValueError("pack and bucket exclude each other (packed sequences all have about max_length tokens)")
        self.texts = texts
        self.tokenizer = tokenizer
        self.batch_size = min(batch_size, len(texts))
        self.max_length = max_length
        self.rng = random.Random(seed)
        self.order: list[int] = []
        self.batches: list[list[int]] = []
        self.epochs = 0
        self.real_tokens = self.computed_tokens = 0
        self.bucket = bucket
        self.lengths = ([len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
                        if pack or bucket else None)

    def _bucketed(self) -> list[int]:
        if not self.batches:
            order = list(range(len(self.texts)))
            self.rng.shuffle(order)
            self.epochs += 1
            window = self.batch_size * self.BUCKET_WINDOW
            for start in range(0, len(order), window):
                chunk = sorted(order[start:start + window], key=lambda i: self.lengths[i])
                self.batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
            # A last, short batch is left out (its texts come back reshuffled next epoch): every step sees batch_size texts.
            self.batches = [b for b in self.batches if len(b) == self.batch_size] or self.batches
            self.rng.shuffle(self.batches)
        return self.batches.pop()

    def _take(self, count: int) -> list[int]:
        while len(self.order) < count:
            order = list(range(len(self.texts)))
            self.rng.shuffle(order)
            self.order += order
            self.epochs += 1
        picked, self.order = self.order[:count], self.order[count:]
        return picked

    def next(self) -> dict[str, torch.Tensor]:
        if self.bucket:
            rows = [self.texts[i] for i in self._bucketed()]
        elif self.lengths is None:
            rows = [self.texts[i] for i in self._take(self.batch_size)]
        else:
            rows = []
            for _ in range(self.batch_size):
                parts, tokens = [], 0
                while tokens < self.max_length - 2:  # room for [CLS] and [SEP]
                    (index,) = self._take(1)
                    parts.append(self.texts[index])
                    tokens += self.lengths[index]
                rows.append(" ".join(parts))
        batch = tokenize_batches(self.tokenizer, rows, self.max_length, len(rows))[0]
        self.real_tokens += int(batch["attention_mask"].sum())
        self.computed_tokens += batch["attention_mask"].numel()
        return batch

    @property
    def padding_share(self) -> float:
        """Share of the tokens computed so far that were padding."""
        return 1.0 - self.real_tokens / max(self.computed_tokens, 1)
