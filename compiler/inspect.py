"""``bertpress inspect``: where a BERT's storage and compute go, per component, estimated and measured.

Components are the seed's breakdown (embeddings, linear-before-attention, attention-core,
linear-after-attention, feed-forward, other). Estimated: the cost model on the traced graph (bytes,
FLOPs, roofline latency). Measured: the bytes of the ONNX initializers each component's nodes read,
and the time ONNX Runtime's profiler records per node, summed per component.

For a model (a Hugging Face folder or builtin:minilm-l6) the plain fp32 export is profiled with
ORT's basic optimizations only, so every profiled node keeps its exporter metadata (the module it came
from and the aten op) and maps to the component the structure analysis gave that op. For a compiled
output folder the estimate is the compile report's and the node-to-component map is by position in the
optimized graph: embeddings up to the first layer norm; per layer, what precedes the attention op,
the attention op, what follows it up to the residual norm, then the feed-forward up to the next norm.
A fused attention op (Attention/QAttention) contains the q/k/v projections; its time is its own row.
"""

from __future__ import annotations

import json
import re
import tempfile
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .structure import COMPONENTS

FUSED_ATTENTION = "attention (fused q/k/v + core)"
_ATTENTION_OPS = {"Attention", "QAttention", "MultiHeadAttention", "PackedAttention"}
_NORM_OPS = {"LayerNormalization", "SkipLayerNormalization", "SkipSimplifiedLayerNormalization",
             "EmbedLayerNormalization", "QEmbedLayerNormalization"}
_RESIDUAL_OPS = {"Sum"}
_SCOPES = "pkg.torch.onnx.name_scopes"


@dataclass
class Breakdown:
    """Per-component figures; shares are fractions of each column's total."""

    source: str
    batch: int
    seq: int
    estimated: dict[str, dict[str, float]] = field(default_factory=dict)  # component -> bytes/flops/latency_ns
    measured: dict[str, dict[str, float]] = field(default_factory=dict)  # component -> bytes/time_us
    notes: list[str] = field(default_factory=list)

    def shares(self) -> dict[str, dict[str, float]]:
        columns = {("estimated", "bytes"): "storage_estimated", ("measured", "bytes"): "storage_measured",
                   ("estimated", "flops"): "flops_estimated", ("estimated", "latency_ns"): "latency_estimated",
                   ("measured", "time_us"): "time_measured"}
        rows = sorted(set(self.estimated) | set(self.measured), key=_order)
        out = {row: {} for row in rows}
        for (side, key), name in columns.items():
            table = getattr(self, side)
            total = sum(table.get(row, {}).get(key, 0) for row in rows)
            for row in rows:
                value = table.get(row, {}).get(key)
                out[row][name] = None if value is None or not total else value / total
        return out

    def findings(self) -> list[dict]:
        """The seed's three findings, each checked against the measured figures where there are some."""
        shares = self.shares()

        def share(component, column, fallback=None):
            value = shares.get(component, {}).get(column)
            return value if value is not None else (shares.get(component, {}).get(fallback) if fallback else None)

        ffn_storage = share("feed-forward", "storage_measured", "storage_estimated") or 0.0
        ffn_time = share("feed-forward", "time_measured", "latency_estimated") or 0.0
        emb_storage = share("embeddings", "storage_measured", "storage_estimated") or 0.0
        emb_time = share("embeddings", "time_measured", "latency_estimated") or 0.0
        core_storage = share("attention-core", "storage_measured", "storage_estimated") or 0.0
        core_time = share("attention-core", "time_measured", "latency_estimated")
        findings = [
            {"finding": "feed-forward is about half of storage and of compute (read: 35-70% of each)",
             "figures": f"storage {ffn_storage:.0%}, time {ffn_time:.0%}",
             "holds": 0.35 <= ffn_storage <= 0.70 and 0.35 <= ffn_time <= 0.70},
            {"finding": "embeddings: much storage (>= 15%), little compute (<= 5% of time)",
             "figures": f"storage {emb_storage:.0%}, time {emb_time:.1%}",
             "holds": emb_storage >= 0.15 and emb_time <= 0.05},
        ]
        if core_time is not None:
            findings.append({"finding": "attention core: little storage (< 1%), real compute (>= 5% of time)",
                             "figures": f"storage {core_storage:.1%}, time {core_time:.0%}",
                             "holds": core_storage < 0.01 and core_time >= 0.05})
        else:
            findings.append({"finding": "attention core: little storage, real compute",
                             "figures": "not separable: the attention op is fused with its q/k/v projections",
                             "holds": None})
        return findings

    def as_dict(self) -> dict:
        return {"source": self.source, "batch": self.batch, "seq": self.seq, "estimated": self.estimated,
                "measured": self.measured, "shares": self.shares(), "findings": self.findings(), "notes": self.notes}


