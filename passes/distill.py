"""distill: train the compressed graph (student) to match the uncompressed reference (teacher).

Lossy (it changes weights), but it exists to *recover* fidelity that earlier lossy passes
(layer-drop, head pruning, quantization) gave up; the pass manager rolls it back if held-out
fidelity ends up lower than before it. It rewrites no nodes: it trains the graph's parameters in
place on unlabeled text, with weighted losses:

- output: 1 - cosine (or MSE) of the pooled sentence embedding, student vs teacher;
- hidden: per-layer MSE of the residual stream (MobileBERT/TinyBERT feature-map transfer); student
  layer j is compared with the teacher layer given by ``layer_map`` (uniform by default, or the
  layer it was kept from, found by the structure analysis of both graphs);
- attention: KL between teacher and student attention distributions, recomputed from each
  attention op's query/key inputs (the fused op never materializes them); when heads were pruned
  both sides are averaged over heads;
- similarity (off by default): MSE between teacher and student in-batch matrices of pairwise
  cosines of the pooled embeddings, so neighbours stay neighbours;
- logits (task models: a classifier, reranker, tagger or QA head): temperature-scaled KL between the
  teacher's and the student's label distributions (MSE of a num_labels-1 score), TinyBERT's
  prediction-layer loss; the teacher's logits are the targets, so it trains on unlabeled text.

Needs: the structure analysis, the reference model (traced here once as the teacher), the
tokenizer, and training text: the calibration texts, or ``texts``/``samples`` loaded with
``compiler.calibration.load_texts`` with the held-out validation texts removed. ``qat: true``
trains through simulated int8 linears (straight-through estimator) so a later quantize-linear
loses less; simulated ops already in the graph are always trained straight-through.
Deterministic for a given seed on CPU (seeded shuffling, no dropout, no other randomness).
"""

from __future__ import annotations

import random
import time

import torch

from compiler import distillation as kd
from compiler.calibration import load_texts, tokenize_batches
from compiler.frontend import example_inputs, trace
from compiler.errors import PassRefused
from compiler.graph_edit import get_tensor, set_parameter
from compiler.model_inputs import feed
from compiler.pass_infra import Pass, PassContext, PassResult, register_pass
from compiler.structure import analyze
from compiler.tasks import task_of_model
from compiler.validation import pool
from passes.options import DISTILL


MONITOR_TEXTS = 64
WARM_STEPS = 50  # seconds_per_step_steady leaves these out
PROBE_GRAPH_GAP = 0.1  # how far the plain graph may score below the probe on the monitor texts (qat: simulated int8)


def split_monitor(texts: list[str]) -> tuple[list[str], list[str]]:
    """The first MONITOR_TEXTS distinct texts, and the rest without any copy of them (``weights`` repeats the texts of a
    small source), so fidelity is monitored on texts the student does not train on."""
    monitor = list(dict.fromkeys(texts))[:MONITOR_TEXTS]
    kept = set(monitor)
    return monitor, [t for t in texts if t not in kept]


def _compiled(probe: torch.fx.GraphModule):
    """``probe`` through torch.compile; a machine that cannot compile is told so at the first call, in words."""
    import shutil

    if not (shutil.which("g++") or shutil.which("c++") or shutil.which("clang++")):
        raise PassRefused("distill's compile: true needs a C++ compiler (torch.compile's Inductor writes C++ kernels),"
                          " and none is on PATH (g++, c++ or clang++).", field="distill.compile",
                          fix="install one (apt-get install g++) or set compile: false.")
    return torch.compile(probe, dynamic=True)


