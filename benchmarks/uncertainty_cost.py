"""Cost of uncertainty (docs/uncertainty.md): a run that saves probabilities, with and without
`uncertainty: true`, on the demo models and the same images.

    PYTHONPATH=. HF_HUB_OFFLINE=1 python -m benchmarks.uncertainty_cost --images 8 --size 1024x768

Each setting runs `python -m legitseg run ... --save-probabilities` as a subprocess `--repeat`
times (fresh OUT each time, alternating); the row gives the best wall time of each and the
ratio (target <= 1.05). The demo manifest is used as it is (no TTA), so the ratio is the cost
of the measures alone; the images are photo-like pictures of `--size`.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from benchmarks.workload import image_set

REPO = Path(__file__).resolve().parent.parent


def manifest(work: Path, uncertainty: bool) -> Path:
    data = yaml.safe_load((REPO / "models.yaml").read_text())
    for entry in data["models"].values():
        entry["weights"] = str(REPO / entry["weights"])
        if uncertainty:
            entry["uncertainty"] = True
    path = work / ("uncertainty.yaml" if uncertainty else "plain.yaml")
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def timed_run(images: Path, manifest_path: Path, out: Path, device: str) -> float:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "legitseg", "run", str(images), "-m", str(manifest_path), "-o", str(out),
                    "--save-probabilities", "--device", device, "-q"], check=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--size", default="1024x768", help="WIDTHxHEIGHT")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory(prefix="legitseg-uncertainty-") as tmp:
        work = Path(tmp)
        images = image_set(work, width, height, args.images)
        plain, unc = manifest(work, False), manifest(work, True)
        times: dict[str, list[float]] = {"plain": [], "uncertainty": []}
        for _ in range(args.repeat):
            times["plain"].append(timed_run(images, plain, work / "out", args.device))
            times["uncertainty"].append(timed_run(images, unc, work / "out", args.device))
    best = {k: min(v) for k, v in times.items()}
    print(json.dumps({"row": "uncertainty on, probabilities saved", "images": args.images, "size": args.size,
                      "device": args.device, "plain_s": round(best["plain"], 3),
                      "uncertainty_s": round(best["uncertainty"], 3),
                      "ratio": round(best["uncertainty"] / best["plain"], 4), "target": 1.05}))


if __name__ == "__main__":
    main()