def _order(component: str) -> int:
    return COMPONENTS.index(component) if component in COMPONENTS else len(COMPONENTS) - 1


def _base(name: str) -> str:
    return re.sub(r"_\d+$", "", name)


def _scopes(node) -> list[str]:
    raw = node.metadata_props.get(_SCOPES)
    return [p.strip(" '\"") for p in raw.strip("[]").split(",")] if raw else []


def fx_component_keys(gm, structure) -> dict[tuple[str, str], str]:
    """(module path, op name without its counter) -> component, from the traced graph's classification."""
    keys: dict[tuple[str, str], set[str]] = defaultdict(set)
    for node, component in structure.node_component.items():
        if node.op != "call_function":
            continue
        stack = list((node.meta.get("nn_module_stack") or {}).values())
        path = stack[-1][0] if stack else ""
        keys[(path, _base(node.name))].add(component)
    # An ambiguous key (e.g. a reshape that is both q's and the attention's) is not guessed.
    return {key: next(iter(found)) for key, found in keys.items() if len(found) == 1}


def components_from_metadata(model, keys: dict[tuple[str, str], str]) -> dict[str, str]:
    """ONNX node name -> component, by the exporter's name scopes (module path and aten op)."""
    out = {}
    for node in model.graph:
        scopes = _scopes(node)
        if len(scopes) >= 2:
            key = (scopes[-2] if scopes[-2] != "_empty_nn_module_stack_from_metadata_hook" else "", _base(scopes[-1]))
            component = keys.get(key)
            if component is None and scopes[-2].startswith("embeddings"):
                component = "embeddings"
            out[node.name] = component or "other"
        else:
            out[node.name] = "other"
    return out


def components_by_position(nodes: list[tuple[str, str]]) -> dict[str, str]:
    """Node name -> component for a (fused) graph given as (name, op_type) in topological order."""
    out: dict[str, str] = {}
    first_norm = next((i for i, (_, op) in enumerate(nodes) if op in _NORM_OPS), None)
    if first_norm is None:
        return {name: "other" for name, _ in nodes}
    for name, _ in nodes[: first_norm + 1]:
        out[name] = "embeddings"
    state, pending = "before", []
    for name, op in nodes[first_norm + 1:]:
        if state == "before":
            if op in _ATTENTION_OPS:
                out.update({n: "linear-before-attention" for n in pending})
                pending = []
                out[name] = FUSED_ATTENTION if op in ("Attention", "QAttention", "PackedAttention") else "attention-core"
                state = "after"
            else:
                pending.append(name)
        elif op in _NORM_OPS:
            out[name] = "other"
            state = "ffn" if state == "after" else "before"
        elif op in _RESIDUAL_OPS:
            out[name] = "other"  # the residual sum before a norm (lowering writes it as Sum)
        else:
            out[name] = "linear-after-attention" if state == "after" else "feed-forward"
    out.update({n: "other" for n in pending})  # after the last layer: the pooler
    return out


def initializer_bytes(model, component_of: dict[str, str]) -> dict[str, int]:
    """Bytes of the initializers each component reads (one initializer counted once, for its first reader)."""
    sizes = {name: value.const_value.nbytes for name, value in model.graph.initializers.items()
             if value.const_value is not None}
    seen, out = set(), defaultdict(int)
    for node in model.graph.all_nodes():
        for value in node.inputs:
            if value is not None and value.name in sizes and value.name not in seen:
                seen.add(value.name)
                out[component_of.get(node.name, "other")] += sizes[value.name]
    return dict(out)


