"""One `legitseg run` row of an older tree and of this one, alternated on the same machine.

    python -m benchmarks.alternate --old 8c3ebd1 --images bench-data/sets/1024x768-n64 \
        --manifest bench-data/models.yaml --model dlv3p_b2_384 --backend onnxruntime --rounds 3

The older tree is `git archive`d to a temporary folder and run from there (PYTHONPATH), with
this checkout's interpreter and the same images, manifest and models; the manifest must be
one the older tree reads (no fields it does not know). Old and new take turns, so a machine
that slows down or speeds up during the runs weighs on both alike. Each run prints the steady
rate (`measure.rates`: between two full pipelines, the fill and the drain left out) and the
whole process's wall time; then the means. Timings mean something only on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks import measure

REPO = Path(__file__).resolve().parents[1]


def _tree(commit: str, where: Path) -> Path:
    where.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "archive", commit], cwd=REPO, capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    return where


def _run(tree: Path, args: argparse.Namespace, out: Path) -> tuple[float, float, str, float]:
    """(steady img/s, process wall s, backend run, peak RSS MB) of one run of `tree`."""
    command = measure.legitseg_command(args.manifest.resolve(), [args.model], args.images.resolve(), out.resolve(),
                                       "cpu", "fp32", args.backend, ["--batch-size", str(args.batch_size)])
    env = measure.child_env()
    env["PYTHONPATH"] = str(tree)  # this tree's legitseg, not the checkout's
    images = sum(1 for p in args.images.iterdir() if p.is_file())
    start = time.monotonic()
    # Run from inside the tree: `python -m` puts the working folder first on sys.path, ahead of
    # PYTHONPATH, so from this checkout both runs would import this checkout's legitseg.
    result = measure.legitseg_run(command, out, images, k=args.batch_size, env=env, cwd=tree)
    ran = subprocess.run([sys.executable, "-c", "import legitseg, sys; sys.stdout.write(legitseg.__file__)"],
                         env=env, cwd=tree, capture_output=True, text=True, check=True).stdout
    if not Path(ran).resolve().is_relative_to(tree.resolve()):
        raise SystemExit(f"{tree}: legitseg imported from {ran}, not from the tree")
    backend = json.loads((out / "run.json").read_text())["models"][args.model].get("backend", "torch")
    return result.steady_img_s, time.monotonic() - start, backend, result.peak_rss_mb


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--old", required=True, help="the older commit")
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--manifest", type=Path, required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--backend", default="torch")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="legitseg-alternate-") as tmp:
        trees = {"old": _tree(args.old, Path(tmp) / "old"), "new": REPO}
        seen: dict[str, list[tuple[float, float]]] = {"old": [], "new": []}
        for r in range(args.rounds):
            for name, tree in trees.items():
                rate, wall, backend, rss = _run(tree, args, Path(tmp) / f"out-{name}")
                seen[name].append((rate, wall))
                print(f"round {r + 1} {name:3s}: steady {rate:6.2f} img/s, wall {wall:5.2f} s, peak RSS {rss:.0f} MB, "
                      f"ran {backend}", flush=True)
        for name, rows in seen.items():
            rates, walls = [x for x, _ in rows], [w for _, w in rows]
            print(f"{name} ({args.old if name == 'old' else 'this tree'}): steady mean {sum(rates) / len(rates):.2f} "
                  f"img/s ({', '.join(f'{x:.2f}' for x in rates)}), wall mean {sum(walls) / len(walls):.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
