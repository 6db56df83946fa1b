"""quantize-embeddings: store the embedding tables in fp16, or in int8 with one scale per row.

Lossy. The tables are the bulk of a small BERT's bytes (MiniLM: 47 of 91 MB in the word table), and
quantize-linear leaves them alone because a table-wide int8 scale costs too much fidelity. Here
``fp16`` (the safe default) halves them; ``int8`` (opt-in) quarters them with a symmetric scale per
row (per token), so a rare token's small vector is not flattened by a frequent token's large one.

In the graph the pass simulates the stored precision on the rows each lookup returns (per-row
quantization is row-local, so rounding the looked-up rows equals rounding the table), which keeps
the lookups plain ``aten.embedding`` on the fp32 table for structure analysis and for passes after
it. Lowering strips the simulation and stores the tables for real (see
``compiler/lowering/embeddings.py``). Needs the BERT structure; works on a pruned vocabulary and on
a factorized (low-rank) word table alike.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from compiler.graph_edit import get_tensor
from compiler.pass_infra import Pass, PassConfig, PassContext, PassResult, register_pass
from compiler.simulation import is_simulated, simulated_op

TABLES = ("word", "position", "token_type")


@simulated_op
def fake_fp16_rows(rows: torch.Tensor) -> torch.Tensor:
    return rows.to(torch.float16).to(rows.dtype)


@simulated_op
def fake_int8_rows(rows: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 with one fp32 scale per table row, as lowering stores it (rows are the last dim)."""
    scale = rows.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127.0
    return torch.clamp(torch.round(rows / scale), -127, 127) * scale


class QuantizeEmbeddingsConfig(PassConfig):
    dtype: Literal["fp16", "int8"] = Field(
        "fp16", description="fp16: half precision (safe default). int8: symmetric int8 with an fp32 scale per row (opt-in).")
    tables: list[Literal["word", "position", "token_type"]] = Field(
        default_factory=lambda: list(TABLES), min_length=1, description="Which embedding tables to store in dtype.")


@register_pass
class QuantizeEmbeddings(Pass):
    """Store embedding tables in fp16 or per-row int8 (simulated in the graph, realized at lowering)."""

    name = "quantize-embeddings"
    Config = QuantizeEmbeddingsConfig
    kind = "lossy"
    must_run_after = ("low-rank",)

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        cfg = self.config
        embeddings = ctx.structure(gm).embeddings
        lookups = {"word": embeddings.word, "position": embeddings.position, "token_type": embeddings.token_type}
        fake = fake_int8_rows if cfg.dtype == "int8" else fake_fp16_rows
        graph, stored, rows = gm.graph, {}, {}
        for name in dict.fromkeys(cfg.tables):
            lookup = lookups[name]
            if lookup is None:
                continue  # e.g. no token-type table
            table = lookup.args[0]
            if is_simulated(table) or any(is_simulated(user) for user in lookup.users):
                raise self.refuse(f"the {name} embedding table is already quantized by an earlier pass.",
                                  fix="keep quantize-linear's exclude: [embeddings] and quantize tables once, here.")
            with graph.inserting_after(lookup):
                simulated = graph.call_function(fake, (lookup,))
            lookup.replace_all_uses_with(simulated)
            simulated.args = (lookup,)
            stored[table.target] = cfg.dtype
            rows[name] = list(get_tensor(gm, table.target).shape)
        graph.lint()
        gm.recompile()
        targets = sorted(stored)
        lowering = {"embedding_precision": stored, ("int8_weights" if cfg.dtype == "int8" else "fp16_weights"): targets}
        details = {"dtype": cfg.dtype, "tables": rows,
                   "storage": "fp32 scale per row" if cfg.dtype == "int8" else "float16",
                   "note": "lowering stores the tables in this precision and dequantizes them with constant ops that"
                           " ONNX Runtime folds when the session loads: smaller file, same fp32 tables in memory"}
        return PassResult(gm, modified=bool(stored), details=details, lowering=lowering)
