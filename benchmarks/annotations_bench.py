"""Export time, peak memory and file sizes of `legitseg annotations` on a large OUT.

    python benchmarks/annotations_bench.py --images 10000 --work /tmp/annot-bench

A real `legitseg run` of the demo models over four demo photos resized to 1024x768 (with
--save-probabilities) gives real masks and maps; the big OUT repeats them: each of its
records is a distinct image (its own name, path and sha256) whose mask and probability
map are hard links to the real ones, so 10,000 images cost seconds and no disk. Each
format is then exported by `python -m legitseg annotations` as its own process, whose
wall time and peak RSS (wait4's ru_maxrss) are reported with the size of what it wrote.
The numbers mean something only on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import cv2

REPO = Path(__file__).resolve().parent.parent
PHOTOS = ["case01.jpg", "case02.jpg", "case05.jpg", "case07.jpg"]
SIZE = (1024, 768)  # width, height
FORMATS = {"coco (RLE)": ["-f", "coco"], "coco --polygons": ["-f", "coco", "--polygons"],
           "geojson": ["-f", "geojson"]}


def legitseg(*args: str, cwd: Path | None = None) -> tuple[float, float]:
    """Run `python -m legitseg ARGS`; (wall seconds, peak RSS in MB). Raises on a non-zero exit."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "legitseg", *args], cwd=cwd, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode() if proc.stderr else ""
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"legitseg {' '.join(args)} exited {proc.returncode}:\n{err[-2000:]}")
    return wall, usage.ru_maxrss / 1024


def real_out(work: Path) -> Path:
    """The demo segmentation models over four demo photos at 1024x768."""
    src, out = work / "photos", work / "real"
    if (out / "run.json").is_file():
        return out
    src.mkdir(parents=True, exist_ok=True)
    for name in PHOTOS:
        img = cv2.imread(str(REPO / "examples" / "images" / name), cv2.IMREAD_COLOR)
        cv2.imwrite(str(src / name), cv2.resize(img, SIZE, interpolation=cv2.INTER_AREA))
    legitseg("run", str(src), "-m", str(REPO / "models.yaml"), "-o", str(out), "--quiet", "--device", "cpu",
             "--models", "erythema_segmenter,lesion_segmenter", "--save-probabilities")
    return out


def big_out(real: Path, dest: Path, n: int) -> Path:
    """OUT of `n` distinct records whose masks and maps are hard links to `real`'s."""
    if dest.exists():
        shutil.rmtree(dest)
    (dest / "records").mkdir(parents=True)
    for name in ("run.json", ".legitseg-out"):
        if (real / name).exists():
            shutil.copy2(real / name, dest / name)
    shutil.copytree(real / "runs", dest / "runs")
    records = [json.loads(p.read_text()) for p in sorted((real / "records").glob("*.json"))]
    for i in range(n):
        rec = json.loads(json.dumps(records[i % len(records)]))
        name = f"img{i:05d}.jpg"
        rec["name"], rec["image"], rec["source"] = name, f"photos/{name}", f"/data/photos/{name}"
        rec["sha256"] = hashlib.sha256(name.encode()).hexdigest()
        for model, entry in rec["models"].items():
            for key, folder, suffix in (("mask", "masks", ".png"), ("probability_map", "probabilities", ".npz")):
                if entry.get(key):
                    link = dest / folder / model / f"{name}{suffix}"
                    link.parent.mkdir(parents=True, exist_ok=True)
                    os.link(real / entry[key], link)
                    entry[key] = f"{folder}/{model}/{name}{suffix}"
        (dest / "records" / f"{name}.json").write_text(json.dumps(rec))
    return dest


def size_mb(path: Path) -> float:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    return sum(p.stat().st_size for p in files) / 1e6


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--work", type=Path, default=REPO / "out" / "annotations-bench")
    args = parser.parse_args(argv)
    real = real_out(args.work)
    t0 = time.perf_counter()
    out = big_out(real, args.work / f"out-{args.images}", args.images)
    print(f"OUT of {args.images} images (1024x768, 2 segmentation models, probabilities saved) "
          f"built in {time.perf_counter() - t0:.1f} s", flush=True)
    print("| format | images | seconds | images/s | peak RSS (MB) | written (MB) | files |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for label, fmt in FORMATS.items():
        dest = args.work / f"export-{label.split()[0]}{'-poly' if '--polygons' in fmt else ''}"
        dest = dest / "coco.json" if "coco" in fmt else dest
        wall, rss = legitseg("annotations", str(out), *fmt, "-o", str(dest), "--quiet")
        files = 1 if dest.is_file() else sum(1 for p in dest.rglob("*") if p.is_file())
        print(f"| {label} | {args.images} | {wall:.1f} | {args.images / wall:.0f} | {rss:.0f} | "
              f"{size_mb(dest):.1f} | {files} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
