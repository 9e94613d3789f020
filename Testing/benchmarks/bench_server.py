"""Benchmark: ``lesionlocator serve`` and its client :class:`LesionLocatorLib.remote.RemoteRunner`
over loopback, with the server in a separate process (the real ``python -m LesionLocatorLib.cli
serve --models demo --devices cpu --max-cache-gb 4 --max-jobs-per-client 4`` with a keys file of
21 clients), so that client and server do not share a GIL and the server's memory can be read
from ``/proc/<pid>/status``. Client and server share the machine's cores.

Timed, in one run against one server:

1. Upload of a synthetic 512x512x300 int16 CT (0.8 x 0.8 x 1.5 mm; air, a body ellipse with fat,
   lungs, an organ and a spine, Gaussian noise; zlib level 1 compresses it about 3:1): the
   content ID (``serverapi.image_id``, SHA-256), the encoding (``serverapi.encode_image``) and
   the whole ``RemoteRunner.upload`` (hash + encode + send + the server's decode, ID check and
   caching), each ``--upload-runs`` times (median; the volume is already cached by step 2, which
   changes nothing: the server decodes, checks and caches it again).
2. Server memory per cached volume: the server's VmRSS before any upload and after uploading
   1, 2, 3 distinct such volumes (other noise seeds); MiB per volume = (RSS after 3 - before) / 3,
   next to the voxel bytes (150 MiB). VmHWM (peak) is recorded too.
3. Per-click overhead, remote vs in-process, demo model on the demo case
   (``Resources/Demo/demo_t0.nii.gz``, the points of ``demo_points.json`` as LPS points): one
   click = one ``SegmentationRequest`` with one point (cycling over the points), ``image_key
   "demo_t0"``. Both warmed up (``--warmup`` clicks: model load, upload), then ``--ab-clicks``
   pairs interleaved (in-process then remote, the next pair remote then in-process, ...) so that
   drift hits both; median and p95 (``numpy.percentile``, linear) of each, and the median of the
   paired differences remote - in-process (the overhead; target <= 50 ms).
4. Latency and throughput at 1, 4 and 20 concurrent clients (``--concurrency``): each client is a
   thread with its own ``RemoteRunner`` and its own API key (its own namespace on the server),
   which uploaded demo_t0 once beforehand (not timed); all start together and each does
   ``--clicks`` single-point clicks in a row. Per level: clicks, p50, p95 and max latency, and
   throughput = clicks / wall time of the level; plus the highest queue position a client was
   told ("queued on the server, position N", 1 = next).

``--devices`` is passed to ``serve`` (default cpu; e.g. cuda:0 on a GPU machine, where the
in-process runner then uses the same device). Only the demo model is benchmarked; without a GPU,
the GPU table (official-size network, random weights) is not measured and the JSON says
``"gpu": null``. Prints a table and writes ``results/bench_server.json`` (all numbers, cpus,
devices, options, date, git commit). The server's log is scanned for errors and tracebacks.

Usage: python Testing/benchmarks/bench_server.py [--upload-runs 3] [--ab-clicks 20] [--clicks 5]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(REPO))

from bench_dicom_write import _timed  # noqa: E402  (wall seconds of each of n calls)
from phantoms import synthetic_body_ct  # noqa: E402
from serve_process import ServeProcess  # noqa: E402  (Testing/serve_process.py)

SHAPE = (300, 512, 512)  # z, y, x
SPACING = (0.8, 0.8, 1.5)  # x, y, z mm
DEMO = REPO / "Resources" / "Demo"
MIB = float(1 << 20)
QUEUED = re.compile(r"queued on the server, position (\d+)")
NO_GPU = "No GPU in this session: the GPU table (official-size network, random weights) was not measured"


# ------------------------------------------------------------------------------ helpers
def _median(values) -> float:
    return float(np.median(values))


def _p95(values) -> float:
    return float(np.percentile(values, 95))


def _git_commit():
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (commit + ("+dirty" if dirty else "")) or None


def _gpu_name(devices):
    if not any(d.startswith("cuda") for d in devices):
        return None
    try:
        import torch
        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - no GPU is a normal answer here
        return None


class CpuMeter:
    """CPU used on the whole machine, by this process and by the server process, between two
    :meth:`mark` calls: ``others_cores`` is the average number of cores other processes kept busy
    (other people's tests on a shared machine disturb the latencies; this says when they did)."""

    def __init__(self, server_pid: int):
        self.server_pid = server_pid
        self.tick = float(os.sysconf("SC_CLK_TCK"))
        self.last = self._sample()

    def _sample(self) -> tuple:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
        values = [int(v) for v in fields]
        busy = sum(values) - values[3] - (values[4] if len(values) > 4 else 0)  # minus idle and iowait

        def process(pid):
            try:
                stat = Path(f"/proc/{pid}/stat").read_text()
            except OSError:
                return 0
            rest = stat[stat.rindex(")") + 2:].split()
            return int(rest[11]) + int(rest[12])  # utime + stime of all its threads

        return time.monotonic(), busy, process("self"), process(self.server_pid)

    def mark(self) -> dict:
        """CPU (cores, averaged) since the previous mark."""
        now = self._sample()
        (t0, busy0, self0, server0), (t1, busy1, self1, server1) = self.last, now
        self.last = now
        wall = max(t1 - t0, 1e-9) * self.tick
        bench, server = (self1 - self0) / wall, (server1 - server0) / wall
        return {"wall_s": t1 - t0, "all_cores": (busy1 - busy0) / wall, "bench_cores": bench, "server_cores": server,
                "others_cores": max((busy1 - busy0) / wall - bench - server, 0.0),
                "loadavg": Path("/proc/loadavg").read_text().split()[:3]}


def count_requests(runner) -> list:
    """Count the HTTP requests ``runner`` (a RemoteRunner) makes: a one-element list, incremented
    per request (submit, each long poll, upload, info), so requests per click can be reported."""
    counter = [0]
    call = runner._call

    def counted(*args, **kwargs):
        counter[0] += 1
        return call(*args, **kwargs)

    runner._call = counted
    return counter


def _log_problems(text: str) -> list:
    """Lines of the server's log that report an error, a traceback or a failed job."""
    pattern = re.compile(r"\b(ERROR|Traceback|internal error|failed after|Exception)\b")
    return [line for line in text.splitlines() if pattern.search(line)][:50]


# ------------------------------------------------------------------------------ the phases
def upload_and_memory(server: ServeProcess, key: str, runs: int, meter: CpuMeter) -> tuple:
    """Steps 1 and 2: the server's memory per cached 512x512x300 volume, then upload timings."""
    from LesionLocatorLib import serverapi
    from LesionLocatorLib.image import Image
    from LesionLocatorLib.remote import RemoteRunner

    origin = (-204.8, -204.8, -300.0)
    runner = RemoteRunner(server.url, key, timeout_s=300)
    runner.info()
    time.sleep(1.0)
    memory = [dict(server.memory(), volumes=0)]
    volumes, upload_seconds, generate_seconds = [], [], []
    for n in range(1, 4):
        t0 = time.perf_counter()
        image = Image(synthetic_body_ct(seed=n), SPACING, origin, np.eye(3))
        generate_seconds.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        runner.upload(image)
        upload_seconds.append(time.perf_counter() - t0)
        time.sleep(0.5)
        memory.append(dict(server.memory(), volumes=n))
        volumes.append(image)
        print(f"  uploaded volume {n}: {upload_seconds[-1]:.2f} s, server RSS {memory[-1]['VmRSS']:.0f} MiB",
              file=sys.stderr)
    cache = runner.info()["cache"]
    image = volumes[0]
    raw = int(np.asarray(image.array).nbytes)
    encoded = serverapi.encode_image(image)
    meter.mark()
    id_s = _timed(lambda: serverapi.image_id(image), runs)
    encode_s = _timed(lambda: serverapi.encode_image(image), runs)
    upload_s = _timed(lambda: runner.upload(image), runs)
    cpu = meter.mark()
    runner.close()
    per_volume = (memory[-1]["VmRSS"] - memory[0]["VmRSS"]) / 3
    return {
        "upload": {"shape_zyx": list(SHAPE), "spacing_xyz_mm": list(SPACING), "raw_bytes": raw,
                   "encoded_bytes": len(encoded), "ratio": raw / len(encoded), "runs": runs,
                   "image_id_s": id_s, "encode_s": encode_s, "upload_s": upload_s,
                   "image_id_median_s": _median(id_s), "encode_median_s": _median(encode_s),
                   "upload_median_s": _median(upload_s),
                   "first_uploads_s": upload_seconds, "generate_volume_s": generate_seconds, "cpu": cpu},
        "memory": {"rss_mib": memory, "rss_per_volume_mib": per_volume, "voxel_mib_per_volume": raw / MIB,
                   "server_cache_after": cache},
    }, volumes


def clicks_ab(server: ServeProcess, key: str, image, points, spec, pairs: int, warmup: int, poll_s: float,
              meter: CpuMeter) -> dict:
    """Step 3: in-process vs remote single-point clicks, interleaved."""
    from LesionLocatorLib.remote import RemoteRunner
    from LesionLocatorLib.runner import InProcessRunner, SegmentationRequest

    local = InProcessRunner()
    remote = RemoteRunner(server.url, key, poll_s=poll_s)
    requests = count_requests(remote)

    def click(runner, i):
        request = SegmentationRequest(image, [points[i % len(points)]], spec, image_key="demo_t0")
        t0 = time.perf_counter()
        response = runner.run(request)
        return time.perf_counter() - t0, response

    warm = {"in-process": [click(local, i)[0] for i in range(warmup)],
            "remote": [click(remote, i)[0] for i in range(warmup)]}
    uploads_in_warmup = remote.uploads
    rows = []
    requests_before = requests[0]
    meter.mark()
    for i in range(pairs):
        order = ("in-process", "remote") if i % 2 == 0 else ("remote", "in-process")
        row = {}
        for name in order:
            seconds, response = click(local if name == "in-process" else remote, i)
            row[name] = seconds
            row[name + " network"] = float(response.timings.get("network", float("nan")))
            row[name + " voxels"] = int(sum(int(m.sum()) for m in response.masks.values()))
        rows.append(row)
    cpu = meter.mark()
    local.close()
    remote.close()
    ms = {name: [1000 * r[name] for r in rows] for name in ("in-process", "remote")}
    diffs = [r - a for r, a in zip(ms["remote"], ms["in-process"])]
    # the same without each click's network stage (its own timing, in the server or here): what the HTTP
    # round trips, the queue and the encodings add, apart from how fast torch ran in each process
    besides = [1000 * ((r["remote"] - r["remote network"]) - (r["in-process"] - r["in-process network"]))
               for r in rows]
    mismatched = sum(1 for r in rows if r["in-process voxels"] != r["remote voxels"])
    return {"pairs": pairs, "warmup": warmup, "poll_s": poll_s, "warmup_s": warm,
            "uploads_in_warmup": uploads_in_warmup, "uploads_after_warmup": remote.uploads - uploads_in_warmup,
            "in_process_ms": ms["in-process"], "remote_ms": ms["remote"], "diff_ms": diffs,
            "in_process_median_ms": _median(ms["in-process"]), "in_process_p95_ms": _p95(ms["in-process"]),
            "remote_median_ms": _median(ms["remote"]), "remote_p95_ms": _p95(ms["remote"]),
            "overhead_median_ms": _median(diffs), "overhead_p95_ms": _p95(diffs), "target_overhead_ms": 50,
            "overhead_besides_network_median_ms": _median(besides), "overhead_besides_network_ms": besides,
            "in_process_network_median_ms": 1000 * _median([r["in-process network"] for r in rows]),
            "remote_network_median_ms": 1000 * _median([r["remote network"] for r in rows]),
            "mask_voxel_mismatches": mismatched, "remote_requests_per_click": (requests[0] - requests_before) / pairs,
            "cpu": cpu}


def concurrency(server: ServeProcess, names, image, points, spec, levels, clicks: int, poll_s: float,
                meter: CpuMeter) -> list:
    """Step 4: ``level`` client threads, each with its own key, ``clicks`` clicks each."""
    from LesionLocatorLib.remote import RemoteRunner
    from LesionLocatorLib.runner import SegmentationRequest

    runners, counters = {}, {}
    for name in names[:max(levels)]:  # warm-up, not timed: each client uploads demo_t0 once
        runner = RemoteRunner(server.url, server.clients[name], poll_s=poll_s)
        counters[name] = count_requests(runner)
        runner.info()
        runner.upload(image, runner.image_id(image, "demo_t0"))
        runners[name] = runner
    results = []
    for level in levels:
        latencies, errors, positions = [], [], []
        lock = threading.Lock()
        barrier = threading.Barrier(level + 1)

        def client(index: int, runner) -> None:
            seen = [0]

            def progress(fraction, message):
                match = QUEUED.search(message or "")
                if match:
                    seen[0] = max(seen[0], int(match.group(1)))

            barrier.wait()
            for k in range(clicks):
                request = SegmentationRequest(image, [points[(index + k) % len(points)]], spec, image_key="demo_t0")
                t0 = time.perf_counter()
                try:
                    runner.run(request, progress)
                    seconds = time.perf_counter() - t0
                    with lock:
                        latencies.append(seconds)
                except Exception as e:  # noqa: BLE001 - a failed click is counted and reported, not fatal
                    with lock:
                        errors.append(f"client {index + 1} click {k + 1}: {type(e).__name__}: {e}")
            with lock:
                positions.append(seen[0])

        uploads_before = sum(r.uploads for r in runners.values())
        requests_before = sum(c[0] for c in counters.values())
        threads = [threading.Thread(target=client, args=(i, runners[name]), daemon=True)
                   for i, name in enumerate(names[:level])]
        for thread in threads:
            thread.start()
        barrier.wait()
        meter.mark()
        t0 = time.perf_counter()
        for thread in threads:
            thread.join()
        wall = time.perf_counter() - t0
        cpu = meter.mark()
        ms = [1000 * s for s in latencies]
        results.append({"clients": level, "clicks": len(latencies), "errors": errors, "wall_s": wall,
                        "p50_ms": _median(ms) if ms else None, "p95_ms": _p95(ms) if ms else None,
                        "max_ms": max(ms) if ms else None, "min_ms": min(ms) if ms else None,
                        "throughput_per_s": len(latencies) / wall, "max_queue_position": max(positions, default=0),
                        "reuploads": sum(r.uploads for r in runners.values()) - uploads_before,
                        "requests_per_click": (sum(c[0] for c in counters.values()) - requests_before)
                        / max(len(latencies), 1),
                        "cpu": cpu, "latencies_ms": ms})
        print(f"  {level} client(s): {len(latencies)} clicks in {wall:.1f} s", file=sys.stderr)
    for runner in runners.values():
        runner.close()
    return results


# ------------------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--upload-runs", type=int, default=3, help="timed uploads of the 512x512x300 volume")
    ap.add_argument("--warmup", type=int, default=3, help="untimed clicks of each runner before the A/B clicks")
    ap.add_argument("--ab-clicks", type=int, default=20, help="in-process/remote click pairs")
    ap.add_argument("--clicks", type=int, default=5, help="clicks per client in the concurrency levels")
    ap.add_argument("--concurrency", default="1,4,20", help="comma-separated numbers of concurrent clients")
    ap.add_argument("--poll-s", type=float, default=0.5, help="RemoteRunner's long-polling wait")
    ap.add_argument("--devices", default="cpu", help="passed to serve --devices (and the in-process runner's device)")
    ap.add_argument("-o", default=str(HERE / "results" / "bench_server.json"))
    args = ap.parse_args()
    levels = [int(n) for n in args.concurrency.split(",")]
    start = time.perf_counter()

    from LesionLocatorLib.image import read_image
    from LesionLocatorLib.modelfolder import ModelSpec
    from LesionLocatorLib.prompts import Point, read_prompt_file
    from LesionLocatorLib.zoo import demo_model_dir

    devices = [d.strip() for d in args.devices.split(",") if d.strip()]
    spec = ModelSpec(str(demo_model_dir()), device=devices[0])
    demo = read_image(DEMO / "demo_t0.nii.gz")
    points = [Point(vp.id, tuple(demo.index_to_world(vp.coords))) for vp in read_prompt_file(DEMO / "demo_points.json")]
    names = [f"c{n:02d}" for n in range(1, max(levels) + 1)]
    with tempfile.TemporaryDirectory(prefix="bench_server_") as tmp:
        server = ServeProcess(Path(tmp), "--models", "demo", "--devices", ",".join(devices), "--max-cache-gb", "4",
                              "--max-jobs-per-client", "4",
                              keys={name: secrets.token_hex(16) for name in ["bench", *names]})
        try:
            server.start()
            print(f"server on {server.url}, pid {server.process.pid}", file=sys.stderr)
            meter = CpuMeter(server.process.pid)
            up, volumes = upload_and_memory(server, server.clients["bench"], args.upload_runs, meter)
            del volumes
            ab = clicks_ab(server, server.clients["bench"], demo, points, spec, args.ab_clicks, args.warmup,
                           args.poll_s, meter)
            conc = concurrency(server, names, demo, points, spec, levels, args.clicks, args.poll_s, meter)
            final_memory = server.memory()
        finally:
            server.stop()
            log_text = server.log.read_text(errors="replace") if server.log.exists() else ""
            exit_code = server.process.returncode if server.process is not None else None
    problems = _log_problems(log_text)
    gpu = _gpu_name(devices)
    total = time.perf_counter() - start

    u, m = up["upload"], up["memory"]
    print(f"lesionlocator serve benchmark ({os.cpu_count()} cpus, server devices {','.join(devices)}, demo model)")
    print(f"upload 512x512x300 int16 ({u['raw_bytes'] / MIB:.1f} MiB raw, {u['encoded_bytes'] / MIB:.1f} MiB sent)"
          f"   id {u['image_id_median_s']:.2f} s  encode {u['encode_median_s']:.2f} s  upload "
          f"{u['upload_median_s']:.2f} s (median of {u['runs']})")
    print(f"server memory per cached volume: {m['rss_per_volume_mib']:.1f} MiB (voxels {m['voxel_mib_per_volume']:.1f}"
          f" MiB); RSS " + " -> ".join(f"{r['VmRSS']:.0f}" for r in m["rss_mib"]) + " MiB for 0..3 volumes, peak "
          + " -> ".join(f"{r['VmHWM']:.0f}" for r in m["rss_mib"]) + " MiB")

    def fmt(v):
        return f"{v:8.0f}" if v is not None else f"{'-':>8}"

    print(f"{'click (1 point, demo model)':<30} {'median ms':>9} {'p95 ms':>8}")
    print(f"{'in-process':<30} {ab['in_process_median_ms']:9.1f} {ab['in_process_p95_ms']:8.1f}")
    print(f"{'remote':<30} {ab['remote_median_ms']:9.1f} {ab['remote_p95_ms']:8.1f}")
    print(f"{'overhead (paired median)':<30} {ab['overhead_median_ms']:9.1f} {ab['overhead_p95_ms']:8.1f}"
          f"   (target <= 50 ms; {ab['pairs']} pairs; other load {ab['cpu']['others_cores']:.2f} cores)")
    print(f"{'overhead besides network stage':<30} {ab['overhead_besides_network_median_ms']:9.1f}"
          f"            (network stage median: in-process {ab['in_process_network_median_ms']:.1f} ms, "
          f"server {ab['remote_network_median_ms']:.1f} ms)")
    print(f"{'clients':>7} {'clicks':>6} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'clicks/s':>8} "
          f"{'max queue position':>18} {'other load':>10} {'req/click':>9}")
    for r in conc:
        print(f"{r['clients']:>7} {r['clicks']:>6} {fmt(r['p50_ms'])} {fmt(r['p95_ms'])} {fmt(r['max_ms'])} "
              f"{r['throughput_per_s']:8.2f} {r['max_queue_position']:>18} {r['cpu']['others_cores']:10.2f} "
              f"{r['requests_per_click']:9.1f}"
              + (f"   {len(r['errors'])} error(s)" if r["errors"] else ""))
    print(f"other load: cores kept busy by processes other than this benchmark and its server (a shared machine); "
          f"req/click: HTTP requests per click (submit + long polls; {ab['remote_requests_per_click']:.1f} in the "
          f"A/B clicks)")
    if gpu is None:
        print(NO_GPU)
    if problems:
        print(f"server log: {len(problems)} error line(s), first: {problems[0]}")
    print(f"wall time {total:.0f} s")

    Path(args.o).parent.mkdir(parents=True, exist_ok=True)
    Path(args.o).write_text(json.dumps({
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "git_commit": _git_commit(),
        "cpus": os.cpu_count(), "devices": devices, "gpu": gpu, "gpu_note": NO_GPU if gpu is None else None,
        "model": "demo", "runs": {"upload_runs": args.upload_runs, "warmup": args.warmup, "ab_clicks": args.ab_clicks,
                                  "clicks": args.clicks, "concurrency": levels, "poll_s": args.poll_s},
        "upload": u, "memory": dict(m, final_rss_mib=final_memory), "clicks_ab": ab, "concurrency": conc,
        "server_log_problems": problems, "server_exit_code": exit_code, "wall_s": total}, indent=1))
    print(f"wrote {args.o}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
