"""bertpress vs its peers on all-MiniLM-L6-v2, side by side, in one run; writes bench/results/RESULTS.md.

Measured in one process, on the same inputs:
  * plain fp32 ONNX export (dynamo, no fusions, no quantization): the baseline every ratio is against;
  * PyTorch eager fp32, and PyTorch dynamic int8 (torch.ao.quantization.quantize_dynamic on nn.Linear);
  * the best peer pipeline, as Hugging Face Optimum runs it: legacy TorchScript export
    (torch.onnx.export(..., dynamo=False); used here only as the peer, never in bertpress) ->
    onnxruntime.transformers optimizer (model_type bert) -> onnxruntime quantize_dynamic int8 per-channel;
  * every recipe in recipes/ (or those --recipes names, from recipes/ or bench/experiments/recipes/), compiled
    with compiler.compile.compile_recipe into OUT_ROOT/<recipe> (an up-to-date build is reused, as
    `bertpress compile` does).
For each: size on disk; latency at batch 1 and 32 (seq 128, 2 intra-op threads), timed in interleaved
rounds (each round runs every model once, in rotating order), as medians and the ratio to the plain
export's median; fidelity on held-out WordNet glosses (the flagship recipe's held-out slice: seeded,
never calibrated or trained on by it) against PyTorch fp32: mean cosine of mean-pooled embeddings and
top-10 neighbour overlap (for each text, the share of its 10 nearest neighbours in the sample that
the model's embeddings and the reference's agree on), and the same on Python-documentation texts that no
recipe calibrates on (another domain for the WordNet-trained flagship family); the cost model's latency estimate against the
measurement, and the Spearman rank correlation of the two over the recipes. Then `bertpress inspect`
on MiniLM and on a BERT-base-sized random model, checking the seed's findings.

    python bench/compare.py [--rounds1 30] [--rounds32 7] [--threads 2] [--out-root out] [--skip-inspect]
                            [--reuse] [--recipes NAME ...] [--sample-also NAME ...] [--results bench/results/RESULTS.md]

A partial run (--recipes) measures its fidelity on the samples of a full run when --sample-also names that run's
other recipes, and writes to its own --results file so the full run's stays.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from compiler.benchmark import SETTLE_SECONDS, rotating_rounds, synthetic_batch, vocab_size  # noqa: E402
from compiler.calibration import BUILTIN_CORPORA, sample_calibration_texts  # noqa: E402
from compiler.frontend import example_inputs, load_model, resolve_model_path, trace  # noqa: E402
from compiler.lowering import export_onnx  # noqa: E402
from compiler.recipe import load_recipe  # noqa: E402
from compiler.runtime import session  # noqa: E402

MODEL = "builtin:minilm-l6"
FLAGSHIP = ROOT / "recipes" / "minilm-fast.yaml"
# Where --recipes and --sample-also look a name up: the recipes users start from, then the experiment variants.
RECIPE_DIRS = (ROOT / "recipes", ROOT / "bench" / "experiments" / "recipes")
RESULTS_DIR = ROOT / "bench" / "results"  # what the maintained bench commands write
TARGETS = {"speedup32": 4.0, "smaller": 10.0, "cosine": 0.95, "overlap": 0.75}
SEQ = 128


def heldout_texts() -> tuple[list[str], str]:
    """The flagship recipe's held-out slice (same source, sizes and seed as its calibration)."""
    cal = load_recipe(str(FLAGSHIP)).file.calibration
    _, heldout = sample_calibration_texts(cal.texts, samples=cal.samples, validation_samples=cal.validation_samples,
                                          seed=cal.seed)
    return heldout, f"{len(heldout)} {cal.texts} texts (seed {cal.seed}, the held-out slice of {FLAGSHIP.name})"


def known_recipes() -> dict[str, Path]:
    """Recipe name (file name without .yaml) -> its file, over RECIPE_DIRS; recipes/ wins a name both hold."""
    known: dict[str, Path] = {}
    for folder in reversed(RECIPE_DIRS):
        known.update((p.stem, p) for p in folder.glob("*.yaml"))
    return dict(sorted(known.items()))


def default_recipes() -> dict[str, Path]:
    """The recipes a run without --recipes compiles: those in recipes/ that ``bertpress compile`` takes (a searchable
    recipe is ``bertpress tune``'s; bench/tune_minilm.py measures it)."""
    import yaml

    from compiler.search_space import is_searchable

    return {p.stem: p for p in sorted(RECIPE_DIRS[0].glob("*.yaml")) if not is_searchable(yaml.safe_load(p.read_text()))}


def recipe_path(name: str) -> Path:
    """The file of recipe ``name`` (see known_recipes)."""
    path = known_recipes().get(name)
    if path is None:
        raise SystemExit(f"no recipe named {name} in {' or '.join(_shown(d) + '/' for d in RECIPE_DIRS)}")
    return path


def _shown(path: Path) -> str:
    """``path`` relative to the repository, as results files and messages name it."""
    return str(path.relative_to(ROOT))


def _pass_text_sources(name: str) -> set[str]:
    """Every text source the passes of recipe ``name`` train or choose on (distill, prune-vocab, ...: their ``*texts``)."""
    recipe = load_recipe(str(recipe_path(name)))
    sources: set[str] = set()
    for step in recipe.steps:
        for key, value in step.config.model_dump().items():
            if key.endswith("texts") and value is not None:
                sources.update([value] if isinstance(value, str) else value)
    return sources


