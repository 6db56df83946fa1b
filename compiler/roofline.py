"""A roofline of this machine, as ONNX Runtime sees it: fp32 and int8 GEMM throughput, memory bandwidth, per-op overhead.

Measured once per (ONNX Runtime version, CPU, thread count) with three small ORT models and cached
as JSON under the user's cache folder (``$XDG_CACHE_HOME/bertpress`` or ``~/.cache/bertpress``);
``machine(threads, refresh=True)`` measures again. The cost model turns per-node FLOPs and bytes into
time with it: ``max(flops / peak, bytes / bandwidth) + overhead``, with the int8 peak for linears that
lowering quantizes. The GEMM shapes are BERT's (4096 tokens x 384 -> 1536): what the peaks mean is
"what ORT reaches on a transformer's linears here", not the CPU's datasheet figure.
"""

from __future__ import annotations

import json
import os
import platform
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .runtime import session

CACHE_VERSION = 3  # 2: peaks are best-of-runs, and the load average is kept; 3: the CPU key has family/model/ISA
_GEMM = (4096, 384, 1536)  # tokens x hidden -> intermediate: a BERT-base-ish FFN at batch 32 x seq 128
_BANDWIDTH_ELEMENTS = 8 * 1024 * 1024  # 32 MB per operand: well beyond any last-level cache
_CHAIN = 200  # tiny Adds in a row, to measure what one ORT kernel launch costs


@dataclass(frozen=True)
class Machine:
    fp32_gflops: float  # GEMM throughput of ORT's fp32 MatMul
    int8_gflops: float  # of ORT's dynamically quantized MatMul (what quantize_dynamic emits), incl. activation quantization
    bandwidth_gbs: float  # streaming elementwise Add: bytes read + written per second
    overhead_us: float  # time of one tiny ORT kernel (launch, allocation), paid by every node
    threads: int
    onnxruntime: str
    cpu: str
    measured_at: str
    # 1-minute load average when measured: peaks measured on a busy machine are low, so the estimate
    # runs high (``bertpress roofline --refresh`` on an idle machine measures again).
    load_average: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "bertpress" / "roofline.json"


# The instruction sets that decide ORT's GEMM speed, best first: with VNNI an int8 GEMM runs at about 3.5x
# the fp32 one, with plain AVX2 at under 2x. Two CPUs with the same marketing name ("AMD EPYC") can differ.
_ISA_FLAGS = ("amx_int8", "avx512_vnni", "avx_vnni", "avx512f", "avx2")


def _cpu_name(cpuinfo: str | None = None) -> str:
    """The CPU's model name, family/model and best GEMM instruction set, e.g. "AMD EPYC (family 25 model 1, avx2)".

    ``cpuinfo`` is the text of /proc/cpuinfo (read when None; absent off Linux).
    """
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    fields: dict[str, str] = {}
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    name = fields.get("model name") or platform.processor() or platform.machine()
    flags = set(fields.get("flags", "").split())
    isa = next((flag for flag in _ISA_FLAGS if flag in flags), None)
    detail = [f"family {fields['cpu family']} model {fields['model']}"] if "cpu family" in fields and "model" in fields else []
    detail += [isa] if isa else []
    return f"{name} ({', '.join(detail)})" if detail else name


def _key(threads: int) -> str:
    import onnxruntime as ort

    return f"v{CACHE_VERSION}|ort {ort.__version__}|{_cpu_name()}|threads {threads}"


def machine(threads: int = 2, *, refresh: bool = False) -> Machine:
    """The roofline for ``threads`` intra-op threads: from the cache, or measured now (a few seconds) and cached."""
    path = cache_path()
    key = _key(threads)
    entries: dict = {}
    if path.is_file():
        try:
            entries = json.loads(path.read_text())
        except (OSError, ValueError):
            entries = {}  # a corrupt cache is measured again, never an error
    if not refresh and isinstance(entries.get(key), dict):
        try:
            return Machine(**entries[key])
        except TypeError:
            pass  # written by another layout of Machine: measure again
    measured = measure(threads)
    entries[key] = measured.as_dict()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        staging = path.with_suffix(f".{os.getpid()}.tmp")
        staging.write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n")
        staging.replace(path)  # atomic: concurrent compiles never read half a file
    except OSError:
        pass  # a read-only home still gets a roofline, just not a cached one
    return measured


