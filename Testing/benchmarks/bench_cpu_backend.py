"""Benchmark: CPU inference runtimes for the ResEnc-L network (issue #29), PyTorch vs ONNX Runtime vs OpenVINO.

The network is the released ResEnc-L architecture with random weights (``build_resencl_checkpoint``, loaded with
``load_model(root, "point", folds=[0], device="cpu")``); the input is one patch, batch 1, fp32, shape
(1, 2, 160, 224, 224): a CT-like volume in HU (air, body, lungs, noise, a 120 HU ball) after the plans' CT
normalisation, and the point-prompt ball of ``encoding.paint_prompt`` at the lesion in the second channel.

Each variant runs in its own subprocess so that peak memories do not mix. A child converts the network (timed:
export / conversion / compilation), saves the converted model to disk (size), drops everything, loads the saved model
back (timed: what the library would do with a cached model keyed by checkpoint hash, patch size and batch), resets
the memory high-water mark, then times the first inference and ``--runs`` further ones (median). Peak memory is
VmHWM from /proc/self/status after the reset (the inference process as deployed: the torch network is freed first
for ONNX Runtime / OpenVINO); the conversion's own peak is in the JSON. Accuracy: the maximum absolute logit
difference to PyTorch fp32 eager on the same input (target <= 1e-3 for fp32 variants) and the Dice of the
foreground masks (logit of the lesion channel > background) against eager's. With ``--rounds`` > 1 the reference is
the first eager run; eager's own row then shows its run-to-run difference.

Other people's processes on a shared machine distort timings: every child also records its own CPU time per
forward ("CPU s": all threads; on a compute-bound pass it barely depends on how many cores others take, while wall
time does) and the machine's busy CPU time from /proc/stat during the timed runs; "other load" = (busy - own) / wall,
in cores. ``--rounds R`` repeats the variant list R times in alternating order (A B C, C B A, ...) and pools the
timings. ``--ab-cycles N`` also runs ``--ab-variants`` in one process, one forward each in turn (order rotated per
cycle), N cycles, and reports the median of the per-cycle time ratios to eager: neighbouring passes see nearly the
same load (ONNX Runtime runs without its memory arena there, or the process would hold ~10 GB more).

Variants (``--variants``; default: all but the ``*-legacy``/``*-t1`` ones):
  torch-eager       PyTorch fp32 eager, torch's default threads (the reference; always run first)
  torch-eager-t1    the same with torch.set_num_threads(1)
  torch-eager-t2    the same with torch.set_num_threads(2) (skipped when that is the default)
  torch-cl3d        channels_last_3d network and input
  torch-jit-freeze  torch.jit.trace + torch.jit.freeze + torch.jit.optimize_for_inference (oneDNN weight prepacking)
  torch-compile     torch.compile (inductor, default mode; compilation counted as conversion)
  torch-bf16        opt-in reduced precision: torch.autocast("cpu", bfloat16)
  ort-fp32          ONNX Runtime: torch.onnx.export(dynamo=True), CPUExecutionProvider, ORT_ENABLE_ALL, intra-op threads
  ort-fp32-legacy   the same with the TorchScript exporter (dynamo=False): ~100 s and ~20 GB of memory here
  ov-fp32           OpenVINO: openvino.convert_model(torch module) traced on a small example input, reshaped to the
                    patch, IR saved with compress_to_fp16=False, compile_model(CPU, LATENCY,
                    INFERENCE_PRECISION_HINT f32)
  ov-fp32-onnx      OpenVINO from the ONNX file of torch.onnx.export(dynamo=True)
  *-stablenorm      ort-fp32 / ov-fp32 with every InstanceNorm3d replaced by the library's StableInstanceNorm
                    (LesionLocatorLib.openvinobackend; what --backend openvino does), whose reductions keep fp32
                    accuracy over 8 M voxels
  ov-bf16           opt-in: OpenVINO's default INFERENCE_PRECISION_HINT (bf16 on CPUs with AVX512-BF16/AMX)
  ov-fp16w          opt-in: IR saved with ov.save_model's default compress_to_fp16=True (fp16 weights, f32 compute)

Usage: python Testing/benchmarks/bench_cpu_backend.py [--runs 3] [--variants torch-eager ov-fp32 ...] [--rounds 1]
       [--ab-cycles 3] [--ab-variants ...] [--work DIR] [--tiny] [-o results/bench_cpu_backend.json]
(``--work DIR`` keeps the ~1.5 GB checkpoint and the converted models for the next run; ``--tiny`` checks the script
in a minute with the tiny test network.)
Prints a table and writes the JSON (all numbers, cpus, CPU flags, package versions, date).
"""
from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(REPO))

