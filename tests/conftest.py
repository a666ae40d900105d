from __future__ import annotations

import os

import pytest

# lm-eval's tasks in the tests read local files only: nothing may reach for the hub
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")  # a one-line error is the only output
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
