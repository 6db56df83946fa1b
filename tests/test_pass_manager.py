"""The pass manager judges passes: exact vs lossy checks, rollback, on_fail, cost before/after."""

from __future__ import annotations

import pytest
import torch

from compiler.errors import PassRefused
from compiler.frontend import example_inputs, trace
from compiler.graph_edit import get_tensor, set_parameter
from compiler.pass_infra import Pass, PassConfig, PassResult, register_pass
from compiler.pass_manager import PassCheckFailed, PassManager
from compiler.recipe import load_recipe_text
from tests.helpers import calibration_for


class _PerturbConfig(PassConfig):
    scale: float = 1e-2


@register_pass
class PerturbingExactPass(Pass):
    """A pass that claims to be exact but nudges one weight (for testing the exact check)."""

    name = "test-perturb-exact"
    Config = _PerturbConfig
    kind = "exact"

    def run(self, gm, ctx):
        target = ctx.structure(gm).layers[0].ffn.up.weight
        set_parameter(gm, target, get_tensor(gm, target) + self.config.scale)
        return PassResult(gm, modified=self.config.scale != 0)


@register_pass
class CrashingPass(Pass):
    """A pass with a bug."""

    name = "test-crash"

    def run(self, gm, ctx):
        ctx.structure(gm).layers[0].ffn.up.node.args = ()
        raise IndexError("list index out of range")


def _manager(loaded, text):
    recipe = load_recipe_text(text, file="t.yaml")
    return PassManager(recipe, calibration_for(loaded), loaded.model, loaded.tokenizer, loaded.config)


def _gm(loaded):
    return trace(loaded.model, example_inputs(loaded.tokenizer), loaded.max_length)


def test_lossy_pass_within_budget_is_applied_with_costs(tiny):
    state, records = _manager(tiny, "budget: {min: 0.5}\npasses:\n  - layer-drop: {layers: [1]}\n").run(_gm(tiny))
    (rec,) = records
    assert rec.status == "applied" and rec.kind == "lossy"
    assert rec.cost_after["flops"] < rec.cost_before["flops"]
    assert rec.cost_after["parameters"] < rec.cost_before["parameters"]
    assert 0.5 <= rec.checks["cosine"] < 1.0


def test_lossy_pass_breaking_budget_is_rolled_back_and_stops(tiny):
    gm = _gm(tiny)
    with pytest.raises(PassCheckFailed) as info:
        _manager(tiny, "budget: {min: 0.9999}\npasses:\n  - layer-drop: {layers: [1]}\n").run(gm)
    rec = info.value.record
    assert rec.status == "rolled_back" and "fidelity budget broken" in rec.reason
    assert info.value.exit_code == 1
    assert len(info.value.state.gm.graph.find_nodes(op="call_function", target=torch.ops.aten.scaled_dot_product_attention.default)) == 2


def test_on_fail_skip_rolls_back_and_goes_on(tiny):
    text = "budget: {min: 0.9999}\npasses:\n  - layer-drop: {layers: [1], on_fail: skip}\n  - test-perturb-exact: {scale: 0}\n"
    state, records = _manager(tiny, text).run(_gm(tiny))
    assert [r.status for r in records] == ["skipped", "unchanged"]
    assert "fidelity budget broken" in records[0].reason


def test_exact_pass_that_changes_outputs_is_rolled_back(tiny):
    with pytest.raises(PassCheckFailed) as info:
        _manager(tiny, "passes:\n  - test-perturb-exact: {scale: 0.01}\n").run(_gm(tiny))
    assert "exact rewrite changed the outputs" in info.value.record.reason
    assert info.value.record.checks["max_abs_error"] > 1e-4


def test_nan_is_caught_and_rolled_back_by_name(tiny):
    with pytest.raises(PassCheckFailed) as info:
        _manager(tiny, "budget: {min: 0.1}\nplugins: [tests.faulty_passes]\npasses:\n  - fault-nan: {}\n").run(_gm(tiny))
    assert "NaN or Inf" in info.value.record.reason and info.value.record.name == "fault-nan"


def test_crashing_pass_is_rolled_back_and_the_graph_restored(tiny):
    text = "passes:\n  - test-crash: {on_fail: skip}\n  - test-perturb-exact: {scale: 0}\n"
    gm = _gm(tiny)
    state, records = _manager(tiny, text).run(gm)
    assert records[0].status == "skipped" and "IndexError" in records[0].reason
    assert state.gm(**example_inputs(tiny.tokenizer))[0].shape[-1] == 32  # the snapshot still runs


def test_refusal_is_a_user_error_not_a_rollback(tiny):
    with pytest.raises(PassRefused):
        _manager(tiny, "passes:\n  - layer-drop: {layers: [9]}\n").run(_gm(tiny))


def test_ordering_constraints_are_checked_as_a_graph():
    from compiler.errors import RecipeError

    class _Cfg(PassConfig):
        pass

    @register_pass
    class MustBeFirst(Pass):
        """Test pass that must run before quantize-linear."""

        name = "test-before-quantize"
        Config = _Cfg
        must_run_before = ("quantize-linear",)

    with pytest.raises(RecipeError, match=r"passes\[1\].*must run before 'quantize-linear'"):
        load_recipe_text("passes:\n  - quantize-linear: {}\n  - test-before-quantize: {}\n", file="t.yaml")
    load_recipe_text("passes:\n  - test-before-quantize: {}\n  - quantize-linear: {}\n", file="t.yaml")