def _best_seconds(sess, feeds: dict, runs: int) -> float:
    """The fastest of ``runs`` timed runs after a warm-up.

    A roofline wants peaks, and on a shared machine noise only ever adds time: the best run is the
    closest to what the hardware does (a median of runs taken while another job holds a core halves
    the peak and the estimate doubles).
    """
    sess.run(None, feeds)  # warm-up: allocations and kernel selection
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        sess.run(None, feeds)
        times.append(time.perf_counter() - start)
    return min(times)


def _save(graph, path: Path) -> Path:
    import onnx
    from onnx import helper

    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def _gemm_model(folder: Path) -> Path:
    from onnx import TensorProto, helper, numpy_helper

    m, k, n = _GEMM
    weight = np.random.default_rng(0).standard_normal((k, n), dtype=np.float32) * 0.05
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"], name="gemm")], "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [m, k])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])],
        [numpy_helper.from_array(weight, "w")])
    return _save(graph, folder / "gemm_fp32.onnx")


def _bandwidth_model(folder: Path) -> Path:
    from onnx import TensorProto, helper

    shape = [_BANDWIDTH_ELEMENTS]
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["c"], name="stream")], "stream",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, shape), helper.make_tensor_value_info("b", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("c", TensorProto.FLOAT, shape)])
    return _save(graph, folder / "stream.onnx")


def _chain_model(folder: Path) -> Path:
    from onnx import TensorProto, helper

    nodes = [helper.make_node("Add", [f"t{i}", "one"], [f"t{i + 1}"], name=f"add{i}") for i in range(_CHAIN)]
    graph = helper.make_graph(
        nodes, "chain",
        [helper.make_tensor_value_info("t0", TensorProto.FLOAT, [8]), helper.make_tensor_value_info("one", TensorProto.FLOAT, [8])],
        [helper.make_tensor_value_info(f"t{_CHAIN}", TensorProto.FLOAT, [8])])
    return _save(graph, folder / "chain.onnx")


def measure(threads: int = 2, *, runs: int = 9) -> Machine:
    """Measure the roofline now (about 3-6 s; more on a loaded machine)."""
    import onnxruntime as ort
    from onnxruntime.quantization import QuantType, quantize_dynamic

    from .lowering.quiet import quiet

    m, k, n = _GEMM
    rng = np.random.default_rng(1)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    with tempfile.TemporaryDirectory(prefix="bertpress-roofline-") as tmp:
        folder = Path(tmp)
        fp32 = _gemm_model(folder)
        int8 = folder / "gemm_int8.onnx"
        with quiet():  # the same quantizer call lowering makes, so the int8 peak is the kernel lowering gets
            quantize_dynamic(str(fp32), str(int8), weight_type=QuantType.QInt8, per_channel=True,
                             op_types_to_quantize=["MatMul"], extra_options={"MatMulConstBOnly": True})
        x = {"x": rng.standard_normal((m, k), dtype=np.float32)}
        flops = 2.0 * m * k * n
        fp32_s = _best_seconds(session(fp32, threads), x, runs)
        int8_s = _best_seconds(session(int8, threads), x, runs)
        a = rng.standard_normal(_BANDWIDTH_ELEMENTS, dtype=np.float32)
        stream_s = _best_seconds(session(_bandwidth_model(folder), threads), {"a": a, "b": a.copy()}, runs)
        ones = np.ones(8, dtype=np.float32)
        chain_s = _best_seconds(session(_chain_model(folder), threads), {"t0": ones, "one": ones}, runs)
    return Machine(
        fp32_gflops=round(flops / fp32_s / 1e9, 3),
        int8_gflops=round(flops / int8_s / 1e9, 3),
        bandwidth_gbs=round(3 * 4 * _BANDWIDTH_ELEMENTS / stream_s / 1e9, 3),
        overhead_us=round(chain_s / _CHAIN * 1e6, 3),
        threads=threads, onnxruntime=ort.__version__, cpu=_cpu_name(),
        measured_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"), load_average=None if load is None else round(load, 2),
    )