VARIANTS = {  # name -> (packages it needs, in the default set)
    "torch-eager": ((), True),
    "torch-eager-t1": ((), False),
    "torch-eager-t2": ((), True),
    "torch-cl3d": ((), True),
    "torch-jit-freeze": ((), True),
    "torch-compile": ((), True),
    "torch-bf16": ((), True),
    "ort-fp32": (("onnxruntime", "onnx", "onnxscript"), True),
    "ort-fp32-legacy": (("onnxruntime", "onnx"), False),
    "ort-fp32-stablenorm": (("onnxruntime", "onnx", "onnxscript"), True),
    "ov-fp32": (("openvino",), True),
    "ov-fp32-onnx": (("openvino", "onnx", "onnxscript"), True),
    "ov-fp32-stablenorm": (("openvino",), True),
    "ov-bf16": (("openvino",), True),
    "ov-fp16w": (("openvino",), True),
}
FP32 = {"torch-eager", "torch-eager-t1", "torch-eager-t2", "torch-cl3d", "torch-jit-freeze", "torch-compile",
        "ort-fp32", "ort-fp32-legacy", "ort-fp32-stablenorm", "ov-fp32", "ov-fp32-onnx", "ov-fp32-stablenorm"}
TRACE_SHAPE = (32, 64, 64)  # small spatial example input for tracing (the graph is then made static at the patch)


from LesionLocatorLib.openvinobackend import StableInstanceNorm, stabilise_norms  # noqa: E402,F401  (the library's)


