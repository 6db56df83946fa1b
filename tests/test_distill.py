"""distill: trains the compressed graph toward the reference, deterministically, without touching the teacher."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from compiler import distillation as kd
from compiler.errors import PassRefused, RecipeError
from compiler.frontend import example_inputs, trace
from compiler.pass_manager import PassCheckFailed, PassManager
from compiler.recipe import load_recipe, load_recipe_text
from compiler.structure import analyze
from compiler.validation import compare, hidden_states, run_batches
from compiler.simulation import fake_quant_activation_blocks_int8, fake_quant_activation_uint8, straight_through
from tests.conftest import make_tiny_bert
from tests.helpers import calibration_for, run_pass

FAST = {"steps": 30, "batch_size": 8, "max_length": 32, "lr": 2e-3, "monitor_every": 10}


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny models are dominated by thread hand-offs; one thread keeps these tests at seconds on a busy CPU.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny3(tmp_path_factory):
    from compiler.frontend import load_model

    return load_model(str(make_tiny_bert(tmp_path_factory.mktemp("tiny3"), layers=3, seed=1)))


@pytest.fixture(scope="module")
def calibration(tiny3):
    return calibration_for(tiny3, samples=128, validation=16)


def _gm(loaded):
    return trace(loaded.model, example_inputs(loaded.tokenizer), max_length=loaded.max_length)


def _heldout_cosine(gm, loaded, calibration):
    batches = calibration.heldout_batches
    return compare(run_batches(hidden_states(loaded.model), batches), run_batches(hidden_states(gm), batches), batches).cosine


def _dropped(loaded, calibration, layers=(1,)):
    gm = _gm(loaded)
    run_pass("layer-drop", {"layers": list(layers)}, gm, loaded, calibration)
    return gm


def test_distill_recovers_held_out_fidelity_lost_by_layer_drop(tiny3, calibration):
    gm = _dropped(tiny3, calibration)
    before = _heldout_cosine(gm, tiny3, calibration)
    result = run_pass("distill", FAST, gm, tiny3, calibration)
    after = _heldout_cosine(result.graph_module, tiny3, calibration)
    assert result.modified and result.details["layer_map"] == [0, 2]
    assert 1 - after < 0.5 * (1 - before), (before, after)
    assert len(analyze(result.graph_module).layers) == 2  # trains weights, rewrites no structure
    assert result.details["monitor_cosine_after"] > result.details["monitor_cosine_before"]
    assert abs(result.details["monitor_cosine_graph"] - result.details["monitor_cosine_after"]) < 0.02


def test_distill_fails_when_the_trained_graph_disagrees_with_its_probe(tiny3, calibration, monkeypatch):
    # Stands in for the fused-AdamW failure: the probe's last reading looks healthy, the graph it trained is not.
    from passes.distill import Distill

    train = Distill._train

    def train_then_corrupt(self, student, *args):
        history = train(self, student, *args)
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for param in args[-2]:
                param.add_(torch.randn(param.shape, generator=generator) * 5)
        return history

    monkeypatch.setattr(Distill, "_train", train_then_corrupt)
    with pytest.raises(RuntimeError, match="training bug"):
        run_pass("distill", {**FAST, "steps": 5}, _dropped(tiny3, calibration), tiny3, calibration)


def test_distill_is_deterministic_for_a_seed(tiny3, calibration):
    first, second = _dropped(tiny3, calibration), _dropped(tiny3, calibration)
    options = {**FAST, "steps": 8, "seed": 3}
    run_pass("distill", options, first, tiny3, calibration)
    run_pass("distill", options, second, tiny3, calibration)
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(a, b), name


def test_compiled_distill_is_deterministic_and_trains_like_the_eager_one(tiny3, calibration):
    # torch.compile (Inductor) reorders float arithmetic, so it does not reproduce the eager weights bit for bit;
    # it must be deterministic itself, simulate int8 the same way (qat) and heal as much. On two threads, as compiles
    # run: there Inductor's atomic scatter-adds (the embedding backward) made every run differ until
    # kd.deterministic_kernels; one thread never showed it.
    torch.set_num_threads(2)
    options = {**FAST, "steps": 12, "seed": 3, "qat": True}
    eager, first, second = (_dropped(tiny3, calibration) for _ in range(3))
    before = _heldout_cosine(eager, tiny3, calibration)
    run_pass("distill", options, eager, tiny3, calibration)
    details = run_pass("distill", {**options, "compile": True}, first, tiny3, calibration).details
    run_pass("distill", {**options, "compile": True}, second, tiny3, calibration)
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(a, b), name
    eager_after, compiled_after = _heldout_cosine(eager, tiny3, calibration), _heldout_cosine(first, tiny3, calibration)
    assert compiled_after > before + 0.5 * (eager_after - before), (before, eager_after, compiled_after)
    assert abs(compiled_after - eager_after) < 0.02
    assert abs(details["monitor_cosine_graph"] - details["monitor_cosine_after"]) < 0.02


def test_ops_without_a_deterministic_kernel_are_recorded_every_time_and_the_setting_is_restored(tiny3, calibration):
    # put_ without accumulate has no deterministic CPU kernel: torch warns (warn-only) and the build goes on, but its
    # weights may differ on a rebuild, so distill reports the op, whatever warning filter the caller set (a CI job
    # that ignores warnings, or a second run in one process, where "default" would show it once per call site).
    import warnings

    from compiler import distillation as kd

    assert not torch.are_deterministic_algorithms_enabled()
    for action in ("default", "default", "ignore"):
        with warnings.catch_warnings(record=True) as shown:
            warnings.simplefilter(action)
            with kd.deterministic_kernels() as nondeterministic:
                torch.zeros(4).put_(torch.tensor([0, 0]), torch.ones(2))
                torch.zeros(4).index_add_(0, torch.tensor([0, 0]), torch.ones(2))  # deterministic on CPU
        assert nondeterministic == ["put_"]
        assert any(kd.NONDETERMINISTIC_WARNING in str(w.message) for w in shown)  # still shown to the user
    assert not torch.are_deterministic_algorithms_enabled()
    details = run_pass("distill", {**FAST, "steps": 3}, _dropped(tiny3, calibration), tiny3, calibration).details
    assert details["nondeterministic_ops"] == []


def test_distill_never_changes_the_reference_and_restores_requires_grad(tiny3, calibration):
    reference = {name: p.detach().clone() for name, p in tiny3.model.named_parameters()}
    gm = _dropped(tiny3, calibration)
    run_pass("distill", {**FAST, "steps": 5}, gm, tiny3, calibration)
    for name, param in tiny3.model.named_parameters():
        assert torch.equal(param, reference[name]), name
    assert not any(p.requires_grad for p in gm.parameters())


def test_no_embeddings_freezes_the_lookup_tables_and_trains_the_rest(tiny3, calibration):
    gm = _dropped(tiny3, calibration)
    structure = analyze(gm)
    table, first_query = structure.embeddings.word_weight, structure.layers[0].attention.query.weight
    before = {name: p.detach().clone() for name, p in gm.named_parameters()}
    run_pass("distill", {**FAST, "steps": 5, "train": "no-embeddings"}, gm, tiny3, calibration)
    params = dict(gm.named_parameters())
    assert torch.equal(params[table], before[table])
    assert not torch.equal(params[first_query], before[first_query])


def test_attention_recomputed_from_query_and_key_reproduces_the_fused_op(tiny3):
    gm = _gm(tiny3)
    structure = analyze(gm)
    probe, info = kd.build_probe(gm, structure)
    batch = dict(tiny3.tokenizer(["a padded sentence that is somewhat longer", "short"], padding=True,
                                 return_tensors="pt"))
    with torch.no_grad():
        out = probe(**batch)
        core = structure.layers[0].attention.core
        log_probs = kd.attention_log_probs(out["queries"][0], out["keys"][0], out["masks"][0], info[0].scale)
        values_probe = torch.fx.GraphModule(gm, _graph_returning(gm, core.args[2]))(**batch)
        fused = torch.nn.functional.scaled_dot_product_attention(
            out["queries"][0], out["keys"][0], values_probe, attn_mask=out["masks"][0], scale=info[0].scale)
    assert torch.allclose(log_probs.exp() @ values_probe, fused, atol=1e-5)
    assert torch.allclose(log_probs.exp().sum(-1), torch.ones(()), atol=1e-5)


def _graph_returning(gm, node):
    graph = torch.fx.Graph()
    mapping = {}
    graph.graph_copy(gm.graph, mapping)
    graph.output(mapping[node])
    return graph


def test_attention_kl_is_zero_for_equal_distributions_and_averages_heads_when_counts_differ():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0]])
    teacher = kd.attention_log_probs(torch.randn(1, 4, 4, 8), torch.randn(1, 4, 4, 8),
                                     mask[:, None, None, :].bool().expand(1, 1, 4, 4), 0.35)
    assert float(kd.attention_kl(teacher, teacher, mask)) == pytest.approx(0.0, abs=1e-6)
    # Two student heads equal to the teacher's head-average: the head-averaged KL is zero.
    average = teacher.exp().mean(1, keepdim=True).log()
    assert float(kd.attention_kl(teacher, average.expand(1, 2, 4, 4), mask)) == pytest.approx(0.0, abs=1e-5)
    assert float(kd.attention_kl(teacher, teacher.flip(1), mask)) > 0.0


def test_similarity_loss_sees_neighbours_not_scale_and_ignores_padding():
    torch.manual_seed(0)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]])
    teacher = torch.randn(3, 4, 8)
    scaled = teacher * 3.0  # the same directions: the same pairwise cosines
    assert float(kd.similarity_loss(teacher, scaled, mask, "mean")) == pytest.approx(0.0, abs=1e-10)
    padded = teacher.clone()
    padded[0, 3] = 100.0  # a padding position changes nothing
    assert float(kd.similarity_loss(teacher, padded, mask, "mean")) == pytest.approx(0.0, abs=1e-10)
    swapped = teacher[[1, 0, 2]]  # a student that confuses which text is which is penalized
    assert float(kd.similarity_loss(teacher, swapped, mask[[1, 0, 2]], "mean")) > 1e-3
    assert float(kd.similarity_loss(teacher[:1], teacher[:1] + 1, mask[:1], "mean")) == 0.0


def test_similarity_loss_trains_and_is_reported(tiny3, calibration):
    gm = _dropped(tiny3, calibration)
    before = {name: p.detach().clone() for name, p in gm.named_parameters()}
    result = run_pass("distill", {**FAST, "steps": 3, "losses": {"output": 0.0, "hidden": 0.0, "attention": 0.0,
                                                                   "similarity": 1.0}}, gm, tiny3, calibration)
    assert set(result.details["curve"][-1]) == {"step", "loss", "monitor_cosine", "similarity"}
    # its gradient alone reaches the encoder's weights
    assert any(not torch.equal(before[name], p) for name, p in gm.named_parameters() if "layer" in name)


def test_uniform_layer_map_spreads_student_layers_and_keeps_the_top():
    assert kd.uniform_layer_map(4, 6) == [0, 2, 3, 5]
    assert kd.uniform_layer_map(3, 6) == [1, 3, 5]
    assert kd.uniform_layer_map(6, 6) == list(range(6))


def test_kept_layer_map_pairs_each_block_with_the_one_it_was_kept_from(tiny3, calibration):
    gm = _dropped(tiny3, calibration, layers=(0,))
    result = run_pass("distill", {**FAST, "steps": 1, "layer_map": "kept"}, gm, tiny3, calibration)
    assert result.details["layer_map"] == [1, 2]


def test_explicit_layer_map_of_the_wrong_length_is_refused(tiny3, calibration):
    gm = _dropped(tiny3, calibration)
    with pytest.raises(PassRefused, match="layer_map has 3 entries"):
        run_pass("distill", {**FAST, "layer_map": [0, 1, 2]}, gm, tiny3, calibration)


def test_training_texts_from_a_file_exclude_the_held_out_texts(tiny3, calibration, tmp_path):
    corpus = tmp_path / "train.txt"
    own = [f"training sentence number {i} about distillation of small encoders" for i in range(100)]
    corpus.write_text("\n".join(own + calibration.heldout_texts) + "\n")
    gm = _dropped(tiny3, calibration)
    result = run_pass("distill", {**FAST, "steps": 1, "texts": str(corpus)}, gm, tiny3, calibration)
    assert result.details["training_texts"] + 64 == len(own)  # 64 monitor texts are kept apart


def test_too_few_training_texts_are_refused_with_a_fix(tiny3):
    small = calibration_for(tiny3, samples=16, validation=8)
    with pytest.raises(PassRefused, match="training texts"):
        run_pass("distill", FAST, _gm(tiny3), tiny3, small)


def test_distill_after_quantize_linear_trains_through_the_simulated_int8(tiny3, calibration):
    gm = _dropped(tiny3, calibration)
    run_pass("quantize-linear", {"dtype": "int8"}, gm, tiny3, calibration)
    weight = analyze(gm).layers[0].attention.query.weight
    before_weight = dict(gm.named_parameters())[weight].detach().clone()
    before = _heldout_cosine(gm, tiny3, calibration)
    run_pass("distill", FAST, gm, tiny3, calibration)
    assert not torch.equal(dict(gm.named_parameters())[weight], before_weight)  # gradients got through the rounding
    assert _heldout_cosine(gm, tiny3, calibration) > before


@pytest.mark.parametrize("storage", [{"dtype": "int8"}, {"dtype": "int4", "block_size": 16}, {"dtype": "fp16"}])
def test_training_probe_passes_gradients_through_simulated_table_rows(tiny3, calibration, storage):
    # quantize-embeddings before distill (so distill trains through the stored precision): rounding has no gradient, so
    # without a straight-through twin only the entries that set a row's (or a block's) scale would get one.
    gm = _dropped(tiny3, calibration)
    run_pass("quantize-embeddings", {**storage, "tables": ["word"]}, gm, tiny3, calibration)
    structure = analyze(gm)
    probe, _ = kd.build_probe(gm, structure, training=True)
    batch = calibration.batches[0]
    outputs = probe(**{key: batch[key] for key in ("input_ids", "attention_mask", "token_type_ids") if key in batch})
    outputs["layers"][-1].pow(2).sum().backward()
    table = dict(gm.named_parameters())[structure.embeddings.word_weight]
    looked_up = table.grad[batch["input_ids"].unique()]
    assert (looked_up != 0).float().mean().item() > 0.9
    gm.zero_grad(set_to_none=True)


def test_qat_simulates_int8_linears_only_while_training(tiny3, calibration):
    gm = _dropped(tiny3, calibration)
    ops_before = [n.target for n in gm.graph.nodes]
    result = run_pass("distill", {**FAST, "steps": 3, "qat": True}, gm, tiny3, calibration)
    assert result.details["qat"] is True
    assert [n.target for n in gm.graph.nodes] == ops_before
    probe, _ = kd.build_probe(gm, analyze(gm), fake_quant_linears=True, training=True)
    simulated = [n for n in probe.graph.nodes if n.target is kd._straight_through_weight_int8]
    assert len(simulated) == len(analyze(gm).linears)


def test_qat_leaves_linears_an_earlier_int4_quantize_linear_simulates_as_it_made_them(tiny3, calibration):
    gm = _dropped(tiny3, calibration)
    run_pass("quantize-linear", {"dtype": "int4", "method": "rtn", "block_size": 16, "exclude": ["embeddings", "attention"]},
             gm, tiny3, calibration)
    structure = analyze(gm)
    probe, _ = kd.build_probe(gm, structure, fake_quant_linears=True, training=True)
    by_name = {node.name: node for node in probe.graph.nodes}
    for layer in structure.layers:
        for linear, int4 in ((layer.attention.query, False), (layer.ffn.up, True), (layer.ffn.down, True)):
            x, weight = by_name[linear.node.name].args[:2]
            # int4 linears: their activation blocks trained straight-through, their rounded weights not rounded again
            assert (x.target is straight_through(fake_quant_activation_blocks_int8)) is int4
            assert (weight.op == "get_attr") is int4
            assert (x.target is straight_through(fake_quant_activation_uint8)) is not int4


def _manager(loaded, calibration, text):
    recipe = load_recipe_text(text, file="t.yaml")
    return PassManager(recipe, calibration, loaded.model, loaded.tokenizer, loaded.config)


def test_pass_manager_applies_a_healing_distill_and_records_cosine_before(tiny3, calibration):
    text = ("budget: {min: 0.5}\npasses:\n  - layer-drop: {layers: [1]}\n"
            "  - distill: {steps: 20, batch_size: 8, max_length: 32, lr: 0.002}\n")
    events = []
    manager = _manager(tiny3, calibration, text)
    manager.instruments.append(lambda event, payload: events.append(event))
    _, records = manager.run(_gm(tiny3))
    drop, distill = records
    assert distill.status == "applied"
    assert distill.checks["cosine_before"] == pytest.approx(drop.checks["cosine"], abs=1e-6)
    assert distill.checks["cosine"] > distill.checks["cosine_before"]
    assert events.count("pass_progress") == 20


def test_pass_manager_rolls_back_a_distill_that_lowers_fidelity(tiny3, calibration):
    # A learning rate of 1 with no warmup wrecks the weights: fidelity drops, so the manager undoes it.
    text = ("budget: {min: 0.01}\npasses:\n"
            "  - distill: {steps: 5, batch_size: 8, max_length: 32, lr: 1.0, warmup: 0, on_fail: skip}\n")
    gm = _gm(tiny3)
    state, (record,) = _manager(tiny3, calibration, text).run(gm)
    assert record.status == "skipped" and "lowered fidelity" in record.reason
    assert _heldout_cosine(state.gm, tiny3, calibration) == pytest.approx(1.0, abs=1e-5)


def test_distill_that_lowers_fidelity_stops_the_compile_by_default(tiny3, calibration):
    text = "budget: {min: 0.01}\npasses:\n  - distill: {steps: 5, batch_size: 8, max_length: 32, lr: 1.0, warmup: 0}\n"
    with pytest.raises(PassCheckFailed, match="lowered fidelity"):
        _manager(tiny3, calibration, text).run(_gm(tiny3))


@pytest.mark.minilm
def test_minilm_distill_heals_two_dropped_layers(minilm):
    calibration = calibration_for(minilm, samples=128, validation=16)
    gm = _dropped(minilm, calibration, layers=(2, 4))
    before = _heldout_cosine(gm, minilm, calibration)
    run_pass("distill", {"steps": 25, "batch_size": 8, "max_length": 32, "lr": 5e-4, "warmup": 0.2}, gm, minilm,
             calibration)
    after = _heldout_cosine(gm, minilm, calibration)
    assert after > before + 0.01, (before, after)


def test_cli_draws_a_progress_bar_for_pass_progress_and_closes_it_at_pass_end(monkeypatch):
    from compiler import cli
    from compiler.pass_manager import PassRecord

    monkeypatch.setattr(cli.console, "_force_terminal", True)

    cli._progress_instrument("pass_progress", {"name": "distill", "step": 1, "total": 2, "loss": 0.5, "fidelity": 0.9})
    assert cli._bar["progress"].tasks[0].completed == 1 and "loss 0.5000" in cli._bar["progress"].tasks[0].fields["info"]
    record = PassRecord(0, "distill", {}, "lossy", status="applied", checks={"cosine": 0.95, "cosine_before": 0.9})
    cli._progress_instrument("pass_end", {"record": record})
    assert cli._bar == {}


def test_cli_logs_a_line_per_tenth_of_a_long_pass_when_stderr_is_not_a_terminal(capsys):
    # In CI or `> file` a live bar shows nothing until the pass ends; a 90-minute distill must still say how far it is.
    from compiler import cli
    from compiler.pass_manager import PassRecord

    assert not cli.console.is_terminal
    for step in range(1, 41):
        cli._progress_instrument("pass_progress", {"name": "distill", "step": step, "total": 40, "loss": 0.5,
                                                   "fidelity": 0.9})
    record = PassRecord(0, "distill", {}, "lossy", status="applied", checks={"cosine": 0.95, "cosine_before": 0.9})
    cli._progress_instrument("pass_end", {"record": record})
    lines = [line.strip() for line in capsys.readouterr().err.splitlines()]
    progress = [line for line in lines if line.startswith("distill ")]
    assert [line.split()[1] for line in progress] == [f"{4 * k}/40" for k in range(1, 11)]
    assert "(100%)" in progress[-1] and "loss 0.5000" in progress[-1] and "min left" in progress[-1]
    assert lines[-1].startswith("applied") and cli._bar == {} and cli._logged == {}


def test_packing_joins_short_texts_into_sequences_of_about_max_length(tiny3):
    texts = [f"a short gloss number {i}" for i in range(50)]
    packed = kd.TextStream(texts, tiny3.tokenizer, batch_size=4, max_length=32, seed=0, pack=True).next()
    plain = kd.TextStream(texts, tiny3.tokenizer, batch_size=4, max_length=32, seed=0).next()
    assert packed["attention_mask"].sum(1).min() >= 30
    assert plain["attention_mask"].sum(1).max() < 12


def test_bucketing_cuts_padding_and_still_visits_every_text_once_per_epoch(tiny3):
    rng = random.Random(0)
    texts = [" ".join(f"word{j}" for j in range(rng.randint(1, 20))) + f" text{i}" for i in range(160)]
    bucketed = kd.TextStream(texts, tiny3.tokenizer, batch_size=8, max_length=64, seed=0, bucket=True)
    plain = kd.TextStream(texts, tiny3.tokenizer, batch_size=8, max_length=64, seed=0)
    seen = []
    for _ in range(20):  # one epoch: 160 texts in batches of 8
        batch = bucketed.next()
        plain.next()
        seen += tiny3.tokenizer.batch_decode(batch["input_ids"], skip_special_tokens=True)
    assert bucketed.epochs == 1 and sorted(seen) == sorted(tiny3.tokenizer.batch_decode(
        tiny3.tokenizer(texts)["input_ids"], skip_special_tokens=True))
    assert bucketed.padding_share < 0.1 < 0.3 < plain.padding_share
    # seeded: the same batches again
    again = kd.TextStream(texts, tiny3.tokenizer, batch_size=8, max_length=64, seed=0, bucket=True)
    first = kd.TextStream(texts, tiny3.tokenizer, batch_size=8, max_length=64, seed=0, bucket=True)
    assert all(torch.equal(again.next()["input_ids"], first.next()["input_ids"]) for _ in range(25))


def test_bucketed_distill_reports_less_padding_and_still_heals(tiny3, calibration):
    plain = run_pass("distill", {**FAST, "steps": 12}, _dropped(tiny3, calibration), tiny3, calibration)
    gm = _dropped(tiny3, calibration)
    before = _heldout_cosine(gm, tiny3, calibration)
    bucketed = run_pass("distill", {**FAST, "steps": 12, "bucket": True}, gm, tiny3, calibration)
    assert bucketed.details["bucket"] and bucketed.details["padding_share"] < plain.details["padding_share"]
    assert _heldout_cosine(bucketed.graph_module, tiny3, calibration) > before


def test_pack_and_bucket_together_are_a_recipe_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nmodel: builtin:minilm-l6\npasses:\n  - distill: {steps: 10, pack: true, bucket: true}\n")
    with pytest.raises(RecipeError) as error:
        load_recipe(recipe)
    assert "passes[0]" in str(error.value) and "pack and bucket exclude each other" in str(error.value)


def test_an_encoder_with_only_the_logits_loss_is_refused(tiny3, calibration):
    gm = _dropped(tiny3, calibration)
    with pytest.raises(PassRefused, match="only the logits loss has a weight"):
        run_pass("distill", {**FAST, "steps": 1, "losses": {"output": 0, "hidden": 0, "attention": 0}}, gm, tiny3,
                 calibration)


def test_all_zero_loss_weights_are_a_recipe_error(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("version: 1\nmodel: builtin:minilm-l6\npasses:\n"
                      "  - distill: {steps: 10, losses: {output: 0, hidden: 0, attention: 0, logits: 0}}\n")
    with pytest.raises(RecipeError) as error:
        load_recipe(recipe)
    assert "passes[0]" in str(error.value) and "every loss weight is 0" in str(error.value)


def test_a_list_of_text_sources_mixes_them_in_equal_shares(tiny3, calibration, tmp_path):
    first, second = tmp_path / "a.txt", tmp_path / "b.txt"
    first.write_text("\n".join(f"first corpus sentence {i} about encoders" for i in range(200)) + "\n")
    second.write_text("\n".join(f"second corpus sentence {i} about glosses" for i in range(200)) + "\n")
    gm = _dropped(tiny3, calibration)
    result = run_pass("distill", {**FAST, "steps": 1, "texts": [str(first), str(second)], "samples": 100}, gm, tiny3,
                      calibration)
    assert result.details["training_texts"] == 100 - 64
    assert result.details["source_texts"] == [{"source": str(first), "texts": 50, "distinct": 50},
                                              {"source": str(second), "texts": 50, "distinct": 50}]


def test_a_small_source_gives_all_it_has_without_weights_and_its_share_with_them(tiny3, calibration, tmp_path):
    big, small = tmp_path / "big.txt", tmp_path / "small.txt"
    big.write_text("\n".join(f"a long corpus sentence {i} about encoders" for i in range(400)) + "\n")
    small.write_text("\n".join(f"a small corpus sentence {i} about glosses" for i in range(30)) + "\n")
    config = {**FAST, "steps": 1, "texts": [str(big), str(small)], "samples": 200}
    equal = run_pass("distill", config, _dropped(tiny3, calibration), tiny3, calibration).details
    assert [s["texts"] for s in equal["source_texts"]] == [100, 30]  # up to 100 each: all 30 of the small one
    weighted = run_pass("distill", {**config, "weights": [1, 3]}, _dropped(tiny3, calibration), tiny3, calibration)
    assert weighted.details["source_texts"] == [{"source": str(big), "texts": 50, "distinct": 50},
                                                {"source": str(small), "texts": 150, "distinct": 30}]
    # The 64 monitor texts leave training with all their copies: 1 each from the big source, 5 from the small one.
    removed = 200 - weighted.details["training_texts"]
    assert 64 < removed <= 64 * 5 and (removed - 64) % 4 == 0


def test_few_distinct_texts_are_refused_however_often_weights_repeat_them(tiny3, calibration, tmp_path):
    few, other = tmp_path / "few.txt", tmp_path / "other.txt"
    few.write_text("\n".join(f"one of few sentences {i}" for i in range(30)) + "\n")
    other.write_text("\n".join(f"one of other sentences {i}" for i in range(30)) + "\n")
    config = {**FAST, "steps": 1, "texts": [str(few), str(other)], "weights": [1, 1], "samples": 5000}
    with pytest.raises(PassRefused, match="only 60 distinct training texts"):
        run_pass("distill", config, _dropped(tiny3, calibration), tiny3, calibration)


def test_the_monitor_texts_are_distinct_and_none_of_them_is_trained_on():
    from passes.distill import MONITOR_TEXTS, split_monitor

    texts = [f"text {i % 40}" for i in range(400)] + [f"once {i}" for i in range(100)]
    random.Random(0).shuffle(texts)
    monitor, training = split_monitor(texts)
    assert len(monitor) == len(set(monitor)) == MONITOR_TEXTS and not set(monitor) & set(training)
    assert len(training) == len(texts) - sum(texts.count(t) for t in monitor)
    distinct = [f"plain {i}" for i in range(100)]  # no repeats: the first 64 monitor, the other 36 train, as before
    assert split_monitor(distinct) == (distinct[:64], distinct[64:])


@pytest.mark.parametrize("distill, message", [
    ("{texts: builtin:wordnet, weights: [1]}", "weights needs texts to be a list"),
    ("{texts: [builtin:wordnet, builtin:fortunes-train], weights: [1]}", "weights has 1 entries but texts lists 2"),
    ("{texts: [builtin:wordnet, builtin:fortunes-train], weights: [1, 0]}", "finite number above 0"),
    ("{texts: [builtin:wordnet, builtin:fortunes-train], weights: [1, .nan]}", "finite number above 0"),
])
def test_weights_that_do_not_fit_texts_are_refused_naming_the_field(tmp_path, distill, message):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"version: 1\nmodel: builtin:minilm-l6\npasses:\n  - distill: {distill}\n")
    with pytest.raises(RecipeError) as error:
        load_recipe(recipe)
    assert "passes[0]" in str(error.value) and message in str(error.value) and str(recipe) in str(error.value)
