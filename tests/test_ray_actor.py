"""A Ray actor builds its runners with the driver's settings and never runs a model on a backend
other than the one the driver recorded (run.json, records). In process, no cluster: the actor
class is what Ray instantiates on a worker."""

from __future__ import annotations

import pytest
import torch

from legitseg.engines.ray_data import _ModelActor
from legitseg.errors import RuntimeFailure
from legitseg.inference.registry import BuildSettings, build_runner
from legitseg.manifest.spec import load_manifest
from legitseg.models import onnx_export
from legitseg.models.factory import load_model
from tests.conftest import ModelKit

pytest.importorskip("ray")


@pytest.fixture(scope="module")
def specs(tmp_path_factory):
    kit = ModelKit(tmp_path_factory.mktemp("ray-actor"))
    kit.add("seg", arch_params={"decoder_channels": [16, 8, 8, 8, 8]})
    kit.add("strict", arch_params={"decoder_channels": [16, 8, 8, 8, 8]}, seed=3, parity_tolerance=1e-12)
    return load_manifest(kit.write()).models


def _actor(specs, names, backends, **kw) -> _ModelActor:
    return _ModelActor([specs[n] for n in names], backends, "cpu", "fp32", 2, False, 10**8, 1, **kw)


def test_the_actor_reuses_the_drivers_graph_cache_and_sizes_onnx_runtime_to_its_cpus(specs, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    driver = build_runner(load_model(specs["seg"]), torch.device("cpu"), "fp32", "onnxruntime", BuildSettings(cache))
    assert driver.backend == "onnxruntime"

    def no_export(*args, **kwargs):
        raise AssertionError("the actor exported the graph again instead of reading the driver's cache")

    monkeypatch.setattr(onnx_export, "_exported", no_export)
    actor = _actor(specs, ["seg"], ["onnxruntime"], cache_dir=str(cache))
    (runner,) = actor.stages.runners
    assert runner.backend == "onnxruntime"
    # One CPU for this actor (threads=1): ONNX Runtime's intra-op pool is that size, not the node's cores.
    assert runner.session.get_session_options().intra_op_num_threads == 1
    # $LEGITSEG_ORT_THREADS, passed on by the driver, wins.
    monkeypatch.undo()
    again = _actor(specs, ["seg"], ["onnxruntime"], cache_dir=str(cache), ort_threads=2)
    assert again.stages.runners[0].session.get_session_options().intra_op_num_threads == 2


def test_an_actor_whose_gate_decides_otherwise_stops_the_run(specs, tmp_path):
    # The driver recorded onnxruntime (say, on another CPU); here the gate sends "strict" to torch.
    with pytest.raises(RuntimeFailure, match=r"model 'strict': the driver runs it on onnxruntime, but on this "
                                             r"Ray worker the parity gate chose torch"):
        _actor(specs, ["strict"], ["onnxruntime"], cache_dir=str(tmp_path / "cache"))
