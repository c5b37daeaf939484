"""Tests marked ``gpu`` run only where torch sees a CUDA GPU; elsewhere they are skipped, saying why. (The marker,
not the keyword: a parametrize id "gpu" is a keyword too.)"""

import pytest


def pytest_collection_modifyitems(config, items):
    gpu_tests = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_tests:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in gpu_tests:
        item.add_marker(skip)