def profile_node_times(model_path: Path, feeds: dict[str, np.ndarray], *, threads: int, runs: int,
                       basic: bool) -> tuple[dict[str, float], Path | None]:
    """Microseconds per node (median over runs) from ORT's profiler.

    With ``basic`` the session keeps node names (basic optimizations only); otherwise it applies all
    of ORT's optimizations and also returns the optimized graph it ran, to map names by position.
    """
    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="bertpress-profile-") as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if basic
                                            else ort.GraphOptimizationLevel.ORT_ENABLE_ALL)
        optimized = Path(tmp) / "optimized.onnx"
        if not basic:
            options.optimized_model_filepath = str(optimized)
        options.enable_profiling = True
        options.profile_file_prefix = str(Path(tmp) / "profile")
        sess = ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()}
        feeds = {k: v for k, v in feeds.items() if k in names}
        sess.run(None, feeds)  # warm-up, dropped below
        for _ in range(runs):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
        graph = _graph_order(optimized) if not basic else None
    per_run: dict[str, list[float]] = defaultdict(list)
    for event in events:
        if event.get("cat") == "Node" and event.get("name", "").endswith("_kernel_time"):
            per_run[event["name"][: -len("_kernel_time")]].append(float(event["dur"]))
    # The first event of each node belongs to the warm-up run; the median resists a neighbour's load spike.
    times = {name: float(np.median(durations[-runs:])) for name, durations in per_run.items()}
    return times, graph


def _graph_order(path: Path):
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return [(node.name, node.op_type) for node in model.graph.node]


def _feeds(batch: int, seq: int, vocab: int) -> dict[str, np.ndarray]:
    from .benchmark import synthetic_batch

    return synthetic_batch(batch, seq, vocab)


def inspect_model(spec: str, *, batch: int = 32, seq: int = 128, threads: int = 2, runs: int = 3,
                  allow_pickle: bool = False) -> Breakdown:
    """Estimated and measured breakdown of a model (Hugging Face folder or builtin name), as exported plainly."""
    import onnx_ir as ir

    from . import cost_model, roofline
    from .frontend import example_inputs, load_model, trace
    from .lowering.export import export_ir
    from .lowering.io import save_model
    from .structure import analyze

    loaded = load_model(spec, allow_pickle=allow_pickle)
    example = example_inputs(loaded.tokenizer)
    gm = trace(loaded.model, example, max_length=loaded.max_length)
    structure = analyze(gm)
    machine = roofline.machine(threads)
    cost = cost_model.estimate(gm, batch=batch, seq=seq, component_of=structure.node_component, machine=machine)
    result = Breakdown(spec, batch, seq)
    result.estimated = {c: {k: v for k, v in figures.items() if k in ("bytes", "flops", "latency_ns")}
                        for c, figures in cost.by_component.items()}
    result.notes.append(f"estimate: roofline {machine.fp32_gflops:.0f} GFLOP/s fp32, {machine.int8_gflops:.0f} int8,"
                        f" {machine.bandwidth_gbs:.1f} GB/s, {machine.overhead_us:.1f} us/op; total {cost.latency_s * 1e3:.1f} ms")
    with tempfile.TemporaryDirectory(prefix="bertpress-inspect-") as tmp:
        model = export_ir(gm, example)
        component_of = components_from_metadata(model, fx_component_keys(gm, structure))
        path = save_model(model, Path(tmp) / "plain.onnx", keep_metadata=True)
        model = ir.load(path)
        storage = initializer_bytes(model, component_of)
        vocab = int(loaded.config.vocab_size)
        times, _ = profile_node_times(path, _feeds(batch, seq, vocab), threads=threads, runs=runs, basic=True)
    measured: dict[str, dict[str, float]] = defaultdict(dict)
    for component, size in storage.items():
        measured[component]["bytes"] = size
    for name, micros in times.items():
        component = component_of.get(name, "other")
        measured[component]["time_us"] = measured[component].get("time_us", 0.0) + micros
    result.measured = dict(measured)
    total = sum(times.values())
    result.notes.append(f"measured: plain fp32 export, ORT basic optimizations, {threads} threads, median of {runs} profiled"
                        f" runs after a warm-up (median per node): {total / 1e3:.1f} ms of kernel time per run")
    return result


