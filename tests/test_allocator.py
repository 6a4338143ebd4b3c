"""`legitseg run` keeps freed memory for reuse (legitseg/cli/allocator.py): large blocks come from
the heap and are reused instead of being unmapped and faulted in again for every image."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from legitseg.cli import allocator
from tests.conftest import REPO, ModelKit, invoke_cli
from tests.images import picture, save

REALLOCATE = r"""
import ctypes, resource
from legitseg.cli.allocator import reuse_freed_memory
print(reuse_freed_memory(), end=" ")
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
SIZE = 64 << 20  # 16,384 pages of 4 KiB: over glibc's largest mmap threshold (32 MiB)


def block():  # the same request each time, as a batch's activations or a decoded photograph are
    p = libc.malloc(SIZE)
    ctypes.memset(p, 1, SIZE)  # touch every page
    libc.free(p)


block()  # the first one takes its pages
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    block()
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def _faults(**env: str) -> tuple[str, int]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MALLOC_", "GLIBC_TUNABLES", "LEGITSEG_MALLOC"))}
    out = subprocess.run([sys.executable, "-c", REALLOCATE], env={**clean, "PYTHONPATH": str(REPO), **env},
                         capture_output=True, text=True, timeout=120, check=True).stdout.split()
    return out[0], int(out[1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator")
def test_freed_blocks_are_reused_instead_of_faulted_in_again():
    applied, faults = _faults()
    kept, control = _faults(LEGITSEG_MALLOC="default")
    assert (applied, kept) == ("True", "False")
    assert control > 4 * 16_384 * 0.9, control  # glibc's default: every 64 MiB block is fresh pages
    assert faults < 2_000, faults  # reused: (almost) no page is faulted in again


@pytest.mark.parametrize("env, why", [
    ({}, None),
    ({"LEGITSEG_MALLOC": "default"}, "LEGITSEG_MALLOC=default"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, "GLIBC_TUNABLES sets glibc.malloc"),
    ({"GLIBC_TUNABLES": "glibc.cpu.hwcaps=-AVX2"}, None),
    ({"MALLOC_ARENA_MAX": "2"}, "MALLOC_ARENA_MAX is set"),
])
def test_the_users_own_allocator_settings_win(env, why):
    assert allocator.user_chose(env) == why
    if why is not None:
        assert allocator.reuse_freed_memory(env) is False


def test_run_sets_it_and_the_python_api_does_not(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(allocator, "reuse_freed_memory", lambda environ=None: calls.append("set") or True)
    kit = ModelKit(tmp_path)
    kit.add("seg", input_size=(64, 64), arch_params={"decoder_channels": [16, 8, 8, 8, 8]})
    manifest = kit.write()
    save(tmp_path / "img" / "a.png", picture(48, 64, 1))
    from legitseg import Predictor

    assert Predictor(manifest, device="cpu", backend="torch").predict_one(np.asarray(picture(48, 64, 2))).ok
    assert calls == []
    r = invoke_cli("run", tmp_path / "img", "-m", manifest, "-o", tmp_path / "out", "--device", "cpu", "--quiet")
    assert r.returncode == 0, r.stderr
    assert calls == ["set"]
