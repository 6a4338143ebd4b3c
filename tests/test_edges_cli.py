"""The error contract of every command (issue 23 item 3) and the small edges of summary and
info --json: what a user sees when something unexpected happens, when stdout closes early,
on a read-only OUT, and what the bill of materials claims."""

from __future__ import annotations

import gc
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import cv2
import numpy as np
import pytest
import typer
from typer.testing import CliRunner

import legitseg
import legitseg.cli
from legitseg.cli import app
from tests.conftest import REPO, ModelKit

# The package under test (a subprocess that runs as another user gets it on PYTHONPATH).
PACKAGE_ROOT = Path(legitseg.__file__).resolve().parent.parent

LINE = "legitseg: error: unexpected ZeroDivisionError: boom (rerun with -v for the traceback)\n"


@pytest.fixture(scope="module")
def done(tmp_path_factory) -> dict[str, Path]:
    """A real OUT (two images, one tiny segmentation model) and the files the commands take."""
    root = tmp_path_factory.mktemp("edges")
    kit = ModelKit(root)
    kit.add("seg")
    manifest = kit.write()
    images = root / "in"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(2):
        cv2.imwrite(str(images / f"{i}.png"), rng.integers(0, 255, (40, 50, 3), dtype=np.uint8))
    out = root / "out"
    r = CliRunner().invoke(app, ["run", str(images), "-m", str(manifest), "-o", str(out), "--backend", "torch"])
    assert r.exit_code == 0, r.output
    return {"root": root, "manifest": manifest, "images": images, "out": out,
            "weights": root / "weights" / "seg.safetensors"}


# Every command, how to call it, and a core function it calls (which the test makes raise).
# A command added to the app without a row here fails test_item3_every_command_has_a_row.
def _cases(d: dict[str, Path]) -> dict[str, tuple[list[str], str]]:
    m, out, root = str(d["manifest"]), str(d["out"]), d["root"]
    return {
        "run": (["run", str(d["images"]), "-o", str(root / "new"), "-m", m], "legitseg.api.run"),
        "evaluate": (["evaluate", out, str(root / "gt")], "legitseg.evaluate.scoring.evaluate"),
        "report": (["report", out, "-o", str(root / "r.html")], "legitseg.report.write_report"),
        "annotations": (["annotations", out, "-f", "coco", "-o", str(root / "a.json")],
                        "legitseg.annotations.export.export"),
        "summary": (["summary", out], "legitseg.summary.summary"),
        "info": (["info"], "legitseg.provenance.versions"),
        "info --json": (["info", "--json"], "legitseg.bom.bill_of_materials"),
        "export": (["export", "seg", "-o", str(root / "seg.onnx"), "-m", m], "legitseg.export.export_model"),
        "verify": (["verify", str(root / "pkg"), "-m", m], "legitseg.verify.cases.verify_package"),
        "verify --make": (["verify", str(root / "pkg2"), str(d["images"]), "--make", "-m", m],
                          "legitseg.verify.cases.make_package"),
        "models list": (["models", "list", "-m", m], "legitseg.manifest.spec.load_manifest"),
        "models check": (["models", "check", "-m", m], "legitseg.models.check.probe_model"),
        "models hash": (["models", "hash", str(d["weights"])], "legitseg.models.weights.sha256_file"),
        "models convert": (["models", "convert", str(d["weights"]), str(root / "c.safetensors")],
                           "legitseg.models.convert.convert_checkpoint"),
    }


def _command_paths(group, prefix: str = "") -> set[str]:
    paths = set()
    for name, cmd in group.commands.items():
        path = f"{prefix}{name}"
        paths |= _command_paths(cmd, path + " ") if hasattr(cmd, "commands") else {path}
    return paths


def _raise(exc: BaseException):
    def boom(*_args, **_kwargs):
        raise exc

    return boom


def _patch(monkeypatch, target: str, exc: BaseException) -> None:
    module, _, attr = target.rpartition(".")
    monkeypatch.setattr(__import__(module, fromlist=[attr]), attr, _raise(exc))


def test_item3_every_command_has_a_row(done):
    commands = _command_paths(typer.main.get_command(app))
    assert commands == {name for name in _cases(done) if "--" not in name}


NAMES = list(_cases(dict.fromkeys(("manifest", "out", "root", "images", "weights"), Path())))


@pytest.mark.parametrize("name", NAMES)
def test_item3_unexpected_error_is_one_line_and_exit_4(done, monkeypatch, name):
    args, target = _cases(done)[name]
    _patch(monkeypatch, target, ZeroDivisionError("boom"))
    r = CliRunner().invoke(app, args, env={"COLUMNS": "80"})
    assert (r.exit_code, r.stderr) == (4, LINE), (r.output, r.exception)


@pytest.mark.parametrize("name", ["evaluate", "report", "annotations", "summary", "info", "export", "verify",
                                  "models list", "models check", "models hash", "models convert"])
