"""Per-image CPU around the forward pass, stage by stage, on realistic masks (issue 26).

    .venv/bin/python benchmarks/cpu_stages.py [--sizes 1024x768,4000x3000] [--count 8]

The calibrated bench model (DeepLabV3Plus + efficientnet-b2 @384, head centred and sharpened:
masks cover about half of each photo with real boundaries) gives the logits once per photo;
then every step legitseg takes around the forward pass is timed on its own, one image at a
time, wall and CPU milliseconds: read+hash, header, decode (full, and `decode: reduced`),
resize, upsample, threshold, areas, components, PNG encode, record JSON, write+fsync (mask and
record). Run it on an idle machine; on a shared one the numbers only rank the stages.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import workload  # noqa: E402
from benchmarks.measure import StepClock  # noqa: E402

STAGES = ("read+hash", "header", "decode", "decode reduced", "resize", "upsample", "threshold", "areas",
          "components", "png encode", "record json", "write+fsync")


def stages(loaded, files: list[Path], out: Path) -> dict[str, dict[str, float]]:
    from dataclasses import replace

    from legitseg.fsio import atomic_write, sha256_bytes
    from legitseg.images.decode import (
        check_header,
        decode_8bit,
        prepare,
        read_bytes,
    )
    from legitseg.images.reduced import decode_reduced, reduction, upright_size
    from legitseg.inference import postprocess
    from legitseg.inference.runners import prep_for
    from legitseg.inference.torch_runner import TorchRunner
    from legitseg.manifest.choices import DEFAULT_MAX_PIXELS
    from legitseg.output.writers import encode_png

    spec = loaded.spec
    runner = TorchRunner(loaded, torch.device("cpu"), "fp32")
    prep = replace(prep_for(loaded), reduced=False)
    wall = dict.fromkeys(STAGES, 0.0)
    cpu = dict.fromkeys(STAGES, 0.0)
    areas = []
    for i, path in enumerate(files):
        clock = StepClock()
        mark = clock.mark
        data = read_bytes(path)
        digest = sha256_bytes(data)
        mark()
        fmt = check_header(data, DEFAULT_MAX_PIXELS)
        mark()
        decoded, bgr = decode_8bit(data, fmt)  # as load_image: only the model's input converted to RGB
        mark()
        size = upright_size(data) or decoded.shape[:2]
        decode_reduced(data, max(2, reduction(size, spec.input_size)), size)
        mark()
        arr = prepare(decoded, prep, bgr=bgr)
        mark()
        logits = runner.logits([arr])[0]  # not timed: the forward pass
        mark()  # the forward pass ends here: the interval before this mark is not a stage
        with torch.inference_mode():
            up = postprocess.upsample(logits, decoded.shape[:2])
        mark()
        mask = np.greater(up.numpy()[0], postprocess.sigmoid_cutoff(spec.threshold)).view(np.uint8)
        mark()
        positive = int(np.count_nonzero(mask))
        mark()
        components = postprocess.count_components(mask, 1, binary=True)
        mark()
        png = encode_png(mask)
        mark()
        record = json.dumps({"image": str(path), "sha256": digest, "size": list(mask.shape),
                             "area_fraction": positive / mask.size, "components": components}).encode()
        mark()
        atomic_write(out / f"{i}.png", png)
        atomic_write(out / f"{i}.json", record)
        mark()
        if i == 0:
            continue  # warm-up
        steps = [s for k, s in enumerate(clock.steps()) if k != 5]  # interval 5 is the forward pass
        for key, (spent, used) in zip(STAGES, steps, strict=True):
            wall[key] += spent
            cpu[key] += used
        areas.append(positive / mask.size)
    n = max(1, len(files) - 1)
    return {"wall_ms": {k: 1000 * v / n for k, v in wall.items()}, "cpu_ms": {k: 1000 * v / n for k, v in cpu.items()},
            "mask_area": float(np.mean(areas)) if areas else None, "images": n}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1024x768,4000x3000")
    p.add_argument("--count", type=int, default=8)
    p.add_argument("--work", type=Path, default=REPO / "bench-data")
    args = p.parse_args(argv)
    from legitseg.manifest.spec import load_manifest
    from legitseg.models.factory import load_model

    manifest = workload.write_manifest([workload.PRODUCTION["dlv3p_b2_384"]], args.work)
    loaded = load_model(load_manifest(manifest).select(["dlv3p_b2_384"])[0])
    print("| stage | " + " | ".join(f"{s} wall ms | {s} CPU ms" for s in args.sizes.split(",")) + " |")
    results = {}
    for size in args.sizes.split(","):
        w, h = (int(v) for v in size.split("x"))
        files = workload.image_pool(args.work, w, h, args.count)[:args.count]
        with tempfile.TemporaryDirectory(dir=args.work) as out:
            results[size] = stages(loaded, files, Path(out))
    for key in STAGES:
        cells = [f"{results[s]['wall_ms'][key]:.1f} | {results[s]['cpu_ms'][key]:.1f}" for s in results]
        print(f"| {key} | " + " | ".join(cells) + " |")
    print("| total (without decode reduced) | " + " | ".join(
        f"{sum(v for k, v in results[s]['wall_ms'].items() if k != 'decode reduced'):.1f} | "
        f"{sum(v for k, v in results[s]['cpu_ms'].items() if k != 'decode reduced'):.1f}" for s in results) + " |")
    print(json.dumps({s: {"mask_area": r["mask_area"], "images": r["images"]} for s, r in results.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
