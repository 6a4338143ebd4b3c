"""What `Predictor.predict` accepts, turned lazily into pipeline Sources.

An item is a path (str, bytes or os.PathLike) to a file or a folder, a numpy array
or a PIL image; `inputs` is one item or any iterable of items (a list, a generator).
The iterable is read one item at a time as the engine asks for more, so a generator
of a million arrays never exists in memory at once.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from legitseg.errors import UsageError
from legitseg.images import naming
from legitseg.images.pixels import PixelSource
from legitseg.images.sources import Source, discover_all, is_image_name

_PATHS = (str, bytes, os.PathLike)


def is_single(inputs: Any) -> bool:
    """One item rather than an iterable of items (a str is a path, not its characters)."""
    return isinstance(inputs, (*_PATHS, np.ndarray, Image.Image))


def iter_sources(inputs: Any) -> Iterator[Source]:
    """Sources for `inputs`, in order, one item at a time.

    Folders are searched as `legitseg run` searches them (recursive, sorted, image
    suffixes only). A path that does not exist, or is not an image, becomes a Source
    that fails as one image. Raises UsageError for an item of any other type.
    """
    items: Iterable[Any]
    if is_single(inputs):
        items = (inputs,)
    elif isinstance(inputs, Iterable):
        items = inputs
    else:
        raise UsageError(f"predict: inputs of type {type(inputs).__name__}: give a path, a folder, "
                         "a numpy array, a PIL image, or an iterable of them")
    for index, item in enumerate(items):
        if isinstance(item, _PATHS):
            yield from _path_sources(os.fsdecode(item))
        elif isinstance(item, np.ndarray):
            # Copied now: a generator may refill the same buffer before the decode worker reads it.
            yield PixelSource(Path(f"array[{index}]"), f"array-{index}", np.array(item, copy=True),
                              f"array[{index}]")
        elif isinstance(item, Image.Image):
            label = f"image[{index}]"
            yield PixelSource(Path(label), f"image-{index}", item, label, "pil")
        else:
            raise UsageError(f"predict: item {index} is a {type(item).__name__}: give a path, a folder, "
                             "a numpy array (H x W x 3 uint8 RGB, or H x W gray) or a PIL image")


def _path_sources(path: str) -> Iterator[Source]:
    if os.path.isdir(path) and not is_image_name(path.rstrip("/\\")):
        yield from discover_all([path]).sources
    else:
        yield Source(Path(path), naming.candidate(os.path.basename(path) or path))
