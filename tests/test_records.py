"""The record format (legitseg/output/records.py): round trip, rows, the resume rule, damaged records."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest
from typer.testing import CliRunner

from legitseg.cli import app
from legitseg.manifest.spec import ModelSpec
from legitseg.output.records import (
    FORMAT_VERSION,
    ImageRecord,
    ModelEntry,
    RecordError,
    settings_digest,
)
from tests.conftest import TINY, ModelKit
from tests.images import picture

SPEC = ModelSpec(name="lesion", task="segmentation", arch="Unet", encoder=TINY, weights=Path("w.safetensors"),
                 sha256="a" * 64, input_size=(64, 64))
SHA = "b" * 64


def record(**entry_fields) -> ImageRecord:
    fields = dict(task="segmentation", weights_sha256=SPEC.sha256, settings=settings_digest(SPEC), status="ok",
                  backend="torch", mask="masks/lesion/a.jpg.png", area_fraction={"lesion": 0.25},
                  components={"lesion": 2})
    fields.update(entry_fields)
    return ImageRecord(image="in/a.jpg", name="a.jpg", sha256=SHA, size=[48, 64], status=fields["status"],
                       error=fields.get("error"), models={"lesion": ModelEntry(**fields)}, legitseg="0.1.0",
                       run_id="r1", written_at="2026-11-27T04:00:00+0000", source="/abs/in/a.jpg",
                       format=FORMAT_VERSION)


def test_a_record_survives_its_json_round_trip_with_unknown_fields_kept():
    rec = record()
    data = json.loads(rec.to_bytes())
    data["models"]["lesion"]["future_field"] = [1, 2]
    data["future_top"] = {"x": 1}
    again = ImageRecord.from_json(data)
    assert again.to_json() == data
    assert again.models["lesion"].extra == {"future_field": [1, 2]}


@pytest.mark.parametrize("data", [[], {"image": "a"}, {"image": "a", "name": "a", "models": []},
                                  {"image": 1, "name": "a", "models": {}},
                                  {"image": "a", "name": "a", "models": {"m": {"status": "ok"}}}])
def test_anything_else_is_a_record_error(data):
    with pytest.raises(RecordError):
        ImageRecord.from_json(data)


def test_rows_follow_the_csv_columns_and_say_which_run_computed_them():
    (row,) = record().rows(current_run="r1")
    assert list(row) == ["image", "model", "status", "mask", "area_fraction", "components", "backend",
                         "run_id", "computed"]
    assert row["computed"] is True
    assert record().rows(current_run="r2")[0]["computed"] is False
    assert record().rows(selected={"other"}) == []


def test_done_means_same_bytes_weights_and_settings():
    rec = record()
    assert rec.done_for([SPEC], SHA, retry_failed=False)
    assert not rec.done_for([SPEC], "c" * 64, retry_failed=False)  # the image changed
    assert not rec.done_for([SPEC.model_copy(update={"sha256": "d" * 64})], SHA, retry_failed=False)
    assert not rec.done_for([SPEC.model_copy(update={"threshold": 0.4})], SHA, retry_failed=False)
    assert not rec.done_for([SPEC.model_copy(update={"name": "other"})], SHA, retry_failed=False)
    # A field left at its default is not part of the digest; an explicit other value is.
    assert settings_digest(SPEC) == settings_digest(SPEC.model_copy(update={"backend": "torch"}))
    assert settings_digest(SPEC) != settings_digest(SPEC.model_copy(update={"interpolation": "area"}))


def test_failures_that_would_repeat_are_done_unless_retried_and_others_never_are():
    bad = record(status="failed", error="not a recognised image format", error_kind="image", backend=None)
    assert bad.done_for([SPEC], SHA, retry_failed=False)
    assert not bad.done_for([SPEC], SHA, retry_failed=True)
    oom = record(status="failed", error="out of memory", error_kind="oom", backend=None)
    assert not oom.done_for([SPEC], SHA, retry_failed=False)


def test_format_1_records_count_as_done_on_bytes_and_weights():
    data = record().to_json()
    del data["format"], data["source"], data["models"]["lesion"]["settings"]
    legacy = ImageRecord.from_json(data)
    assert legacy.format == 1 and legacy.done_for([SPEC], SHA, retry_failed=False)


def test_a_damaged_record_is_logged_counted_and_redone(tmp_path):
    kit = ModelKit(tmp_path / "kit")
    kit.add("lesion")
    manifest = kit.write()
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("a.jpg", "b.jpg"):
        (folder / name).write_bytes(cv2.imencode(".jpg", picture(40, 50))[1].tobytes())
    out = tmp_path / "out"
    args = ["run", str(folder), "-m", str(manifest), "-o", str(out), "--device", "cpu", "--backend", "torch"]
    assert CliRunner().invoke(app, args).exit_code == 0
    (out / "records" / "a.jpg.json").write_text('{"image": "in/a.jpg", "na')  # cut short by hand
    (out / "records" / "stray.json").write_text("[]")
    r = CliRunner().invoke(app, args, env={"COLUMNS": "4000"})
    assert r.exit_code == 0
    assert "1 to process, 1 already done" in r.output  # a.jpg is redone
    assert "stray.json" in r.output and "not a valid record" in r.output
    run = json.loads((out / "run.json").read_text())
    assert run["counts"]["unreadable_records"] == 1 and run["unreadable_records"] == ["records/stray.json"]
    rows = [json.loads(line) for line in (out / "scores.jsonl").read_text().splitlines()]
    assert sorted(row["image"] for row in rows) == sorted(str(folder / n) for n in ("a.jpg", "b.jpg"))
