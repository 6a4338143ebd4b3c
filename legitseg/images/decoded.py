"""What decoding produces and how each model wants it: the types every stage after decoding
shares (the decoders, the runners, the engines), apart from the OpenCV decoder itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from legitseg.images.sources import Source


@dataclass(frozen=True)
class Prep:
    """How one model wants its input: all models sharing a Prep share one resized array."""

    resize: str  # stretch | pad | letterbox | tile
    size: tuple[int, int] | None  # (h, w) for stretch and letterbox
    interpolation: str
    channels: int
    reduced: bool = False  # `decode: reduced`: a large JPEG decoded at 1/2-1/8 first (images/reduced.py)


@dataclass
class DecodedImage:
    source: Source
    sha256: str
    size: tuple[int, int]  # oriented (h, w)
    inputs: dict[Prep, Any] = field(default_factory=dict)  # HWC uint8 array (or CHW device tensor) per Prep
    # A JPEG left for the GPU to decode (images/device_decode.py): its bytes and EXIF orientation.
    encoded: Any = None
    orientation: int = 1
    quality: Any = None  # manifest.quality.Quality, with a `quality:` policy (images/quality.py)
