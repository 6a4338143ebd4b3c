"""SPEC 5/6: which files a run picks up, in what order, and the names their outputs get."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import shutil
import tempfile
from pathlib import Path

import pytest

from legitseg.errors import UsageError
from legitseg.images.sources import discover, discover_all


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


# -- discover_all: stdin as bytes, what is skipped and why, empty folders, OUT ------------------
def reasons(discovery) -> dict[str, str]:
    return dict(discovery.skipped)


def test_stdin_is_read_as_bytes_one_path_per_line(tmp_path):
    touch(tmp_path, "a.jpg", "b c.png")
    stdin = io.BytesIO(f"{tmp_path / 'a.jpg'}\r\n\n  \n{tmp_path / 'b c.png'}".encode())
    found = discover_all(["-"], stdin)
    assert [s.path for s in found.sources] == [tmp_path / "a.jpg", tmp_path / "b c.png"]


def test_null_separated_stdin_keeps_names_exactly(tmp_path):
    odd = ["line\nbreak.jpg", " lead.png", "cr\r.jpg", "plain.jpg"]
    touch(tmp_path, *odd)
    stdin = io.BytesIO(b"".join(os.fsencode(tmp_path / n) + b"\0" for n in odd))  # find -print0
    found = discover_all(["-"], stdin, null=True)
    assert [s.path for s in found.sources] == [tmp_path / n for n in odd]
    assert [s.name for s in found.sources] == odd
    assert found.sources[0].display.endswith("line\\nbreak.jpg")  # printable in a log line


def test_nul_bytes_on_stdin_without_null_are_a_usage_error(tmp_path):
    with pytest.raises(UsageError, match="NUL bytes.*--null"):
        discover_all(["-"], io.BytesIO(f"{tmp_path / 'a.jpg'}\0{tmp_path / 'b.jpg'}\0".encode()))


def test_skipped_files_are_listed_with_a_reason(tmp_path):
    root = tmp_path / "photos"
    touch(root, "a.jpg", "notes.txt", "._a.jpg", ".thumbnails/t.jpg", "sub/b.HEIC", "sub/c.jpg.bak")
    found = discover_all([str(root)])
    assert [s.name for s in found.sources] == ["a.jpg", "sub/b.HEIC"]
    assert reasons(found) == {
        str(root / "._a.jpg"): "hidden file",
        str(root / ".thumbnails"): "hidden folder",
        str(root / "notes.txt"): "suffix is not an image type",
        str(root / "sub/c.jpg.bak"): "suffix is not an image type",
    }


@pytest.mark.parametrize("marker", [[".legitseg-out"], [".legitseg.lock", "records/r.json"]])
def test_a_folder_holding_a_legitseg_output_is_not_searched(tmp_path, marker):
    root = tmp_path / "in"
    touch(root, "a.jpg", "old_out/masks/m/a.jpg.png", *("old_out/" + m for m in marker))
    found = discover_all([str(root)])
    assert [s.name for s in found.sources] == ["a.jpg"]
    assert reasons(found) == {str(root / "old_out"): "holds a legitseg output folder (not searched)"}


def test_out_inside_the_input_folder_is_never_searched(tmp_path):
    root = tmp_path / "in"
    touch(root, "a.jpg", "out/masks/m/a.jpg.png")  # OUT of a run without a marker yet
    found = discover_all([str(root)], out=root / "out" / ".." / "out")  # compared by real path
    assert [s.name for s in found.sources] == ["a.jpg"]
    assert reasons(found) == {str(root / "out"): "the output folder (OUT) is never searched"}
    # Paths listed on stdin (find in | legitseg run - -o in/out) are held to the same rule.
    stdin = io.BytesIO(f"{root / 'a.jpg'}\n{root / 'out/masks/m/a.jpg.png'}\n".encode())
    piped = discover_all(["-"], stdin, out=root / "out")
    assert [s.name for s in piped.sources] == ["a.jpg"]
    assert reasons(piped) == {str(root / "out/masks/m/a.jpg.png"): "inside the output folder (OUT)"}


def test_symlinked_folders_are_followed_once_and_loops_reported(tmp_path):
    touch(tmp_path / "elsewhere", "far.jpg")
    root = tmp_path / "in"
    touch(root, "sub/a.jpg")
    (root / "archive").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    (root / "sub" / "loop").symlink_to(root, target_is_directory=True)  # points back up
    (root / "twin").symlink_to(root / "sub", target_is_directory=True)  # same folder twice
    found = discover_all([str(root)])
    assert [s.name for s in found.sources] == ["archive/far.jpg", "sub/a.jpg"]
    loop = "symbolic link to a folder already searched (not searched twice)"
    assert reasons(found) == {str(root / "sub/loop"): loop, str(root / "twin"): loop}


@contextlib.contextmanager
def without_root():
    """Run the block as an unprivileged user when the tests run as root (root reads anything)."""
    if os.geteuid() != 0:
        yield
        return
    os.seteuid(65534)
    try:
        yield
    finally:
        os.seteuid(0)


def test_an_unreadable_folder_is_listed_with_the_reason():
    base = Path(tempfile.mkdtemp(prefix="legitseg-unreadable-"))
    try:
        base.chmod(0o755)
        touch(base, "a.jpg", "locked/b.jpg")
        (base / "locked").chmod(0)
        with without_root():
            found = discover_all([str(base)])
        assert [s.name for s in found.sources] == ["a.jpg"]
        assert reasons(found) == {str(base / "locked"): "folder cannot be listed: Permission denied"}
    finally:
        (base / "locked").chmod(0o755)
        shutil.rmtree(base)


def test_folder_inputs_without_images_are_reported_as_empty(tmp_path):
    touch(tmp_path, "full/a.jpg", "texts/notes.txt")
    (tmp_path / "empty").mkdir()
    found = discover_all([str(tmp_path / "full"), str(tmp_path / "empty"), str(tmp_path / "texts")])
    assert [s.name for s in found.sources] == ["a.jpg"]
    assert found.empty_inputs == [str(tmp_path / "empty"), str(tmp_path / "texts")]


def test_a_fifo_named_like_an_image_is_listed_to_fail_as_one_image(tmp_path):
    os.mkfifo(tmp_path / "x.jpg")
    os.mkfifo(tmp_path / "y.txt")
    found = discover_all([str(tmp_path)])
    assert [s.name for s in found.sources] == ["x.jpg"]
    assert reasons(found) == {str(tmp_path / "y.txt"): "suffix is not an image type"}
