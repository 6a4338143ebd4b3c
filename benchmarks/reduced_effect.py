"""What `decode: reduced` changes: probabilities, masks and grades against the full decode.

    .venv/bin/python benchmarks/reduced_effect.py                       # bench model on bench photos
    .venv/bin/python benchmarks/reduced_effect.py --manifest models.yaml --images examples/images

For every model (stretch) and every JPEG: the model's input from the full decode and from the
reduced one (images/reduced.py), torch logits of each, the results at the photo's full size;
prints per model the reduction used, max and mean |dp|, the share of mask pixels that differ,
the largest change of a class's area fraction, and grade/score changes, as JSON and a table.
Timings of the two decodes are printed too (informative only on an idle machine).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import workload  # noqa: E402


def compare(loaded, files: list[Path]) -> dict:
    from legitseg.images.decode import load_image
    from legitseg.images.reduced import reduction, upright_size
    from legitseg.images.sources import Source
    from legitseg.inference.postprocess import segmentation, severity
    from legitseg.inference.runners import prep_for
    from legitseg.inference.torch_runner import TorchRunner

    spec = loaded.spec
    runner = TorchRunner(loaded, torch.device("cpu"), "fp32")
    full_prep = replace(prep_for(loaded), reduced=False)
    red_prep = replace(full_prep, reduced=True)
    rows, t_full, t_red = [], 0.0, 0.0
    for path in files:
        data = path.read_bytes()
        size = upright_size(data)
        if size is None:
            continue
        k = reduction(size, spec.input_size)
        t = time.perf_counter()
        a = load_image(Source(path, path.name), [full_prep], 10**9)
        t_full += time.perf_counter() - t
        t = time.perf_counter()
        b = load_image(Source(path, path.name), [red_prep], 10**9)
        t_red += time.perf_counter() - t
        z = runner.logits([a.inputs[full_prep], b.inputs[red_prep]])
        row = {"image": path.name, "size": list(a.size), "reduction": k}
        if spec.task == "severity":
            ra, rb = severity(z[0], spec), severity(z[1], spec)
            row.update(max_dp=float(np.abs(np.subtract(ra.probabilities, rb.probabilities)).max()),
                       grade_changed=ra.grade != rb.grade, score_delta=abs(ra.score - rb.score))
        else:
            ra, rb = segmentation(z[0], a.size, spec, True), segmentation(z[1], b.size, spec, True)
            dp = np.abs(ra.probabilities.astype(np.float32) - rb.probabilities.astype(np.float32))
            row.update(max_dp=float(dp.max()), mean_dp=float(dp.mean()),
                       mask_changed=float((ra.mask != rb.mask).mean()),
                       area=ra.area_fraction,
                       area_delta=max(abs(ra.area_fraction[c] - rb.area_fraction[c]) for c in ra.area_fraction))
        rows.append(row)
    n = max(1, len(rows))
    summary = {"model": spec.name, "images": len(rows), "reductions": sorted({r["reduction"] for r in rows}),
               "decode_ms_full": 1000 * t_full / n, "decode_ms_reduced": 1000 * t_red / n,
               "max_dp": max((r["max_dp"] for r in rows), default=0.0)}
    reduced_rows = [r for r in rows if r["reduction"] > 1]
    if spec.task == "severity":
        summary.update(grades_changed=sum(r["grade_changed"] for r in rows),
                       max_score_delta=max((r["score_delta"] for r in rows), default=0.0))
    else:
        summary.update(mean_dp=float(np.mean([r["mean_dp"] for r in reduced_rows])) if reduced_rows else 0.0,
                       mask_changed_mean=float(np.mean([r["mask_changed"] for r in reduced_rows])) if reduced_rows else 0.0,
                       mask_changed_max=max((r["mask_changed"] for r in rows), default=0.0),
                       area_delta_max=max((r["area_delta"] for r in rows), default=0.0))
    return {"summary": summary, "rows": rows}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--manifest", type=Path, help="models.yaml (default: the bench's, with the calibrated head)")
    p.add_argument("--models", help="comma-separated names (default: every stretch model)")
    p.add_argument("--images", type=Path, help="folder of JPEGs (default: bench photos, --size)")
    p.add_argument("--size", default="4000x3000", help="bench photo size when --images is not given")
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--work", type=Path, default=REPO / "bench-data")
    p.add_argument("--out-json", type=Path)
    args = p.parse_args(argv)
    from legitseg.manifest.spec import load_manifest
    from legitseg.models.factory import load_model

    manifest = args.manifest or workload.write_manifest([workload.PRODUCTION["dlv3p_b2_384"]], args.work)
    if args.images:
        files = sorted(f for f in args.images.iterdir() if f.suffix.lower() in (".jpg", ".jpeg"))[:args.count]
    else:
        w, h = (int(v) for v in args.size.split("x"))
        files = workload.image_pool(args.work, w, h, args.count)[:args.count]
    specs = load_manifest(manifest)
    names = args.models.split(",") if args.models else [n for n, s in specs.models.items() if s.resize == "stretch"]
    results = []
    for name in names:
        result = compare(load_model(specs.select([name])[0]), files)
        results.append(result)
        print(json.dumps(result["summary"]), flush=True)
    if args.out_json:
        args.out_json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
