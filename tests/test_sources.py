"""SPEC 5/6: which files a run picks up, in what order, and the names their outputs get."""

from __future__ import annotations

import hashlib
import io
import os
import random
from pathlib import Path

import pytest

from legitseg.errors import UsageError
from legitseg.pipeline.sources import discover


def touch(root: Path, *names: str) -> None:
    for name in names:
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x")


def names(sources) -> list[str]:
    return [s.name for s in sources]


def tag(path: Path) -> str:
    """The collision suffix the naming rule appends: 8 hex of the sha1 of the absolute path."""
    return hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:8]


TREE = ["b.jpg", "a.png", "a.jpg", "0.gif", "sub/z.tif", "sub/deeper/c.webp", "sub2/x.bmp",
        "notes.txt", "sub/readme.md", "sub2/y.jpg.bak", "noext"]
ORDER = ["0.gif", "a.jpg", "a.png", "b.jpg", "sub/z.tif", "sub/deeper/c.webp", "sub2/x.bmp"]


def test_a_folder_is_searched_recursively_in_sorted_depth_first_order(tmp_path):
    touch(tmp_path / "images", *TREE)
    sources = discover([str(tmp_path / "images")])
    assert names(sources) == ORDER
    assert [s.path for s in sources] == [tmp_path / "images" / n for n in ORDER]


def test_the_order_does_not_depend_on_creation_order(tmp_path):
    shuffled = TREE[:]
    random.Random(3).shuffle(shuffled)
    touch(tmp_path / "one", *TREE)
    touch(tmp_path / "two", *shuffled)
    assert names(discover([str(tmp_path / "one")])) == names(discover([str(tmp_path / "two")])) == ORDER


def test_suffixes_are_matched_case_insensitively(tmp_path):
    found = ["A.JPG", "b.Jpeg", "c.PNG", "d.TiF", "e.TIFF", "f.WebP", "g.BMP", "h.GIF", "i.jpeg",
             "o.heic", "p.HEIF", "q.jpe"]
    ignored = ["j.jpgx", "k.txt", "l.jpg.bak", "m", "n.JPG.json"]
    touch(tmp_path, *found, *ignored)
    assert names(discover([str(tmp_path)])) == sorted(found)


def test_same_stem_different_suffix_keeps_distinct_names(tmp_path):
    touch(tmp_path, "a.jpg", "a.png", "a.JPG", "a.tiff")
    assert names(discover([str(tmp_path)])) == ["a.JPG", "a.jpg", "a.png", "a.tiff"]


def test_the_same_relative_path_under_two_roots_gets_two_names(tmp_path):
    touch(tmp_path / "site1", "visit/a.jpg", "only1.png")
    touch(tmp_path / "site2", "visit/a.jpg", "only2.png")
    one, two = tmp_path / "site1", tmp_path / "site2"
    sources = discover([str(one), str(two)])
    assert names(sources) == ["only1.png", f"visit/a.jpg~{tag(one / 'visit/a.jpg')}",
                              "only2.png", f"visit/a.jpg~{tag(two / 'visit/a.jpg')}"]
    # The name of a file does not depend on the order of the INPUT arguments.
    reverse = discover([str(two), str(one)])
    assert {s.path: s.name for s in reverse} == {s.path: s.name for s in sources}


def test_file_inputs_are_named_by_file_name_and_collisions_resolved(tmp_path):
    touch(tmp_path, "x/a.jpg", "y/a.jpg", "y/b.png")
    sources = discover([str(tmp_path / "x/a.jpg"), str(tmp_path / "y/a.jpg"), str(tmp_path / "y/b.png")])
    assert names(sources) == [f"a.jpg~{tag(tmp_path / 'x/a.jpg')}", f"a.jpg~{tag(tmp_path / 'y/a.jpg')}",
                              "b.png"]


