"""Where a JPEG or PNG image ends, found by parsing its structure; HEIF header sizes.

Phones append data after a complete image (Google and Samsung motion photos put an MP4
after the JPEG's end-of-image marker; some tools add metadata after a PNG's IEND), so
"truncated" cannot be judged from the last bytes of the file. These walkers follow the
format from the start to the marker that ends the first image; running out of data
before it means the file was cut short.
"""

from __future__ import annotations

import io
import re
import struct

_SOI, _EOI, _SOS = 0xD8, 0xD9, 0xDA
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0..RST7: markers without a length
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def jpeg_end(data: bytes) -> int | None:
    """Offset just past the end-of-image marker of the JPEG starting at 0, or None if cut short.

    Segments are skipped by their declared length (so an EXIF thumbnail's own markers are
    not mistaken for the image's); entropy-coded data after each start-of-scan is
    scanned for the next marker (0xFF not followed by a stuffed 0x00 or a restart
    marker). Stray bytes between segments are passed over as libjpeg does.
    """
    n = len(data)
    if n < 4 or data[0] != 0xFF or data[1] != _SOI:
        return None
    pos = 2
    while True:
        pos = data.find(b"\xff", pos)
        if pos < 0:
            return None
        while pos < n and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos >= n:
            return None
        marker = data[pos]
        pos += 1
        if marker == _EOI:
            return pos
        if marker in _STANDALONE or marker == 0x00 or marker == _SOI:
            continue
        if pos + 2 > n:
            return None
        length = struct.unpack_from(">H", data, pos)[0]
        pos += length
        if length < 2 or pos > n:
            return None
        if marker == _SOS:
            pos = _scan_end(data, pos)
            if pos is None:
                return None


def jpeg_whole(data: bytes) -> bool:
    """Whether the JPEG starting at 0 is whole: `jpeg_end(data) is not None`, mostly without its scan search.

    A JPEG whose frame is coded in one scan holding every component (baseline and extended
    sequential: nearly every camera's) and whose last two bytes are the end-of-image marker
    is whole: entropy-coded data never holds 0xFF 0xD9, so those bytes end the scan, and a
    file cut inside the scan cannot end with them. Such a file is known whole from its header
    segments alone, without searching the megabytes of its scan (C-speed, but under the GIL,
    in every decode worker). Anything else (progressive or multi-scan JPEGs, data after the
    image such as a motion photo's video, a file cut short) is walked to its end as before.
    """
    if data[-2:] == b"\xff\xd9" and _one_scan(data):
        return True
    return jpeg_end(data) is not None


def _one_scan(data: bytes) -> bool:
    """Whether the segments before the first scan are whole and that scan codes every component of a
    sequential (SOF0/SOF1) frame, ending before the file's last two bytes."""
    n, pos, components = len(data), 2, None
    if n < 4 or data[0] != 0xFF or data[1] != _SOI:
        return False
    while pos + 4 <= n:
        if data[pos] != 0xFF or data[pos + 1] in (0xFF, _EOI, _SOI, 0x00, *_STANDALONE):
            return False  # fill bytes, stray markers: left to the full walk
        marker = data[pos + 1]
        length = struct.unpack_from(">H", data, pos + 2)[0]
        end = pos + 2 + length
        if length < 2 or end > n - 2:
            return False
        if marker in (0xC0, 0xC1):
            if components is not None or length < 8:
                return False
            components = data[pos + 9]
        elif 0xC2 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            return False  # progressive, lossless, hierarchical, arithmetic: several scans possible
        elif marker == _SOS:
            return components is not None and length >= 3 and data[pos + 4] == components
        pos = end
    return False


# 0xFF not followed by 0x00 (a stuffed 0xFF data byte) or RST0..RST7 (restart markers).
_MARKER_IN_SCAN = re.compile(rb"\xff[^\x00\xd0-\xd7]")


def _scan_end(data: bytes, pos: int) -> int | None:
    """Offset of the 0xFF that starts the first marker after entropy-coded data.

    One regular-expression search (C speed, no Python loop per 0xFF: on a 12 MP photo
    this took 7.6 ms under the GIL in a loop, a sixth of a GPU's time per image).
    """
    found = _MARKER_IN_SCAN.search(data, pos)
    return found.start() if found else None


def png_end(data: bytes) -> int | None:
    """Offset just past the IEND chunk of the PNG starting at 0, or None if cut short."""
    n = len(data)
    if not data.startswith(PNG_SIGNATURE):
        return None
    pos = len(PNG_SIGNATURE)
    while pos + 12 <= n:
        length, kind = struct.unpack_from(">I4s", data, pos)
        pos += 12 + length
        if pos > n:
            return None
        if kind == b"IEND":
            return pos
    return None


def heif_header(data: bytes) -> tuple[int, int] | None:
    """(width, height) of a HEIF/HEIC file's primary image as displayed, or None if not HEIF.

    Parses the header only (libheif through pillow-heif); raises OSError or ValueError
    for a HEIF file whose header cannot be read.
    """
    if data[4:8] != b"ftyp":  # every HEIF file opens with its ftyp box; nothing else needs libheif
        return None
    import pillow_heif  # imported only for ftyp files: a machine without it still reads JPEG and PNG

    if not pillow_heif.is_supported(bytes(data[:64])):
        return None
    heif = pillow_heif.open_heif(io.BytesIO(data))
    return heif.size