def _same_corpus(a: str, b: str) -> bool:
    """``a`` and ``b`` name the same texts (``builtin`` is an alias of ``builtin:python-docs``)."""
    return a == b or (a in BUILTIN_CORPORA and BUILTIN_CORPORA[a] is BUILTIN_CORPORA.get(b))


@functools.cache
def _corpus(source: str) -> tuple[str, ...]:
    """The texts of ``source`` (relative paths as the recipes name them), loaded once per run."""
    from compiler.calibration import load_texts

    return tuple(load_texts(source, ROOT / "recipes"))


def other_domain_texts(names: list[str], source: str, what: str, count: int = 256,
                       seed: int = 0) -> tuple[list[str], str]:
    """``count`` texts of ``source`` (another domain than the WordNet glosses the flagship family calibrates on) that
    none of the recipes ``names`` calibrates on: their calibration samples are left out (all of them together can
    leave fewer than ``count``: minilm-small calibrates on most of the 1569 Python-docs texts), and so is any text
    that also occurs in a corpus a recipe's passes train on (two docstring sentences are also Python-docs sentences)."""
    import random

    seen: set[str] = set()
    trained_on: list[str] = []
    training: set[str] = set()
    for name in names:
        cal = load_recipe(str(recipe_path(name))).file.calibration
        if _same_corpus(cal.texts, source):
            seen.update(sample_calibration_texts(cal.texts, samples=cal.samples, validation_samples=cal.validation_samples,
                                                 seed=cal.seed)[0])
        for other in sorted(_pass_text_sources(name)):
            if _same_corpus(other, source):
                trained_on.append(name)
            else:
                training.add(other)
    for other in sorted(training):
        seen.update(_corpus(other))
    pool = [text for text in dict.fromkeys(_corpus(source)) if text not in seen]
    if len(pool) < min(count, 32):
        raise SystemExit(f"only {len(pool)} texts of {source} are left once the texts the recipes {', '.join(names)}"
                         " calibrate or train on are taken out: too few to measure fidelity on; leave those recipes out"
                         " of the run or measure on another source")
    texts = random.Random(seed).sample(pool, min(count, len(pool)))
    label = (f"{len(texts)} {what} ({source}, seed {seed}) outside the calibration sample of every recipe in this run"
             " and outside every corpus their passes train on")
    for name in sorted(set(trained_on)):
        label += f" ({_shown(recipe_path(name))} trains on {source}, so it may have seen them)"
    return texts, label


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    weights = mask[..., None].astype(np.float32)
    return (hidden * weights).sum(1) / np.maximum(weights.sum(1), 1e-9)


def embed(run, tokenizer, texts: list[str], batch_size: int = 32) -> np.ndarray:
    """Mean-pooled embeddings of ``texts``; ``run(feeds: dict of int64 arrays) -> last hidden state``."""
    out = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(texts[start:start + batch_size], padding=True, truncation=True, max_length=SEQ, return_tensors="np")
        feeds = {k: enc[k].astype(np.int64) for k in ("input_ids", "attention_mask", "token_type_ids") if k in enc}
        feeds.setdefault("token_type_ids", np.zeros_like(feeds["input_ids"]))
        out.append(mean_pool(np.asarray(run(feeds), dtype=np.float32), feeds["attention_mask"]))
    return np.concatenate(out)


def fidelity(embeddings: np.ndarray, reference: np.ndarray, k: int = 10) -> dict:
    a = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    b = reference / np.linalg.norm(reference, axis=1, keepdims=True)
    cosine = (a * b).sum(1)

    def neighbours(x):
        sim = x @ x.T
        np.fill_diagonal(sim, -np.inf)
        return np.argsort(-sim, axis=1)[:, :k]

    mine, theirs = neighbours(a), neighbours(b)
    overlap = np.mean([len(set(m) & set(t)) / k for m, t in zip(mine, theirs)])
    return {"cosine": float(cosine.mean()), "cosine_min": float(cosine.min()), "overlap10": float(overlap)}


# The held-out samples every fidelity figure in bench/ is measured on: key -> column title.
SAMPLES = {"wordnet": "WordNet slice", "docs": "Python docs", "fortunes": "held-out fortunes"}


def results_recipes() -> list[str]:
    """The recipes of the run bench/results/RESULTS.md records (read from its JSON, so a new run moves these with it): scripts
    that pass them to HeldOut measure on that run's samples, so their figures sit beside RESULTS.md's."""
    return sorted(json.loads((RESULTS_DIR / "RESULTS.json").read_text())["recipes"])


def heldout_samples(names: list[str]) -> dict[str, tuple[list[str], str]]:
    """The three held-out samples, key (as SAMPLES) -> (texts, label): the flagship's held-out WordNet slice, and 256
    Python-documentation texts and 256 held-out fortunes outside every text the recipes ``names`` calibrate or
    train on (other_domain_texts). The same names give the same samples in any script and any run."""
    return {"wordnet": heldout_texts(),
            "docs": other_domain_texts(names, "builtin:python-docs", "Python-documentation texts"),
            "fortunes": other_domain_texts(names, "builtin:fortunes-heldout",
                                           "Debian fortunes on everyday life (quotations and sayings)")}


