"""provenance: who ran what where, the effective float math, the machine, the lock file."""

from __future__ import annotations

import json
import os
import socket
import sys
from importlib import metadata

import pytest

from legitseg import provenance
from legitseg.provenance import (
    compare_lock,
    cpu_facts,
    environment,
    math_mode,
    relevant_environment,
)

torch = pytest.importorskip("torch")


# -- environment() ---------------------------------------------------------------------------
def test_environment_names_host_user_directory_and_command(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["/usr/bin/legitseg", "run", "photos/", "-o", "out"])
    env = environment()
    assert env["hostname"] == socket.gethostname()
    assert env["working_directory"] == str(tmp_path)
    assert env["command_line"] == ["/usr/bin/legitseg", "run", "photos/", "-o", "out"]
    assert env["pid"] == os.getpid()
    assert env["user"]
    assert json.loads(json.dumps(env)) == env


def test_environment_records_only_the_variables_that_change_results(monkeypatch):
    for name in list(os.environ):
        if name in provenance.ENV_NAMES or name.startswith(provenance.ENV_PREFIXES):
            monkeypatch.delenv(name)
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")
    monkeypatch.setenv("TORCH_CUDNN_V8_API_LRU_CACHE_LIMIT", "100")
    monkeypatch.setenv("LEGITSEG_MANIFEST", "/srv/models.yaml")
    monkeypatch.setenv("EDITOR", "vi")                     # does not change results
    monkeypatch.setenv("LEGITSEG_API_TOKEN", "hunter2")    # a secret is never written to a run file
    assert environment()["environment"] == {
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
        "LEGITSEG_MANIFEST": "/srv/models.yaml",
        "NVIDIA_TF32_OVERRIDE": "0",
        "OMP_NUM_THREADS": "3",
        "TORCH_CUDNN_V8_API_LRU_CACHE_LIMIT": "100",
    }


def test_unset_variables_are_absent_not_empty():
    env = relevant_environment({"MKL_NUM_THREADS": "1", "PATH": "/bin"})
    assert env == {"MKL_NUM_THREADS": "1"}


