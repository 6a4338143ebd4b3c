"""DICOM in and out (issue 29): a DICOM photograph made from a demo photo runs and gives the
JPEG's mask; `annotations --format dicom-seg` reads back with highdicom to the same pixels
and references the source instance. Needs the optional DICOM extra (skipped without it);
the messages without it are tested everywhere."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, invoke_cli

HAVE_DICOM = all(importlib.util.find_spec(m) is not None for m in ("pydicom", "highdicom"))
needs_dicom = pytest.mark.skipif(
    not HAVE_DICOM, reason="the optional DICOM extra is not installed (pip install -r requirements_dicom.txt; "
                           "make test installs it)")
VL_PHOTOGRAPHIC = "1.2.840.10008.5.1.4.1.1.77.1.4"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
PHOTO = REPO / "examples" / "images" / "case02.jpg"
MODEL = "lesion_segmenter"


def make_dicom(path: Path, rgb: np.ndarray, photometric: str = "RGB", jpeg: bytes | None = None):
    """A VL Photographic Image of `rgb` (uncompressed RGB or YBR_FULL, or `jpeg` encapsulated)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.pixels import convert_color_space
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = VL_PHOTOGRAPHIC
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = JPEG_BASELINE if jpeg else ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = VL_PHOTOGRAPHIC, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.Modality, ds.PatientID, ds.PatientName = "XC", "DEMO1", "Demo^Patient"
    ds.PatientBirthDate = ds.PatientSex = ds.AccessionNumber = ds.ReferringPhysicianName = ""
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20260101", "120000", "1"
    ds.SeriesNumber = ds.InstanceNumber = 1
    ds.Manufacturer, ds.ImageType = "legitseg tests", ["ORIGINAL", "PRIMARY"]
    ds.Rows, ds.Columns = rgb.shape[:2]
    ds.SamplesPerPixel, ds.PlanarConfiguration = 3, 0
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    if jpeg:
        ds.PhotometricInterpretation = "YBR_FULL_422"
        ds.PixelData = encapsulate([jpeg])
        ds["PixelData"].VR = "OB"
    else:
        ds.PhotometricInterpretation = photometric
        pixels = rgb if photometric == "RGB" else convert_color_space(rgb, "RGB", photometric)
        ds.PixelData = np.ascontiguousarray(pixels).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return ds


def upright_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


@pytest.fixture(scope="module")
def dicom_out(tmp_path_factory) -> dict:
    pytest.importorskip("highdicom", reason="the optional DICOM extra is not installed")
    root = tmp_path_factory.mktemp("dicom")
    images = root / "in"
    images.mkdir()
    rgb = upright_rgb(PHOTO)
    (images / "photo.jpg").write_bytes(PHOTO.read_bytes())
    sources = {"rgb": make_dicom(images / "rgb.dcm", rgb),
               "ybr": make_dicom(images / "ybr.DCM", rgb, "YBR_FULL"),
               "jpeg": make_dicom(images / "jpeg.dcm", rgb, jpeg=PHOTO.read_bytes())}
    out = root / "out"
    r = invoke_cli("run", images, "-m", REPO / "models.yaml", "-o", out, "--models", MODEL, "--device", "cpu",
                   "--save-probabilities", "--quiet")
    assert r.returncode == 0, r.stderr
    return {"root": root, "out": out, "sources": sources, "images": images}


def mask(out: Path, name: str) -> np.ndarray:
    return np.asarray(Image.open(out / "masks" / MODEL / f"{name}.png"))


@needs_dicom
def test_a_dicom_photograph_gives_the_jpegs_mask(dicom_out):
    out = dicom_out["out"]
    jpeg = mask(out, "photo.jpg")
    np.testing.assert_array_equal(mask(out, "rgb.dcm"), jpeg)  # the same pixels: the same mask
    # YBR_FULL and the JPEG's own YBR_FULL_422 stream go through other colour conversions
    # (pydicom's, Pillow's libjpeg): a few pixels on region edges may differ.
    for name in ("ybr.DCM", "jpeg.dcm"):
        assert (mask(out, name) == jpeg).mean() >= 0.99, name
    record = json.loads((out / "records" / "rgb.dcm.json").read_text())
    assert record["status"] == "ok" and record["size"] == list(jpeg.shape)


@needs_dicom
def test_a_grey_dicom_fails_alone_naming_its_photometric_interpretation(tmp_path):
    from pydicom import dcmread

    images = tmp_path / "in"
    images.mkdir()
    ds = make_dicom(images / "a.dcm", upright_rgb(PHOTO))
    grey = dcmread(images / "a.dcm")
    grey.SamplesPerPixel, grey.PhotometricInterpretation = 1, "MONOCHROME2"
    del grey.PlanarConfiguration
    grey.PixelData = np.zeros((ds.Rows, ds.Columns), np.uint8).tobytes()
    grey.save_as(images / "grey.dcm")
    r = invoke_cli("run", images, "-m", REPO / "models.yaml", "-o", tmp_path / "out", "--models", MODEL,
                   "--device", "cpu", "--quiet")
    assert r.returncode == 1
    record = json.loads((tmp_path / "out" / "records" / "grey.dcm.json").read_text())
    assert "MONOCHROME2" in record["error"] and "only colour photographs" in record["error"]


