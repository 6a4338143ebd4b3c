"""The engine as stages with public steps, and the decode workers' work on the GPU path (CPU twins).

- `Stages.step` (what the Ray actors run) gives the local engine's results; the Ray engine
  reaches no private name of another module.
- Per-class counts made on the device equal the host's; orientation and resize run once per
  group of images of one size and turn; nvJPEG runs a batch ahead on a thread of its own.
- A JPEG's EXIF orientation is read from the one walk of its segments, as Pillow reads it,
  on every orientation and on malformed EXIF; a sequential JPEG ending in its end-of-image
  marker is known whole without searching its scan, with the same verdict as the full walk.
"""

from __future__ import annotations

import ast
import io
import random
import struct
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from legitseg.images import device_decode, jpeg_plan
from legitseg.images.containers import jpeg_end, jpeg_whole
from tests.conftest import engine_for, sources_in, torch_runners
from tests.images import picture, save

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def runners(tmp_path_factory):
    from tests.conftest import ModelKit

    kit = ModelKit(tmp_path_factory.mktemp("kit"))
    kit.add("binary", input_size=(64, 96))
    kit.add("multi", classes=4, resize="pad", seed=1)
    kit.add("grade", task="severity", classes=3, input_size=(64, 64), seed=2)
    return torch_runners(kit.write())


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("in")
    for i in range(5):  # one size and turn: one group
        save(d / f"a{i}.jpg", picture(48, 64, i), orientation=6, quality=92)
    for i, turn in enumerate((1, 3, 8)):
        save(d / f"b{i}.jpg", picture(40 + i, 56, 10 + i), orientation=turn, quality=92)
    save(d / "c.png", picture(45, 61, 20))
    return d


_sources, _engine = sources_in, engine_for


def _same(a, b) -> None:
    assert (a.name, a.error, a.size, a.sha256) == (b.name, b.error, b.size, b.sha256)
    for model, oa in a.outputs.items():
        ra, rb = oa.result, b.outputs[model].result
        assert (ra is None) == (rb is None), (a.name, model)
        if ra is None:
            assert oa.error == b.outputs[model].error
        elif model == "grade":
            assert ra == rb
        else:
            assert ra.mask.dtype == rb.mask.dtype and np.array_equal(ra.mask, rb.mask), (a.name, model)
            assert np.array_equal(ra.probabilities, rb.probabilities), (a.name, model)
            assert (ra.area_fraction, ra.components) == (rb.area_fraction, rb.components), (a.name, model)


# -- the public steps ------------------------------------------------------------------------------
def test_the_batch_step_gives_the_local_engines_results(runners, folder, tmp_path):
    from legitseg.engines.stages import Stages, decode
    from legitseg.errors import ImageError
    from legitseg.images.sources import Source

    (tmp_path / "bad.jpg").write_bytes(b"not an image at all")
    sources = _sources(folder)[:3] + [Source(tmp_path / "bad.jpg", "bad.jpg")] + _sources(folder)[3:5]
    local = list(_engine(runners, batched_post=False).process(sources))
    for batched in (False, True):
        stages = Stages(runners, save_probabilities=True, batched_post=batched)
        entries = []
        for s in sources:
            d = decode(s, [r.prep for r in runners], 10**8)
            entries.append(stages.failed(s, d) if isinstance(d, ImageError) else d)
        # the engine's batches: four decoded images each (the failed one rides along)
        stepped = stages.step(entries[:5]) + stages.step(entries[5:])
        assert len(stepped) == len(local)
        for a, b in zip(local, stepped, strict=True):
            _same(a, b)
    assert local[3].error and "not a recognised image format" in local[3].error


def test_the_ray_engine_calls_no_private_name_of_another_module():
    tree = ast.parse((REPO / "legitseg/engines/ray_data.py").read_text())
    private = [f"{ast.unparse(n.value)}.{n.attr}" for n in ast.walk(tree)
               if isinstance(n, ast.Attribute) and n.attr.startswith("_") and not n.attr.startswith("__")
               and not (isinstance(n.value, ast.Name) and n.value.id in ("self", "cls"))]
    assert private == []
    assert "__new__" not in (REPO / "legitseg/engines/ray_data.py").read_text()


