from __future__ import annotations

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def calib(tmp_path_factory):
    """Calibration text shared by the tests that prune: the last 15,000 characters of Python's help topics."""
    from tests import tiny

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(tiny.sample_text(15000))
    return path
