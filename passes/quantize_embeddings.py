"""quantize-embeddings: store the embedding tables in fp16, in int8 with one scale per row, or in int4.

Lossy. The tables are the bulk of a small BERT's bytes (MiniLM: 47 of 91 MB in the word table), and
quantize-linear leaves them alone because a table-wide int8 scale costs too much fidelity. Here
``fp16`` (the safe default) halves them; ``int8`` (opt-in) quarters them with a symmetric scale per
row (per token), so a rare token's small vector is not flattened by a frequent token's large one;
``int4`` (opt-in, for size) stores 4-bit values in [-7, 7] with a float16 scale per block of
``block_size`` columns of a row: about an eighth of fp32 (0.56 bytes per weight at block 32).

In the graph the pass simulates the stored precision on the rows each lookup returns (per-row
quantization is row-local, so rounding the looked-up rows equals rounding the table), which keeps
the lookups plain ``aten.embedding`` on the fp32 table for structure analysis and for passes after
it. Lowering strips the simulation and stores the tables for real (see
``compiler/lowering/embeddings.py``). Needs the BERT structure; works on a pruned vocabulary and on
a factorized (low-rank) word table alike.
"""

from __future__ import annotations

import torch

from compiler.gptq import _to_stored
from compiler.graph_edit import get_tensor
from compiler.pass_infra import Pass, PassContext, PassResult, register_pass
from compiler.simulation import is_simulated, simulated_op
from passes.options import QUANTIZE_EMBEDDINGS


@simulated_op
def fake_fp16_rows(rows: torch.Tensor) -> torch.Tensor:
    return rows.to(torch.float16).to(rows.dtype)


@simulated_op
def fake_int8_rows(rows: torch.Tensor) -> torch.Tensor:
    """Symmetric int8 with one fp32 scale per table row, as lowering stores it (rows are the last dim)."""
    scale = rows.abs().amax(dim=-1, keepdim=True).clamp(min=1e-12) / 127.0
    return torch.clamp(torch.round(rows / scale), -127, 127) * scale


@simulated_op
def fake_int4_rows(rows: torch.Tensor, block: int) -> torch.Tensor:
    """Symmetric int4 in [-7, 7] with a float16 scale per ``block`` columns of a row, as lowering stores it."""
    shape = rows.shape
    blocks = rows.reshape(*shape[:-1], shape[-1] // block, block)
    scale = _to_stored(blocks.abs().amax(dim=-1, keepdim=True) / 7.0)
    return (torch.clamp(torch.round(blocks / scale), -7, 7) * scale).reshape(shape)


@register_pass
class QuantizeEmbeddings(Pass):
    """Store embedding tables in fp16, per-row int8 or block-wise int4 (simulated in the graph, realized at lowering)."""

    declaration = QUANTIZE_EMBEDDINGS
    kind = "lossy"

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        cfg = self.config
        embeddings = ctx.structure(gm).embeddings
        lookups = {"word": embeddings.word, "position": embeddings.position, "token_type": embeddings.token_type}
        fake = {"int8": fake_int8_rows, "int4": fake_int4_rows}.get(cfg.dtype, fake_fp16_rows)
        extra = (cfg.block_size,) if cfg.dtype == "int4" else ()
        graph, stored, rows = gm.graph, {}, {}
        for name in dict.fromkeys(cfg.tables):
            lookup = lookups[name]
            if lookup is None:
                continue  # e.g. no token-type table
            table = lookup.args[0]
            if is_simulated(table) or any(is_simulated(user) for user in lookup.users):
                raise self.refuse(f"the {name} embedding table is already quantized by an earlier pass.",
                                  fix="keep quantize-linear's exclude: [embeddings] and quantize tables once, here.")
            width = get_tensor(gm, table.target).shape[-1]
            if extra and width % cfg.block_size:
                raise self.refuse(f"the {name} embedding table is {width} wide, not a multiple of block_size "
                                  f"{cfg.block_size}.", fix="choose a block_size that divides the table's width.")
            with graph.inserting_after(lookup):
                simulated = graph.call_function(fake, (lookup, *extra))
            lookup.replace_all_uses_with(simulated)
            simulated.args = (lookup, *extra)
            stored[table.target] = cfg.dtype
            rows[name] = list(get_tensor(gm, table.target).shape)
        graph.lint()
        gm.recompile()
        targets = sorted(stored)
        if cfg.dtype == "int4":  # the cost model counts these as int4 weights; lowering packs them itself
            lowering = {"embedding_precision": stored, "int4_tables": {target: cfg.block_size for target in targets}}
        else:
            lowering = {"embedding_precision": stored, f"{cfg.dtype}_weights": targets}
        storage = {"int8": "fp32 scale per row", "int4": f"float16 scale per {cfg.block_size} columns of a row"}
        details = {"dtype": cfg.dtype, "tables": rows, "storage": storage.get(cfg.dtype, "float16"),
                   "note": "lowering stores the tables in this precision and dequantizes them with constant ops that"
                           " ONNX Runtime folds when the session loads: smaller file, same fp32 tables in memory"}
        return PassResult(gm, modified=bool(stored), details=details, lowering=lowering)