# -- math_mode() ------------------------------------------------------------------------------
@pytest.fixture
def flags():
    """Restore torch's global math flags after a test changes them (legacy API only: mixing
    it with the fp32_precision API makes torch refuse to read the legacy flags)."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32,
             torch.get_float32_matmul_precision(), torch.backends.cudnn.benchmark,
             torch.backends.cudnn.deterministic)
    yield
    (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) = saved[:2]
    torch.set_float32_matmul_precision(saved[2])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = saved[3:]


def test_cpu_fp32_is_ieee_and_names_threads_and_kernels(flags):
    torch.set_float32_matmul_precision("highest")
    mode = math_mode("cpu", "fp32")
    assert (mode["convolution_fp32"], mode["matmul_fp32"], mode["autocast_dtype"]) == ("ieee", "ieee", None)
    assert mode["torch_threads"] == torch.get_num_threads()
    assert mode["torch_interop_threads"] == torch.get_num_interop_threads()
    assert mode["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert json.loads(json.dumps(mode)) == mode


def test_cudnn_tf32_flag_makes_cuda_convolutions_tf32(flags):
    torch.backends.cudnn.allow_tf32 = True
    assert math_mode("cuda:0", "fp32")["convolution_fp32"] == "tf32"
    assert math_mode("cpu", "fp32")["convolution_fp32"] == "ieee"   # TF32 is a CUDA-only mode
    torch.backends.cudnn.allow_tf32 = False
    mode = math_mode("cuda:0", "fp32")
    assert (mode["convolution_fp32"], mode["cudnn_allow_tf32"]) == ("ieee", False)


def test_matmul_precision_high_is_tf32_on_cuda_and_medium_is_bf16_on_cpu(flags):
    torch.set_float32_matmul_precision("high")
    assert math_mode("cuda", "fp32")["matmul_fp32"] == "tf32"
    torch.set_float32_matmul_precision("medium")
    assert math_mode("cpu", "fp32")["matmul_fp32"] == "bf16"
    torch.set_float32_matmul_precision("highest")
    assert math_mode("cuda", "fp32")["matmul_fp32"] == "ieee"
    assert math_mode("cpu", "fp32")["matmul_fp32"] == "ieee"


def test_nvidia_tf32_override_0_turns_tf32_off(flags, monkeypatch):
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = True
    monkeypatch.setenv("NVIDIA_TF32_OVERRIDE", "0")
    mode = math_mode("cuda:0", "fp32")
    assert (mode["convolution_fp32"], mode["matmul_fp32"]) == ("ieee", "ieee")
    assert mode["cudnn_allow_tf32"] is True  # the flag itself is still reported as set


def test_cudnn_benchmark_deterministic_and_autocast_are_reported(flags):
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = True, True
    mode = math_mode("cuda:1", "bf16")
    assert (mode["cudnn_benchmark"], mode["cudnn_deterministic"]) == (True, True)
    assert (mode["device"], mode["precision"], mode["autocast_dtype"]) == ("cuda:1", "bf16", "bfloat16")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_what_math_mode_claims_is_what_a_cuda_convolution_computes(flags):
    """The report is checked against the hardware: a TF32 convolution is ~1000x less exact."""
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(1, 64, 64, 64, generator=g), torch.randn(64, 64, 3, 3, generator=g)
    exact = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
    errors = {}
    for allow in (False, True):
        torch.backends.cudnn.allow_tf32 = allow
        y = torch.nn.functional.conv2d(x.cuda(), w.cuda(), padding=1).cpu().double()
        errors[math_mode("cuda", "fp32")["convolution_fp32"]] = ((y - exact).abs().max() / exact.abs().max()).item()
    if torch.cuda.get_device_capability() >= (8, 0):
        assert errors["ieee"] < 1e-5 < errors["tf32"], errors
    else:  # no TF32 units before Ampere: both are IEEE
        assert errors["tf32"] < 1e-5, errors


# -- the machine --------------------------------------------------------------------------------
def test_cpu_facts_read_model_and_flags_of_the_first_processor(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Gold 6338\n"
                       "flags\t\t: fpu sse2 avx2 avx512f amx_tile\n\n"
                       "processor\t: 1\nmodel name\t: something else\nflags\t\t: fpu\n")
    facts = cpu_facts(cpuinfo)
    assert facts["model"] == "Intel(R) Xeon(R) Gold 6338"
    assert facts["flags"] == ["amx_tile", "avx2", "avx512f", "fpu", "sse2"]


def test_cpu_facts_without_proc_cpuinfo_still_name_the_machine(tmp_path):
    facts = cpu_facts(tmp_path / "absent")
    assert facts["flags"] == [] and facts["machine"] and facts["logical_cores"] == os.cpu_count()


def test_arm_cpuinfo_features_are_flags(tmp_path):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text("processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd sve\nCPU part\t: 0xd40\n")
    assert cpu_facts(cpuinfo)["flags"] == ["asimd", "fp", "sve"]


# -- requirements_lock.txt --------------------------------------------------------------------------
def test_lock_comparison_finds_different_missing_and_unlocked(tmp_path):
    numpy = metadata.version("numpy")
    lock = tmp_path / "lock.txt"
    lock.write_text(f"# comment\nNumPy=={numpy}\ntorch==0.0.1\nnot-a-real-dist-xyz==1.0\n")
    cmp = compare_lock(lock)
    assert cmp.different == {"torch": ("0.0.1", metadata.version("torch"))}
    assert cmp.missing == {"not-a-real-dist-xyz": "1.0"}
    assert "numpy" not in cmp.different and "numpy" not in cmp.unlocked  # names compare normalised
    assert cmp.unlocked["segmentation-models-pytorch"] == metadata.version("segmentation_models_pytorch")
    assert not cmp.matches
    assert provenance.lock_mismatches(lock) == [
        "not-a-real-dist-xyz: locked 1.0, installed none",
        f"torch: locked 0.0.1, installed {metadata.version('torch')}",
    ]


def test_lock_file_follows_the_environment_variable(monkeypatch, tmp_path):
    monkeypatch.setenv("LEGITSEG_LOCK_FILE", str(tmp_path / "l.txt"))
    assert provenance.lock_file() == tmp_path / "l.txt"
    assert compare_lock() is None  # absent: nothing to compare with
    monkeypatch.delenv("LEGITSEG_LOCK_FILE")
    assert provenance.lock_file() == provenance.LOCK_FILE


def test_math_mode_survives_mixed_tf32_apis():
    """torch >= 2.9 refuses to read allow_tf32 once the fp32_precision API was used; math_mode
    still answers (a fresh process: the refusal is global state)."""
    import subprocess

    code = ("import json, torch; from legitseg.provenance import math_mode\n"
            "torch.backends.cudnn.allow_tf32 = True\n"
            "torch.backends.cuda.matmul.fp32_precision = 'tf32'\n"
            "print(json.dumps(math_mode('cuda:0', 'fp32')))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    mode = json.loads(r.stdout)
    assert mode["matmul_fp32"] == "tf32" and mode["cuda_matmul_fp32_precision"] == "tf32"
    assert mode["cuda_matmul_allow_tf32"] is None  # unreadable, and said so
