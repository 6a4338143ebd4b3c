"""`--shard i/N`: N real processes share one OUT and together do exactly what one run does."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import pytest
from typer.testing import CliRunner

from legitseg.cli import app
from legitseg.errors import OutputLocked, UsageError
from legitseg.output.lock import OutputLock, shard_lock_name
from legitseg.output.shard import Shard, shard_of
from tests.conftest import REPO, invoke_cli, run_cli

N_IMAGES = 24


def _photo(i: int) -> np.ndarray:
    rng = np.random.default_rng(i)
    img = cv2.GaussianBlur(rng.integers(0, 255, (60 + i, 80, 3), dtype=np.uint8), (7, 7), 0)
    return img


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.conftest import ModelKit

    root = tmp_path_factory.mktemp("shards")
    kit = ModelKit(root)
    kit.add("seg")
    kit.add("sev", task="severity", classes=4, seed=1)
    manifest = kit.write()
    images = root / "in"
    (images / "sub").mkdir(parents=True)
    for i in range(N_IMAGES):
        folder = images / "sub" if i % 3 == 0 else images
        cv2.imwrite(str(folder / f"img{i:02d}.png"), _photo(i))
    (images / "broken.jpg").write_bytes(b"\xff\xd8 not a jpeg")  # fails alone, in whichever shard
    return manifest, images


def _records(out: Path) -> dict[str, dict]:
    return {p.relative_to(out / "records").as_posix(): json.loads(p.read_text())
            for p in (out / "records").rglob("*.json")}


def _comparable(record: dict) -> dict:
    models = {m: {k: v for k, v in e.items() if k != "run_id"} for m, e in record.get("models", {}).items()}
    return {**{k: v for k, v in record.items() if k not in ("run_id", "written_at")}, "models": models}


def _masks(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in (out / "masks").rglob("*.png")}


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    return sorted(({k: v for k, v in r.items() if k not in ("run_id", "computed")} for r in rows),
                  key=lambda r: (r["image"], r["model"]))


def _args(manifest: Path, images: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "legitseg", "run", str(images), "-m", str(manifest), "-o", str(out),
            "--workers", "1", "--batch-size", "2", "--backend", "torch", "-q", *extra]


# -- the split --------------------------------------------------------------------------------
@pytest.mark.parametrize("text,message", [
    ("3/3", "i must be between 0 and 2"),
    ("-1/2", "i must be between 0 and 1"),
    ("1/0", "N must be at least 1"),
    ("a/b", "expected i/N with whole numbers"),
    ("1", "expected i/N with whole numbers"),
])
def test_invalid_shard_is_a_usage_error_naming_the_value(text, message):
    with pytest.raises(UsageError, match=message) as err:
        Shard.parse(text)
    assert repr(text) in str(err.value)


def test_invalid_shard_exits_2_before_anything_is_written(setup, tmp_path):
    manifest, images = setup
    out = tmp_path / "out"
    r = CliRunner().invoke(app, ["run", str(images), "-m", str(manifest), "-o", str(out), "--shard=3/3"])
    assert r.exit_code == 2, r.output
    assert "--shard '3/3'" in r.output and not out.exists()


def test_shards_partition_names_deterministically():
    names = [f"visit{i}/IMG_{i:04d}.JPG" for i in range(600)]
    parts = [Shard(i, 3).select(names, name=lambda n: n) for i in range(3)]
    assert sorted(sum(parts, [])) == sorted(names)  # each name in exactly one part
    assert all(150 < len(p) < 250 for p in parts)  # and the parts are balanced
    # Stable: a fixed value, not Python's per-process hash().
    assert shard_of("visit1/IMG_0001.JPG", 3) == int.from_bytes(
        __import__("hashlib").sha256(b"visit1/IMG_0001.JPG").digest(), "big") % 3
    assert Shard(0, 1).select(names, name=lambda n: n) == names


# -- locks ------------------------------------------------------------------------------------
def _hold(out: Path, shard: str | None) -> subprocess.Popen:
    arg = f"Shard.parse({shard!r})" if shard else "None"
    proc = subprocess.Popen([sys.executable, "-c", (
        "import time; from pathlib import Path; from legitseg.output.lock import OutputLock;"
        "from legitseg.output.shard import Shard;"
        f"OutputLock(Path({str(out)!r}), {arg}).acquire(); print('locked', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, cwd=REPO)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_locks_shards_share_out_but_not_a_shard_and_exclude_unsharded_runs(tmp_path):
    out = tmp_path / "out"
    holder = _hold(out, "0/3")
    try:
        with OutputLock(out, Shard(1, 3)):  # another shard of the same split: fine
            pass
        with pytest.raises(OutputLocked, match=rf"shard 0/3 .*PID {holder.pid}"):
            OutputLock(out, Shard(0, 3)).acquire()
        with pytest.raises(OutputLocked, match=rf"shard-0-of-3 PID {holder.pid}"):
            OutputLock(out).acquire()  # an unsharded run waits for the shards
        with pytest.raises(OutputLocked, match="same N"):
            OutputLock(out, Shard(0, 2)).acquire()  # parts of another split would overlap
        assert (out / shard_lock_name(Shard(0, 3))).read_text().strip() == str(holder.pid)
    finally:
        holder.kill()
        holder.wait()
    with OutputLock(out, Shard(0, 2)):  # SIGKILL released everything
        pass
    holder = _hold(out, None)
    try:
        with pytest.raises(OutputLocked, match=rf"PID {holder.pid}"):
            OutputLock(out, Shard(2, 3)).acquire()  # a shard waits for an unsharded run
        with pytest.raises(OutputLocked):
            OutputLock(out).acquire()
    finally:
        holder.kill()
        holder.wait()


def test_a_second_process_on_the_same_shard_exits_5(setup, tmp_path):
    manifest, images = setup
    out = tmp_path / "out"
    holder = _hold(out, "1/3")
    try:
        r = run_cli("run", str(images), "-m", str(manifest), "-o", str(out), "--shard", "1/3")
        assert r.returncode == 5, r.stderr
        assert f"shard 1/3 of output folder {out} is in use" in r.stderr and f"PID {holder.pid}" in r.stderr
        assert not (out / "records").exists()
    finally:
        holder.kill()
        holder.wait()


# -- three processes, one OUT -----------------------------------------------------------------
@pytest.fixture(scope="module")
def unsharded(setup, tmp_path_factory):
    manifest, images = setup
    out = tmp_path_factory.mktemp("unsharded") / "out"
    r = invoke_cli(*_args(manifest, images, out)[3:])  # the reference needs no process of its own
    assert r.returncode == 1, r.stderr  # broken.jpg
    return out


@pytest.mark.slow
def test_three_shard_processes_equal_one_unsharded_run(setup, unsharded, tmp_path):
    manifest, images = setup
    out = tmp_path / "out"
    procs = [subprocess.Popen(_args(manifest, images, out, "--shard", f"{i}/3", "--jsonl"),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(3)]
    results = [p.communicate(timeout=300) for p in procs]
    codes = sorted(p.returncode for p in procs)
    assert codes == [0, 0, 1], [r[1] for r in results]  # only the shard holding broken.jpg fails

    # Every image done exactly once: rows per shard are disjoint and cover everything.
    images_per_shard = [{json.loads(x)["image"] for x in out_.splitlines()} for out_, _ in results]
    assert sum(len(s) for s in images_per_shard) == N_IMAGES + 1
    assert set().union(*images_per_shard) == {r["image"] for r in _rows(unsharded)}
    runs = [json.loads(p.read_text()) for p in (out / "runs").glob("*.json")]
    assert sorted(r["shard"] for r in runs) == ["0/3", "1/3", "2/3"]
    assert sum(r["counts"]["processed"] + r["counts"]["failed"] for r in runs) == N_IMAGES + 1

    # Same records, byte-identical masks, same summaries as one unsharded run.
    want, got = _records(unsharded), _records(out)
    assert sorted(got) == sorted(want)
    assert {k: _comparable(v) for k, v in got.items()} == {k: _comparable(v) for k, v in want.items()}
    assert _masks(out) == _masks(unsharded)
    assert _rows(out) == _rows(unsharded)  # the last shard to finish wrote the complete set
    csv_lines = (out / "scores.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + 2 * (N_IMAGES + 1)
    assert not list(out.rglob("*.legitseg-tmp"))


@pytest.mark.slow
def test_killed_shard_rerun_completes_the_set(setup, unsharded, tmp_path):
    manifest, images = setup
    out = tmp_path / "out"
    for i in (0, 2):  # the other shards, in this process: only the victim needs a process of its own
        r = invoke_cli(*_args(manifest, images, out, "--shard", f"{i}/3")[3:])
        assert r.returncode in (0, 1), r.stderr
    before = set(_records(out))
    victim = subprocess.Popen(_args(manifest, images, out, "--shard", "1/3", "--batch-size", "1"),
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(_records(out)) == len(before):
        time.sleep(0.02)
    victim.kill()
    victim.wait()
    partial = set(_records(out))
    assert before < partial < set(_records(unsharded))  # killed part-way through its shard
    r = invoke_cli(*_args(manifest, images, out, "--shard", "1/3", "--jsonl")[3:])
    assert r.returncode in (0, 1), r.stderr
    computed = {json.loads(x)["image"] for x in r.stdout.splitlines() if json.loads(x)["computed"]}
    done_by_victim = {rec["image"] for name, rec in _records(out).items() if name in partial - before}
    assert not computed & done_by_victim  # what the killed process finished is not redone
    assert sorted(_records(out)) == sorted(_records(unsharded))
    assert _masks(out) == _masks(unsharded)
    assert _rows(out) == _rows(unsharded)
