"""The 1024x768 targets of the CPU bench, measured back to back several times (docs/benchmarks.md).

    python -m benchmarks.loop_pairs --work /tmp/bench/work2 --set 1024x768-n64 --model dlv3p_b2_384 --rounds 6

Each round measures, one right after the other: (a') ONNX Runtime's forward bound (legitseg's
cached graph and session settings, ready tensors, best of batch 1/2/4), (b) the researcher's
loop over the set, and (c) one default `legitseg run` of the set (steady rate, as the bench
computes it). The machine's speed drifts by 10-20% over minutes, so ratios of numbers taken
seconds apart say more than ratios across a whole bench; the medians of the per-round ratios
close the table. Needs a work folder prepared by `make bench` (its manifest, weights, sets).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from benchmarks import measure  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--set", default="1024x768-n64")
    ap.add_argument("--model", default="dlv3p_b2_384")
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--min-time", type=float, default=2.0)
    args = ap.parse_args()
    work = args.work.resolve()
    os.environ["LEGITSEG_CACHE_DIR"] = str(work / "cache")  # the bench's graphs and choices

    from legitseg.inference.ort_runner import available_cores, ort_session
    from legitseg.manifest.spec import load_manifest
    from legitseg.models.factory import load_model
    from legitseg.options import Environment

    env = Environment.read()

    manifest, folder = work / "models.yaml", work / "sets" / args.set
    loaded = load_model(load_manifest(manifest).select([args.model])[0])
    spec = loaded.spec
    threads = env.ort_threads or available_cores()
    session = ort_session(loaded, threads, env.cache_dir)
    files = sorted(folder.glob("*.jpg"))
    loop_model = measure.LoopModel(args.model, loaded.module, spec.input_size, loaded.mean, loaded.std, spec.task)
    rows = []
    print("round | (a') ORT bound | (b) loop | (c) legitseg steady | (c)/(a') | (c)/(b) | backend | images/call")
    for i in range(args.rounds):
        bound = measure.ort_forward_bound(session, args.model, spec.in_channels, spec.input_size, [1, 2, 4],
                                          args.min_time, threads).best[2]
        loop = measure.researcher_loop([loop_model], files, work / "out" / "pairs-loop", torch.device("cpu")).img_s
        out = work / "out" / "pairs-run"
        run = measure.legitseg_run(measure.legitseg_command(manifest, [args.model], folder, out, "cpu", "fp32",
                                                            "auto"), out, len(files))
        variant = run.variants.get(args.model)
        rows.append((bound, loop, run.steady_img_s))
        print(f"{i + 1} | {bound:.2f} | {loop:.2f} | {run.steady_img_s:.2f} | {run.steady_img_s / bound:.2f} | "
              f"{run.steady_img_s / loop:.2f} | {run.backends[args.model]} | {variant}", flush=True)
    print(f"median | {statistics.median(r[0] for r in rows):.2f} | {statistics.median(r[1] for r in rows):.2f} | "
          f"{statistics.median(r[2] for r in rows):.2f} | {statistics.median(r[2] / r[0] for r in rows):.2f} | "
          f"{statistics.median(r[2] / r[1] for r in rows):.2f} | |")


if __name__ == "__main__":
    main()
