"""What a JPEG's own header says about decoding it on the GPU: its frame, its EXIF
orientation, and whether nvJPEG decodes it exactly (no torch here: the decode workers ask).

One walk of the segments before the first scan finds the frame and the EXIF and XMP
segments; the orientation is read from them as Pillow reads it (a second Pillow parse of
the file only for the odd EXIF blocks whose reading depends on Pillow's version).
"""

from __future__ import annotations

import io
import re
import struct
from dataclasses import dataclass, field, replace

from PIL import Image

ORIENTATION = 0x0112
_XMP = b"http://ns.adobe.com/xap/1.0/\0"
_XMP_ORIENTATION = re.compile(rb'tiff:Orientation(="|>)([0-9])')
# TIFF field types Pillow reads, with their unit sizes; integers and the rest.
_UNIT = {1: 1, 2: 1, 3: 2, 4: 4, 5: 8, 6: 1, 7: 1, 8: 2, 9: 4, 10: 8, 11: 4, 12: 8, 13: 4, 16: 8}
_INT = {3: "H", 4: "L", 6: "b", 8: "h", 9: "l", 13: "L", 16: "Q"}
_OTHER = {1, 2, 5, 7, 10, 11, 12}  # bytes, text, rationals, floats: never an orientation
_UNSURE, _NOT_INT = object(), object()


@dataclass(frozen=True)
class Frame:
    """What the start-of-frame segment of a JPEG declares."""

    marker: int  # 0xC0 baseline, 0xC1 extended, 0xC2 progressive, ...
    precision: int
    height: int
    width: int
    components: int
    adobe: bool  # an APP14 "Adobe" segment (colour transform of its own) before the first scan


@dataclass
class _Header:
    """What the segments before a JPEG's first scan hold, for planning its GPU decode."""

    frame: Frame | None = None
    adobe: bool = False  # an APP14 "Adobe" segment before the first scan (libjpeg reads it there)
    exif: list[bytes] = field(default_factory=list)  # APP1 "Exif" segments, in order
    xmp: bytes | None = None  # the last XMP packet (APP1)
    whole: bool = False  # every segment up to the first scan was walked by its length


def _walk(data: bytes) -> _Header | None:
    """The segments of a JPEG walked by their lengths up to the first start-of-scan, or None if not a JPEG."""
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != 0xD8:
        return None
    head, pos = _Header(), 2
    while pos + 4 <= n:
        if data[pos] != 0xFF:
            return head
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0xDA, 0xD9):  # the scan (or the end) is reached
            head.whole = marker == 0xDA and head.frame is not None
            return head
        length = struct.unpack_from(">H", data, pos + 2)[0]
        body, end = pos + 4, pos + 2 + length
        if length < 2 or end > n:
            return head
        if marker == 0xEE and data[body:body + 5] == b"Adobe":
            head.adobe = True
        elif marker == 0xE1:
            if data[body:body + 6] == b"Exif\0\0":
                head.exif.append(bytes(data[body:end]))
            elif data[body:body + len(_XMP)] == _XMP:
                head.xmp = bytes(data[body + len(_XMP):end])
        elif 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC) and head.frame is None:
            if body + 6 > n:
                return head
            precision, height, width, components = struct.unpack_from(">BHHB", data, body)
            head.frame = Frame(marker, precision, height, width, components, False)
        pos = end
    return head


def jpeg_frame(data: bytes) -> Frame | None:
    """The frame header of a JPEG (segments walked by their lengths up to the first SOFn), or None.

    `adobe` counts an APP14 "Adobe" segment anywhere before the first scan (libjpeg reads it there).
    """
    head = _walk(data)
    if head is None or head.frame is None:
        return None
    return replace(head.frame, adobe=True) if head.adobe else head.frame


def orientation(data: bytes) -> int:
    """The EXIF orientation (1-8) of a JPEG as Pillow reads it, 1 when there is none or it is out of range."""
    return _orientation(_walk(data), data)