@needs_dicom
@pytest.mark.parametrize("fractional", [False, True], ids=["binary", "fractional"])
def test_dicom_seg_reads_back_to_the_same_pixels_and_references_the_source(dicom_out, fractional):
    import highdicom as hd

    out, root = dicom_out["out"], dicom_out["root"]
    dest = root / ("frac" if fractional else "bin")
    r = invoke_cli("annotations", out, "-f", "dicom-seg", "-o", dest, *(["--fractional"] if fractional else []))
    assert r.returncode == 0, r.stderr
    assert "1 result(s) of images that are not DICOM files" in r.stderr  # photo.jpg
    assert sorted(p.name for p in (dest / MODEL).iterdir()) == ["jpeg.dcm.dcm", "rgb.dcm.dcm", "ybr.DCM.dcm"]
    source = dicom_out["sources"]["rgb"]
    seg = hd.seg.segread(dest / MODEL / "rgb.dcm.dcm")
    assert seg.get_source_image_uids() == [(source.StudyInstanceUID, source.SeriesInstanceUID,
                                            source.SOPInstanceUID)]
    assert seg.StudyInstanceUID == source.StudyInstanceUID and seg.PatientID == "DEMO1"
    record = json.loads((out / "records" / "rgb.dcm.json").read_text())["models"][MODEL]
    assert [s.SegmentLabel for s in seg.SegmentSequence] == list(record["area_fraction"])
    algorithm = seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == MODEL and algorithm.AlgorithmVersion == seg.SoftwareVersions.split()[-1]
    assert record["weights_sha256"] in algorithm.AlgorithmParameters and record["run_id"] in algorithm.AlgorithmParameters
    if fractional:
        assert seg.SegmentationType == "FRACTIONAL"
        probs = np.load(out / record["probability_map"])["probabilities"].astype(np.float32)
        back = seg.get_pixels_by_source_instance([source.SOPInstanceUID])[0]
        assert np.abs(np.moveaxis(back, -1, 0) - probs[1:]).max() <= 0.5 / 255 + 1e-3
    else:
        assert seg.SegmentationType == "BINARY"
        back = seg.get_pixels_by_source_instance([source.SOPInstanceUID], combine_segments=True)[0]
        np.testing.assert_array_equal(back, mask(out, "rgb.dcm"))


@needs_dicom
def test_dicom_seg_of_a_changed_source_is_listed_and_exits_1(dicom_out, tmp_path):
    import shutil

    images = tmp_path / "in"
    shutil.copytree(dicom_out["images"], images)
    out = tmp_path / "out"
    shutil.copytree(dicom_out["out"], out)
    for p in (out / "records").glob("*.json"):  # point the records at the copies
        rec = json.loads(p.read_text())
        rec["source"] = str(images / Path(rec["source"]).name)
        p.write_text(json.dumps(rec))
    (images / "rgb.dcm").write_bytes((images / "rgb.dcm").read_bytes() + b"\0\0")
    r = invoke_cli("annotations", out, "-f", "dicom-seg", "-o", tmp_path / "seg")
    assert r.returncode == 1
    assert "rgb.dcm: lesion_segmenter: not exported: source" in r.stderr and "changed since the run" in r.stderr
    assert (tmp_path / "seg" / MODEL / "ybr.DCM.dcm").is_file()


def test_dicom_seg_without_the_extra_exits_2_naming_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "highdicom", None)  # what `import highdicom` does where it is missing
    (tmp_path / "records").mkdir()
    r = invoke_cli("annotations", tmp_path, "-f", "dicom-seg")
    assert r.returncode == 2 and "legitseg[dicom]" in r.stderr and r.stderr.count("\n") == 1


def test_a_dicom_input_without_the_extra_fails_alone_naming_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "pydicom", None)
    images = tmp_path / "in"
    images.mkdir()
    # A preamble, the DICM prefix and nothing else: recognised as DICOM by its first bytes.
    (images / "a.dcm").write_bytes(b"\0" * 128 + b"DICM" + b"\0" * 16)
    (images / "b.jpg").write_bytes(PHOTO.read_bytes())
    r = invoke_cli("run", images, "-m", REPO / "models.yaml", "-o", tmp_path / "out", "--models", MODEL,
                   "--device", "cpu", "--quiet")
    assert r.returncode == 1
    record = json.loads((tmp_path / "out" / "records" / "a.dcm.json").read_text())
    assert "legitseg[dicom]" in record["error"]
    assert json.loads((tmp_path / "out" / "records" / "b.jpg.json").read_text())["status"] == "ok"
