"""`--engine ray`: a local Ray cluster (2 CPUs, started here) gives the local engine's outputs."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from legitseg.cli import app
from tests.conftest import REPO

HAVE_RAY = importlib.util.find_spec("ray") is not None
needs_ray = pytest.mark.skipif(
    not HAVE_RAY, reason="the optional Ray extra is not installed (pip install -r requirements_ray.txt; "
                         "make test installs it)")
DEMO = ["run", str(REPO / "examples" / "images"), "-m", str(REPO / "models.yaml"),
        "--backend", "torch", "--batch-size", "4"]


def _masks(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in (out / "masks").rglob("*.png")}


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "scores.jsonl").read_text().splitlines()]
    return sorted(({k: v for k, v in r.items() if k not in ("run_id", "computed")} for r in rows),
                  key=lambda r: (r["image"], r["model"]))


@pytest.fixture(scope="module")
def cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    """The demo's 12 images and one that fails to decode (last, so that batches match the demo's)."""
    folder = tmp_path_factory.mktemp("in")
    for p in (REPO / "examples" / "images").iterdir():
        (folder / p.name).write_bytes(p.read_bytes())
    (folder / "zz_bad.jpg").write_bytes(b"\xff\xd8 truncated")
    return folder


def _run(images: Path, out: Path, *extra: str):
    return CliRunner().invoke(app, ["run", str(images), *DEMO[2:], "-o", str(out), *extra])


@pytest.fixture(scope="module")
def local_out(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("local") / "out"
    r = _run(images, out)
    assert r.exit_code == 1, r.output  # zz_bad.jpg
    return out


@needs_ray
@pytest.mark.slow
def test_ray_engine_matches_the_local_engine_fails_a_bad_image_alone_and_resumes(cluster, images, local_out,
                                                                                  tmp_path):
    out = tmp_path / "out"
    r = _run(images, out, "--engine", "ray", "--jsonl")
    assert r.exit_code == 1, r.output  # zz_bad.jpg failed, every other image done
    stdout_rows = [json.loads(line) for line in r.stdout.splitlines()]  # nothing but JSON on stdout
    assert len(stdout_rows) == 39 and all(row["computed"] for row in stdout_rows)
    assert _masks(out) == _masks(local_out) and len(_masks(out)) == 24  # byte-identical
    assert _rows(out) == _rows(local_out)  # same scores, areas, grades, and the same failure
    bad = json.loads((out / "records" / "zz_bad.jpg.json").read_text())
    assert bad["status"] == "failed"
    assert {m["error_kind"] for m in bad["models"].values()} == {"image"}
    good = json.loads((out / "records" / "case04.png.json").read_text())
    assert good["status"] == "ok" and isinstance(good["models"]["severity_classifier"]["score"], float)
    run = json.loads((out / "run.json").read_text())
    assert run["engine"] == "ray" and run["counts"]["processed"] == 12 and run["counts"]["failed"] == 1
    # Resume: nothing to do, so no model is built and the cluster is not used.
    r = _run(images, out, "--engine", "ray")
    assert "0 to process, 13 already done" in r.output, r.output


def test_engine_ray_without_ray_exits_2_naming_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # what `import ray` does where it is not installed
    out = tmp_path / "out"
    r = CliRunner().invoke(app, [*DEMO, "-o", str(out), "--engine", "ray"])
    assert r.exit_code == 2, r.output
    assert "--engine ray needs Ray Data" in r.output and "legitseg[ray]" in r.output
    assert not out.exists()


@pytest.mark.parametrize("args,message", [
    (["--engine", "spark"], "--engine 'spark': choose local or ray"),
    (["--address", "10.0.0.1:6379"], "--address is the address of a Ray cluster: it needs --engine ray"),
])
def test_engine_options_are_validated(args, message, tmp_path):
    r = CliRunner().invoke(app, [*DEMO, "-o", str(tmp_path / "out"), *args])
    assert r.exit_code == 2 and message in r.output, r.output