# --------------------------------------------------------------------------- measurement helpers
def _status_kb(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return float("nan")


def _peak_mb() -> float:
    return _status_kb("VmHWM") / 1024


def _release_and_reset_peak() -> float:
    """Free what can be freed (gc, glibc malloc_trim), reset VmHWM to the current RSS; returns the RSS (MiB)."""
    gc.collect()
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass
    return _status_kb("VmRSS") / 1024


def _busy_jiffies() -> tuple:
    """(busy, steal) jiffies of all CPUs from /proc/stat (busy includes steal)."""
    f = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = (f + [0] * 8)[:8]
    return user + nice + system + irq + softirq + steal, steal


class LoadMeter:
    """Own CPU time (process, all threads) and the rest of the machine's busy CPU time over a period."""

    def __init__(self):
        self.hz = os.sysconf("SC_CLK_TCK")
        self.wall0, self.own0, (self.busy0, self.steal0) = time.perf_counter(), self._own(), _busy_jiffies()

    @staticmethod
    def _own() -> float:
        t = os.times()
        return t.user + t.system

    def stop(self) -> dict:
        wall = time.perf_counter() - self.wall0
        own = self._own() - self.own0
        busy, steal = _busy_jiffies()
        busy_s, steal_s = (busy - self.busy0) / self.hz, (steal - self.steal0) / self.hz
        return {"wall_s": wall, "own_cpu_cores": own / wall, "other_load_cores": max(busy_s - own, 0.0) / wall,
                "steal_cores": steal_s / wall}


# --------------------------------------------------------------------------- inputs
def make_input(patch: tuple, intensity: dict) -> np.ndarray:
    """(1, 2, *patch) float32: CT-normalised CT-like volume and a point-prompt ball at the lesion."""
    from LesionLocatorLib.encoding import paint_prompt
    from LesionLocatorLib.modelgrid import ct_normalizer
    rng = np.random.default_rng(0)
    z, y, x = patch
    zz, yy, xx = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in patch), indexing="ij")
    body = ((yy - y / 2) / (0.45 * y)) ** 2 + ((xx - x / 2) / (0.47 * x)) ** 2 <= 1
    lungs = ((yy - 0.45 * y) / (0.22 * y)) ** 2 + ((np.abs(xx - x / 2) - 0.2 * x) / (0.14 * x)) ** 2 <= 1
    hu = np.where(body, 40.0, -1000.0).astype(np.float32)
    hu[lungs & body] = -850.0
    centre = (z // 2, int(0.6 * y), int(0.4 * x))
    lesion = ((zz - centre[0]) / 8) ** 2 + ((yy - centre[1]) / 12) ** 2 + ((xx - centre[2]) / 12) ** 2 <= 1
    hu[lesion] = 120.0
    hu += rng.normal(0, 15, size=patch).astype(np.float32)
    out = np.zeros((1, 2, *patch), np.float32)
    out[0, 0] = ct_normalizer(intensity)(hu)
    prompt = np.zeros(patch, np.float32)
    paint_prompt(prompt, "point", centre)
    out[0, 1] = prompt
    return out


# --------------------------------------------------------------------------- one variant (child process)
def _load_network(model_root: str):
    from LesionLocatorLib.model import load_model
    model = load_model(model_root, "point", folds=[0], device="cpu")
    return model.network.eval(), model.patch_size


def _dir_mb(paths) -> float:
    return sum(Path(p).stat().st_size for p in paths if Path(p).exists()) / 2**20


def _onnx_export(net, x, path: Path, dynamo: bool) -> list:
    with torch.no_grad():
        torch.onnx.export(net, (x,), str(path), dynamo=dynamo, input_names=["x"], output_names=["logits"],
                          **({} if dynamo else {"opset_version": 17}))
    return [p for p in (path, path.with_name(path.name + ".data")) if p.exists()]


def _ov_core():
    import openvino as ov
    return ov, ov.Core()


def _ov_compile(core, model, f32: bool):
    import openvino.properties as props
    import openvino.properties.hint as hints
    config = {hints.performance_mode: hints.PerformanceMode.LATENCY}
    if f32:
        config[hints.inference_precision] = "f32"
    compiled = core.compile_model(model, "CPU", config)
    info = {"ov_default_precision_hint": core.get_property("CPU", hints.inference_precision).to_string(),
            "ov_precision": compiled.get_property(hints.inference_precision).to_string(),
            "ov_threads": int(compiled.get_property(props.inference_num_threads)),
            "ov_streams": int(compiled.get_property(props.num_streams))}
    return compiled, info


def _prepare(variant: str, work: Path, x_np: np.ndarray, threads: int | None, ort_arena: bool = True) -> tuple:
    """(infer() -> logits as numpy, result dict with conversion numbers, note for torch.compile or None)."""
    if threads:
        torch.set_num_threads(threads)
    if variant in ("torch-eager-t1", "torch-eager-t2"):
        torch.set_num_threads(int(variant[-1]))
    n_threads = torch.get_num_threads()
    x = torch.from_numpy(x_np)
    res = {"variant": variant, "torch_threads": n_threads, "notes": []}
    t_start = time.perf_counter()
    net, patch = _load_network(str(work / "model" / "LesionLocatorCheckpoint"))
    res["torch_load_s"] = time.perf_counter() - t_start
    if variant.endswith("-stablenorm"):
        res["notes"].append(f"{stabilise_norms(net)} InstanceNorm3d -> StableInstanceNorm before export")
    out_dir = work / "converted" / variant
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    compile_note = None

    t0 = time.perf_counter()
    if variant in ("torch-eager", "torch-eager-t1", "torch-eager-t2", "torch-bf16"):
        def infer():
            with torch.inference_mode(), (torch.autocast("cpu", dtype=torch.bfloat16) if variant == "torch-bf16"
                                          else _Null()):
                return net(x).float().numpy()
    elif variant == "torch-cl3d":
        net = net.to(memory_format=torch.channels_last_3d)
        x = x.contiguous(memory_format=torch.channels_last_3d)

        def infer():
            with torch.inference_mode():
                return net(x).contiguous().numpy()
    elif variant == "torch-jit-freeze":
        with torch.no_grad():
            traced = torch.jit.trace(net, torch.from_numpy(x_np[..., :TRACE_SHAPE[0], :TRACE_SHAPE[1],
                                                              :TRACE_SHAPE[2]].copy()))
            frozen = torch.jit.freeze(traced)
        path = out_dir / "model.pt"
        frozen.save(str(path))  # a module after optimize_for_inference cannot be loaded back: optimise after loading
        with torch.no_grad():
            torch.jit.optimize_for_inference(frozen)
        res["convert_s"] = time.perf_counter() - t0
        res["disk_mb"] = _dir_mb([path])
        res["convert_peak_mb"] = _peak_mb()
        del net, traced, frozen
        _release_and_reset_peak()
        t0 = time.perf_counter()
        with torch.no_grad():
            net = torch.jit.optimize_for_inference(torch.jit.load(str(path)))
        res["cache_load_s"] = time.perf_counter() - t0
        res["notes"].append("small-input trace, frozen; optimize_for_inference (oneDNN) after loading")

        def infer():
            with torch.no_grad():
                return net(x).numpy()
    elif variant == "torch-compile":
        net = torch.compile(net, backend="inductor")
        compile_note = "convert s = first call - median (inductor, cold cache)"

        def infer():
            with torch.inference_mode():
                return net(x).numpy()
    elif variant.startswith("ort-"):
        import onnxruntime as ort
        files = _onnx_export(net, x, out_dir / "model.onnx", dynamo=not variant.endswith("legacy"))
        res["exporter"] = "torch.onnx.export(dynamo=False)" if variant.endswith("legacy") else \
            "torch.onnx.export(dynamo=True)"
        export_s = time.perf_counter() - t0
        del net
        _release_and_reset_peak()
        so = ort.SessionOptions()
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        so.intra_op_num_threads = threads or os.cpu_count()
        so.inter_op_num_threads = 1
        so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        so.enable_cpu_mem_arena = ort_arena

        def session():
            return ort.InferenceSession(str(out_dir / "model.onnx"), so, providers=["CPUExecutionProvider"])
        t1 = time.perf_counter()
        sess = session()
        res["convert_s"] = export_s + time.perf_counter() - t1
        res["disk_mb"] = _dir_mb(files)
        del sess
        _release_and_reset_peak()
        t0 = time.perf_counter()
        sess = session()
        res["cache_load_s"] = time.perf_counter() - t0
        res["ort_threads"] = so.intra_op_num_threads
        res["ort_version"] = ort.__version__

        def infer():
            return sess.run(None, {"x": x_np})[0]
    elif variant.startswith("ov-"):
        ov, core = _ov_core()
        if variant == "ov-fp32-onnx":
            files = _onnx_export(net, x, out_dir / "model.onnx", dynamo=True)
            model = ov.convert_model(str(out_dir / "model.onnx"))
            res["notes"].append("dynamo ONNX file -> convert_model")
        else:
            small = torch.from_numpy(x_np[..., :TRACE_SHAPE[0], :TRACE_SHAPE[1], :TRACE_SHAPE[2]].copy())
            with torch.no_grad():
                model = ov.convert_model(net, example_input=small, input=[tuple(x.shape)])
            res["notes"].append("convert_model(torch module), small-input trace")
        res["convert_peak_mb"] = _peak_mb()
        del net
        xml = out_dir / "model.xml"
        ov.save_model(model, str(xml), compress_to_fp16=(variant == "ov-fp16w"))
        compiled, info = _ov_compile(core, model, f32=(variant != "ov-bf16"))
        res["convert_s"] = time.perf_counter() - t0
        res["disk_mb"] = _dir_mb([xml, xml.with_suffix(".bin")])
        res.update(info)
        del compiled, model
        _release_and_reset_peak()
        t0 = time.perf_counter()
        compiled, _ = _ov_compile(core, core.read_model(str(xml)), f32=(variant != "ov-bf16"))
        res["cache_load_s"] = time.perf_counter() - t0
        request = compiled.create_infer_request()
        res["ov_version"] = ov.__version__

        def infer():
            request.infer({0: x_np}, share_inputs=True)
            return request.get_output_tensor(0).data.copy()
    else:
        raise ValueError(f"unknown variant {variant!r}")
    res.setdefault("convert_s", time.perf_counter() - t0)
    res.setdefault("convert_peak_mb", _peak_mb())
    return infer, res, compile_note


def child(variant: str, work: str, runs: int, threads: int | None) -> dict:
    work = Path(work)
    x_np = np.load(work / "input.npy")
    infer, res, compile_note = _prepare(variant, work, x_np, threads)
    res["rss_before_inference_mb"] = _release_and_reset_peak()

    t0 = time.perf_counter()
    out = infer()
    res["first_s"] = time.perf_counter() - t0
    times, cpu_times, meter = [], [], LoadMeter()
    for _ in range(runs):
        t0, c0 = time.perf_counter(), LoadMeter._own()
        out = infer()
        times.append(time.perf_counter() - t0)
        cpu_times.append(LoadMeter._own() - c0)
    res.update(meter.stop())
    res["peak_mb"] = _peak_mb()
    res["times_s"], res["cpu_times_s"] = times, cpu_times
    res["median_s"], res["cpu_median_s"] = statistics.median(times), statistics.median(cpu_times)
    if compile_note:
        res["convert_s"] = max(res["first_s"] - res["median_s"], 0.0)
        res["notes"].append(compile_note)
    out = np.asarray(out, np.float32).reshape(x_np.shape[0], -1, *x_np.shape[2:])
    ref_path = work / "reference_logits.npy"
    if variant == "torch-eager" and not ref_path.exists():  # later rounds: eager's run-to-run difference
        np.save(ref_path, out)
    ref = np.load(ref_path)
    res["max_abs_diff"] = float(np.max(np.abs(out - ref)))
    res["ref_max_abs_logit"] = float(np.max(np.abs(ref)))
    fg, fg_ref = out[:, 1] > out[:, 0], ref[:, 1] > ref[:, 0]
    inter, total = int(np.logical_and(fg, fg_ref).sum()), int(fg.sum() + fg_ref.sum())
    res["dice_vs_eager"] = 1.0 if total == 0 else 2 * inter / total
    res["fg_fraction_eager"] = float(fg_ref.mean())
    res["mask_voxels_differing"] = int(np.count_nonzero(fg != fg_ref))
    return res


def ab_child(variants: list, work: str, cycles: int, threads: int | None) -> dict:
    """All ``variants`` in one process, timed in turns (order rotated each cycle), so that each cycle's variants
    see nearly the same load from other processes: the per-cycle time ratios to eager are robust to slow drifts."""
    work = Path(work)
    x_np = np.load(work / "input.npy")
    infers = {}
    for v in variants:
        infer, _, _ = _prepare(v, work, x_np, threads, ort_arena=False)  # ORT's arena would hold ~10 GB
        infer()  # warm-up (torch.compile compiles here)
        infers[v] = infer
        gc.collect()
    times, cpu_times, loads = {v: [] for v in variants}, {v: [] for v in variants}, []
    for c in range(cycles):
        order = variants[c % len(variants):] + variants[:c % len(variants)]
        meter = LoadMeter()
        for v in order:
            t0, c0 = time.perf_counter(), LoadMeter._own()
            infers[v]()
            times[v].append(time.perf_counter() - t0)
            cpu_times[v].append(LoadMeter._own() - c0)
        loads.append(meter.stop()["other_load_cores"])
    return {"variants": variants, "times_s": times, "cpu_times_s": cpu_times, "other_load_cores": loads,
            "peak_mb": _peak_mb(), "notes": ["ONNX Runtime without its memory arena here"]}


class _Null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


# --------------------------------------------------------------------------- parent
def _missing(variant: str) -> list:
    return [p for p in VARIANTS[variant][0] if importlib.util.find_spec(p) is None]


def run_child(variant: str, work: Path, runs: int, threads: int | None, timeout: float) -> dict:
    argv = [sys.executable, __file__, "--child", variant, str(work), str(runs), str(threads or 0)]
    meter = LoadMeter()
    try:
        p = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "error": f"did not finish within {timeout:.0f} s", "notes": []}
    load = meter.stop()
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    if p.returncode != 0 or not lines:
        tail = (p.stderr.strip().splitlines() or ["(no output)"])[-1]
        return {"variant": variant, "error": f"exit {p.returncode}: {tail[:400]}", "stderr_tail": p.stderr[-4000:],
                "notes": []}
    res = json.loads(lines[-1])
    res["child_wall_s"], res["child_other_load_cores"] = load["wall_s"], load["other_load_cores"]
    return res


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for name in ("torch", "numpy", "openvino", "onnxruntime", "onnx", "onnxscript"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def _cpu_info() -> dict:
    flags, model = [], ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].split()
            elif line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    keep = [f for f in flags if f.startswith(("avx", "amx", "fma", "f16c"))]
    return {"cpus": os.cpu_count(), "model": model or platform.processor(), "simd_flags": keep,
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "torch_default_threads": torch.get_num_threads(), "mkldnn": torch.backends.mkldnn.is_available()}


