"""Shared fixtures: tiny real smp models, their weights files and manifests.

Models use smp's own test encoder (timm `test_resnet.r160_in1k`, ~0.4M parameters)
so that building, saving and running them takes well under a second.
"""

from __future__ import annotations

import gc
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

os.environ["HF_HUB_OFFLINE"] = "1"
# Tests that import ONNX Runtime directly must not write its telemetry files into $HOME.
os.environ["ORT_DISABLE_TELEMETRY"] = "1"
# pytest-xdist (`make test`) runs one worker per core. Left alone, each worker's PyTorch, and
# each CLI process a test starts, would run one OpenMP thread per core as well: cores x cores
# threads spinning for cores, which made the suite take 9.4 CPU-minutes instead of 6.8 on the
# 2-core machine. One thread each, unless the caller chose (before torch is imported).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

TINY = "tu-test_resnet.r160_in1k"
REPO = Path(__file__).resolve().parent.parent


def save_weights(module, path: Path, fmt: str = "safetensors") -> str:
    """Save `module` in one accepted format; return the sha256 the manifest must pin."""
    import torch
    from safetensors.torch import save_file

    from legitseg.models.weights import hashed_file, sha256_file

    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in module.state_dict().items()}
    if fmt == "safetensors":
        save_file(state, str(path))
    elif fmt == "pt":
        torch.save(state, path)
    elif fmt in ("state_dict", "model_state_dict", "model"):
        torch.save({fmt: state, "epoch": 3}, path)
    elif fmt == "module-prefix":
        torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    elif fmt == "pretrained":
        module.save_pretrained(str(path))
    else:
        raise ValueError(fmt)
    return sha256_file(hashed_file(path))


class ModelKit:
    """Builds tiny models with random (seeded) weights and writes manifests for them."""

    def __init__(self, root: Path):
        self.root = root
        self.models: dict[str, dict] = {}

    def add(self, name: str, *, task: str = "segmentation", arch: str | None = "Unet",
            encoder: str = TINY, classes: int = 1, fmt: str = "safetensors", seed: int = 0,
            **fields) -> dict:
        import torch

        from legitseg.manifest.spec import ModelSpec
        from legitseg.models.factory import build_module

        suffix = {"safetensors": ".safetensors", "pretrained": ""}.get(fmt, ".pt")
        weights = self.root / "weights" / f"{name}{suffix}"
        spec_fields = dict(name=name, task=task, encoder=encoder, classes=classes,
                           weights=weights, sha256="0" * 64, **fields)
        if task == "segmentation":
            spec_fields["arch"] = arch
        if fields.get("resize", "stretch") == "stretch":
            spec_fields.setdefault("input_size", (64, 64))
        torch.manual_seed(seed)
        module = build_module(ModelSpec(**spec_fields))
        sha = save_weights(module, weights, fmt)
        entry = {k: v for k, v in spec_fields.items() if k not in ("name", "weights", "sha256")}
        entry = {k: list(v) if isinstance(v, tuple) else v for k, v in entry.items()}
        entry.update(weights=os.path.relpath(weights, self.root), sha256=sha)
        self.models[name] = entry
        return entry

    def write(self, name: str = "models.yaml", *, quality: dict | None = None) -> Path:
        """The manifest of the models added so far; `quality` is its `quality:` policy, if any."""
        data: dict = {"version": 1, "models": self.models}
        if quality:
            data["quality"] = quality
        path = self.root / name
        path.write_text(yaml.safe_dump(data, sort_keys=False))
        return path


@pytest.fixture
def kit(tmp_path: Path) -> ModelKit:
    return ModelKit(tmp_path)


def invoke_cli(*args: str, cwd: Path | None = None, stdin: str | None = None,
               env: dict | None = None) -> subprocess.CompletedProcess:
    """`legitseg ARGS` in this process (typer's CliRunner): what `run_cli` gives, without paying
    for a new interpreter and a torch import. Use `run_cli` where a real process matters
    (signals, locks, closed stdout, resource limits, imports)."""
    import contextlib

    from typer.testing import CliRunner

    from legitseg.cli import app

    with contextlib.chdir(cwd) if cwd is not None else contextlib.nullcontext():
        r = CliRunner().invoke(app, [str(a) for a in args], input=stdin, env={"COLUMNS": "4000", **(env or {})})
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return subprocess.CompletedProcess(list(args), r.exit_code, r.stdout, r.stderr)


def run_cli(*args: str, cwd: Path | None = None, stdin: str | None = None, env: dict | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess:
    """Run `python -m legitseg ARGS` as a real subprocess."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run([sys.executable, "-m", "legitseg", *args], cwd=cwd, input=stdin,
                          capture_output=True, text=True, env=full_env, timeout=timeout)


@pytest.fixture(autouse=True)
def _unfrozen_heap() -> Iterator[None]:
    """legitseg.cli.main freezes the heap when a command ends (gc.freeze: a quick exit); tests that
    call it in process get the pytest worker's objects back to the collector afterwards."""
    yield
    if gc.get_freeze_count():
        gc.unfreeze()


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory) -> Iterator[Path]:
    """Exported ONNX graphs go to one folder per test session, never to ~/.cache.

    Session-scoped so that it is in place before module-scoped fixtures start
    subprocesses (they inherit it); tests of the cache itself set their own folder.
    """
    cache = tmp_path_factory.mktemp("legitseg-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LEGITSEG_CACHE_DIR", str(cache))
        yield cache


def sources_in(folder: Path) -> list:
    """The files of `folder` as Sources, in name order (what the engine tests stream)."""
    from legitseg.images.sources import Source

    return [Source(p, p.name) for p in sorted(folder.iterdir())]


def engine_for(runners: list, **options):
    """A local Engine with the engine tests' defaults (batch 4, 2 decode and 2 postprocessing
    threads, probabilities kept); `options` override them."""
    import threading

    from legitseg.engines.local import Engine

    defaults = dict(batch_size=4, workers=2, post_threads=2, save_probabilities=True, max_pixels=10**8,
                    stop=threading.Event())
    return Engine(runners, **{**defaults, **options})


def torch_runners(manifest: Path) -> list:
    """Every model of `manifest` built as a torch runner on the CPU in fp32 (the engine tests)."""
    import torch

    from legitseg.inference.registry import build_runner
    from legitseg.manifest.spec import load_manifest
    from legitseg.models.factory import load_model

    return [build_runner(load_model(s), torch.device("cpu"), "fp32", "torch")
            for s in load_manifest(manifest).models.values()]
