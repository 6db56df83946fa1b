"""Property: any recipe either fails with a clear, located error or compiles to ONNX that agrees with its graph.

Hypothesis generates recipes over a tiny BERT (valid and invalid passes, fields, types and values).
Valid ones run through the real pass manager; the resulting graph is exported to ONNX and run in
ONNX Runtime, which must reproduce the FX graph (simulation stripped) within 1e-4. Each distinct
graph structure (code and parameter shapes) is exported once, so 200+ examples stay fast.
"""

from __future__ import annotations

import copy
import hashlib
import tempfile
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from compiler.errors import BertpressError, CheckFailed, RecipeError
from compiler.frontend import example_inputs, trace
from compiler.lowering import lower_to_onnx
from compiler.pass_manager import PassManager
from compiler.recipe import load_recipe_text
from compiler.runtime import ort_runner, session
from compiler.simulation import strip_simulation
from compiler.validation import compare, hidden_states, run_batches
from tests.helpers import calibration_for

layer_index = st.one_of(st.integers(0, 1), st.integers(0, 1), st.integers(-1, 3))
layer_drop = st.one_of(
    st.fixed_dictionaries({"layers": st.lists(layer_index, min_size=0, max_size=3)}),
    st.fixed_dictionaries({"top": st.integers(-1, 3)}),
    st.fixed_dictionaries({"keep_every": st.integers(0, 3)}),
    st.fixed_dictionaries({"count": st.integers(0, 2)}),
    st.fixed_dictionaries({"layers": st.just([1]), "top": st.just(1)}),
)
quantize = st.fixed_dictionaries({}, optional={
    "dtype": st.sampled_from(["int8", "int8", "fp16", "int4", "int3"]),
    "exclude": st.lists(st.one_of(st.sampled_from(["embeddings", "attention", "ffn", "pooler", "embedings"]), layer_index), max_size=3),
})
prune_heads = st.fixed_dictionaries({}, optional={
    "keep": st.one_of(st.integers(-1, 5), st.lists(st.integers(0, 5), max_size=3)),
    "keep_fraction": st.floats(-0.5, 1.5, allow_nan=False),
    "importance": st.sampled_from(["l1", "gradient", "entropy", "random"]),
})
prune_ffn = st.fixed_dictionaries({}, optional={"keep": st.integers(-1, 80), "keep_fraction": st.floats(-0.5, 1.5, allow_nan=False)})
junk = st.one_of(
    st.builds(lambda name: {name: {}}, st.sampled_from(["layer-dropp", "quantize", "prune_heads", ""])),
    st.just("layer-drop"), st.just(["not", "a", "mapping"]), st.just({"layer-drop": {"layers": "all"}}),
    st.just({"quantize-linear": {"bits": 8}}), st.just({"layer-drop": [1, 2]}),
)
valid_heads = st.fixed_dictionaries({"keep": st.sampled_from([2, 4])}, optional={"importance": st.sampled_from(["l1", "entropy"])})
valid_ffn = st.fixed_dictionaries({"keep": st.sampled_from([16, 64])})
step = st.one_of(
    st.builds(lambda c: {"layer-drop": c}, layer_drop),
    st.builds(lambda c: {"quantize-linear": c}, quantize),
    st.builds(lambda c: {"prune-heads": c}, prune_heads),
    st.builds(lambda c: {"prune-ffn": c}, prune_ffn),
    # valid configs, repeated so most recipes get past validation and really compile
    st.builds(lambda c: {"prune-heads": c}, valid_heads),
    st.builds(lambda c: {"prune-ffn": c}, valid_ffn),
    st.builds(lambda c: {"quantize-linear": c}, st.just({})),
    st.builds(lambda c: {"layer-drop": c}, st.fixed_dictionaries({"layers": st.sampled_from([[0], [1]])})),
    junk,
)
valid_step = st.one_of(
    st.builds(lambda c: {"prune-heads": c}, valid_heads),
    st.builds(lambda c: {"prune-ffn": c}, valid_ffn),
    st.builds(lambda c: {"quantize-linear": c}, st.just({})),
    st.builds(lambda c: {"layer-drop": c}, st.fixed_dictionaries({"layers": st.sampled_from([[0], [1]])})),
)
recipes = st.one_of(
    st.fixed_dictionaries({"passes": st.lists(valid_step, max_size=2),
                           "budget": st.sampled_from([{"min": 0.05}, {"min": 0.05}, {"min": 0.9999}])}),
    st.fixed_dictionaries({"passes": st.lists(step, max_size=3)},
                          optional={"budget": st.fixed_dictionaries({"min": st.sampled_from([0.05, 0.05, 0.5, 1.2])})}),
    st.fixed_dictionaries({"passes": st.lists(step, max_size=2), "versionn": st.just(1)}),
)

_EXPORTS: dict[str, object] = {}
_STATS = {"recipe_error": 0, "refused": 0, "check_failed": 0, "compiled": 0}


@pytest.fixture(scope="module")
def setup(tiny):
    cal = calibration_for(tiny, samples=8, validation=4, max_length=16)
    gm = trace(tiny.model, example_inputs(tiny.tokenizer), tiny.max_length)
    return tiny, cal, gm


def _fingerprint(gm) -> str:
    """The graph's structure: its code and parameter shapes (export does not depend on the values)."""
    digest = hashlib.sha256(gm.code.encode())
    for name, tensor in sorted(gm.state_dict().items()):
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
    return digest.hexdigest()


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
@given(recipe=recipes)
def test_recipe_fails_clearly_or_compiles_to_agreeing_onnx(setup, recipe):
    tiny, cal, traced = setup
    data = {"model": "unused", **recipe}
    data.setdefault("budget", {"min": 0.05})
    text = yaml.safe_dump(data)
    try:
        parsed = load_recipe_text(text, file="gen.yaml")
    except RecipeError as error:
        assert error.exit_code == 2 and "gen.yaml" in error.render() and error.fix
        _STATS["recipe_error"] += 1
        return
    manager = PassManager(parsed, cal, tiny.model, tiny.tokenizer, tiny.config)
    try:
        state, records = manager.run(copy.deepcopy(traced))
    except CheckFailed as failure:
        assert failure.exit_code == 1 and "passes[" in failure.render()
        _STATS["check_failed"] += 1
        return
    except BertpressError as error:
        assert error.exit_code == 2 and "gen.yaml: passes[" in error.render() and error.fix
        _STATS["refused"] += 1
        return
    graph = copy.deepcopy(state.gm)
    strip_simulation(graph)
    key = _fingerprint(graph)
    if key not in _EXPORTS:
        out = Path(tempfile.mkdtemp(prefix="bertpress-prop-"))
        lowered = lower_to_onnx(graph, example_inputs(tiny.tokenizer), out, quantize=None, fuse=True)
        ours = run_batches(hidden_states(graph), cal.heldout_batches)
        theirs = run_batches(ort_runner(session(lowered.model_path)), cal.heldout_batches)
        _EXPORTS[key] = compare(ours, theirs, cal.heldout_batches)
    agreement = _EXPORTS[key]
    assert agreement.finite and agreement.max_abs_error < 1e-4, agreement
    _STATS["compiled"] += 1


def test_the_property_exercised_every_outcome():
    if sum(_STATS.values()) < 200:
        pytest.skip("runs after the property test in the same session")
    print(f"outcomes: {_STATS}, distinct exports: {len(_EXPORTS)}")
    assert all(count > 0 for count in _STATS.values()), _STATS
