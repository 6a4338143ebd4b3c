"""Output names: stable across runs, never shared in one OUT, UTF-8 text, short enough to write."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from legitseg.images.naming import COMPONENT_MAX_BYTES, NAME_MAX, candidate, escape
from legitseg.images.sources import discover_all, source_key


def touch(root: Path, *names: str) -> None:
    for name in names:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")


def tag(path: Path) -> str:
    return hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:8]


class FakeOut:
    """What OUT's records say: output name -> source key (the lead's records hold the same)."""

    def __init__(self):
        self.records: dict[str, str] = {}

    def run(self, inputs, stdin=None) -> dict[Path, str]:
        found = discover_all(inputs, stdin, existing=self.records)
        for s in found.sources:
            assert self.records.get(s.name) in (None, source_key(s.path)), "would overwrite another image"
            self.records[s.name] = source_key(s.path)
        return {s.path: s.name for s in found.sources}


def test_same_file_name_from_two_sites_in_two_runs_gets_two_names(tmp_path):
    touch(tmp_path, "siteA/IMG_0001.JPG", "siteB/IMG_0001.JPG")
    a, b = tmp_path / "siteA/IMG_0001.JPG", tmp_path / "siteB/IMG_0001.JPG"
    out = FakeOut()
    assert out.run([str(a)]) == {a: "IMG_0001.JPG"}
    assert out.run([str(b)]) == {b: f"IMG_0001.JPG~{tag(b)}"}  # siteA's outputs are kept
    # Rerunning both, in either order, changes neither name.
    assert out.run([str(b), str(a)]) == {a: "IMG_0001.JPG", b: f"IMG_0001.JPG~{tag(b)}"}
    assert len(out.records) == 2


def test_adding_a_second_root_later_does_not_rename_existing_outputs(tmp_path):
    touch(tmp_path / "site1", "visit/a.jpg", "only1.png")
    touch(tmp_path / "site2", "visit/a.jpg")
    one, two = tmp_path / "site1", tmp_path / "site2"
    out = FakeOut()
    first = out.run([str(one)])
    assert sorted(first.values()) == ["only1.png", "visit/a.jpg"]
    second = out.run([str(one), str(two)])
    assert {p: second[p] for p in first} == first
    assert second[two / "visit/a.jpg"] == f"visit/a.jpg~{tag(two / 'visit/a.jpg')}"


def test_a_tagged_name_is_kept_when_the_file_later_runs_alone(tmp_path):
    touch(tmp_path, "x/a.jpg", "y/a.jpg")
    x, y = tmp_path / "x/a.jpg", tmp_path / "y/a.jpg"
    out = FakeOut()
    assert out.run([str(x), str(y)]) == {x: f"a.jpg~{tag(x)}", y: f"a.jpg~{tag(y)}"}
    assert out.run([str(y)]) == {y: f"a.jpg~{tag(y)}"}


def test_a_name_recorded_for_a_file_no_longer_given_is_not_taken_over(tmp_path):
    touch(tmp_path, "old/a.jpg", "new/a.jpg")
    out = FakeOut()
    out.records["a.jpg"] = source_key(tmp_path / "old/a.jpg")
    new = tmp_path / "new/a.jpg"
    assert out.run([str(new)]) == {new: f"a.jpg~{tag(new)}"}


def test_undecodable_bytes_in_a_file_name_are_escaped_in_the_name_only(tmp_path):
    raw = os.fsencode(tmp_path) + b"/caf\xe9 \xff.jpg"
    with open(raw, "wb") as f:
        f.write(b"x")
    found = discover_all([str(tmp_path)])
    (source,) = found.sources
    assert os.fsencode(source.path) == raw  # the real file, losslessly
    assert source.path.read_bytes() == b"x"
    assert source.name == "caf%E9 %FF.jpg"
    json.dumps({"name": source.name, "image": source.display}, ensure_ascii=False).encode("utf-8")
    assert source.display == f"{tmp_path}/caf%E9 %FF.jpg"
    # The escaped name is a usable output file name.
    (tmp_path / "masks").mkdir()
    (tmp_path / "masks" / f"{source.name}.png").write_bytes(b"png")


def test_valid_utf8_names_are_unchanged():
    assert escape("visit 1/éczéma_ü.jpg") == "visit 1/éczéma_ü.jpg"
    assert candidate("visit 1/éczéma_ü.jpg") == "visit 1/éczéma_ü.jpg"


def test_a_long_file_name_is_shortened_with_a_digest_so_outputs_can_be_written(tmp_path):
    long_name = "é" * 10 + "x" * 216 + ".jpeg"  # 20 + 216 + 5 = 241 bytes, under the 255 limit
    assert len(long_name.encode()) == 241
    touch(tmp_path / "in", long_name, "sub/" + long_name[:-5] + "Z.jpeg", "short.jpg")
    names = [s.name for s in discover_all([str(tmp_path / "in")]).sources]
    assert names[0] == "short.jpg"
    long_a, long_b = names[1], names[2].split("/")[1]
    digest = hashlib.sha256(long_name.encode()).hexdigest()[:16]
    assert long_a.endswith("~" + digest) and long_a.startswith("é" * 10 + "x" * 100)
    assert len(long_a.encode()) <= COMPONENT_MAX_BYTES and long_a != long_b
    assert candidate(long_name) == long_a  # deterministic
    # The longest output file legitseg makes from it: tagged, `.json`, temporary decoration.
    final = f"{long_a}~{tag(tmp_path)}.json"
    temp = f".{final}.{4194304}-{'f' * 8}.legitseg-tmp"
    assert len(temp.encode()) <= NAME_MAX
    (tmp_path / temp).write_bytes(b"{}")


def test_a_cut_never_splits_a_multibyte_character():
    name = "x" + "é" * 150  # 301 bytes; the cut point falls inside a character
    short = candidate(name)
    short.encode("utf-8")
    assert short.startswith("x" + "é" * 91) and len(short.encode()) <= COMPONENT_MAX_BYTES
