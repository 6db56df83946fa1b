"""Passes that misbehave on purpose, loaded by recipes through `plugins: [tests.faulty_passes]`."""

from __future__ import annotations

from compiler.graph_edit import get_tensor, set_parameter
from compiler.pass_infra import Pass, PassResult, register_pass


@register_pass
class NanBias(Pass):
    """Poison the first FFN bias with NaN (a numerical blow-up)."""

    name = "fault-nan"

    def run(self, gm, ctx):
        target = ctx.structure(gm).layers[0].ffn.up.bias
        set_parameter(gm, target, get_tensor(gm, target) * float("nan"))
        return PassResult(gm, modified=True)


@register_pass
class BadShape(Pass):
    """Slice a weight so the graph no longer type-checks (a shape error)."""

    name = "fault-shape"

    def run(self, gm, ctx):
        target = ctx.structure(gm).layers[0].ffn.down.weight
        set_parameter(gm, target, get_tensor(gm, target)[:, :3])
        return PassResult(gm, modified=True)