@register_pass
class Distill(Pass):
    """Train the compressed graph to match the uncompressed reference (knowledge distillation)."""

    declaration = DISTILL
    kind = "lossy"
    heals = True
    weights_only = True  # a compile that reads the same graph, texts and config replays the stored result

    def run(self, gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult:
        cfg = self.config
        seed = ctx.seed if cfg.seed is None else cfg.seed
        structure = ctx.structure(gm)
        self._task = task_of_model(ctx.reference)
        weights = cfg.losses
        if self._task == "feature-extraction" and weights.logits and not any(
                value for name, value in weights.model_dump().items() if name != "logits"):
            raise self.refuse("only the logits loss has a weight, but this model has no task head (it is an encoder).",
                              fix="give losses.output, hidden or attention a weight above 0.")
        teacher_gm = trace(ctx.reference, example_inputs(ctx.tokenizer),
                           max_length=int(getattr(ctx.model_config, "max_position_embeddings", 512)))
        teacher_structure = analyze(teacher_gm)
        layer_map = self._layer_map(structure, teacher_structure)

        texts, source, source_texts = self._training_texts(ctx, seed)
        monitor, texts = split_monitor(texts)
        stream = kd.TextStream(texts, ctx.tokenizer, cfg.batch_size, cfg.max_length, seed, pack=cfg.pack, bucket=cfg.bucket)
        monitor_batches = tokenize_batches(ctx.tokenizer, monitor, cfg.max_length, cfg.batch_size)

        trained = self._trainable(gm, structure)
        # The traced graph's untouched parameters are the reference model's own tensors (torch.export
        # does not copy them); training them in place would train the teacher too.
        for name in trained:
            set_parameter(gm, name, get_tensor(gm, name))
        teacher, teacher_info = kd.build_probe(teacher_gm, teacher_structure)
        student, student_info = kd.build_probe(gm, structure, fake_quant_linears=cfg.qat, training=True)
        if cfg.compile:
            teacher, student = _compiled(teacher), _compiled(student)
        flags = {name: p.requires_grad for name, p in gm.named_parameters()}
        # Bit-identical weights from run to run at a given thread count, compiled or not: kd.deterministic_kernels.
        with kd.deterministic_kernels() as nondeterministic:
            try:
                for name, param in gm.named_parameters():
                    param.requires_grad_(name in trained)
                with torch.no_grad():
                    monitor_targets = [pool(teacher(**feed(teacher, b))["layers"][-1], b["attention_mask"], cfg.pooling)
                                       for b in monitor_batches]
                history = self._train(student, student_info, teacher, teacher_info, layer_map, stream, monitor_batches,
                                      monitor_targets, [p for n, p in gm.named_parameters() if n in trained], ctx)
                # The plain graph: no simulated training ops (a probe only for its last layer's output).
                plain, _ = kd.build_probe(gm, structure)

                def graph(b):
                    return plain(**feed(plain, b))["layers"][-1]
                history["monitor_cosine_graph"] = round(self._monitor_cosine(graph, monitor_batches, monitor_targets), 4)
            finally:
                for name, param in gm.named_parameters():
                    param.requires_grad_(flags[name])
        details = {"texts": source, "training_texts": len(texts), "source_texts": source_texts, "epochs": stream.epochs,
                   "layer_map": layer_map,
                   "trained_parameters": sum(p.numel() for n, p in gm.named_parameters() if n in trained),
                   "student_heads": [i.heads for i in student_info], "qat": cfg.qat, "pack": cfg.pack, "bucket": cfg.bucket,
                   "padding_share": round(stream.padding_share, 3),
                   # Ops torch has no deterministic kernel for (warned about while training): if any, a rebuild's
                   # weights may differ from these.
                   "nondeterministic_ops": list(nondeterministic), **history}
        # The probe shares the graph's parameters, so the plain graph should score what the probe scored (less
        # the simulated int8 under qat). A training bug such as the fused AdamW's (see the optimizer below) leaves the
        # probe's monitor plausible and the graph untrained; this check names that cause instead of leaving the pass
        # manager's held-out check to report only a low cosine.
        if history["monitor_cosine_graph"] < history["monitor_cosine_after"] - PROBE_GRAPH_GAP:
            raise RuntimeError(
                f"the trained graph scores monitor cosine {history['monitor_cosine_graph']:.4f} but the training probe"
                f" {history['monitor_cosine_after']:.4f}; they share parameters, so this is a training bug (an optimizer"
                " or simulated-op kernel), not a fidelity limit")
        return PassResult(gm, modified=True, details=details)

    def _monitor_cosine(self, last_hidden, batches, targets) -> float:
        """Mean cosine between the teacher's pooled embeddings (`targets`) and those of `last_hidden(batch)`."""
        with torch.no_grad():
            cosines = [torch.nn.functional.cosine_similarity(
                target, pool(last_hidden(b), b["attention_mask"], self.config.pooling), dim=-1)
                for b, target in zip(batches, targets)]
        return float(torch.cat(cosines).mean())

    def _layer_map(self, student, teacher) -> list[int]:
        cfg = self.config
        count, teacher_count = len(student.layers), len(teacher.layers)
        if cfg.layer_map == "uniform":
            return kd.uniform_layer_map(count, teacher_count)
        if cfg.layer_map == "kept":
            # Blocks keep the module path they were traced from, so provenance is an exact match.
            origin = {layer.module: layer.index for layer in teacher.layers}
            missing = [layer.index for layer in student.layers if layer.module not in origin]
            if missing:
                raise self.refuse(f"student layer {missing[0]} does not come from any teacher layer, so layer_map: kept"
                                  " cannot pair them.", fix="use layer_map: uniform or explicit teacher indices.")
            return [origin[layer.module] for layer in student.layers]
        if len(cfg.layer_map) != count or max(cfg.layer_map) >= teacher_count:
            raise self.refuse(f"layer_map has {len(cfg.layer_map)} entries (max {max(cfg.layer_map)}) but the student has"
                              f" {count} layers and the teacher {teacher_count} (0-{teacher_count - 1}).",
                              fix=f"give {count} teacher indices between 0 and {teacher_count - 1}.")
        return list(cfg.layer_map)

    def _training_texts(self, ctx: PassContext, seed: int) -> tuple[list[str], str | list[str], list[dict]]:
        """The training texts (monitor slice included), the source option as given, and per source how many texts it
        gave (``texts``) and how many of them are distinct (``distinct``)."""
        cfg = self.config
        heldout = set(ctx.calibration.heldout_texts)
        if cfg.texts is None:
            texts = [t for t in ctx.calibration.texts if t not in heldout]
            source, source_texts = "calibration", [{"source": "calibration", "texts": len(texts),
                                                    "distinct": len(set(texts))}]
        else:
            sources = [cfg.texts] if isinstance(cfg.texts, str) else cfg.texts
            rng, texts, source_texts = random.Random(seed), [], []
            for index, name in enumerate(sources):
                candidates = [t for t in dict.fromkeys(load_texts(name, ctx.base_dir)) if t not in heldout]
                if cfg.weights is None:  # at most an equal share, so a small corpus is not drowned by a large one
                    share = rng.sample(candidates, min(cfg.samples // len(sources), len(candidates)))
                else:
                    wanted = round(cfg.samples * cfg.weights[index] / sum(cfg.weights))
                    copies, rest = divmod(wanted, len(candidates)) if candidates else (0, 0)
                    share = candidates * copies + rng.sample(candidates, rest)
                texts += share
                source_texts.append({"source": name, "texts": len(share), "distinct": min(len(share), len(candidates))})
            rng.shuffle(texts)
            source = cfg.texts
        distinct = len(set(texts))  # repeated texts (weights) count once: the monitor slice takes all their copies
        if distinct < MONITOR_TEXTS + 8:
            raise self.refuse(f"only {distinct} distinct training texts (after removing held-out ones); distillation"
                              f" needs at least {MONITOR_TEXTS + 8} ({MONITOR_TEXTS} are kept apart to monitor fidelity).",
                              fix="raise calibration.samples or give distill a larger `texts` source.")
        return texts, source, source_texts

    def _trainable(self, gm: torch.fx.GraphModule, structure) -> set[str]:
        params = dict(gm.named_parameters())
        frozen = set()
        if self.config.train == "no-embeddings":
            frozen = {n.target for n, part in structure.node_component.items()
                      if n.op == "get_attr" and part == "embeddings"}
        return {n.target for n in gm.graph.nodes if n.op == "get_attr" and n.target in params and n.target not in frozen}

    def _train(self, student, student_info, teacher, teacher_info, layer_map, stream, monitor_batches, monitor_targets,
               params, ctx):
        cfg = self.config
        weights = cfg.losses
        decay = [p for p in params if p.dim() >= 2]
        no_decay = [p for p in params if p.dim() < 2]
        # Not fused=True: on torch 2.13 CPU the fused AdamW does not train a pruned student (held-out cosine stays near
        # 0 while its monitor cosine looks plausible; contiguous parameters do not help). foreach=True is correct but
        # no faster than this loop.
        optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                       {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, eps=1e-6)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, kd.lr_lambda(cfg.steps, cfg.warmup, cfg.schedule))

        def monitor_cosine() -> float:
            return self._monitor_cosine(lambda b: student(**feed(student, b))["layers"][-1], monitor_batches, monitor_targets)

        report = ctx.progress
        first = monitor_cosine()
        curve = [{"step": 0, "monitor_cosine": round(first, 4)}]
        started = time.perf_counter()
        running = None
        fidelity = first
        for step in range(1, cfg.steps + 1):
            batch = stream.next()
            mask = batch["attention_mask"]
            with torch.no_grad():
                t = teacher(**feed(teacher, batch))
            s = student(**feed(student, batch))
            terms = {}
            if weights.output:
                terms["output"] = kd.output_loss(t["layers"][-1], s["layers"][-1], mask, cfg.output_loss, cfg.pooling)
            if weights.logits and self._task != "feature-extraction":
                terms["logits"] = kd.logits_loss(t["outputs"], s["outputs"], mask, self._task, cfg.temperature)
            if weights.similarity:
                terms["similarity"] = kd.similarity_loss(t["layers"][-1], s["layers"][-1], mask, cfg.pooling)
            if weights.hidden:
                terms["hidden"] = sum(kd.hidden_mse(t["layers"][m], s["layers"][j], mask)
                                      for j, m in enumerate(layer_map)) / len(layer_map)
            if weights.attention:
                terms["attention"] = sum(
                    kd.attention_kl(
                        kd.attention_log_probs(t["queries"][m], t["keys"][m], t["masks"][m], teacher_info[m].scale),
                        kd.attention_log_probs(s["queries"][j], s["keys"][j], s["masks"][j], student_info[j].scale),
                        mask)
                    for j, m in enumerate(layer_map)) / len(layer_map)
            loss = sum(getattr(weights, name) * value for name, value in terms.items())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.clip)
            optimizer.step()
            scheduler.step()
            value = float(loss.detach())
            running = value if running is None else 0.9 * running + 0.1 * value
            if step % cfg.monitor_every == 0 or step == cfg.steps:
                fidelity = monitor_cosine()
                curve.append({"step": step, "loss": round(running, 5), "monitor_cosine": round(fidelity, 4),
                              **{name: round(float(v.detach()), 5) for name, v in terms.items()}})
            report(step=step, total=cfg.steps, loss=running, fidelity=fidelity)
            if step == WARM_STEPS:
                warm = time.perf_counter()
        seconds = time.perf_counter() - started
        # After the first steps (torch.compile compiles there; allocators warm up): the pace of a long run.
        steady = {"seconds_per_step_steady": round((time.perf_counter() - warm) / (cfg.steps - WARM_STEPS), 3)} \
            if cfg.steps >= 2 * WARM_STEPS else {}
        return {"steps": cfg.steps, "seconds": round(seconds, 1), "seconds_per_step": round(seconds / cfg.steps, 3), **steady,
                "monitor_cosine_before": round(first, 4), "monitor_cosine_after": round(fidelity, 4), "curve": curve}