def network_flops(model) -> int:
    """Floating-point operations (2 per multiply-add) of one forward pass, batch 1, at the patch size: counted by
    ``torch.utils.flop_counter`` on a copy of the plans' network built on the meta device (no memory, no time)."""
    from torch.utils.flop_counter import FlopCounterMode

    from LesionLocatorLib.model import build_network
    net = build_network(model.plans, model.configuration_name, model.dataset_json, device="meta").eval()
    x = torch.empty((1, 2) + tuple(model.patch_size), device="meta")
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        net(x)
    return int(counter.get_total_flops())


def gemm_peak(threads: int | None, n: int = 4096, runs: int = 5) -> dict:
    """This machine's attainable dense-arithmetic rate (GFLOP/s): the median of ``runs`` n x n float32 matrix
    products through torch (MKL/oneDNN, the threads torch uses or ``threads``), and the same in bfloat16. Direct
    3D convolutions (what every runtime here uses for ResEnc-L: none offers 3D Winograd/FFT on a CPU) cannot do
    more useful work per second than this, so flops / peak is a lower bound on an fp32 forward pass."""
    if threads:
        torch.set_num_threads(threads)
    out = {"n": n, "threads": torch.get_num_threads()}
    for dtype, key in ((torch.float32, "fp32_gflops"), (torch.bfloat16, "bf16_gflops")):
        a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
        for _ in range(2):
            a @ b
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t)
        out[key] = 2 * n ** 3 / statistics.median(times) / 1e9
    return out