@pytest.mark.parametrize("classes", [1, 3, 300])
def test_counts_made_on_the_device_are_the_hosts(classes):
    from types import SimpleNamespace

    from legitseg.inference import postprocess

    spec = SimpleNamespace(classes=classes, uncertainty=False, refer=None, label_names=["bg", *[f"c{i}" for i in range(1, max(2, classes))]])
    rng = np.random.default_rng(classes)
    if classes == 1:
        mask = (rng.random((37, 53)) > 0.7).astype(np.uint8)
    else:
        mask = rng.integers(0, classes, (37, 53)).astype(np.uint8 if classes <= 256 else np.int32)
    counts = postprocess.counts_on_device(torch.from_numpy(mask), spec).numpy()
    on_host = postprocess.finish_segmentation(mask, None, mask.shape, spec)
    from_device = postprocess.finish_segmentation(mask, None, mask.shape, spec, counts=counts)
    assert counts.sum() == mask.size and counts.dtype == np.int64
    assert on_host.area_fraction == from_device.area_fraction
    assert on_host.components == from_device.components


def test_orientation_and_resize_run_once_per_group_and_decode_runs_ahead(runners, folder, monkeypatch):
    """Five JPEGs of one size and turn: one orient and one resize per group, not per image, giving
    each image the input a per-image preparation gives; nvJPEG (torchvision's CPU decoder here)
    runs on its own thread."""
    from torchvision.io import ImageReadMode, decode_jpeg

    from legitseg.engines.stages import Stages

    oriented, threads, inputs = [], [], {}
    real_orient, real_decode, real_compute = device_decode.orient, device_decode._decode, Stages.compute

    def orient(image, turn):
        oriented.append(tuple(image.shape))
        return real_orient(image, turn)

    def decoding(encoded, device):
        threads.append(threading.current_thread().name)
        return real_decode(encoded, device)

    def compute(self, items):
        inputs.update({item.source.name: dict(item.inputs) for item in items})
        return real_compute(self, items)

    sources = [s for s in _sources(folder) if s.name.startswith("a")]
    monkeypatch.setattr(device_decode, "orient", orient)
    monkeypatch.setattr(device_decode, "_decode", decoding)
    monkeypatch.setattr(Stages, "compute", compute)
    results = list(_engine(runners, batch_size=5, batched_post=True, device_decode=True).process(sources))
    assert [r.error for r in results] == [None] * 5
    assert oriented == [(5, 3, 48, 64)]  # as stored (48 high, 64 wide), turned upright as one batch
    assert threads == ["legitseg-nvjpeg_0"]
    for s in sources:
        raw = decode_jpeg(torch.frombuffer(bytearray(s.path.read_bytes()), dtype=torch.uint8), mode=ImageReadMode.RGB)
        upright = real_orient(raw, 6)
        for runner in runners:
            assert torch.equal(inputs[s.name][runner.prep], device_decode.prepare(upright, runner.prep)), s.name


def test_mixed_sizes_and_turns_on_the_device_path_equal_the_batched_cpu_path(runners, folder):
    plain = list(_engine(runners, batched_post=True, device_decode=False).process(_sources(folder)))
    device = list(_engine(runners, batch_size=3, batched_post=True, device_decode=True).process(_sources(folder)))
    assert [r.name for r in plain] == [r.name for r in device]
    for a, b in zip(plain, device, strict=True):  # torchvision's CPU decoder is libjpeg, as OpenCV's
        assert a.error is None and b.error is None
        assert np.array_equal(a.outputs["multi"].result.mask, b.outputs["multi"].result.mask), a.name