class HeldOut:
    """The held-out samples of recipes ``names`` and the reference model's embeddings of them, computed once;
    ``measure`` scores any model (a ``run(feeds) -> last hidden state`` and its tokenizer) on all three."""

    def __init__(self, names: list[str], model, tokenizer):
        self.samples = heldout_samples(names)
        reference = torch_run(model)
        self.references = {key: embed(reference, tokenizer, texts) for key, (texts, _) in self.samples.items()}

    @property
    def labels(self) -> list[str]:
        return [label for _, label in self.samples.values()]

    def measure(self, run, tokenizer) -> dict[str, dict]:
        """key -> fidelity(...) of the model's embeddings against the reference's: cosine, cosine_min, overlap10."""
        return {key: fidelity(embed(run, tokenizer, texts), self.references[key])
                for key, (texts, _) in self.samples.items()}

    @staticmethod
    def cells(measured: dict[str, dict]) -> str:
        """Markdown cells 'cosine / top-10 overlap', one per sample, in SAMPLES' order."""
        return " | ".join(f"{measured[key]['cosine']:.4f} / {measured[key]['overlap10']:.3f}" for key in SAMPLES)


def ort_run(path: Path, threads: int):
    sess = session(path, threads)
    names = {i.name for i in sess.get_inputs()}
    return lambda feeds: sess.run(None, {k: v for k, v in feeds.items() if k in names})[0]


def torch_run(model):
    def run(feeds):
        with torch.inference_mode():
            out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
        return out[0].numpy()
    return run


