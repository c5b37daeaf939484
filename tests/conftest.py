"""Shared test set-up: tests marked ``gpu`` run only where torch sees a CUDA GPU and are skipped elsewhere,
saying why (by the marker, not the keyword: a parametrize id "gpu" is a keyword too); the fixture that keeps
plane sweeps on one torch thread."""

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    gpu_tests = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_tests:
        return
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in gpu_tests:
        item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Two torch threads on a shared 2-core machine spin against each other; one is faster here. Modules
    that sweep planes use it (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