def test_item3_keyboard_interrupt_is_one_line_and_exit_130(done, monkeypatch, name):
    args, target = _cases(done)[name]
    _patch(monkeypatch, target, KeyboardInterrupt())
    r = CliRunner().invoke(app, args)
    assert (r.exit_code, r.stderr) == (130, "legitseg: interrupted\n"), r.output


def test_item3_a_message_over_several_lines_stays_one_line(done, monkeypatch):
    _patch(monkeypatch, "legitseg.summary.summary", ValueError("bad\nvalue\n"))
    r = CliRunner().invoke(app, ["summary", str(done["out"])])
    assert (r.exit_code, r.stderr) == (
        4, "legitseg: error: unexpected ValueError: bad value (rerun with -v for the traceback)\n")


def test_item3_root_verbose_shows_the_traceback_for_any_command(done, monkeypatch):
    _patch(monkeypatch, "legitseg.summary.summary", ZeroDivisionError("boom"))
    r = CliRunner().invoke(app, ["-v", "summary", str(done["out"])])
    assert r.exit_code == 4
    assert "Traceback (most recent call last)" in r.stderr and "ZeroDivisionError: boom" in r.stderr
    assert r.stderr.endswith(LINE)
    # -v is not sticky: the next invocation is quiet again
    r = CliRunner().invoke(app, ["summary", str(done["out"])])
    assert r.stderr == LINE


def _main(monkeypatch, capsys, *args: str) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["legitseg", *args])
    with pytest.raises(SystemExit) as exit_:
        legitseg.cli.main()
    return exit_.value.code, capsys.readouterr().err


def test_item3_main_applies_the_contract_to_a_command(done, monkeypatch, capsys):
    _patch(monkeypatch, "legitseg.report.write_report", ZeroDivisionError("boom"))
    assert _main(monkeypatch, capsys, "report", str(done["out"])) == (4, LINE)


def test_item3_main_applies_the_contract_outside_any_command(monkeypatch, capsys):
    # typer's own machinery failing, before a command starts: still the one line and 4
    monkeypatch.setattr(typer.main, "get_command", _raise(ZeroDivisionError("boom")))
    assert _main(monkeypatch, capsys, "info") == (4, LINE)


def test_item3_main_keeps_usage_errors_at_2(monkeypatch, capsys):
    code, err = _main(monkeypatch, capsys, "summary", "--no-such-option")
    assert code == 2 and err.startswith("legitseg: usage error: No such option: --no-such-option")


@pytest.mark.parametrize("args, code", [(["info"], 0), (["summary", "--no-such-option"], 2),
                                        (["models", "list", "-m", "/no/such/models.yaml"], 3)])
def test_main_freezes_the_heap_when_a_command_ends_whatever_its_exit(monkeypatch, capsys, args, code):
    # Python's shutdown collects garbage over every object torch made (0.9 s of a CPU run);
    # frozen objects are skipped. The conftest fixture unfreezes after each test.
    gc.unfreeze()
    assert gc.get_freeze_count() == 0
    assert _main(monkeypatch, capsys, *args)[0] == code
    assert gc.get_freeze_count() > 0


def _closed_stdout(*args: str) -> subprocess.CompletedProcess:
    """`legitseg ARGS | head -0`, without the race: the reader is gone before legitseg writes."""
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", "legitseg", *args], stdout=write, stderr=subprocess.PIPE,
                              text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, timeout=120)
    finally:
        os.close(write)
    return proc


@pytest.mark.parametrize("args", [["summary", "{out}"], ["summary", "{out}", "--json"],
                                  ["models", "list", "-m", "{manifest}"], ["info"]],
                         ids=["summary", "summary-json", "models-list", "info-rich-table"])
def test_item3_closed_stdout_is_quiet_and_exits_141(done, args):
    args = [a.format(out=done["out"], manifest=done["manifest"]) for a in args]
    r = _closed_stdout(*args)
    # models list warns about the manifest (no normalize); nothing else may be said
    said = [line for line in r.stderr.splitlines() if "WARNING model 'seg': no normalize" not in line]
    assert (r.returncode, said) == (141, [])


# -- summary ----------------------------------------------------------------------------------
def _in_read_only(folder: Path, *args: str) -> subprocess.CompletedProcess:
    """`legitseg ARGS` with `folder` read-only to it: by permissions for a normal user; for root,
    who writes through permissions, by a read-only bind mount in a private mount namespace
    (EROFS, as on an archive mount), which leaves no mount behind."""
    argv = [sys.executable, "-m", "legitseg", *args]
    env = {**os.environ, "PYTHONPATH": str(PACKAGE_ROOT), "HF_HUB_OFFLINE": "1"}
    if os.geteuid() != 0:
        for sub in [folder, *folder.rglob("*")]:
            sub.chmod(0o555 if sub.is_dir() else 0o444)
        try:
            return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
        finally:
            for sub in [folder, *folder.rglob("*")]:
                sub.chmod(0o755 if sub.is_dir() else 0o644)
    if not shutil.which("unshare"):
        pytest.skip("root without unshare(1): cannot make a read-only folder")
    r = subprocess.run(["unshare", "-m", "sh", "-c", 'mount --bind -o ro "$0" "$0" && exec "$@"',
                        str(folder), *argv], capture_output=True, text=True, env=env, timeout=120)
    if r.returncode != 0 and ("unshare:" in r.stderr or "mount:" in r.stderr):
        pytest.skip(f"root without mount namespaces here: {r.stderr.strip()}")
    return r


