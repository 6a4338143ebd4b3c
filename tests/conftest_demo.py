"""One real `legitseg run` of the bundled demo, shared by the modules that read its OUT.

    from tests.conftest_demo import demo_out   # a module-scoped fixture

The run happens once per test session (about 30 s on the CPU); every module that
imports the fixture gets the same folder, which tests must treat as read-only
(write evaluations and reports elsewhere with -o).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DEMO_IMAGES = REPO / "examples" / "images"
DEMO_TRUTH = REPO / "examples" / "ground_truth"
_cache: dict[str, Path] = {}


def run_demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if "out" not in _cache:
        from typer.testing import CliRunner

        from legitseg.cli import app

        out = tmp_path_factory.mktemp("demo") / "out"
        cwd = os.getcwd()
        os.chdir(REPO)  # record paths are given relative to the repository, as in `make demo`
        try:
            result = CliRunner().invoke(app, ["run", "examples/images", "-m", "models.yaml",
                                              "-o", str(out), "--device", "cpu", "--quiet"])
        finally:
            os.chdir(cwd)
        assert result.exit_code == 0, result.output[-3000:]
        _cache["out"] = out
    return _cache["out"]


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return run_demo(tmp_path_factory)