def inspect_output(folder: Path, *, batch: int = 32, seq: int = 128, threads: int = 2, runs: int = 3) -> Breakdown:
    """Breakdown of a compiled output folder: the report's estimate, ORT's profile of model.onnx."""
    import onnx_ir as ir

    from .benchmark import vocab_size

    folder = Path(folder)
    report = json.loads((folder / "report.json").read_text())
    result = Breakdown(str(folder), batch, seq)
    compiled = (report.get("cost") or {}).get("compiled") or {}
    result.estimated = {c: {k: v for k, v in figures.items() if k in ("bytes", "flops", "latency_ns")}
                        for c, figures in compiled.get("by_component", {}).items()}
    if compiled and (compiled.get("batch"), compiled.get("seq")) != (batch, seq):
        result.notes.append(f"estimate: from the compile report, at batch {compiled.get('batch')} x seq {compiled.get('seq')}")
    times, graph = profile_node_times(folder / "model.onnx", _feeds(batch, seq, vocab_size(folder)), threads=threads,
                                      runs=runs, basic=False)
    by_position = components_by_position(graph or [])
    model = ir.load(folder / "model.onnx")
    storage = initializer_bytes(model, components_by_position([(n.name, n.op_type) for n in model.graph]))
    measured: dict[str, dict[str, float]] = defaultdict(dict)
    for component, size in storage.items():
        measured[component]["bytes"] = size
    for name, micros in times.items():
        component = by_position.get(name, "other")
        measured[component]["time_us"] = measured[component].get("time_us", 0.0) + micros
    result.measured = dict(measured)
    result.notes.append(f"measured: model.onnx with all ORT optimizations, {threads} threads, median of {runs} profiled runs per node;"
                        " components by position in the optimized graph")
    return result


def inspect(target: str, **options) -> Breakdown:
    path = Path(target)
    if path.is_dir() and (path / "report.json").is_file() and (path / "model.onnx").is_file():
        options.pop("allow_pickle", None)
        return inspect_output(path, **options)
    return inspect_model(target, **options)


def plot(breakdown: Breakdown, path: Path) -> Path:
    """Grouped bar chart: storage and compute share per component, estimated vs measured."""
    import matplotlib

    matplotlib.use("Agg")  # no display; never touches the user's matplotlib backend beyond this process
    import matplotlib.pyplot as plt

    shares = breakdown.shares()
    rows = list(shares)
    panels = [("storage", [("storage_estimated", "estimated (cost model)"), ("storage_measured", "measured (ONNX initializers)")]),
              ("compute", [("flops_estimated", "estimated FLOPs"), ("latency_estimated", "estimated roofline time"),
                           ("time_measured", "measured ORT kernel time")])]
    figure, axes = plt.subplots(1, 2, figsize=(13, 4.8), sharey=True)
    for axis, (title, columns) in zip(axes, panels):
        width = 0.8 / len(columns)
        for i, (column, label) in enumerate(columns):
            values = [100 * (shares[row].get(column) or 0.0) for row in rows]
            axis.bar(np.arange(len(rows)) + (i - (len(columns) - 1) / 2) * width, values, width, label=label)
        axis.set_xticks(np.arange(len(rows)))
        axis.set_xticklabels(rows, rotation=30, ha="right", fontsize=8)
        axis.set_title(f"{title} share per component")
        axis.legend(fontsize=8)
    axes[0].set_ylabel("% of total")
    figure.suptitle(f"{breakdown.source} (batch {breakdown.batch} x seq {breakdown.seq})", fontsize=10)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path
