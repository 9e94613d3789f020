"""Benchmark (issue #29): the CUDA path, the whole table in one call (at most ~8 minutes on an H100/H200).

Official-size networks with random weights (``build_resencl_checkpoint``: ResEnc-L, 160x224x224 patch; point and
tracking models, 5 folds) on a 512x512x300 synthetic body CT (``phantoms.synthetic_body_ct``) with lesions:

  click 1 fold, no TTA         one point prompt, end to end (``segment``), after one warm-up click
  click 5 folds x 8 flips      the same with every fold and all 8 mirrorings
  batch of 10 lesions          10 point prompts in one ``segment`` call, 1 fold, no TTA
  track 10 x 3                 10 lesions through 3 follow-ups (each moved), registration included
                               (``--registration``, default simpleitk on the CPU), 1 fold, no TTA

Each row: median seconds of ``--repeats`` runs, the peak GPU memory (``torch.cuda.max_memory_allocated``) and the
last run's stages (preprocessing on the CPU, network, postprocessing on the CPU). Two reference rows in the same run
show what the library's CUDA settings bring: the 1-fold click with ``cudnn.benchmark`` off, and the 5-fold TTA click
with one mirroring per network call instead of all 8 together (``LoadedModel.mirror_batch_limit``).
Accuracy rows: the network's logits for one patch in fp32 on the GPU vs fp32 on the CPU (max |difference|, target
<= 1e-3), and the fp16-autocast mask (the library's default on CUDA; logits accumulated in fp32) vs the fp32 mask of
the same click (Dice, target >= 0.999). Targets from the issue: <= 0.1 s per click (1 fold, no TTA), <= 1.5 s
(5 folds x 8 flips), <= 10 s for the tracking case.

Without a GPU: ``--device cpu --tiny`` runs the same table with the tiny test network on a small volume (a check
that the script works; the test suite runs it), and the accuracy rows compare CPU with CPU.

Usage: python Testing/benchmarks/bench_gpu.py WORKDIR [--device cuda] [--repeats 3] [--tiny]
       [-o results/bench_gpu.json]
On a lent GPU machine without package registries: ``Testing/benchmarks/gpu_wheels.sh`` prepares the two wheels
it lacks (SimpleITK, dynamic-network-architectures) and says how to carry them in two calls and run this script.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE.parents[1]))


def _study(shape, spacing, n_lesions: int, followups: int, seed: int = 0):
    """(images, baseline label Image, lesion centres (z, y, x)): a body CT with ``n_lesions`` +60 HU balls; each
    follow-up redraws the noise and moves the scan (origin) by a few mm."""
    from phantoms import synthetic_body_ct

    from LesionLocatorLib.image import Image

    rng = np.random.default_rng(seed)
    base = synthetic_body_ct(seed, shape, spacing).astype(np.int16)
    zz, yy, xx = np.ogrid[tuple(slice(0, n) for n in shape)]
    labels = np.zeros(shape, np.uint16)
    centres = []
    for i in range(1, n_lesions + 1):
        c = [int(rng.integers(n // 4, 3 * n // 4)) for n in shape]
        r = float(rng.uniform(3, 8)) / min(spacing)
        ball = ((zz - c[0]) * spacing[2]) ** 2 + ((yy - c[1]) * spacing[1]) ** 2 + ((xx - c[2]) * spacing[0]) ** 2 \
            <= (r * min(spacing)) ** 2
        labels[ball & (labels == 0)] = i
        centres.append(c)
    images = []
    for t in range(followups + 1):
        noisy = synthetic_body_ct(seed + 100 * t, shape, spacing).astype(np.int16) if t else base
        array = np.where(labels > 0, noisy + 60, noisy).astype(np.int16)
        images.append(Image(array, spacing, (3.0 * t, -2.0 * t, 1.5 * t)))
    return images, images[0].with_array(labels), centres


class _Gpu:
    def __init__(self, device):
        import torch

        self.torch, self.cuda = torch, device.startswith("cuda")

    def reset(self):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()

    def peak_mib(self) -> float:
        if not self.cuda:
            return float("nan")
        self.torch.cuda.synchronize()
        return self.torch.cuda.max_memory_allocated() / 2 ** 20


def _timed(gpu, repeats: int, run) -> dict:
    run()  # warm-up (cudnn autotuning, allocator)
    seconds = []
    gpu.reset()
    for _ in range(repeats):
        t0 = time.perf_counter()
        result = run()
        if gpu.cuda:
            gpu.torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    stages = {k: round(v, 4) for k, v in (getattr(result, "timings", None) or {}).items()}  # the last run's
    return {"median_s": statistics.median(seconds), "min_s": min(seconds), "peak_gpu_mib": gpu.peak_mib(),
            "stages_s": stages}


def _with_attribute(owner, name: str, value, run):
    """``run`` with ``owner.name`` set to ``value`` for its duration (the previous value restored after): the
    reference rows, e.g. ``torch.backends.cudnn.benchmark`` off or ``LoadedModel.mirror_batch_limit`` 1."""
    def reference():
        before = getattr(owner, name)
        setattr(owner, name, value)
        try:
            return run()
        finally:
            setattr(owner, name, before)
    return reference


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("work")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--registration", default="simpleitk")
    ap.add_argument("--tiny", action="store_true", help="the tiny test network on a small volume (a quick check)")
    ap.add_argument("-o", default=str(HERE / "results" / "bench_gpu.json"))
    a = ap.parse_args()
    started = time.perf_counter()
    import torch

    from build_test_models import build_resencl_checkpoint, build_tiny_checkpoint

    from LesionLocatorLib.evaluate import dice
    from LesionLocatorLib.model import load_model
    from LesionLocatorLib.predict import segment
    from LesionLocatorLib.prompts import Point
    from LesionLocatorLib.track import track

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print("no CUDA GPU here: run with --device cpu --tiny to check the script", file=sys.stderr)
        return 2
    work = Path(a.work)
    folds = (0, 1, 2, 3, 4)
    root = work / ("tiny" if a.tiny else "resencl") / "LesionLocatorCheckpoint"
    if not root.is_dir():
        if a.tiny:
            build_tiny_checkpoint(root.parent, folds=folds)
        else:
            build_resencl_checkpoint(root.parent, folds=folds, prompt_types=("point", "prev_mask"))
    shape, spacing = ((48, 96, 96), (1.6, 1.6, 2.0)) if a.tiny else ((300, 512, 512), (0.8, 0.8, 1.5))
    images, labels, centres = _study(shape, spacing, 10, 3)
    gpu = _Gpu(a.device)
    one = load_model(root, "point", folds=[0], device=a.device, tta=False)
    every = load_model(root, "point", folds=list(folds), device=a.device, tta=True)
    tracker = load_model(root, "prev_mask", folds=[0], device=a.device, tta=False)
    points = [Point(i + 1, tuple(images[0].index_to_world(c))) for i, c in enumerate(centres)]
    click_one = lambda: segment(images[0], points[:1], one)  # noqa: E731
    click_every = lambda: segment(images[0], points[:1], every)  # noqa: E731
    cases = {
        "click 1 fold, no TTA": (a.repeats, click_one),
        "  same, cudnn.benchmark off (ref.)": (a.repeats, _with_attribute(torch.backends.cudnn, "benchmark", False,
                                                                           click_one)),
        "click 5 folds x 8 flips": (max(1, a.repeats // 2), click_every),
        "  same, 1 flip per call (ref.)": (max(1, a.repeats // 2), _with_attribute(every, "mirror_batch_limit", 1,
                                                                                     click_every)),
        "batch of 10 lesions": (a.repeats, lambda: segment(images[0], points, one)),
        "track 10 x 3 (with registration)": (1, lambda: track(images, labels, tracker, registration=a.registration)),
    }
    device_name = torch.cuda.get_device_name() if gpu.cuda else platform.processor() or platform.machine()
    result = {"device": a.device, "device_name": device_name, "tiny": a.tiny, "shape": shape, "rows": {},
              "accuracy": None, "setup_s": round(time.perf_counter() - started, 1), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M")}
    print(f"\n{'tiny network' if a.tiny else 'ResEnc-L (random weights)'}, {shape[2]}x{shape[1]}x{shape[0]} CT, "
          f"{a.device} ({device_name}), median of {a.repeats}; set-up {result['setup_s']} s")
    print(f"{'case':36s} {'median s':>9s} {'min s':>8s} {'peak GPU MiB':>13s}  stages of the last run (s)", flush=True)
    for name, (repeats, run) in cases.items():  # one failing row (out of memory, ...) does not cost the others
        try:
            r = _timed(gpu, repeats, run)
            stages = ", ".join(f"{k} {v:.3f}" for k, v in r["stages_s"].items())
            print(f"{name:36s} {r['median_s']:9.3f} {r['min_s']:8.3f} {r['peak_gpu_mib']:13.0f}  {stages}", flush=True)
        except Exception as e:  # noqa: BLE001 - reported in the table and the JSON
            r = {"error": f"{type(e).__name__}: {e}"[:500]}
            print(f"{name:36s} failed: {r['error']}", flush=True)
        result["rows"][name] = r
        _write(a.o, result)  # after every row: a run cut short still leaves its rows
    try:  # accuracy: one patch in fp32 on this device vs the CPU, and fp16 autocast vs fp32 masks
        x = torch.randn((1, 2) + one.patch_size, generator=torch.Generator().manual_seed(0))
        reference = load_model(root, "point", folds=[0], device="cpu", tta=False).forward(x)
        fp16_mask = segment(images[0], points[:1], one).masks[1]
        one.cuda_fp16 = False  # fp32 on the GPU
        one_fp32 = one.forward(x)
        fp32_mask = segment(images[0], points[:1], one).masks[1]
        result["accuracy"] = {"max_abs_logit_diff_fp32_vs_cpu": float((one_fp32 - reference).abs().max()),
                              "dice_fp16_vs_fp32": float(dice(fp16_mask, fp32_mask))}
        print(f"fp32 logits on {a.device} vs CPU: max |diff| "
              f"{result['accuracy']['max_abs_logit_diff_fp32_vs_cpu']:.1e} (target <= 1e-3); fp16 autocast vs fp32 "
              f"mask: Dice {result['accuracy']['dice_fp16_vs_fp32']:.4f} (target >= 0.999)")
    except Exception as e:  # noqa: BLE001
        result["accuracy"] = {"error": f"{type(e).__name__}: {e}"[:500]}
        print(f"accuracy rows failed: {result['accuracy']['error']}")
    _write(a.o, result)
    print(f"wrote {a.o}")
    return 0 if all("error" not in r for r in result["rows"].values()) and "error" not in result["accuracy"] else 1


def _write(path: str, result: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    sys.exit(main())