def _fmt(v, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width}{spec}}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3, help="timed forward passes after the first one")
    ap.add_argument("--variants", nargs="+", default=[v for v, (_, d) in VARIANTS.items() if d],
                    choices=list(VARIANTS))
    ap.add_argument("--rounds", type=int, default=1, help="repeat the variant list, alternating its order")
    ap.add_argument("--threads", type=int, default=0, help="torch/ORT threads (0: torch's default, os.cpu_count())")
    ap.add_argument("--work", default=None, help="keep the model, input and converted models here (reused)")
    ap.add_argument("--ab-cycles", type=int, default=0,
                    help="also time --ab-variants in one process, in turns, this many cycles (0: off)")
    ap.add_argument("--ab-variants", nargs="+", choices=[v for v in VARIANTS if not v.startswith("torch-eager-t")],
                    default=["torch-eager", "torch-compile", "ort-fp32-stablenorm", "ov-fp32-stablenorm"],
                    help="each OpenVINO variant holds ~5 GB of buffers between passes: mind the memory")
    ap.add_argument("--tiny", action="store_true", help="the tiny test network (a quick check of this script)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per variant")
    ap.add_argument("-o", default=str(HERE / "results" / "bench_cpu_backend.json"))
    args = ap.parse_args()

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="bench_cpu_backend_"))
    work.mkdir(parents=True, exist_ok=True)
    from build_test_models import build_resencl_checkpoint, build_tiny_checkpoint
    if not (work / "model" / "LesionLocatorCheckpoint").exists():
        (build_tiny_checkpoint if args.tiny else build_resencl_checkpoint)(work / "model")
    from LesionLocatorLib.model import load_model
    model = load_model(work / "model" / "LesionLocatorCheckpoint", "point", folds=[0], device="cpu")
    n_params = sum(p.numel() for p in model.network.parameters())
    flops = network_flops(model)
    np.save(work / "input.npy", make_input(model.patch_size, model.intensity_properties))
    (work / "reference_logits.npy").unlink(missing_ok=True)
    shutil.rmtree(work / "inductor_cache", ignore_errors=True)  # torch.compile starts cold
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor_cache")
    patch = model.patch_size
    del model

    peak = gemm_peak(args.threads or None)
    bound_s = flops / (peak["fp32_gflops"] * 1e9)
    print(f"{flops / 1e12:.2f} TFLOP per forward; fp32 matrix product {peak['fp32_gflops']:.0f} GFLOP/s "
          f"({peak['threads']} threads; bf16 {peak['bf16_gflops']:.0f}): an fp32 forward cannot take less than "
          f"{bound_s:.1f} s here", flush=True)
    variants = ["torch-eager"] + [v for v in args.variants if v != "torch-eager"]
    skipped = {}
    if "torch-eager-t2" in variants and (args.threads or torch.get_num_threads()) == 2:
        skipped["torch-eager-t2"] = "torch-eager already runs 2 threads (torch's default here)"
        variants.remove("torch-eager-t2")
    for v in list(variants):
        if _missing(v):
            skipped[v] = f"not installed: {', '.join(_missing(v))} (optional, e.g. pip install {' '.join(_missing(v))})"
            variants.remove(v)
    results = {v: [] for v in variants}
    for r in range(args.rounds):
        order = variants if r % 2 == 0 else ["torch-eager"] + variants[1:][::-1]
        for v in order:
            print(f"[round {r + 1}] {v} ...", flush=True)
            res = run_child(v, work, args.runs, args.threads or None, args.timeout)
            results[v].append(res)
            print("   ", res.get("error") or f"first {res['first_s']:.1f} s, median {res['median_s']:.1f} s, "
                  f"max|diff| {res['max_abs_diff']:.2e}, other load {res['other_load_cores']:.2f} cores", flush=True)

    ab = None
    if args.ab_cycles:
        ab_variants = ["torch-eager"] + [v for v in args.ab_variants if v != "torch-eager" and not _missing(v)]
        print(f"[A/B] {' '.join(ab_variants)}: {args.ab_cycles} cycles in one process ...", flush=True)
        argv = [sys.executable, __file__, "--ab-child", ",".join(ab_variants), str(work), str(args.ab_cycles),
                str(args.threads or 0)]
        p = subprocess.run(argv, capture_output=True, text=True, timeout=args.timeout * len(ab_variants))
        lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
        if p.returncode != 0 or not lines:
            ab = {"error": f"exit {p.returncode}: {(p.stderr.strip().splitlines() or ['?'])[-1][:400]}"}
        else:
            ab = json.loads(lines[-1])
            eager_t = ab["times_s"]["torch-eager"]
            ab["median_s"] = {v: statistics.median(t) for v, t in ab["times_s"].items()}
            ab["speedup_per_cycle"] = {v: [e / s for e, s in zip(eager_t, t)] for v, t in ab["times_s"].items()}
            ab["median_speedup"] = {v: statistics.median(r) for v, r in ab["speedup_per_cycle"].items()}
            ab["cpu_median_s"] = {v: statistics.median(t) for v, t in ab["cpu_times_s"].items()}

    rows = []
    for v in variants:
        ok = [r for r in results[v] if "error" not in r]
        if not ok:
            rows.append({"variant": v, "error": results[v][-1]["error"], "notes": [results[v][-1]["error"]]})
            continue
        times = [t for r in ok for t in r["times_s"]]

        def med(key):
            vals = [r[key] for r in ok if r.get(key) is not None]
            return statistics.median(vals) if vals else None
        row = {"variant": v, "rounds": len(ok), "convert_s": med("convert_s"), "cache_load_s": med("cache_load_s"),
               "disk_mb": med("disk_mb"), "first_s": med("first_s"), "median_s": statistics.median(times),
               "times_s": times, "cpu_median_s": statistics.median([t for r in ok for t in r["cpu_times_s"]]),
               "peak_mb": max(r["peak_mb"] for r in ok),
               "convert_peak_mb": max(r["convert_peak_mb"] for r in ok),
               "max_abs_diff": max(r["max_abs_diff"] for r in ok), "dice_vs_eager": min(r["dice_vs_eager"] for r in ok),
               "other_load_cores": med("other_load_cores"), "own_cpu_cores": med("own_cpu_cores"),
               "fp32": v in FP32, "notes": sorted({n for r in ok for n in r["notes"]}), "children": ok}
        for key in ("exporter", "ov_precision", "ov_default_precision_hint", "ov_threads", "ov_streams", "ort_threads",
                    "torch_threads"):
            if key in ok[0]:
                row[key] = ok[0][key]
        if "ov_precision" in row:
            row["notes"].append(f"{row['ov_precision']} (default {row['ov_default_precision_hint']}), "
                                f"{row['ov_threads']} threads, {row['ov_streams']} stream(s)")
        if v == "torch-compile":
            row["convert_s"] = ok[0]["convert_s"]
            if len(ok) > 1:
                row["cache_load_s"] = min(r["convert_s"] for r in ok[1:])
                row["notes"].append("load s = compile again with inductor's warm on-disk cache")
        row["gflops"] = flops / row["median_s"] / 1e9
        row["fraction_of_fp32_peak"] = row["gflops"] / peak["fp32_gflops"]
        if v in FP32 and row["max_abs_diff"] > 1e-3:
            row["notes"].append("ABOVE the 1e-3 fp32 target")
        rows.append(row)
    eager = next((r for r in rows if r["variant"] == "torch-eager" and "error" not in r), None)
    for r in rows:
        if eager and "error" not in r:
            r["speedup_vs_eager"] = eager["median_s"] / r["median_s"]
            r["cpu_speedup_vs_eager"] = eager["cpu_median_s"] / r["cpu_median_s"]

    info = _cpu_info()
    print(f"\n{'Tiny network' if args.tiny else 'ResEnc-L'} forward, batch 1, patch {'x'.join(map(str, patch))}, "
          f"{n_params / 1e6:.1f} M parameters, "
          f"{info['cpus']} cpus ({info['model']}), {args.runs} runs x {args.rounds} round(s)")
    print(f"{'variant':<20}{'convert s':>10}{'load s':>7}{'disk MB':>8}{'first s':>8}{'median s':>9}{'speed-up':>9}"
          f"{'CPU s':>7}{'CPU x':>7}{'GFLOP/s':>8}{'%peak':>6}{'peak MiB':>9}{'max|diff|':>10}{'Dice':>7}{'other':>6}"
          f"  notes")
    for r in rows:
        if "error" in r:
            print(f"{r['variant']:<20}{'failed: ' + r['error']}")
            continue
        print(f"{r['variant']:<20}{_fmt(r['convert_s'], '.1f', 10)}{_fmt(r['cache_load_s'], '.1f', 7)}"
              f"{_fmt(r['disk_mb'], '.0f', 8)}{r['first_s']:>8.1f}{r['median_s']:>9.1f}{r['speedup_vs_eager']:>8.2f}x"
              f"{r['cpu_median_s']:>7.1f}{r['cpu_speedup_vs_eager']:>6.2f}x{r['gflops']:>8.0f}"
              f"{100 * r['fraction_of_fp32_peak']:>5.0f}%{r['peak_mb']:>9.0f}{r['max_abs_diff']:>10.1e}"
              f"{r['dice_vs_eager']:>7.4f}{r['other_load_cores']:>6.2f}  {'; '.join(r['notes'])}")
    for v, why in skipped.items():
        print(f"{v:<20}skipped: {why}")
    if eager and "error" not in eager:
        verdict = "possible" if eager["median_s"] / 2 >= bound_s else "below the bound"
        print(f"Lower bound for any fp32 forward here: {flops / 1e12:.2f} TFLOP / {peak['fp32_gflops']:.0f} GFLOP/s "
              f"(fp32 matrix product, {peak['threads']} threads) = {bound_s:.1f} s; 2x PyTorch eager would be "
              f"{eager['median_s'] / 2:.1f} s ({verdict})."
              f" %peak: the variant's useful GFLOP/s over that rate (above 100% only with less arithmetic or bf16)")
    print("CPU s: this process's CPU time per forward (all threads; less sensitive to other load than wall time); "
          "CPU x: eager's CPU s / this one's;\n"
          "other: other processes' CPU load during the timed runs (cores, /proc/stat busy time minus own CPU time)")
    if ab and "error" in ab:
        print(f"\nA/B in one process failed: {ab['error']}")
    elif ab:
        print(f"\nA/B in one process, {args.ab_cycles} cycles (order rotated), other load per cycle "
              f"{', '.join(f'{v:.2f}' for v in ab['other_load_cores'])} cores")
        print(f"{'variant':<20}{'median s':>9}{'speed-up':>10}{'CPU s':>8}   per-cycle speed-ups")
        for v in ab["variants"]:
            per = ", ".join(f"{r:.2f}" for r in ab["speedup_per_cycle"][v])
            print(f"{v:<20}{ab['median_s'][v]:>9.1f}{ab['median_speedup'][v]:>9.2f}x{ab['cpu_median_s'][v]:>8.1f}"
                  f"   {per}")

    Path(args.o).parent.mkdir(parents=True, exist_ok=True)
    Path(args.o).write_text(json.dumps({
        "rows": rows, "ab": ab, "skipped": skipped, "runs": args.runs, "rounds": args.rounds, "patch": list(patch),
        "batch": 1, "ab_cycles": args.ab_cycles, "flops": flops, "gemm_peak": peak, "fp32_lower_bound_s": bound_s,
        "parameters": n_params, "cpu": info, "cpus": info["cpus"], "versions": _versions(),
        "machine": platform.platform(), "date": time.strftime("%Y-%m-%d")}, indent=2))
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--ab-child":
        variants, work, cycles, threads = sys.argv[2].split(","), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        print(json.dumps(ab_child(variants, work, cycles, threads or None)))
    elif len(sys.argv) > 1 and sys.argv[1] == "--child":
        variant, work, runs, threads = sys.argv[2], sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
        print(json.dumps(child(variant, work, runs, threads or None)))
    else:
        sys.exit(main())
