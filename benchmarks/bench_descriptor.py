"""Benchmark of fitting.descriptor: forward and forward+backward time per batch.

    .venv/bin/python benchmarks/bench_descriptor.py [--backbone vgg16-hed] [--runs 5]
        [--threads 2] [--batches 1,4,16] [--out benchmarks/results/descriptor.json]

For each batch size: a warm-up call, then the median (and min/max) of N timed runs of
  * forward:           ``describe(x)`` without autograd (the ranking / reference path),
  * forward+backward:  ``descriptor_distance(describe(x), target).sum().backward()`` with x
                       requiring grad (the refinement loss path).
Also times ``describe_reference`` on a 1024x1024 image (16 tiles) and the first construction
(weight loading). Writes a JSON with the machine info next to the numbers, including the load
average: on a shared machine other jobs inflate the times (rerun when the load is < 1; the
minimum and the CPU time are less sensitive to it than the median). The budget checked
(``within_budget``: best of N; ``within_budget_median``) is one 256x256 image forward <= 0.3 s.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

BUDGET_S = 0.3


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _timed(fn, runs: int) -> dict:
    """Wall time (median, min, max) and process CPU time per run (median, all threads summed).

    On a shared machine wall time grows with other jobs' load; CPU time much less (it still
    includes OpenMP spin-waiting), so cpu/threads is a rough estimate of the unloaded wall time.
    """
    fn()  # warm-up
    ts, cs = [], []
    for _ in range(runs):
        c = time.process_time()
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
        cs.append(time.process_time() - c)
    return {"median_s": statistics.median(ts), "min_s": min(ts), "max_s": max(ts), "runs": runs,
            "cpu_median_s": statistics.median(cs)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--backbone", default="vgg16-hed")
    ap.add_argument("--work-size", type=int, default=256)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", default="1,4,16")
    ap.add_argument("--no-reference", action="store_true", help="skip the describe_reference timing")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "descriptor.json"))
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    load_start = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    from fitting.describe.descriptor import TextureDescriptor, descriptor_distance, synthetic_textures

    t0 = time.perf_counter()
    desc = TextureDescriptor(args.backbone, work_size=args.work_size)
    load_s = time.perf_counter() - t0
    s = args.work_size
    tex = synthetic_textures(16, s, seed=1)
    target = desc.describe(torch.from_numpy(np.stack(synthetic_textures(1, s, seed=2)))[:, None])

    results = []
    for b in [int(v) for v in args.batches.split(",")]:
        x = torch.from_numpy(np.stack([tex[i % len(tex)] for i in range(b)]))[:, None].contiguous()

        def fwd():
            with torch.no_grad():
                desc.describe(x)

        def fwd_bwd():
            xx = x.clone().requires_grad_(True)
            descriptor_distance(desc.describe(xx), target).sum().backward()

        runs_fb = max(2, args.runs // 2) if b >= 16 else args.runs
        f = _timed(fwd, args.runs)
        fb = _timed(fwd_bwd, runs_fb)
        row = {"batch": b, "forward": f, "forward_backward": fb,
               "forward_per_image_s": f["median_s"] / b, "forward_backward_per_image_s": fb["median_s"] / b}
        results.append(row)
        print(f"batch {b:3d}: forward {f['median_s']:.3f} s ({row['forward_per_image_s']:.3f} s/img, "
              f"min {f['min_s'] / b:.3f}, cpu {f['cpu_median_s']:.3f} s), "
              f"forward+backward {fb['median_s']:.3f} s ({row['forward_backward_per_image_s']:.3f} s/img, "
              f"min {fb['min_s'] / b:.3f}, cpu {fb['cpu_median_s']:.3f} s)", flush=True)

    ref = None
    if not args.no_reference:
        big = np.tile(np.stack(synthetic_textures(1, 512, seed=3))[0], (2, 2))
        r = _timed(lambda: desc.describe_reference(big, max_tiles=16), max(1, args.runs // 2))
        ref = {"image": "1024x1024", "tiles": 16, **r}
        print(f"describe_reference 1024x1024 (16 tiles): {r['median_s']:.3f} s", flush=True)

    first = results[0]["forward"] if results and results[0]["batch"] == 1 else None
    out = {
        "benchmark": "descriptor",
        "date_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "backbone": desc.backbone_id,
        "work_size": s,
        "dim": desc.dim,
        "layers": list(desc.layers),
        "first_load_s": load_s,
        "budget_forward_1_image_s": BUDGET_S,
        # best-of-N is what the code can do; the median also shows what other jobs cost
        "within_budget": None if first is None else first["min_s"] <= BUDGET_S,
        "within_budget_median": None if first is None else first["median_s"] <= BUDGET_S,
        "results": results,
        "describe_reference": ref,
        "machine": {
            "cpu": _cpu_model(),
            "logical_cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "platform": platform.platform(),
            "mkldnn": torch.backends.mkldnn.is_available(),
            "loadavg_at_start": load_start,
            "loadavg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        },
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
