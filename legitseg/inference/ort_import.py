"""The one place legitseg imports ONNX Runtime, with its telemetry switched off first.

`import onnxruntime` alone, with telemetry on, writes a device id and an event database
under ~/.cache/Microsoft/DeveloperTools/.onnxruntime, and the library can upload them.
legitseg promises never to touch the network, so `ORT_DISABLE_TELEMETRY=1` is set
before every import, whatever the caller had set (ONNX Runtime reads the variable once,
when it loads; `disable_telemetry_events()` after that leaves the files). Every other
module gets ONNX Runtime from `onnxruntime()`; tests/test_edges_runtime.py checks that
no other import exists in the package. docs/onnx.md.
"""

from __future__ import annotations

import logging
import os
import sys
from types import ModuleType

log = logging.getLogger(__name__)

TELEMETRY_ENV = "ORT_DISABLE_TELEMETRY"
# Values ONNX Runtime 1.x reads as "off"; "0", "2" or an empty value leave telemetry on.
_OFF = {"1", "true", "yes"}


def telemetry_env() -> dict[str, str]:
    """The environment a process needs for ONNX Runtime's telemetry to stay off (Ray workers)."""
    return {TELEMETRY_ENV: "1"}


def onnxruntime() -> ModuleType:
    """The `onnxruntime` module, imported with telemetry off.

    Sets $ORT_DISABLE_TELEMETRY=1 in this process (children inherit it) before the
    first import. When something else imported ONNX Runtime earlier with telemetry on,
    it is too late for the files it wrote: this is logged once as a warning.
    """
    earlier = sys.modules.get("onnxruntime")
    was_off = os.environ.get(TELEMETRY_ENV, "").strip().lower() in _OFF
    os.environ.update(telemetry_env())
    if earlier is not None:
        if not was_off and not getattr(earlier, "_legitseg_warned", False):
            log.warning("onnxruntime was imported before legitseg with telemetry on (set %s=1 before "
                        "importing it); legitseg switches its telemetry events off now", TELEMETRY_ENV)
            earlier._legitseg_warned = True  # type: ignore[attr-defined]
            earlier.disable_telemetry_events()
        return earlier
    import onnxruntime as ort  # the only import of ONNX Runtime in legitseg

    return ort
