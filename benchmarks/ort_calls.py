"""ONNX Runtime's per-image rate at 1, 2 and 4 images per call, for every cached graph (docs/onnx.md, "Images per call").

    .venv/bin/python benchmarks/ort_calls.py [ONNX_CACHE_FOLDER ...]

Default folder: `$LEGITSEG_CACHE_DIR/onnx` (run `legitseg run` with the models first). Each call
size runs for one second on random inputs of the graph's size, three rounds in turns; the
median per size is printed, with whether its outputs equal the whole batch's bit for bit.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402

from legitseg.fsio import cache_root  # noqa: E402
from legitseg.inference.ort_calls import run_in_calls  # noqa: E402
from legitseg.inference.ort_runner import make_session  # noqa: E402

SIZES, ROUNDS, SECONDS = (4, 2, 1), 3, 1.0


def rates(path: Path) -> str:
    fields = json.loads(path.with_suffix(".json").read_text()).get("fields", {})
    session = make_session(path.read_bytes())
    h, w = session.get_inputs()[0].shape[2:]
    batch = np.random.default_rng(0).random((4, 3, h, w), dtype=np.float32)
    whole = run_in_calls(session, batch, 4)
    same = {k: np.array_equal(run_in_calls(session, batch, k), whole) for k in SIZES}
    seen: dict[int, list[float]] = {k: [] for k in SIZES}
    for _ in range(ROUNDS):
        for k in SIZES:
            t0, n = time.perf_counter(), 0
            while time.perf_counter() - t0 < SECONDS:
                run_in_calls(session, batch, k)
                n += 4
            seen[k].append(n / (time.perf_counter() - t0))
    cells = "  ".join(f"{k}/call {np.median(v):.2f} img/s{'' if same[k] else ' (outputs differ)'}"
                      for k, v in seen.items())
    return f"{fields.get('arch')}/{fields.get('encoder')} {fields.get('task')} {h}x{w}: {cells}"


def main() -> None:
    folders = [Path(a) for a in sys.argv[1:]] or [cache_root() / "onnx"]
    for folder in folders:
        for path in sorted(folder.glob("*.onnx")):
            print(rates(path), flush=True)


if __name__ == "__main__":
    main()
