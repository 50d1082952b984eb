"""Shared by the test files: the cuda marker. `python -m pytest -m cuda -rs` runs only the GPU tests and prints why
each was skipped where no CUDA device is; the plain `python -m pytest -q` runs them too (skipped on a CPU)."""
import pytest
import torch

NO_CUDA = "no CUDA device here (torch.cuda.is_available() is False); .ci/gpu runs these on a GPU"
ON_CUDA = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]
DEVICES = ["cpu", pytest.param("cuda", marks=ON_CUDA)]  # parametrize a test with these to run it on both


def cuda_only(test):
    """A test that runs on a GPU alone."""
    for mark in ON_CUDA:
        test = mark(test)
    return test


def pytest_configure(config):
    config.addinivalue_line("markers", "cuda: needs a CUDA GPU (skipped, with the reason, where there is none)")
