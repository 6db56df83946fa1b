"""low-rank: replace linear weights by two truncated-SVD factors, or factorize the word embeddings (ALBERT).

Rewrites ``linear(x, W, b)`` (W is m x n) into ``linear(linear(x, A), B, b)`` with A = sqrt(S) V^T
(r x n) and B = U sqrt(S) (m x r), so a layer stores and computes r*(m+n) instead of m*n. With
``target: embeddings`` the vocab x H word table becomes a vocab x r table and an r -> H projection.
Lossy; exact at full rank (the manager then checks it to 1e-4). A rank at or above the break-even
r*(m+n) >= m*n makes the layer bigger and slower, so it is refused unless ``force: true`` with a
``reason``. Needs the BERT structure; runs before quantize-linear and after the pruning passes (which
slice whole rows and columns of unfactorized weights).
"""

from __future__ import annotations

import torch

from compiler.graph_edit import get_tensor, remove_dead_code, set_parameter
from compiler.pass_infra import Pass, PassContext, PassResult, register_pass
from compiler.simulation import is_simulated
from compiler.structure import Linear
from passes.options import LOW_RANK, LowRankConfig

aten = torch.ops.aten
TARGETS = ("ffn", "attention", "all", "embeddings")


def factorize(weight: torch.Tensor, cfg: LowRankConfig) -> tuple[int, torch.Tensor, torch.Tensor, float]:
    """(rank, A [r x n], B [m x r], kept energy) of a truncated SVD, W ~= B @ A."""
    u, s, vh = torch.linalg.svd(weight.detach().double(), full_matrices=False)
    full = len(s)
    if cfg.rank is not None:
        rank = min(cfg.rank, full)
    elif cfg.rank_fraction is not None:
        rank = max(1, round(cfg.rank_fraction * full))
    else:
        share = torch.cumsum(s.pow(2), 0) / s.pow(2).sum()
        rank = min(int(torch.searchsorted(share, torch.tensor(cfg.energy, dtype=share.dtype) - 1e-12)) + 1, full)
    root = s[:rank].sqrt()
    energy = float(s[:rank].pow(2).sum() / s.pow(2).sum())
    return rank, (root[:, None] * vh[:rank]).float(), (u[:, :rank] * root).float(), energy