def _snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")}


def test_low_summary_read_only(done, tmp_path):
    """A read-only OUT is described (exit 0) with one warning that scores.* were not rebuilt."""
    ro = tmp_path / "out"
    shutil.copytree(done["out"], ro)
    before = _snapshot(ro)
    text = _in_read_only(ro, "summary", str(ro))
    as_json = _in_read_only(ro, "summary", str(ro), "--json")
    assert _snapshot(ro) == before
    assert text.returncode == 0, text.stderr
    assert "images: 2 (2 ok, 0 failed)" in text.stdout and "model seg (segmentation): 2 ok" in text.stdout
    warnings = [line for line in text.stderr.splitlines() if line]
    assert len(warnings) == 1 and "WARNING" in warnings[0]
    assert f"{ro} is read-only: scores.jsonl and scores.csv were not rebuilt" in warnings[0]
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["scores_rebuilt"] is False and data["images_ok"] == 2


def test_low_summary_plain_text_into_a_pipe(done):
    r = CliRunner().invoke(app, ["summary", str(done["out"])])
    assert r.exit_code == 0
    assert r.stdout.startswith("legitseg summary of ")
    assert not set(r.stdout) & set("─│┃━┏┓┗┛┡┩╇╋┼")  # no box drawing into a pipe
    assert json.loads(CliRunner().invoke(app, ["summary", str(done["out"]), "--json"]).stdout)["scores_rebuilt"]


# -- info --json ------------------------------------------------------------------------------
def _props(component: dict) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for p in component.get("properties", []):
        out.setdefault(p["name"], []).append(p["value"])
    return out


def _bom(*args: str) -> dict:
    r = CliRunner().invoke(app, ["info", "--json", *args])
    assert r.exit_code == 0, r.output
    return json.loads(r.stdout)


def test_low_info_json_reads_the_extras_pins(tmp_path):
    """A distribution pinned by requirements_ray.txt beside the lock is locked, not `not-locked`;
    an extra that is not installed is no mismatch."""
    import hashlib

    yaml_version = metadata.version("PyYAML")
    lock = tmp_path / "requirements_lock.txt"
    lock.write_text(f"numpy=={metadata.version('numpy')}\n")
    extra = tmp_path / "requirements_ray.txt"
    extra.write_text(f"# the extra\npyyaml[libyaml]=={yaml_version}\nno-such-extra-dist-for-legitseg==1.0\n")
    doc = _bom("--lock", str(lock))
    meta = _props(doc["metadata"])
    assert meta["legitseg:lock:status"] == ["match"]
    assert meta["legitseg:lock:extra"] == [f"{hashlib.sha256(extra.read_bytes()).hexdigest()}  {extra}"]
    states = {c["purl"].split("@")[0]: _props(c)["legitseg:lock"] for c in doc["components"] if "purl" in c}
    assert states["pkg:pypi/pyyaml"] == ["match"]
    assert states["pkg:pypi/numpy"] == ["match"]
    extra.write_text("PyYAML==0.0.1\n")
    doc = _bom("--lock", str(lock))
    assert _props(doc["metadata"])["legitseg:lock:status"] == ["differs"]
    assert _props(doc["metadata"])["legitseg:lock:different"] == [f"PyYAML==0.0.1 installed {yaml_version}"]


def test_low_info_json_ray_is_locked_by_the_source_tree():
    try:
        ray = metadata.version("ray")
    except metadata.PackageNotFoundError:
        pytest.skip("the ray extra is not installed")
    pinned = [line for line in (REPO / "requirements_ray.txt").read_text().splitlines() if line.startswith("ray")]
    doc = _bom("--lock", str(REPO / "requirements_lock.txt"))
    (component,) = [c for c in doc["components"] if c.get("purl", "").startswith("pkg:pypi/ray@")]
    assert _props(component)["legitseg:lock"] == (["match"] if pinned[0].endswith(f"=={ray}")
                                                  else [f"different (locked {pinned[0].split('==')[1]})"])


def test_low_info_json_cuda_components_say_built_with():
    import torch

    if not torch.version.cuda:
        pytest.skip("a CPU-only torch build lists no CUDA components")
    doc = _bom()
    by_ref = {c["bom-ref"]: c for c in doc["components"]}
    for ref in ("cuda-runtime", "cudnn"):
        c = by_ref[ref]
        assert _props(c)["legitseg:cuda:built-with"] == [f"torch {metadata.version('torch')}"]
        assert c["description"].startswith("built with: ")
        if torch.cuda.is_available():
            assert "scope" not in c or c["scope"] == "required"
        else:  # CycloneDX `optional`: not present or not callable at runtime
            assert c["scope"] == "optional" and "not usable on this host" in c["description"]