def _orientation(head: _Header | None, data: bytes) -> int:
    if head is not None and head.whole:
        found = _exif_orientation(head.exif)
        if found is not _UNSURE:
            if found is None and head.xmp:  # Pillow's fallback: the XMP packet's tiff:Orientation
                match = _XMP_ORIENTATION.search(head.xmp)
                found = int(match[2]) if match else None
            return found if isinstance(found, int) and not isinstance(found, bool) and 1 <= found <= 8 else 1
    return _pillow_orientation(data)


def _pillow_orientation(data: bytes) -> int:
    """Pillow's reading (a second parse of the file): for the files `_exif_orientation` leaves to it."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            value = im.getexif().get(ORIENTATION, 1)
    except (OSError, ValueError, SyntaxError, struct.error):
        return 1
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _exif_orientation(segments: list[bytes]) -> object:
    """The orientation tag of IFD0 as Pillow's TIFF reader stores it: an int, `_NOT_INT` (a
    value of another type), None (no such tag), or `_UNSURE` where Pillow's reading depends on
    details (several EXIF segments, a non-standard header, a tag given twice) left to Pillow.

    Pillow's rules, followed here: entries of an unknown type are skipped, as is a value that
    would make the tags' data larger than the EXIF block; an entry cut short, or a value that
    runs past the end, ends the directory (the tags before it stay); an empty value is skipped.
    """
    if not segments:
        return None
    if len(segments) > 1:
        return _UNSURE  # Pillow joins them
    tiff = segments[0][6:]
    if tiff.startswith(b"Exif\0\0"):
        return _UNSURE
    if not tiff:
        return None
    if len(tiff) < 8 or tiff[:4] not in (b"II*\0", b"MM\0*"):
        return _UNSURE  # Pillow raises (then 1) or guesses: its business
    e = "<" if tiff[:2] == b"II" else ">"
    limit = len(tiff)
    ifd = struct.unpack_from(e + "L", tiff, 4)[0]
    if ifd + 2 > limit:
        return _UNSURE
    count = struct.unpack_from(e + "H", tiff, ifd)[0]
    stored: dict[int, tuple[int, int, int]] = {}  # tag -> (type, count, offset of the value)
    seen: set[int] = set()
    total = 0
    for i in range(count):
        at = ifd + 2 + 12 * i
        if at + 12 > limit:
            break
        tag, typ, n = struct.unpack_from(e + "HHL", tiff, at)
        if tag in seen:
            return _UNSURE  # which of two entries counts has changed between Pillow versions
        seen.add(tag)
        unit = _UNIT.get(typ)
        if unit is None:
            continue
        size = n * unit
        where = at + 8
        if size > 4:
            where = struct.unpack_from(e + "L", tiff, at + 8)[0]
            total += size
            if total > limit:
                continue
            if where + size > limit:
                break
        elif size == 0:
            continue
        stored[tag] = (typ, n, where)
    if ORIENTATION not in stored:
        return None
    typ, _, where = stored[ORIENTATION]
    if typ in _INT:
        return struct.unpack_from(e + _INT[typ], tiff, where)[0]
    return _NOT_INT if typ in _OTHER else _UNSURE


def plan(data: bytes, fmt: str) -> tuple[tuple[int, int], int] | None:
    """((upright height, width), EXIF orientation) of a JPEG the GPU decodes, else None.

    Baseline, 8-bit, three-component (YCbCr) JPEGs only.
    """
    if fmt != "JPEG":
        return None
    head = _walk(data)  # one walk of the header segments gives the frame and the orientation
    frame = None if head is None else head.frame
    if frame is None or frame.marker != 0xC0 or frame.precision != 8 or frame.components != 3 or head.adobe:
        return None
    turn = _orientation(head, data)
    h, w = frame.height, frame.width
    return ((w, h) if turn >= 5 else (h, w)), turn
