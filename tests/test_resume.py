"""Resume reads OUT once, and a record appears only once the files it names are durable.

`legitseg run` reads each record under OUT once (output/resume.py) and hands what it
learned to naming, the plan, the sink and the summaries; the sink writes images in
groups, one flush per group, records renamed last (fsio.Staging). The order of file
operations is observed on real files through a recording `fsio.Disk`.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from legitseg import fsio
from legitseg.output import writers
from legitseg.output.records import ImageRecord
from tests.conftest import ModelKit, invoke_cli


def _picture(seed: int, h: int = 40, w: int = 52) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return cv2.GaussianBlur(rng.integers(0, 255, (h, w, 3), dtype=np.uint8), (5, 5), 0)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    kit = ModelKit(tmp_path_factory.mktemp("resume-kit"))
    kit.add("seg", classes=2)
    kit.add("grade", task="severity", classes=3, seed=1)
    return kit.write()


def _folder(root: Path, names: list[str], seed: int = 0) -> Path:
    for i, name in enumerate(names):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        cv2.imwrite(str(path), _picture(seed + i))
    return root


def _run(manifest: Path, out: Path, *inputs: Path, extra: tuple[str, ...] = ()):
    r = invoke_cli("run", *map(str, inputs), "-m", str(manifest), "-o", str(out), "--backend", "torch",
                   "--workers", "1", "--batch-size", "2", "--save-probabilities", "--jsonl", *extra)
    return r


def _count_record_reads(monkeypatch) -> list[int]:
    """Count records parsed (ImageRecord.from_json: every reader of a record calls it)."""
    calls = [0]
    original = ImageRecord.from_json.__func__

    def counting(cls, data):
        calls[0] += 1
        return original(cls, data)

    monkeypatch.setattr(ImageRecord, "from_json", classmethod(counting))
    return calls


def test_a_rerun_reads_each_record_once(manifest, tmp_path, monkeypatch):
    names = [f"img{i}.png" for i in range(6)]
    images = _folder(tmp_path / "in", names)
    out = tmp_path / "out"
    assert _run(manifest, out, images).returncode == 0
    before = {p.name: p.read_bytes() for p in (out / "records").glob("*.json")}
    cv2.imwrite(str(images / "img3.png"), _picture(99))  # one image changes: redone, merged, summarised

    reads = _count_record_reads(monkeypatch)
    r = _run(manifest, out, images)
    assert r.returncode == 0, r.stderr
    assert reads[0] == len(names)  # naming, plan, sink and summaries share one reading
    computed = {json.loads(x)["image"] for x in r.stdout.splitlines() if json.loads(x)["computed"]}
    assert computed == {str(images / "img3.png")}
    after = {p.name: p.read_bytes() for p in (out / "records").glob("*.json")}
    assert {n for n in after if after[n] != before[n]} == {"img3.png.json"}  # nothing else redone


def test_summaries_of_a_run_equal_a_rebuild_from_disk(manifest, tmp_path):
    first = _folder(tmp_path / "first", ["a/b.png", "a-c.png", "z.png"])  # a/b sorts before a-c
    second = _folder(tmp_path / "second", ["a/b.png", "m.png"], seed=10)
    out = tmp_path / "out"
    assert _run(manifest, out, first).returncode == 0
    (out / "records" / "stray.json").write_text("[]")  # not a record: listed, never summarised
    cv2.imwrite(str(first / "z.png"), _picture(50))
    r = _run(manifest, out, second, first / "z.png", extra=("--models", "seg"))
    assert r.returncode == 0, r.stderr
    run = json.loads((out / "run.json").read_text())
    written = {name: (out / name).read_bytes() for name in ("scores.jsonl", "scores.csv")}
    scan = writers.rebuild_summaries(out, run["run_id"])
    assert {name: (out / name).read_bytes() for name in written} == written
    assert run["unreadable_records"] == scan.unreadable == ["records/stray.json"]
    rows = [json.loads(x) for x in written["scores.jsonl"].decode().splitlines()]
    # a/b.png and a-c.png with both models; z.png changed, so only seg's new entry; second's two with seg
    assert len(rows) == 2 * 2 + 1 + 2
    assert [row["image"] for row in rows[:2]] == [str(first / "a/b.png")] * 2


class RecordingDisk(fsio.Disk):
    """The real file-system calls, logged in the order they happen."""

    def __init__(self, fail_flush: bool = False):
        self.log: list[tuple] = []
        self.fail_flush = fail_flush

    def write_new(self, path, data, *, fsync):
        super().write_new(path, data, fsync=fsync)
        self.log.append(("write", Path(path), fsync))

    def flush(self, paths, watched):
        if self.fail_flush:
            raise OSError(errno.EIO, "Input/output error")
        super().flush(paths, watched)
        self.log.append(("flush", {Path(p) for p in paths}))

    def replace(self, src, dst):
        super().replace(src, dst)
        self.log.append(("replace", Path(src), Path(dst)))


def test_no_record_is_visible_before_the_files_it_names_are_durable(manifest, tmp_path, monkeypatch):
    images = _folder(tmp_path / "in", [f"img{i}.png" for i in range(9)])
    out = tmp_path / "out"
    disk = RecordingDisk()
    monkeypatch.setattr(fsio, "disk", disk)
    monkeypatch.setattr(writers, "LINGER_S", 3600.0)  # groups by queue depth only, whatever the machine's speed
    assert _run(manifest, out, images).returncode == 0

    flushed: set[Path] = set()  # temporary files made durable so far
    durable: set[Path] = set()  # final names whose data was flushed before the rename
    records = 0
    for op in disk.log:
        if op[0] == "write":
            assert op[1].name.endswith(fsio.TMP_SUFFIX)  # only temporary names are written to
        elif op[0] == "flush":
            flushed |= op[1]
        elif op[0] == "replace":
            src, dst = op[1], op[2]
            if dst.parent.name == "runs" or dst.parent == out:
                continue  # run files and summaries: written with their own fsync
            assert src in flushed, f"{dst} renamed into place before its data was flushed"
            durable.add(dst)
            if dst.parent == out / "records":
                records += 1
                entries = json.loads(dst.read_text())["models"].values()
                named = [out / e[k] for e in entries for k in ("mask", "probability_map") if k in e]
                assert len(named) == 2
                assert all(p in durable for p in named), f"{dst} appeared before the files it names"
    flushes = sum(op[0] == "flush" for op in disk.log)
    assert records == 9
    assert 1 <= flushes < records  # one flush per group of images, not two fsyncs per image
    fsynced = {op[1].parent for op in disk.log if op[0] == "write" and op[2]}
    assert fsynced <= {out, out / "runs"}  # no fsync per image: only summaries and run files


def test_a_failed_flush_leaves_no_record_and_no_temporary_file(manifest, tmp_path, monkeypatch):
    images = _folder(tmp_path / "in", [f"img{i}.png" for i in range(3)])
    out = tmp_path / "out"
    monkeypatch.setattr(fsio, "disk", RecordingDisk(fail_flush=True))
    r = _run(manifest, out, images)
    assert r.returncode == 4
    assert "cannot flush" in r.stderr and "Input/output error" in r.stderr
    assert not list((out / "records").glob("*.json"))
    assert not list(out.rglob("*.png"))  # no mask under its final name either
    assert not list(out.rglob("*.legitseg-tmp"))
    assert json.loads((out / "run.json").read_text())["status"] == "failed"
