"""Resume with a `quality:` policy: judge a done image again without running its models.

The measures do not depend on the limits, so a record whose verdict was given by another
policy is judged again from its stored measures (no decode, no model); a record without
measures of the current method (written before the policy was on) is measured from the
bytes the plan has already read (a decode, still no model). Models run again only where
the verdict decides they must: an image the skip policy passed over that is now adequate
(or whose policy was removed). docs/quality.md, "Resume".
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from pathlib import Path

from legitseg.errors import ImageError
from legitseg.images.decode import check_header, decode_rgb
from legitseg.images.quality import assess, current
from legitseg.manifest.choices import DEFAULT_MAX_PIXELS
from legitseg.manifest.quality import Quality, QualityPolicy, judge
from legitseg.output.records import ImageRecord
from legitseg.output.writers import write_record

log = logging.getLogger(__name__)


def rejudged(record: ImageRecord, data: bytes, policy: QualityPolicy | None,
             max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageRecord:
    """`record` with `policy`'s verdict (a new object when it changes; `record` itself otherwise).

    Entries of models the skip policy passed over are dropped when the image is no longer
    skipped, so the plan sends it to the models.
    """
    if policy is None:
        if record.quality is None:
            return record
        return _with(record, None, keep_skipped=False)
    stored = Quality.from_json(record.quality) if record.quality is not None else None
    if stored is not None and current(stored) and stored.policy == policy.digest():
        return record
    if stored is not None and current(stored):
        quality = judge(stored.measures, policy, stored.model)
    else:
        try:
            quality = assess(decode_rgb(data, check_header(data, max_pixels)), policy, stored)
        except ImageError:
            return record  # a file that does not decode: its record says so already
    return _with(record, quality, keep_skipped=quality.skipped)


def _with(record: ImageRecord, quality: Quality | None, keep_skipped: bool) -> ImageRecord:
    models = record.models if keep_skipped else {
        k: e for k, e in record.models.items() if e.status != "inadequate"}
    return dataclasses.replace(record, models=dict(models), quality=None if quality is None else quality.to_json(),
                               written_at=time.strftime("%Y-%m-%dT%H:%M:%S%z"))


def resumed(out: Path, record: ImageRecord, data: bytes, policy: QualityPolicy | None,
            done: Callable[[ImageRecord], bool], max_pixels: int = DEFAULT_MAX_PIXELS) -> ImageRecord | None:
    """The plan's answer for one recorded image: its record (rewritten with a new verdict when it
    changed) when the run may skip it, None when it must be processed."""
    new = rejudged(record, data, policy, max_pixels)
    if not done(new):
        return None
    if new is not record:
        write_record(out, new)
        log.debug("%s: verdict of the quality policy given again, models not rerun", record.image)
    return new