# -- the decode workers ----------------------------------------------------------------------------
def test_a_deferred_jpeg_wraps_the_bytes_read_without_a_copy_or_a_warning(folder):
    from legitseg.images.decode import load_image
    from legitseg.images.sources import Source

    path = folder / "a0.jpg"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns when it wraps a read-only buffer
        item = load_image(Source(path, path.name), [], 10**8, defer_jpeg=True)
    assert item.encoded is not None and item.orientation == 6 and item.size == (64, 48)
    assert bytes(item.encoded.numpy()) == path.read_bytes()


def _exif(entries: list[tuple[int, int, int, bytes]], order: str = "<", ifd: int = 8, extra: bytes = b"",
          header: bytes | None = None) -> bytes:
    head = header if header is not None else (b"II*\0" if order == "<" else b"MM\0*") + struct.pack(order + "L", ifd)
    body = head.ljust(ifd, b"\0") + struct.pack(order + "H", len(entries))
    for tag, typ, count, value in entries:
        body += struct.pack(order + "HHL", tag, typ, count) + value.ljust(4, b"\0")[:4]
    return b"Exif\0\0" + body + struct.pack(order + "L", 0) + extra


def _jpeg_with(segments: list[bytes]) -> bytes:
    """A real baseline JPEG with APP1 segments put right after its SOI."""
    buf = io.BytesIO()
    Image.fromarray(picture(16, 24, 1)).save(buf, "JPEG", quality=90)
    data = buf.getvalue()
    app1 = b"".join(b"\xff\xe1" + struct.pack(">H", len(s) + 2) + s for s in segments)
    return data[:2] + app1 + data[2:]


def _short(v: int, order: str = "<") -> bytes:
    return struct.pack(order + "H", v)


