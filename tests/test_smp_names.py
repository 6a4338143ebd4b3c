"""legitseg/manifest/smp_names.py is a snapshot of smp's names, so the manifest validates without torch.

These tests fail when the installed smp offers a different set than the snapshot.
"""

import segmentation_models_pytorch as smp

from legitseg.manifest import smp_names as _smp_names


def test_snapshot_is_for_the_installed_smp():
    assert _smp_names.SMP_VERSION == smp.__version__


def test_architectures_equal_smps_in_its_order():
    assert list(_smp_names.ARCHITECTURES) == [a.__name__ for a in smp._MODEL_ARCHITECTURES]


def test_encoders_equal_smps_sorted():
    assert list(_smp_names.ENCODERS) == sorted(smp.encoders.encoders)
