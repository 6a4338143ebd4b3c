"""Cost of the `quality:` policy: the same run with and without it, on photo-like JPEGs.

    python -m benchmarks.quality_cost                          # 12 MP, 16 images, the demo models, CPU
    python -m benchmarks.quality_cost --size 1000x750 --images 2 --repeats 1   # a smoke run

Prints one row: seconds per image without and with the policy (best of `--repeats`, each a
fresh OUT, so every image is decoded and measured), their ratio, and the measures alone on
one decoded image (`images.quality.measures`, min of 5). The issue's bound: at most 3% of a
12 MP run's time. Timings are only meaningful on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import time
from pathlib import Path

import cv2
import yaml

from benchmarks.measure import child_env, legitseg_command
from benchmarks.workload import image_set

REPO = Path(__file__).resolve().parents[1]


def _timed_run(command: list[str], out: Path) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run(command, check=True, env=child_env())
    return time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", default="4000x3000", help="WIDTHxHEIGHT of the JPEGs")
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--manifest", type=Path, default=REPO / "models.yaml")
    parser.add_argument("--work", type=Path, default=REPO / "bench-data")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    images = image_set(args.work, width, height, args.images)
    # The same manifest with the default policy added (limits never change what a run costs).
    data = yaml.safe_load(args.manifest.read_text())
    for body in data["models"].values():
        for key in ("weights",):
            if isinstance(body.get(key), str):
                body[key] = str((args.manifest.parent / body[key]).resolve())
    with_policy = args.work / "quality-models.yaml"
    with_policy.write_text(yaml.safe_dump({**data, "quality": {"on_inadequate": "flag"}}, sort_keys=False))
    models = list(data["models"])
    times = {}
    for label, manifest in (("off", args.manifest), ("on", with_policy)):
        out = args.work / f"quality-out-{label}"
        command = legitseg_command(manifest, models, images, out, args.device, "fp32", args.backend)
        times[label] = min(_timed_run(command, out) for _ in range(args.repeats)) / args.images

    from legitseg.images.quality import measures

    rgb = cv2.cvtColor(cv2.imread(str(next(images.glob("*.jpg")))), cv2.COLOR_BGR2RGB)
    alone = min(_time(lambda: measures(rgb)) for _ in range(5))
    print("| size | images | device | s/image, no policy | s/image, quality: on | ratio | measures alone (s) |")
    print("|---|---:|---|---:|---:|---:|---:|")
    print(f"| {width}x{height} | {args.images} | {args.device} | {times['off']:.3f} | {times['on']:.3f} | "
          f"{times['on'] / times['off']:.3f} | {alone:.4f} |")
    return 0


def _time(call) -> float:
    start = time.perf_counter()
    call()
    return time.perf_counter() - start


if __name__ == "__main__":
    raise SystemExit(main())