MALFORMED = {
    "no exif": [],
    "empty exif": [b"Exif\0\0"],
    "no orientation tag": [_exif([(0x010F, 2, 4, b"Cam\0")])],
    "orientation 0": [_exif([(0x0112, 3, 1, _short(0))])],
    "orientation 9": [_exif([(0x0112, 3, 1, _short(9))])],
    "orientation 65535": [_exif([(0x0112, 3, 1, _short(65535))])],
    "as a long": [_exif([(0x0112, 4, 1, struct.pack("<L", 6))])],
    "as a signed short": [_exif([(0x0112, 8, 1, _short(3))])],
    "as a byte": [_exif([(0x0112, 1, 1, b"\x06")])],
    "as text": [_exif([(0x0112, 2, 2, b"6\0")])],
    "as undefined": [_exif([(0x0112, 7, 1, b"\x06")])],
    "as a rational": [_exif([(0x0112, 5, 1, struct.pack("<L", 26))], extra=struct.pack("<LL", 6, 1))],
    "of an unknown type": [_exif([(0x0112, 99, 1, _short(6))])],
    "count 0": [_exif([(0x0112, 3, 0, _short(6))])],
    "count 2": [_exif([(0x0112, 3, 2, _short(8) + _short(1))])],
    "count 3, value elsewhere": [_exif([(0x0112, 3, 3, struct.pack("<L", 26))], extra=_short(7) * 3)],
    "value past the end": [_exif([(0x0112, 3, 3, struct.pack("<L", 4000))])],
    "a tag before it runs past the end": [_exif([(0x010F, 2, 20, struct.pack("<L", 4000)),
                                                  (0x0112, 3, 1, _short(6))])],
    "a tag before it too large": [_exif([(0x010F, 2, 5000, struct.pack("<L", 26)), (0x0112, 3, 1, _short(6))])],
    "twice": [_exif([(0x0112, 3, 1, _short(6)), (0x0112, 3, 1, _short(3))])],
    "directory cut short": [_exif([(0x0112, 3, 1, _short(6)), (0x0110, 2, 4, b"abc\0")])[:-10]],
    "entry count past the end": [_exif([], ifd=4000)],
    "bad tiff header": [_exif([(0x0112, 3, 1, _short(6))], header=b"XX*\0\x08\0\0\0")],
    "bigtiff header": [_exif([(0x0112, 3, 1, _short(6))], header=b"II+\0\x08\0\0\0")],
    "odd tiff header": [_exif([(0x0112, 3, 1, _short(6))], header=b"II\0*\x08\0\0\0")],
    "header only": [b"Exif\0\0II*\0"],
    "exif twice in a row": [b"Exif\0\0" + _exif([(0x0112, 3, 1, _short(5))])],
    "two exif segments": [_exif([(0x0112, 3, 1, _short(6))]), _exif([(0x0112, 3, 1, _short(3))])],
    "xmp only": [b"http://ns.adobe.com/xap/1.0/\0<x tiff:Orientation=\"8\"/>"],
    "xmp beside exif without the tag": [_exif([(0x010F, 2, 4, b"Cam\0")]),
                                        b"http://ns.adobe.com/xap/1.0/\0<tiff:Orientation>5</x>"],
    "xmp beside exif with it": [_exif([(0x0112, 3, 1, _short(2))]),
                                b"http://ns.adobe.com/xap/1.0/\0<x tiff:Orientation=\"8\"/>"],
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_orientation_from_the_walk_is_pillows_on_malformed_exif(case):
    data = _jpeg_with(MALFORMED[case])
    assert jpeg_plan.orientation(data) == jpeg_plan._pillow_orientation(data), case


@pytest.mark.parametrize("order", ["<", ">"])
def test_orientation_from_the_walk_is_pillows_on_every_orientation_without_a_second_parse(order, tmp_path,
                                                                                           monkeypatch):
    pillow = {}
    for turn in range(1, 9):
        pillow[turn] = jpeg_plan._pillow_orientation(_jpeg_with([_exif([(0x0112, 3, 1, _short(turn, order))], order)]))
        pillow[(turn, "saved")] = jpeg_plan._pillow_orientation(
            save(tmp_path / f"{turn}.jpg", picture(20, 30), orientation=turn).read_bytes())
    monkeypatch.setattr(jpeg_plan, "_pillow_orientation", lambda data: pytest.fail("Pillow opened the file"))
    for turn in range(1, 9):
        assert jpeg_plan.orientation(_jpeg_with([_exif([(0x0112, 3, 1, _short(turn, order))], order)])) \
            == pillow[turn] == turn
        assert jpeg_plan.orientation((tmp_path / f"{turn}.jpg").read_bytes()) == pillow[(turn, "saved")] == turn


def test_orientation_from_the_walk_is_pillows_on_randomly_damaged_exif():
    rng = random.Random(25)
    base = _exif([(0x010F, 2, 8, struct.pack("<L", 38)), (0x0112, 3, 1, _short(6)), (0x0110, 2, 4, b"abc\0")],
                 extra=b"CameraX\0")
    for _ in range(300):
        damaged = bytearray(base)
        for _ in range(rng.randint(1, 4)):
            damaged[rng.randrange(6, len(damaged))] = rng.randrange(256)
        cut = bytes(damaged[:rng.randint(8, len(damaged))]) if rng.random() < 0.3 else bytes(damaged)
        data = _jpeg_with([cut])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Pillow warns on corrupt EXIF
            assert jpeg_plan.orientation(data) == jpeg_plan._pillow_orientation(data), cut.hex()


def _jpegs():
    out = {}
    for progressive in (False, True):
        buf = io.BytesIO()
        Image.fromarray(picture(40, 56, 3)).save(buf, "JPEG", quality=90, progressive=progressive)
        out[f"progressive={progressive}"] = buf.getvalue()
    out["exif"] = _jpeg_with([_exif([(0x0112, 3, 1, _short(6))])])
    return out


def test_a_jpeg_is_judged_whole_as_by_the_full_walk_at_every_cut_and_with_data_after_it():
    for name, data in _jpegs().items():
        assert jpeg_whole(data), name
        for cut in range(2, len(data) - 1):
            assert jpeg_whole(data[:cut]) is (jpeg_end(data[:cut]) is not None), (name, cut)
        for tail in (b"\0\0\0\x18ftypmp42" + bytes(100), b"\xff\xd9", data):
            assert jpeg_whole(data + tail) is (jpeg_end(data + tail) is not None), (name, tail[:8])
