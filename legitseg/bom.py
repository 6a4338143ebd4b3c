"""`legitseg info --json`: a CycloneDX bill of materials of the running environment.

The document lists every installed Python distribution (with whether it matches the
lock file), the interpreter, the operating system, the CPU, the CUDA/cuDNN build of
torch and each visible GPU. Facts CycloneDX has no field for are `properties` named
`legitseg:*` (documented in docs/soup/README.md). Imports torch (for the CUDA facts).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

from legitseg._version import __version__
from legitseg.errors import UsageError
from legitseg.provenance import (
    LOCK_ENV,
    LockComparison,
    compare_lock,
    cpu_facts,
    cuda_facts,
    installed_distributions,
    lock_file,
    os_facts,
    python_facts,
)

SPEC_VERSION = "1.6"  # ECMA-424 1st edition; what dependency-track and most scanners ingest


def bill_of_materials(lock: Path | None = None) -> str:
    """The CycloneDX 1.6 JSON document, as text.

    `lock` defaults to `$LEGITSEG_LOCK_FILE`, else the source tree's requirements_lock.txt.
    Raises UsageError when a lock file named explicitly (argument or variable) is absent
    or unreadable; a missing default lock is recorded as `legitseg:lock:status` = absent.
    """
    explicit = lock is not None or bool(os.environ.get(LOCK_ENV))
    lock = lock or lock_file()
    try:
        cmp = compare_lock(lock)
    except OSError as err:
        raise UsageError(f"cannot read lock file {lock}: {err.strerror or err}") from err
    if cmp is None and explicit:
        raise UsageError(f"lock file {lock} does not exist")
    return _serialize(_bom(cmp, lock, installed_distributions(), python_facts(), os_facts(),
                           cpu_facts(), cuda_facts()))


def _bom(cmp: LockComparison | None, lock: Path, dists: dict[str, tuple[str, str]],
         py: dict[str, Any], os_: dict[str, str], cpu: dict[str, Any], cuda: dict[str, Any]):
    from cyclonedx.model import Property
    from cyclonedx.model.bom import Bom
    from cyclonedx.model.component import Component, ComponentScope, ComponentType
    from packageurl import PackageURL

    def props(prefix: str, items: dict[str, Any]) -> list:
        return [Property(name=f"legitseg:{prefix}:{k}", value=str(v)) for k, v in items.items()
                if v not in (None, "", [])]

    bom = Bom()
    bom.metadata.component = Component(
        type=ComponentType.APPLICATION, name="legitseg", version=__version__, bom_ref="legitseg",
        purl=PackageURL(type="pypi", name="legitseg", version=__version__),
        description="Batch inference of segmentation-models-pytorch models over folders of images")
    bom.metadata.properties.update(_lock_properties(cmp, lock))

    for key, (name, version) in dists.items():
        if key == "legitseg":
            continue  # the metadata component above
        bom.components.add(Component(
            type=ComponentType.LIBRARY, name=name, version=version, bom_ref=f"pypi:{key}",
            purl=PackageURL(type="pypi", name=key, version=version),
            properties=[Property(name="legitseg:lock", value=_lock_state(cmp, key))]))

    bom.components.add(Component(
        type=ComponentType.PLATFORM, name=py["implementation"], version=py["version"],
        bom_ref="python", properties=props("python", {"executable": py["executable"], "compiler": py["compiler"]})))
    bom.components.add(Component(
        type=ComponentType.OPERATING_SYSTEM, name=os_["system"], version=os_["release"], bom_ref="os",
        description=os_.get("distribution") or None,
        properties=props("os", {"version": os_["version"], "platform": os_["platform"]})))
    bom.components.add(Component(
        type=ComponentType.DEVICE, name=cpu["model"], bom_ref="cpu",
        properties=props("cpu", {"machine": cpu["machine"], "logical_cores": cpu["logical_cores"],
                                 "usable_cores": cpu["usable_cores"], "flags": " ".join(cpu["flags"])})))
    torch_version = dists.get("torch", ("torch", None))[1]
    for name, version in (("cuda-runtime", cuda["torch_cuda"]), ("cudnn", cuda["cudnn"])):
        if version:
            # What torch was compiled against, not something found installed on this host:
            # without a usable GPU the component is `optional` (CycloneDX: not present or
            # not callable at runtime), so a scanner does not count it as installed.
            bom.components.add(Component(
                type=ComponentType.LIBRARY, name=name, version=version, bom_ref=name,
                scope=None if cuda["available"] else ComponentScope.OPTIONAL,
                description=f"built with: the {name} version torch {torch_version or ''} was built "
                            "against; " + ("usable on this host" if cuda["available"] else
                                           "not usable on this host (no CUDA device)"),
                properties=props("cuda", {"built-with": f"torch {torch_version}" if torch_version else "torch",
                                          "available": cuda["available"]})))
    for dev in cuda["devices"]:
        bom.components.add(Component(
            type=ComponentType.DEVICE, name=dev["name"], bom_ref=f"cuda:{dev['index']}",
            properties=props("gpu", {"index": dev["index"], "capability": dev["capability"],
                                     "memory_bytes": dev["memory_bytes"], "uuid": dev["uuid"]})))
    return bom


def _lock_state(cmp: LockComparison | None, key: str) -> str:
    if cmp is None:
        return "no-lock-file"
    if key in cmp.different:
        return f"different (locked {cmp.different[key][0]})"
    return "match" if key in cmp.locked else "not-locked"


def _lock_properties(cmp: LockComparison | None, lock: Path) -> list:
    from cyclonedx.model import Property

    out = [Property(name="legitseg:lock:file", value=str(lock.absolute()))]
    if cmp is None:
        return [*out, Property(name="legitseg:lock:status", value="absent")]
    out.append(Property(name="legitseg:lock:sha256", value=cmp.sha256))
    out += [Property(name="legitseg:lock:extra", value=f"{digest}  {path.absolute()}")
            for path, digest in cmp.extra_files.items()]
    out.append(Property(name="legitseg:lock:status", value="match" if cmp.matches else "differs"))
    out += [Property(name="legitseg:lock:different",
                     value=f"{cmp.locked[k][0]}=={want} installed {have}")
            for k, (want, have) in cmp.different.items()]
    out += [Property(name="legitseg:lock:missing", value=f"{cmp.locked[k][0]}=={want}")
            for k, want in cmp.missing.items()]
    return out


def _serialize(bom) -> str:
    from cyclonedx.output.json import JsonV1Dot6

    with warnings.catch_warnings():
        # The library warns that the root component declares no dependency graph: we
        # list what is installed, not who requires whom, and say so in docs/soup/README.md.
        warnings.simplefilter("ignore", UserWarning)
        return JsonV1Dot6(bom).output_as_string(indent=2)
