"""A first end-to-end pass: one tiny model over two images through the real CLI."""

import json

import cv2
import numpy as np

from tests.conftest import invoke_cli as run_cli


def test_run_writes_mask_record_and_scores(kit, tmp_path):
    kit.add("lesion")
    manifest = kit.write()
    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    cv2.imwrite(str(images / "a.jpg"), rng.integers(0, 255, (70, 90, 3), dtype=np.uint8))
    cv2.imwrite(str(images / "b.png"), rng.integers(0, 255, (45, 33, 3), dtype=np.uint8))
    out = tmp_path / "out"
    r = run_cli("run", str(images), "-m", str(manifest), "-o", str(out), "--jsonl")
    assert r.returncode == 0, r.stderr
    rows = [json.loads(line) for line in r.stdout.splitlines()]
    assert [(row["image"], row["model"], row["status"]) for row in rows] == [
        (str(images / "a.jpg"), "lesion", "ok"), (str(images / "b.png"), "lesion", "ok")]
    mask = cv2.imread(str(out / "masks/lesion/b.png.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (45, 33) and mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 1}
    assert (out / "records/a.jpg.json").is_file()
    assert len((out / "scores.jsonl").read_text().splitlines()) == 2