def test_a_file_given_twice_is_processed_once_under_its_first_name(tmp_path):
    touch(tmp_path, "root/sub/a.jpg", "root/b.jpg")
    root = tmp_path / "root"
    sources = discover([str(root), str(root / "sub/a.jpg"), str(root / "sub"), "./" + os.path.relpath(root / "b.jpg")])
    assert names(sources) == ["b.jpg", "sub/a.jpg"]


def test_no_two_sources_share_a_name(tmp_path):
    touch(tmp_path / "r1", "a.jpg", "s/a.jpg", "s/b.png")
    touch(tmp_path / "r2", "a.jpg", "s/a.jpg", "a.png")
    stdin = io.StringIO(f"{tmp_path / 'r1/s/b.png'}\n{tmp_path / 'r2/s/a.jpg'}\n")
    sources = discover([str(tmp_path / "r1"), str(tmp_path / "r2"), "-"], stdin)
    assert len(names(sources)) == len(set(names(sources))) == 6  # r1/s/b.png and r2/s/a.jpg are known


def test_stdin_lists_paths_one_per_line(tmp_path):
    touch(tmp_path, "d1/p.jpg", "d2/q.png", "d2/skip.txt", "d3/p.jpg")
    stdin = io.StringIO(
        f"{tmp_path / 'd2/q.png'}\r\n"  # CRLF from a Windows-made list
        "\n   \n"  # blank lines are skipped
        f"{tmp_path / 'd1/p.jpg'}\n"
        f"{tmp_path / 'd2/skip.txt'}\n"  # taken as given: the user listed it
        f"{tmp_path / 'd3/p.jpg'}"  # no final newline
    )
    sources = discover(["-"], stdin)
    assert [s.path for s in sources] == [tmp_path / "d2/q.png", tmp_path / "d1/p.jpg",
                                         tmp_path / "d2/skip.txt", tmp_path / "d3/p.jpg"]
    assert names(sources) == ["q.png", f"p.jpg~{tag(tmp_path / 'd1/p.jpg')}", "skip.txt",
                              f"p.jpg~{tag(tmp_path / 'd3/p.jpg')}"]


def test_a_missing_path_on_stdin_is_kept_to_fail_as_one_image(tmp_path):
    sources = discover(["-"], io.StringIO(f"{tmp_path / 'gone.jpg'}\n"))
    assert [s.path for s in sources] == [tmp_path / "gone.jpg"]


def test_stdin_and_folders_mix(tmp_path):
    touch(tmp_path, "f/a.jpg", "g/b.jpg")
    sources = discover([str(tmp_path / "f"), "-"], io.StringIO(f"{tmp_path / 'g/b.jpg'}\n"))
    assert names(sources) == ["a.jpg", "b.jpg"]


@pytest.mark.parametrize("inputs, stdin, message", [
    (["{tmp}/missing"], None, "does not exist"),
    (["-"], None, "no standard input"),
])
def test_bad_inputs_are_usage_errors(tmp_path, inputs, stdin, message):
    with pytest.raises(UsageError, match=message):
        discover([i.format(tmp=tmp_path) for i in inputs], stdin)


def test_an_empty_folder_gives_no_sources(tmp_path):
    touch(tmp_path, "notes.txt")
    assert discover([str(tmp_path)]) == []


def test_a_folder_named_like_an_image_is_listed_and_searched(tmp_path):
    touch(tmp_path, "x.jpg/inner.png", "y.png")
    sources = discover([str(tmp_path)])
    assert names(sources) == ["x.jpg", "y.png", "x.jpg/inner.png"]  # x.jpg itself fails later


def test_folder_search_skips_hidden_files_and_folders_but_not_named_ones(tmp_path):
    root = tmp_path / "photos"
    (root / ".thumbnails").mkdir(parents=True)
    (root / "a.jpg").write_bytes(b"x")
    (root / "._a.jpg").write_bytes(b"x")
    (root / ".thumbnails" / "a.jpg").write_bytes(b"x")
    assert [s.name for s in discover([str(root)])] == ["a.jpg"]
    assert [s.name for s in discover([str(root / "._a.jpg")])] == ["._a.jpg"]