@register_pass
class LowRank(Pass):
    """Factorize linear weights (or the word embeddings) by truncated SVD."""

    declaration = LOW_RANK
    kind = "lossy"

    def is_exact(self) -> bool:
        return self.config.rank_fraction == 1.0 or self.config.energy == 1.0 or super().is_exact()

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        cfg = self.config
        structure = ctx.structure(gm)
        if cfg.target == "embeddings":
            return self._embeddings(gm, structure)
        # A weight read by several layers (ALBERT's shared layer) is factorized once; every use reads the factors.
        uses: dict[str, list[Linear]] = {}
        for lin in self._sites(structure):
            uses.setdefault(lin.weight, []).append(lin)
        plans = []
        for lin in [group[0] for group in uses.values()]:
            if lin.factor is not None:
                raise self.refuse(f"{lin.weight} is already factorized.", fix="list each weight in one low-rank pass.")
            if is_simulated(lin.node.args[1]) or is_simulated(lin.node.args[0]):
                raise self.refuse(f"{lin.weight} is already quantized (simulated); factors must be quantized afterwards.",
                                  fix="run low-rank before quantize-linear.")
            weight = get_tensor(gm, lin.weight)
            m, n = weight.shape
            rank, a, b, energy = factorize(weight, cfg)
            if rank * (m + n) >= m * n and not cfg.force:
                raise self._past_break_even(f"{lin.weight} ({m}x{n})", rank, m, n)
            plans.append((lin, rank, a, b, energy, (m, n)))
        self.kept_everything = all(rank == min(shape) for _, rank, _, _, _, shape in plans)
        report = []
        for lin, rank, a, b, energy, (m, n) in plans:
            for use in uses[lin.weight]:
                _split_linear(gm, use, a, b)
            report.append({"weight": lin.weight, "shape": [m, n], "rank": rank, "energy_kept": round(energy, 6),
                           "weights_before": m * n, "weights_after": rank * (m + n)})
        remove_dead_code(gm)
        details = {"target": cfg.target, "factorized": report,
                   "note": "FLOPs drop only in proportion to r*(m+n)/(m*n); two thin matmuls can run slower than"
                           " one wide one at small ranks' break-even margins."}
        if cfg.force:
            details["forced"] = cfg.reason
        return PassResult(gm, modified=bool(plans), details=details)

    def _past_break_even(self, what: str, rank: int, m: int, n: int):
        """The refusal of a rank whose two factors hold as many weights as the m x n matrix, or more."""
        asked = self.config.rank
        capped = f" (the recipe's rank {asked}, capped at the matrix's {min(m, n)})" if asked is not None and asked > rank else ""
        below = m * n // (m + n) + (1 if (m * n) % (m + n) else 0)  # the smallest rank that does not pay
        return self.refuse(
            f"rank {rank}{capped} of {what} is at or above the break-even rank {m * n // (m + n)}:"
            f" two factors would store and compute {rank * (m + n):,} weights instead of {m * n:,}.",
            fix=f"use a rank below {below}, or set force: true with a reason.")

    def _sites(self, structure) -> list[Linear]:
        cfg = self.config
        layers = structure.layers
        if cfg.target == "ffn":
            return [lin for layer in layers for lin in (layer.ffn.up, layer.ffn.down)]
        if cfg.target == "attention":
            a = [layer.attention for layer in layers]
            return [lin for x in a for lin in (x.query, x.key, x.value, x.output, *x.position)]
        if cfg.target == "all":  # the encoder's linears and the pooler, not a factorized embedding's projection
            return [lin for lin in structure.linears if lin is not structure.embeddings.projection]
        by_weight = {lin.weight: lin for lin in structure.linears}
        unknown = [name for name in cfg.target if name not in by_weight]
        if unknown:
            raise self.refuse(f"target names {unknown[0]!r}, which is not a linear weight of this model.",
                              fix=f"use weight names like {structure.linears[0].weight!r}, or ffn/attention/all/embeddings.")
        return [by_weight[name] for name in cfg.target]

    def _embeddings(self, gm, structure) -> PassResult:
        cfg = self.config
        word = structure.embeddings.word
        table = get_tensor(gm, structure.embeddings.word_weight)
        vocab, hidden = table.shape
        # The lookup is a row selection, so factorize W^T (hidden x vocab): rows of A^T are the new table.
        rank, a, b, energy = factorize(table.t(), cfg)
        if rank * (vocab + hidden) >= vocab * hidden and not cfg.force:
            raise self._past_break_even(f"the {vocab}x{hidden} word table", rank, vocab, hidden)
        self.kept_everything = rank == min(vocab, hidden)
        base = structure.embeddings.word_weight.rsplit(".", 1)[0]
        set_parameter(gm, f"{base}.low_rank_table", a.t().contiguous())  # vocab x r
        set_parameter(gm, f"{base}.low_rank_projection", b)  # hidden x r
        graph = gm.graph
        with graph.inserting_before(word):
            table_node = graph.get_attr(f"{base}.low_rank_table")
            projection = graph.get_attr(f"{base}.low_rank_projection")
        with graph.inserting_after(word):
            projected = graph.call_function(aten.linear.default, (word, projection))
        word.replace_all_uses_with(projected)
        projected.args = (word, projection)
        word.args = (table_node, *word.args[1:])
        projected.meta.update({k: v for k, v in word.meta.items() if k == "nn_module_stack"})
        remove_dead_code(gm)
        details = {"target": "embeddings", "table": [vocab, hidden], "rank": rank, "energy_kept": round(energy, 6),
                   "weights_before": vocab * hidden, "weights_after": rank * (vocab + hidden),
                   "note": "ALBERT-style: the lookup stays a gather, plus one rank x hidden projection per token."}
        if structure.embeddings.projection is not None:
            details["note"] = (f"the {vocab}x{hidden} table was already factorized (its {hidden} -> "
                               f"{structure.hidden_size} projection follows, as in ALBERT); it is factorized further,"
                               f" to a {vocab}x{rank} table and a {rank} -> {hidden} projection before that one.")
        return PassResult(gm, modified=True, details=details)


def _split_linear(gm: torch.fx.GraphModule, lin: Linear, a: torch.Tensor, b: torch.Tensor) -> None:
    base = lin.weight.rsplit(".", 1)[0]
    first, second = f"{base}.low_rank_in", f"{base}.low_rank_out"
    set_parameter(gm, first, a)
    set_parameter(gm, second, b)
    graph, node = gm.graph, lin.node
    with graph.inserting_before(node):
        a_node = graph.get_attr(first)
        b_node = graph.get_attr(second)
        inner = graph.call_function(aten.linear.default, (node.args[0], a_node))
    inner.meta.update({k: v for k, v in node.meta.items() if k == "nn_module_stack"})
    node.args = (inner, b_node, *node.args[2:])
