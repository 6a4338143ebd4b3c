"""`legitseg report`: tinting pixels, the HTML's content and escaping, and the page in a real
headless Chromium (no console messages, no network requests, thumbnails = images in OUT).

Chromium: $CHROMIUM or `chromium` on PATH; if missing, tools/ensure_chromium.sh tries to
install Debian's package once; the browser tests skip with a message only if that fails.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from urllib.parse import unquote

import cv2
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from legitseg.cli import app
from legitseg.report import ALPHA, colour, tint
from tests.conftest_demo import REPO, demo_out  # noqa: F401

CARD = re.compile(r'<figure class="card[ "]')
THUMB = re.compile(r'<img class="thumb" src="data:image/jpeg;base64,')
BROWSER_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--enable-logging=stderr", "--v=0"]


def find_chromium() -> str | None:
    env = os.environ.get("CHROMIUM")
    if env and os.access(env, os.X_OK):
        return env
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


@pytest.fixture(scope="module")
def chromium() -> str:
    found = find_chromium()
    if found is None:
        subprocess.run(["sh", str(REPO / "tools" / "ensure_chromium.sh")], timeout=900, check=False)
        found = find_chromium()
    if found is None:
        pytest.skip("no headless Chromium: tools/ensure_chromium.sh could not install Debian's "
                    "chromium (not root, or no apt-get/network); set $CHROMIUM to a chromium binary")
    return found


def browse(chromium: str, page: Path, tmp: Path) -> dict:
    """Load `page` twice (DOM dump, screenshot); return the DOM, console lines, page requests."""
    net = tmp / "net.json"
    dom = subprocess.run([chromium, *BROWSER_FLAGS, f"--user-data-dir={tmp / 'profile1'}",
                          f"--log-net-log={net}", "--dump-dom", page.resolve().as_uri()],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    shot = tmp / "shot.png"
    s = subprocess.run([chromium, *BROWSER_FLAGS, f"--user-data-dir={tmp / 'profile2'}",
                        "--window-size=1280,4000", "--hide-scrollbars", f"--screenshot={shot}",
                        page.resolve().as_uri()], capture_output=True, text=True, timeout=120)
    assert s.returncode == 0, s.stderr[-2000:]
    log = json.loads(net.read_text())
    types = {v: k for k, v in log["constants"]["logEventTypes"].items()}
    # The browser's own housekeeping (update checks, clock) has no initiator origin; every
    # request a document makes carries its initiator (`null` for a file:// page).
    requests = [e["params"]["url"] for e in log["events"]
                if types.get(e["type"]) == "URL_REQUEST_START_JOB" and "url" in e.get("params", {})
                and e["params"].get("initiator") != "not an origin"
                and not e["params"]["url"].startswith("data:")]
    console = [line for line in (dom.stderr + s.stderr).splitlines() if ":CONSOLE" in line]
    return {"dom": dom.stdout, "console": console, "requests": requests, "screenshot": shot}


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


# -- tinting ------------------------------------------------------------------------------
def test_tint_fills_the_mask_and_outlines_it():
    rng = np.random.default_rng(3)
    photo = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    mask = np.zeros((60, 80), np.uint8)
    mask[10:30, 15:50] = 1
    mask[35:55, 40:70] = 2
    out = tint(photo, mask)
    kernel = np.ones((3, 3), np.uint8)
    for label in (1, 2):
        inner = cv2.erode((mask == label).astype(np.uint8), kernel).astype(bool)  # away from the outline
        want = np.clip((1 - ALPHA) * photo[inner] + ALPHA * np.array(colour(label)) + 0.5, 0, 255).astype(np.uint8)
        assert np.abs(out[inner].astype(int) - want).max() <= 1
        edge = (mask == label) & ~inner
        assert (out[edge] == colour(label)).all(1).mean() > 0.95
    outside = ~cv2.dilate((mask > 0).astype(np.uint8), kernel).astype(bool)
    assert np.array_equal(out[outside], photo[outside])
    assert colour(1) != colour(2)


# -- HTML content (no browser) --------------------------------------------------------------
def write_record(out: Path, name: str, rec: dict) -> None:
    path = out / "records" / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"name": name, **rec}))


@pytest.fixture
def small_out(tmp_path):
    """OUT with a good image, a changed photograph, a missing one and a failure with markup."""
    photos, out = tmp_path / "photos", tmp_path / "out"
    photos.mkdir()
    rgb = np.full((40, 60, 3), 200, np.uint8)
    Image.fromarray(rgb).save(photos / "a.png")
    Image.fromarray(rgb).save(photos / "b.png")
    mask = np.zeros((40, 60), np.uint8)
    mask[5:20, 5:30] = 1
    (out / "masks" / "seg").mkdir(parents=True)
    Image.fromarray(mask).save(out / "masks" / "seg" / "a.png.png")
    import hashlib
    sha = hashlib.sha256((photos / "a.png").read_bytes()).hexdigest()
    entry = {"task": "segmentation", "status": "ok", "mask": "masks/seg/a.png.png",
             "area_fraction": {"spot": 0.156}, "components": {"spot": 1}}
    write_record(out, "a.png", {"image": str(photos / "a.png"), "sha256": sha, "size": [40, 60],
                                "status": "ok", "error": None, "models": {"seg": entry}})
    write_record(out, "b.png", {"image": str(photos / "b.png"), "sha256": "0" * 64, "size": [40, 60],
                                "status": "ok", "error": None, "models": {"seg": entry}})
    write_record(out, "c.png", {"image": str(photos / "gone.png"), "sha256": sha, "size": [40, 60],
                                "status": "ok", "error": None, "models": {"seg": entry}})
    bad = {"task": "severity", "status": "failed", "error": "<script>alert(1)</script> exploded"}
    write_record(out, "d.png", {"image": str(photos / "d.png"), "sha256": None, "size": None,
                                "status": "failed", "error": "sev: <script>alert(1)</script> exploded",
                                "models": {"sev": bad}})
    return out


def test_report_content_escaping_and_fallbacks(small_out, tmp_path):
    dest = tmp_path / "rep" / "r.html"
    r = invoke("report", small_out, "-o", dest)
    assert r.exit_code == 0, r.output
    html = dest.read_text()
    assert len(CARD.findall(html)) == 4
    assert len(THUMB.findall(html)) == 3  # d.png has neither size nor photograph
    assert "changed since the run (sha256 differs)" in html and "gone.png not found" in html
    assert "<script>" not in html and "&lt;script&gt;alert(1)&lt;/script&gt; exploded" in html
    assert 'id="failed">Failed images (1)' in html
    assert "run.json" in html  # says provenance is missing
    hrefs = [unquote(h) for h in re.findall(r'<a href="([^"#]+)">mask</a>', html)]
    assert hrefs and all((dest.parent / h).resolve().is_file() for h in hrefs)


def test_thumbnail_cap_lists_the_rest_as_rows(small_out, tmp_path):
    dest = tmp_path / "r.html"
    r = invoke("report", small_out, "-o", dest, "--max-thumbnails", "1")
    assert r.exit_code == 0, r.output
    html = dest.read_text()
    assert len(CARD.findall(html)) == 1 and html.count('<tr class="row">') == 3
    assert "beyond --max-thumbnails 1" in html


def test_not_an_output_folder_exits_2(tmp_path):
    r = invoke("report", tmp_path)
    assert r.exit_code == 2 and "not a legitseg output folder" in r.output


# -- in a real browser --------------------------------------------------------------------
def test_browser_check_catches_requests_and_console_errors(chromium, tmp_path):
    """Negative control: the checks below can fail."""
    page = tmp_path / "bad.html"
    page.write_text('<!DOCTYPE html><html><head><meta charset="utf-8"><title>x</title></head><body>'
                    '<img src="http://127.0.0.1:9/x.png"><script>console.error("boom")</script></body></html>')
    seen = browse(chromium, page, tmp_path)
    assert seen["requests"] == ["http://127.0.0.1:9/x.png"]
    assert any("boom" in line for line in seen["console"])


@pytest.mark.slow
def test_demo_report_in_headless_chromium(chromium, demo_out, tmp_path):  # noqa: F811
    dest = tmp_path / "report.html"
    cwd = os.getcwd()
    os.chdir(REPO)  # the demo's records name its photographs relative to the repository
    try:
        r = invoke("report", demo_out, "-o", dest)
    finally:
        os.chdir(cwd)
    assert r.exit_code == 0, r.output
    records = list((demo_out / "records").rglob("*.json"))
    seen = browse(chromium, dest, tmp_path)
    assert seen["console"] == [] and seen["requests"] == []
    assert len(CARD.findall(seen["dom"])) == len(records) == 12
    assert len(THUMB.findall(seen["dom"])) == 2 * len(records)  # two segmentation models
    assert "not found" not in seen["dom"] and "changed since the run" not in seen["dom"]
    shot = np.asarray(Image.open(seen["screenshot"]).convert("RGB"))
    assert shot.shape[:2] == (4000, 1280) and shot.std() > 20
    # The contact sheet is on screen: the first and last thumbnails appear, pixel for pixel.
    uris = re.findall(r'<img class="thumb" src="data:image/jpeg;base64,([^"]+)"', seen["dom"])
    for uri in (uris[0], uris[-1]):
        thumb = cv2.cvtColor(cv2.imdecode(np.frombuffer(base64.b64decode(uri), np.uint8), cv2.IMREAD_COLOR),
                             cv2.COLOR_BGR2RGB)
        match = cv2.matchTemplate(shot, thumb, cv2.TM_CCOEFF_NORMED).max()
        assert match > 0.95, f"thumbnail not found in the screenshot (best match {match:.2f})"


def test_thumbnails_use_the_overlays_of_run_overlay_and_the_recorded_colours(tmp_path):
    """An overlay file stands in for the photograph (here gone); the legend takes run.json's colours."""
    out = tmp_path / "out"
    mask = np.zeros((40, 60), np.uint8)
    mask[5:20, 5:30] = 1
    (out / "masks" / "seg").mkdir(parents=True)
    Image.fromarray(mask).save(out / "masks" / "seg" / "a.png.png")
    (out / "overlays" / "seg").mkdir(parents=True)
    Image.fromarray(np.full((40, 60, 3), (10, 200, 30), np.uint8)).save(out / "overlays" / "seg" / "a.png.jpg")
    entry = {"task": "segmentation", "status": "ok", "mask": "masks/seg/a.png.png",
             "overlay": "overlays/seg/a.png.jpg", "area_fraction": {"spot": 0.156}, "components": {"spot": 1}}
    write_record(out, "a.png", {"image": str(tmp_path / "gone.png"), "sha256": "0" * 64, "size": [40, 60],
                                "status": "ok", "error": None, "models": {"seg": entry}})
    no_overlay = {k: v for k, v in entry.items() if k != "overlay"}
    write_record(out, "b.png", {"image": str(tmp_path / "gone.png"), "sha256": "0" * 64, "size": [40, 60],
                                "status": "ok", "error": None, "models": {"seg": no_overlay}})
    (out / "run.json").write_text(json.dumps({"models": {"seg": {"colors": {"spot": "#123456"}}}}))
    dest = tmp_path / "r.html"
    r = invoke("report", out, "-o", dest)
    assert r.exit_code == 0, r.output
    html = dest.read_text()
    uris = re.findall(r'<img class="thumb" src="data:image/jpeg;base64,([^"]+)"', html)
    assert len(uris) == 2  # a.png from its overlay; b.png tinted over grey
    first = cv2.imdecode(np.frombuffer(base64.b64decode(uris[0]), np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    assert np.abs(first.astype(int) - (10, 200, 30)).max() <= 8
    second = cv2.imdecode(np.frombuffer(base64.b64decode(uris[1]), np.uint8), cv2.IMREAD_COLOR)[..., ::-1]
    tinted = second[12, 15].astype(int)  # inside the mask: grey 128 blended with #123456
    want = (1 - ALPHA) * 128 + ALPHA * np.array([0x12, 0x34, 0x56])
    assert np.abs(tinted - want).max() <= 8
    assert "background: #123456" in html  # the legend swatch
    assert html.count("gone.png not found") == 1  # only b.png needed its photograph
