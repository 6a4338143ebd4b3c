"""One COCO dataset JSON for a whole OUT, written as it goes and renamed into place at the end.

`images` and `annotations` are streamed into two temporary files beside the destination
(one image's objects at a time); closing writes the head, copies both in and adds the
categories, which are only known once every record was read. The file appears under its
final name complete, or not at all.
"""

from __future__ import annotations

import os
import secrets
import shutil
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from legitseg._version import __version__
from legitseg.annotations.regions import keyhole
from legitseg.annotations.shapes import Shape
from legitseg.annotations.source import Category
from legitseg.errors import RuntimeFailure
from legitseg.fsio import TMP_SUFFIX, dumps
from legitseg.output.records import ImageRecord


class CocoWriter:
    """Streams one COCO file to `dest`; `polygons` writes polygons instead of RLE."""

    def __init__(self, dest: Path, out: Path, polygons: bool = False) -> None:
        self.dest, self.out, self.polygons = dest, out, polygons
        stem = f".{dest.name}.{os.getpid()}-{secrets.token_hex(4)}"
        self.tmp = {part: dest.parent / f"{stem}.{part}{TMP_SUFFIX}" for part in ("images", "annotations", "all")}
        self.files: dict[str, IO[str]] = {}
        self.counts = {"images": 0, "annotations": 0}
        self.runs: set[str] = set()
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            for part in ("images", "annotations"):
                self.files[part] = open(self.tmp[part], "w", encoding="utf-8")  # noqa: SIM115 - closed in close/abort
        except OSError as err:
            self.abort()
            raise RuntimeFailure(f"cannot write {dest}: {err.strerror or err}") from err

    def _put(self, part: str, item: dict[str, Any]) -> None:
        f = self.files[part]
        if self.counts[part]:
            f.write(",\n")
        f.write(dumps(item, ensure_ascii=False))
        self.counts[part] += 1

    def add(self, record: ImageRecord, shapes: list[Shape], severity: dict[str, dict[str, Any]]) -> None:
        """The image and its shapes. Raises RuntimeFailure when the disk refuses them."""
        h, w = record.size or (0, 0)
        image_id = self.counts["images"] + 1
        image: dict[str, Any] = {"id": image_id, "file_name": record.image, "width": w, "height": h,
                                 "sha256": record.sha256, "legitseg_name": record.name}
        if severity:
            image["attributes"] = {"severity": severity}
            self.runs.update(str(s["run_id"]) for s in severity.values() if s.get("run_id"))
        try:
            self._put("images", image)
            for shape in shapes:
                self._put("annotations", self._annotation(shape, image_id))
        except OSError as err:
            raise RuntimeFailure(f"cannot write {self.dest}: {err.strerror or err}") from err

    def _annotation(self, shape: Shape, image_id: int) -> dict[str, Any]:
        if self.polygons:
            segmentation: Any = [keyhole(outer, holes) for outer, holes in shape.polygons()]
        else:
            segmentation = shape.rle()
        trace = shape.trace()
        if trace["run_id"]:
            self.runs.add(str(trace["run_id"]))
        ann = {"id": self.counts["annotations"] + 1, "image_id": image_id,
               "category_id": shape.category.id, "segmentation": segmentation,
               "area": shape.area, "bbox": shape.bbox, "iscrowd": 0, **trace}
        if shape.score is not None:
            ann["score"] = shape.score
        return ann

    def close(self, categories: list[Category]) -> Path:
        """Join the parts into `dest`, atomically. Raises RuntimeFailure."""
        head = {
            "info": {"description": f"legitseg annotations of {self.out.resolve()}", "version": __version__,
                     "date_created": datetime.now().astimezone().isoformat(timespec="seconds"),
                     "segmentation": "polygons" if self.polygons else "rle",
                     "coordinates": "pixels: x right, y down, (0, 0) the top-left corner of the image",
                     "runs": sorted(self.runs)},
            "licenses": [],
        }
        cats = [{"id": c.id, "name": f"{c.model}/{c.label}", "supercategory": c.model, "model": c.model,
                 "label": c.label, "class_index": c.class_index, "color": c.colour} for c in categories]
        try:
            for f in self.files.values():
                f.close()
            with open(self.tmp["all"], "w", encoding="utf-8") as f:
                f.write(dumps(head, ensure_ascii=False)[:-1] + ',\n"images": [\n')
                for part, end in (("images", '\n],\n"annotations": [\n'), ("annotations", "\n],\n")):
                    with open(self.tmp[part], encoding="utf-8") as src:
                        shutil.copyfileobj(src, f, 1 << 20)
                    f.write(end)
                f.write('"categories": ' + dumps(cats, ensure_ascii=False) + "}\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(self.tmp["all"], self.dest)
        except OSError as err:
            raise RuntimeFailure(f"cannot write {self.dest}: {err.strerror or err}") from err
        finally:
            self.abort()
        return self.dest

    def abort(self) -> None:
        """Remove the temporary parts (the destination is left as it was)."""
        for f in self.files.values():
            f.close()
        for path in self.tmp.values():
            try:
                path.unlink(missing_ok=True)
            except OSError:
                pass  # the folder went away or is read-only: a hidden leftover, never the final name