def peer_pipeline(model, tokenizer, folder: Path,
                  outputs: tuple[str, ...] = ("last_hidden_state", "pooler_output")) -> tuple[Path, dict]:
    """Legacy TorchScript export -> ORT transformers optimizer (bert) -> quantize_dynamic int8 per-channel.

    ``outputs``: the model output fields exported (a classifier's ``("logits",)``)."""
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers.optimizer import optimize_model

    from compiler.lowering.quiet import quiet

    enc = tokenizer(["a peer pipeline export"], return_tensors="pt")
    args = tuple(enc[k] for k in ("input_ids", "attention_mask", "token_type_ids"))
    legacy = folder / "peer-legacy.onnx"
    axes = {n: {0: "batch", 1: "seq"} for n in ("input_ids", "attention_mask", "token_type_ids", "last_hidden_state")}
    if "logits" in outputs:
        axes["logits"] = {0: "batch"}
    class ByName(torch.nn.Module):  # transformers 5's forward takes more positional args than the three inputs
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, input_ids, attention_mask, token_type_ids):
            out = self.inner(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
            return tuple(getattr(out, name) for name in outputs)

    # The ORT optimizer's attention fusion matches the eager attention subgraph, not an exported SDPA.
    model = copy.deepcopy(model)
    model.set_attn_implementation("eager")
    with quiet(), torch.no_grad():
        torch.onnx.export(ByName(model).eval(), args, str(legacy), dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask", "token_type_ids"],
                          output_names=list(outputs), dynamic_axes=axes)
        optimized = optimize_model(str(legacy), model_type="bert", num_heads=model.config.num_attention_heads,
                                   hidden_size=model.config.hidden_size)
        fused = folder / "peer-optimized.onnx"
        optimized.save_model_to_file(str(fused))
        quantized = folder / "peer-int8.onnx"
        # DefaultTensorType: shape inference cannot type outputs of the optimizer's contrib ops (FastGelu, ...).
        quantize_dynamic(str(fused), str(quantized), weight_type=QuantType.QInt8, per_channel=True,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
    return quantized, {"fusions": {k: v for k, v in optimized.get_fused_operator_statistics().items() if v}}


def _roofline_label(machine: dict | None) -> str:
    if not machine:
        return "not recorded (built before reports kept their roofline)"
    return (f"{machine['fp32_gflops']:.0f} GFLOP/s fp32, {machine['int8_gflops']:.0f} GFLOP/s int8, {machine['bandwidth_gbs']:.1f} GB/s,"
            f" {machine['overhead_us']:.1f} us per kernel ({machine['threads']} threads, measured {machine['measured_at']})")


def _reusable(recipe, out: Path) -> dict | None:
    """A finished build of this exact recipe text in ``out`` (its cache key may predate later code edits)."""
    path = out / "report.json"
    if not path.is_file():
        return None
    report = json.loads(path.read_text())
    ok = report.get("status") == "ok" and (out / "model.onnx").is_file() and (
        report.get("recipe_digest") == recipe.digest() or _same_recipe_today(report.get("recipe"), recipe))
    return report if ok else None


def _same_recipe_today(built: dict | None, recipe) -> bool:
    """The build's normalized recipe, read by today's schema, equals ``recipe``: a build made before an option
    with a default existed (distill's compile: false) is a build of the same recipe."""
    from compiler.recipe import load_recipe_text

    if not isinstance(built, dict):
        return False
    try:
        return load_recipe_text(json.dumps(built), base_dir=recipe.base_dir).digest() == recipe.digest()
    except Exception:
        return False


def compile_all(out_root: Path, reuse: bool, only: list[str] | None = None) -> dict[str, dict]:
    """Compile the recipes ``only`` names (from RECIPE_DIRS), or default_recipes() without ``only``."""
    from compiler.compile import compile_recipe

    results = {}
    chosen = {n: p for n, p in known_recipes().items() if n in only} if only else default_recipes()
    for name, path in chosen.items():
        out = out_root / name
        started = time.perf_counter()
        recipe = load_recipe(str(path))
        report = _reusable(recipe, out) if reuse else None
        if report is not None:
            print(f"[compare] reusing the build of {path.name} in {out}", flush=True)
            results[name] = {"path": out, "report": report, "status": "ok", "reason": None, "up_to_date": False,
                             "reused": True, "seconds": 0.0, "compile_seconds": report.get("timings", {}).get("total")}
            continue
        print(f"[compare] compiling {path.name} -> {out}", flush=True)
        try:
            result = compile_recipe(recipe, out)
            report = result.report
            status = "ok" if result.exit_code == 0 else "check_failed"
            reason = (report.get("failure") or {}).get("message")
        except Exception as exc:  # a recipe the current code cannot compile is a row in the table, not a crash
            report, status, reason = None, "error", f"{type(exc).__name__}: {exc}"
        results[name] = {"path": out, "report": report, "status": status, "reason": reason,
                         "up_to_date": bool(status == "ok" and result.up_to_date), "reused": False,
                         "seconds": round(time.perf_counter() - started, 1),
                         "compile_seconds": (report or {}).get("timings", {}).get("total")}
        print(f"[compare]   {status} in {results[name]['seconds']} s", flush=True)
    return results


def interleaved(runs: dict, feeds: dict[str, np.ndarray], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Seconds per run of each model on ``feeds``, in rotating rounds with compiler.benchmark's settle pause."""
    calls = {name: functools.partial(run, feeds) for name, run in runs.items()}
    return rotating_rounds(calls, rounds=rounds, warmup=warmup, settle=SETTLE_SECONDS)


def spearman(xs: list[float], ys: list[float]) -> float | None:
    if len(xs) < 3:
        return None

    def ranks(values):
        order = sorted(range(len(values)), key=lambda i: values[i])
        out = [0.0] * len(values)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for k in range(i, j + 1):
                out[order[k]] = (i + j) / 2
            i = j + 1
        return out

    rx, ry = ranks(xs), ranks(ys)
    return float(np.corrcoef(rx, ry)[0, 1])


def bert_base_folder(folder: Path) -> Path:
    """A BERT-base-sized random model (12 x 768, 12 heads, 3072 FFN) with MiniLM's tokenizer."""
    import shutil

    from transformers import BertConfig, BertModel

    if (folder / "model.safetensors").is_file():
        return folder
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                 intermediate_size=3072, max_position_embeddings=512)).eval()
    model.save_pretrained(folder, safe_serialization=True)
    source = resolve_model_path(MODEL)
    for name in ("vocab.txt", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (source / name).is_file():
            shutil.copyfile(source / name, folder / name)
    return folder


def run_inspect(out_root: Path, threads: int) -> list[dict]:
    from compiler.inspect import inspect, plot

    rows = []
    for label, spec, png, batch in (("all-MiniLM-L6-v2", MODEL, "inspect-minilm.png", 32),
                                    ("BERT-base-sized random", None, "inspect-bert-base.png", 8)):
        spec = spec or str(bert_base_folder(out_root / "bert-base-random"))
        started = time.perf_counter()
        print(f"[compare] inspect {label} at batch {batch} x seq {SEQ}", flush=True)
        try:
            breakdown = inspect(spec, batch=batch, seq=SEQ, threads=threads, runs=2)
        except Exception as exc:  # the table above is still worth writing
            print(f"[compare] inspect {label} failed: {type(exc).__name__}: {exc}", flush=True)
            continue
        plot(breakdown, RESULTS_DIR / png)
        rows.append({"label": label, "png": png, "breakdown": breakdown.as_dict(), "seconds": round(time.perf_counter() - started)})
    return rows


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def architecture(report: dict) -> str | None:
    """A compiled model's encoder shape from its report, e.g. "4 layers, 8 heads, FFN 1024" (None if unknown)."""
    layers = ((report.get("model") or {}).get("structure_after") or {}).get("layers")
    if not layers:
        return None
    heads = sorted({layer["heads"] for layer in layers})
    ffn = sorted({layer["intermediate"] for layer in layers})
    show = lambda values: "/".join(str(v) for v in values)  # noqa: E731
    return f"{len(layers)} layers, {show(heads)} heads, FFN {show(ffn)}"


def tradeoff_figure(rows: list[dict], plain: dict):
    """Speed against fidelity for every model: one column per held-out sample (the WordNet slice the targets are set
    on, Python documentation, held-out fortunes), cosine above and top-10 overlap below, the flagship's goals as lines.

    The flagship family (recipes named minilm-fast*) is drawn in red, other recipes in blue, baselines and peers in
    grey. Labels are placed by adjustText so that near points (the baselines at 1x, the flagships) stay readable;
    points closer than a label's size share one label. Returns the matplotlib figure (plot_tradeoff saves it).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from adjustText import adjust_text

    prefixes = {"wordnet": "", "docs": "docs_", "fortunes": "fortunes_"}
    family = [r for r in rows if r["name"].startswith("recipe minilm-fast")]
    # Members of the family with one encoder shape (layers, heads, FFN) differ only in their distillation (its length
    # or its text): joined, they are what the distillation buys at that speed.
    shapes = sorted({r["architecture"] for r in family if r.get("architecture")})
    speeds = [plain["b32_ms"] / r["b32_ms"] for r in rows]
    x_span = max(speeds) - min(speeds) or 1.0
    figure, axes = plt.subplots(2, 3, figsize=(17, 10))
    for column, (sample, title) in enumerate(SAMPLES.items()):
        for line, (measure, label, goal) in enumerate((("cosine", "mean cosine", TARGETS["cosine"]),
                                                      ("overlap10", "top-10 neighbour overlap", TARGETS["overlap"]))):
            axis, key = axes[line][column], prefixes[sample] + measure
            points = []  # [speed, value, names]: points closer than the labels' own size share one label
            span = max(r[key] for r in rows) - min(r[key] for r in rows) or 1.0
            for shape, style in zip(shapes, ("-", "--", "-.", (0, (1, 1)))):
                curve = sorted((r for r in family if r.get("architecture") == shape), key=lambda r: r[key])
                if len(curve) > 1:
                    axis.plot([plain["b32_ms"] / r["b32_ms"] for r in curve], [r[key] for r in curve], color="tab:red",
                              linestyle=style, linewidth=1, alpha=0.6, label=f"{shape}: one encoder, distilled differently")
            for row in rows:
                speed, value = plain["b32_ms"] / row["b32_ms"], row[key]
                flagship = row in family
                axis.scatter(speed, value, s=40 if flagship else 25, zorder=3, color="tab:red" if flagship else
                             "tab:blue" if row["name"].startswith("recipe ") else "tab:gray")
                name = row["name"].replace("recipe ", "").replace("peer: legacy export + ORT optimizer + int8 per-channel",
                                                                  "peer pipeline")
                near = next((p for p in points if abs(p[0] - speed) < 0.015 * x_span and abs(p[1] - value) < 0.012 * span), None)
                if near:
                    near[2].append(name)
                else:
                    points.append([speed, value, [name]])
            texts = [axis.text(x, y, " / ".join(names), fontsize=7) for x, y, names in points]
            xs, ys = [p[0] for p in points], [p[1] for p in points]
            axis.axvline(TARGETS["speedup32"], color="black", linestyle=":", linewidth=1)
            axis.axhline(goal, color="black", linestyle=":", linewidth=1)
            axis.set_title(f"{title}: {label}", fontsize=9)
            axis.set_xlabel("speedup at batch 32 x seq 128 vs the plain fp32 export (same run)", fontsize=8)
            axis.set_ylabel(f"held-out {label}", fontsize=8)
            axis.grid(alpha=0.3)
            axis.margins(x=0.12, y=0.08)
            adjust_text(texts, x=xs, y=ys, ax=axis, expand=(1.2, 1.6), force_text=(0.3, 0.6), iter_lim=2000,
                        arrowprops={"arrowstyle": "-", "color": "0.5", "linewidth": 0.5})
    figure.suptitle("all-MiniLM-L6-v2: speed against fidelity on three held-out samples (bench/compare.py). Dotted: the"
                    f" flagship's goals ({TARGETS['speedup32']:g}x; cosine {TARGETS['cosine']:g}, top-10 overlap"
                    f" {TARGETS['overlap']:g}), set on the WordNet slice", fontsize=10)
    handles, labels = axes[0][0].get_legend_handles_labels()
    figure.tight_layout(rect=(0, 0.03 if handles else 0, 1, 1))
    if handles:
        figure.legend(handles, labels, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    return figure


def plot_tradeoff(rows: list[dict], plain: dict, path: Path) -> Path:
    """tradeoff_figure(rows, plain) saved as the PNG ``path``."""
    import matplotlib.pyplot as plt

    figure = tradeoff_figure(rows, plain)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path


def chart_path(results: Path) -> Path:
    """The trade-off chart beside a results file: RESULTS.md's is tradeoff.png, RESULTS-x.md's (or x.md's) tradeoff-x.png.

    A partial run written to its own results file must not overwrite the chart the main results link to.
    """
    stem = results.stem
    suffix = stem[len("RESULTS"):] if stem.startswith("RESULTS") else "-" + stem
    return results.parent / f"tradeoff{suffix}.png"


def replot(results: Path) -> Path:
    """Redraw the chart of a results file from the rows its .json keeps (what that run measured)."""
    rows = json.loads(results.with_suffix(".json").read_text())["rows"]
    plain = next(r for r in rows if r["name"] == "plain fp32 ONNX export")
    return plot_tradeoff(rows, plain, chart_path(results))


def write_results(path: Path, context: dict, rows: list[dict], recipes: dict, inspected: list[dict], command: str) -> None:
    lines = ["# bertpress vs peers on all-MiniLM-L6-v2 (written by bench/compare.py)", "",
             f"Command: `{command}`", "",
             f"{context['environment']}. Load average before / after: {context['load_before']} / {context['load_after']}"
             f" ({os.cpu_count()} cores; a 1-minute load average near the thread count means other jobs shared them)."
             f" Whole run {context['seconds'] / 60:.1f} min"
             f" (compiles {context['compile_seconds'] / 60:.1f} min of it).", "",
             f"Latency: seq {SEQ}, {context['threads']} intra-op threads, synthetic token ids (all attended), interleaved"
             f" rounds: {context['rounds1']} at batch 1, {context['rounds32']} at batch 32 (each round runs every model once,"
             f" in rotating order, with a {SETTLE_SECONDS:g} s pause before each run so the previous model's idle ONNX Runtime"
             " workers stop spinning); medians, and ratios of the plain fp32 export's median to each model's.",
             f"Fidelity: {context['heldout']}, against PyTorch fp32 (mean-pooled): mean cosine, and top-10 neighbour overlap"
             " (per text, the share of its 10 nearest neighbours in the sample that both embeddings agree on).",
             f"Other domains (columns 'docs' and 'fortunes'): the same two measures on {context['docs']}; and on"
             f" {context['fortunes']}." + (
                 f" Both samples also avoid the calibration and training texts of {', '.join(context['sample_also'])}"
                 " (--sample-also: the recipes of the run whose samples these are)." if context.get("sample_also") else ""),
             "Size: bytes on disk of the model file(s) (ONNX file; PyTorch: saved state dict).", "",
             "| model | size MB | smaller | b1 median ms | b1 speedup | b32 median ms | b32 speedup | est. b32 ms | cosine | top-10 overlap"
             " | docs cosine | docs top-10 | fortunes cosine | fortunes top-10 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    plain = next(r for r in rows if r["name"] == "plain fp32 ONNX export")
    for row in rows:
        est = row.get("estimated_ms")
        lines.append(
            f"| {row['name']} | {row['bytes'] / 1e6:.1f} | {plain['bytes'] / row['bytes']:.1f}x | {row['b1_ms']:.2f} |"
            f" {plain['b1_ms'] / row['b1_ms']:.2f}x | {row['b32_ms']:.0f} | {plain['b32_ms'] / row['b32_ms']:.2f}x |"
            f" {'-' if est is None else f'{est:.0f}'} | {row['cosine']:.4f} | {row['overlap10']:.3f} |"
            f" {row['docs_cosine']:.4f} | {row['docs_overlap10']:.3f} | {row['fortunes_cosine']:.4f} |"
            f" {row['fortunes_overlap10']:.3f} |")
    failed = {n: r for n, r in recipes.items() if r["status"] != "ok"}
    for name, rec in failed.items():
        lines.append(f"| recipe {name}: {rec['status']} | - | - | - | - | - | - | - | - | - | - | - | - | - |")
    lines += [""]
    for name, rec in recipes.items():
        how = ("reused an earlier build (--reuse)" if rec.get("reused") else "up to date" if rec.get("up_to_date")
               else f"compiled in this run ({rec['seconds']:.0f} s)")
        total = rec.get("compile_seconds")
        shape = architecture(rec["report"]) if rec.get("report") else None
        lines.append(f"- `{_shown(recipe_path(name))}`: {rec['status']}; {how}" + (f"; its compile took {total:.0f} s" if total else "")
                     + (f"; encoder: {shape}" if shape else ""))
    for name, rec in failed.items():
        lines.append(f"- `{_shown(recipe_path(name))}` did not compile: {rec['reason']}")
    left_out = sorted(name for name in default_recipes() if name not in recipes)
    if left_out:
        lines.append(f"- not in this run (`--recipes`): {', '.join(f'`recipes/{n}.yaml`' for n in left_out)}")
    recipe_rows = [r for r in rows if r.get("estimated_ms") is not None and r["name"].startswith("recipe ")]
    rho = spearman([r["estimated_ms"] for r in recipe_rows], [r["b32_ms"] for r in recipe_rows])
    lines += ["", "## Cost model: estimated vs measured latency (batch 32, seq 128)", "",
              "The estimate is the compile report's roofline latency (per node: max(FLOPs / peak, bytes / bandwidth) +"
              " kernel overhead, int8 peak for quantized linears), made with the roofline cached when that recipe was"
              " compiled (column R):", ""]
    labels = list(dict.fromkeys(r["roofline"] for r in [plain] + recipe_rows if r.get("estimated_ms") and r.get("roofline")))
    lines += [f"- R{i + 1}: {label}" for i, label in enumerate(labels)]
    lines += [f"- this machine's roofline now (`bertpress roofline`): {context['machine']}", "",
              "| model | estimated ms | R | measured ms | measured / estimated |", "|---|---|---|---|---|"]
    for row in [plain] + recipe_rows:
        if row.get("estimated_ms"):
            r = f"R{labels.index(row['roofline']) + 1}" if row.get("roofline") in labels else "-"
            lines.append(f"| {row['name']} | {row['estimated_ms']:.0f} | {r} | {row['b32_ms']:.0f} | {row['b32_ms'] / row['estimated_ms']:.2f} |")
    lines += ["", f"Spearman rank correlation of estimate vs measurement over the {len(recipe_rows)} compiled recipes:"
              f" **{'n/a' if rho is None else f'{rho:.3f}'}**.", ""]
    flagship = next((r for r in rows if r["name"] == "recipe minilm-fast"), None)
    lines += ["## Flagship: recipes/minilm-fast.yaml", ""]
    if flagship is None:
        lines.append("The flagship did not compile in this run (see above).")
    else:
        checks = [("speed at batch 32", plain["b32_ms"] / flagship["b32_ms"], TARGETS["speedup32"], "x"),
                  ("smaller on disk", plain["bytes"] / flagship["bytes"], TARGETS["smaller"], "x"),
                  ("held-out mean cosine", flagship["cosine"], TARGETS["cosine"], ""),
                  ("top-10 neighbour overlap", flagship["overlap10"], TARGETS["overlap"], "")]
        lines += ["| target | reached | goal | met |", "|---|---|---|---|"]
        for label, value, goal, unit in checks:
            lines.append(f"| {label} | {value:.3f}{unit} | >= {goal}{unit} | {'yes' if value >= goal else 'no'} |")
        peer = next((r for r in rows if r["name"].startswith("peer:")), None)
        lines += ["", "On other domains, never calibrated or trained on: Python documentation, cosine"
                  f" {flagship['docs_cosine']:.4f} and top-10 overlap {flagship['docs_overlap10']:.3f}"
                  + (f" (peer pipeline: {peer['docs_cosine']:.4f} and {peer['docs_overlap10']:.3f})" if peer else "")
                  + f"; fortunes, cosine {flagship['fortunes_cosine']:.4f} and top-10 overlap"
                  f" {flagship['fortunes_overlap10']:.3f}"
                  + (f" (peer pipeline: {peer['fortunes_cosine']:.4f} and {peer['fortunes_overlap10']:.3f})" if peer else "")
                  + ". The targets are set on the WordNet slice; these show how far the distillation's text carries."]
    report = (recipes.get("minilm-fast") or {}).get("report")
    if report:
        lines += ["", "Where the flagship's fidelity went (held-out cosine of the recipe's own check after each pass, the same"
                  " WordNet slice; the ONNX check at the end):", "",
                  "| pass | status | cosine after | seconds |", "|---|---|---|---|"]
        for row in report["passes"]:
            lines.append(f"| {row['name']} | {row['status']} | {row['checks'].get('cosine', float('nan')):.4f} | {row['seconds']:.0f} |")
        lines.append(f"| ONNX Runtime model | final check | {report['final_check']['cosine']:.4f} | - |")
        compiled = report["cost"]["compiled"]["by_component"]
        total = sum(c.get("bytes", 0) for c in compiled.values())
        lines += ["", "Where its bytes are (cost model, as stored): " + ", ".join(
            f"{name} {c.get('bytes', 0) / 1e6:.2f} MB ({c.get('bytes', 0) / total:.0%})"
            for name, c in compiled.items() if c.get("bytes")) + "."]
    chart = plot_tradeoff(rows, plain, chart_path(path))
    lines += ["", f"### Trade-off: every model above, by speed and fidelity (chart: [{chart.name}]({chart.name}))", "",
              "| model | b32 speedup | smaller | cosine | top-10 overlap |", "|---|---|---|---|---|"]
    for row in sorted(rows, key=lambda r: plain["b32_ms"] / r["b32_ms"]):
        lines.append(f"| {row['name']} | {plain['b32_ms'] / row['b32_ms']:.2f}x | {plain['bytes'] / row['bytes']:.1f}x |"
                     f" {row['cosine']:.4f} | {row['overlap10']:.3f} |")
    lines += ["", "## Where the cost goes: `bertpress inspect` on the seed's breakdown", ""]
    for item in inspected:
        b = item["breakdown"]
        lines += [f"### {item['label']} (batch {b['batch']} x seq {b['seq']}; chart: [{item['png']}]({item['png']}))", "",
                  "| component | storage est. | storage meas. | FLOPs est. | time est. | time meas. |", "|---|---|---|---|---|---|"]
        for component, share in b["shares"].items():
            lines.append(f"| {component} | {_pct(share['storage_estimated'])} | {_pct(share['storage_measured'])} |"
                         f" {_pct(share['flops_estimated'])} | {_pct(share['latency_estimated'])} | {_pct(share['time_measured'])} |")
        lines.append("")
        for finding in b["findings"]:
            verdict = {True: "holds", False: "does not hold", None: "not measurable"}[finding["holds"]]
            lines.append(f"- {finding['finding']}: **{verdict}** ({finding['figures']})")
        lines += [f"- {note}" for note in b["notes"]] + [""]
    path.write_text("\n".join(lines) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds1", type=int, default=30)
    parser.add_argument("--rounds32", type=int, default=7)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out-root", type=Path, default=ROOT / "out")
    parser.add_argument("--skip-inspect", action="store_true")
    parser.add_argument("--reuse", action="store_true", help="use an existing build of the same recipe text in OUT_ROOT even if"
                        " code changed since (the default rebuilds unless `bertpress compile` would call it up to date)")
    parser.add_argument("--recipes", nargs="*", help="only these recipes (names without .yaml, from recipes/ or"
                        " bench/experiments/recipes/; default: every recipe in recipes/)")
    parser.add_argument("--sample-also", nargs="*", default=[], metavar="RECIPE",
                        help="recipes not run here whose calibration and training texts the held-out samples also avoid:"
                        " given the recipes of an earlier run, a partial run measures fidelity on that run's samples")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR / "RESULTS.md")
    parser.add_argument("--replot", action="store_true", help="only redraw the chart of --results from its .json (the"
                        " rows an earlier run measured), without compiling or measuring")
    args = parser.parse_args()
    if args.replot:
        if not args.results.with_suffix(".json").is_file():
            parser.error(f"--replot draws from {args.results.with_suffix('.json')}, which does not exist (run compare.py"
                         " with this --results first)")
        print(replot(args.results))
        return
    known = known_recipes()
    unknown = [name for name in (args.recipes or []) + args.sample_also if name not in known]
    if unknown:
        parser.error(f"no recipe named {', '.join(unknown)} in {' or '.join(_shown(d) + '/' for d in RECIPE_DIRS)}"
                     f" (names are file names without .yaml: {', '.join(known)})")
    compilable = default_recipes()
    searchable = [name for name in (args.recipes or []) + args.sample_also
                  if known[name].parent == RECIPE_DIRS[0] and name not in compilable]
    if searchable:
        parser.error(f"{', '.join(searchable)} is a searchable recipe: `bertpress tune` searches it (bench/tune_minilm.py"
                     " measures the result); compare.py compiles plain recipes")
    command = "python bench/compare.py " + " ".join(sys.argv[1:])
    started = time.perf_counter()
    load_before = [round(x, 1) for x in os.getloadavg()]
    torch.set_num_threads(args.threads)
    from compiler import roofline
    from compiler.report import environment

    recipes = compile_all(args.out_root, args.reuse, args.recipes)
    compile_seconds = time.perf_counter() - started

    loaded = load_model(MODEL)
    tokenizer, model = loaded.tokenizer, loaded.model.eval()
    held_out = HeldOut(sorted(set(recipes) | set(args.sample_also)), model, tokenizer)
    others = ("docs", "fortunes")  # row fields docs_cosine, ...; the WordNet slice's are plain cosine, overlap10

    # name -> (latency runner, fidelity embeddings, bytes, estimated ms)
    variants: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bertpress-compare-") as tmp:
        tmp = Path(tmp)
        example = example_inputs(tokenizer)
        plain = export_onnx(trace(model, example, max_length=loaded.max_length), example, tmp / "plain.onnx")
        ok = {n: r for n, r in recipes.items() if r["status"] == "ok"}
        first = next(iter(ok.values()), None)  # the plain export's estimate is a build's reference cost
        variants["plain fp32 ONNX export"] = {
            "run": ort_run(plain, args.threads), "tokenizer": tokenizer, "bytes": plain.stat().st_size,
            "estimated_ms": first and first["report"]["cost"]["reference"].get("latency_ms"),
            "roofline": first and _roofline_label((first["report"].get("latency") or {}).get("machine"))}
        variants["PyTorch eager fp32"] = {"run": torch_run(model), "tokenizer": tokenizer,
                                          "bytes": (loaded.path / "model.safetensors").stat().st_size}
        dynamic = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        torch.save(dynamic.state_dict(), tmp / "dynamic.pt")
        variants["PyTorch dynamic int8"] = {"run": torch_run(dynamic), "tokenizer": tokenizer,
                                            "bytes": (tmp / "dynamic.pt").stat().st_size}
        peer, peer_info = peer_pipeline(model, tokenizer, tmp)
        variants["peer: legacy export + ORT optimizer + int8 per-channel"] = {
            "run": ort_run(peer, args.threads), "tokenizer": tokenizer, "bytes": peer.stat().st_size}
        from transformers import AutoTokenizer

        for name, rec in ok.items():
            files = rec["report"]["outputs"]["files"]
            onnx_bytes = sum(size for file, size in files.items() if file == "model.onnx")
            variants[f"recipe {name}"] = {
                "run": ort_run(rec["path"] / "model.onnx", args.threads),
                "tokenizer": AutoTokenizer.from_pretrained(str(rec["path"])),  # prune-vocab rewrites it
                "bytes": onnx_bytes, "estimated_ms": rec["report"]["cost"]["compiled"].get("latency_ms"),
                "roofline": _roofline_label((rec["report"].get("latency") or {}).get("machine")),
                "architecture": architecture(rec["report"]), "vocab": vocab_size(rec["path"])}

        for name, variant in variants.items():
            print(f"[compare] fidelity of {name}", flush=True)
            measured = held_out.measure(variant["run"], variant["tokenizer"])
            variant.update(measured["wordnet"])
            for key in others:
                variant.update({f"{key}_cosine": measured[key]["cosine"], f"{key}_overlap10": measured[key]["overlap10"]})

        vocab = min([int(loaded.config.vocab_size)] + [v.get("vocab", 10**9) for v in variants.values()])
        runs = {name: v["run"] for name, v in variants.items()}
        timings = {}
        for batch, rounds in ((1, args.rounds1), (32, args.rounds32)):
            print(f"[compare] timing batch {batch}: {rounds} interleaved rounds of {len(runs)} models", flush=True)
            timings[batch] = interleaved(runs, synthetic_batch(batch, SEQ, vocab), rounds)
    rows = []
    for name, variant in variants.items():
        rows.append({"name": name, "bytes": variant["bytes"], "estimated_ms": variant.get("estimated_ms"),
                     "roofline": variant.get("roofline"), "architecture": variant.get("architecture"),
                     "b1_ms": 1e3 * statistics.median(timings[1][name]), "b32_ms": 1e3 * statistics.median(timings[32][name]),
                     "cosine": variant["cosine"], "overlap10": variant["overlap10"],
                     **{f"{key}_{measure}": variant[f"{key}_{measure}"] for key in others
                        for measure in ("cosine", "overlap10")}})
    inspected = [] if args.skip_inspect else run_inspect(args.out_root, args.threads)
    machine = roofline.machine(args.threads)
    env = environment()
    context = {"environment": f"onnxruntime {env.get('onnxruntime')}, torch {env.get('torch')}, {machine.cpu}",
               "load_before": load_before, "load_after": [round(x, 1) for x in os.getloadavg()],
               "seconds": time.perf_counter() - started, "compile_seconds": compile_seconds, "threads": args.threads,
               "rounds1": args.rounds1, "rounds32": args.rounds32, "heldout": held_out.samples["wordnet"][1],
               "docs": held_out.samples["docs"][1], "fortunes": held_out.samples["fortunes"][1],
               "sample_also": sorted(set(args.sample_also) - set(recipes)),
               "machine": _roofline_label(machine.as_dict())}
    write_results(args.results, context, rows, recipes, inspected, command)
    (args.results.with_suffix(".json")).write_text(json.dumps(
        {"context": context, "rows": rows, "peer": peer_info,
         "recipes": {n: {k: v for k, v in r.items() if k not in ("report", "path")} for n, r in recipes.items()},
         "inspect": inspected}, indent=2, default=str) + "\n")
    print(args.results.read_text())


if __name__ == "__main__":
    main()
