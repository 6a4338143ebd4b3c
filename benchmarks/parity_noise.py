"""How far torch differs from itself, and ONNX Runtime from torch, on the bench's sharp models.

    .venv/bin/python benchmarks/parity_noise.py [--models dlv3p_b2_384,unet_r101_512,severity_b2_384]

The table behind the parity rule (docs/onnx.md, "The measurements behind it"). Reference:
torch channels_last, 2 threads, batch 4 (the gate's reference runner); each other execution
(contiguous, 1 thread, batch 1, ONNX Runtime) on 4 bench photos and on the gate's probe batch.
Prints one JSON object per model; no timing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from benchmarks import workload  # noqa: E402


def figures(spec, ref: torch.Tensor, z: torch.Tensor) -> dict:
    d = (z - ref).abs()
    out = {"max_dz": float(d.max()), "relative": float(d.max() / max(1.0, float(ref.abs().max())))}
    if spec.task == "segmentation" and spec.classes == 1:
        p0, p1 = torch.sigmoid(ref), torch.sigmoid(z)
        a16, b16 = p0.half().numpy(), p1.half().numpy()
        steps = np.abs(a16.astype(np.float32) - b16.astype(np.float32)) / np.spacing(np.maximum(a16, b16))
        flips = (ref > 0) != (z > 0)
        out.update(max_dp=float((p0 - p1).abs().max()), float16_changed_share=float((a16 != b16).mean()),
                   float16_max_steps=float(steps.max()), mask_changed_share=float(flips.float().mean()),
                   largest_changed_abs_logit=float(ref.abs()[flips].max()) if flips.any() else 0.0)
    else:
        p0, p1 = torch.softmax(ref, 1), torch.softmax(z, 1)
        out.update(max_dp=float((p0 - p1).abs().max()), grades_changed=int((ref.argmax(1) != z.argmax(1)).sum()))
    return out


def measure(work: Path, name: str, spec) -> dict:
    from legitseg.inference.ort_runner import OrtRunner, make_session
    from legitseg.inference.runners import probe_arrays
    from legitseg.inference.torch_runner import TorchRunner
    from legitseg.models.factory import load_model
    from legitseg.models.onnx_export import cached_onnx

    loaded = load_model(spec)
    model = workload.PRODUCTION.get(name) or workload.TINY[name]

    def logits(runner, arrays, batch):
        return torch.cat([runner.logits(arrays[i:i + batch]).float() for i in range(0, len(arrays), batch)])

    def torch_run(channels_last: bool, threads: int, batch: int, arrays) -> torch.Tensor:
        saved = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            return logits(TorchRunner(loaded, torch.device("cpu"), "fp32", channels_last=channels_last), arrays, batch)
        finally:
            torch.set_num_threads(saved)

    ort = OrtRunner(loaded, make_session(cached_onnx(loaded).data, 2))
    result = {}
    for label, arrays in (("photos", workload.calibration_photos(work, model, 4)), ("probe", probe_arrays(spec)[0])):
        ref = torch_run(True, 2, 4, arrays)
        row = {"max_abs_logit": float(ref.abs().max()), "logit_std": float(ref.std())}
        for what, z in (("torch contiguous", torch_run(False, 2, 4, arrays)),
                        ("torch 1 thread", torch_run(True, 1, 4, arrays)),
                        ("torch batch 1", torch_run(True, 2, 1, arrays)),
                        ("onnxruntime", logits(ort, arrays, 4)), ("onnxruntime batch 1", logits(ort, arrays, 1))):
            row[what] = figures(spec, ref, z)
        result[label] = row
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="dlv3p_b2_384,unet_r101_512,severity_b2_384")
    p.add_argument("--work", type=Path, default=REPO / "bench-data")
    args = p.parse_args(argv)
    from legitseg.manifest.spec import load_manifest

    names = args.models.split(",")
    os.environ.setdefault("LEGITSEG_CACHE_DIR", str(args.work / "cache"))
    manifest = workload.write_manifest([workload.PRODUCTION.get(n) or workload.TINY[n] for n in names], args.work)
    loaded = load_manifest(manifest)
    for name in names:
        print(json.dumps({name: measure(args.work, name, loaded.select([name])[0])}, indent=1), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
