"""Shared test set-up: tests marked ``gpu`` run only where torch sees a CUDA GPU and are skipped elsewhere,
saying why (by the marker, not the keyword: a parametrize id "gpu" is a keyword too); the fast lane's guard
(``make test-fast``: a test that starts Snakemake there fails, naming the marker it lacks); the fixture that
keeps plane sweeps on one torch thread."""

import os
import subprocess

import pytest
import torch
from helpers import starts_snakemake

FAST_LANE = "HOLOPIPE_FAST_LANE"
"""Set (to anything) by ``make test-fast``, which deselects the ``slow`` and ``workflow`` tests."""


def pytest_collection_modifyitems(config, items):
    gpu_tests = [item for item in items if item.get_closest_marker("gpu") is not None]
    if not gpu_tests:
        return
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (torch.cuda.is_available() is False)")
    for item in gpu_tests:
        item.add_marker(skip)


@pytest.fixture(autouse=True)
def no_snakemake_in_the_fast_lane(request, monkeypatch):
    """In the fast lane, a test that starts Snakemake fails: it belongs in ``workflow``."""
    if not os.environ.get(FAST_LANE):
        return
    popen_init = subprocess.Popen.__init__

    def guarded(self, args, *more, **options):
        if starts_snakemake(args):
            pytest.fail(f"{request.node.nodeid} starts Snakemake in the fast lane: mark it pytest.mark.workflow")
        popen_init(self, args, *more, **options)

    monkeypatch.setattr(subprocess.Popen, "__init__", guarded)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Two torch threads on a shared 2-core machine spin against each other; one is faster here. Modules
    that sweep planes use it (``pytestmark = pytest.mark.usefixtures("one_torch_thread")``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
