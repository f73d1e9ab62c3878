"""pytest setup: ``import zoo`` registers the models with timm before any test; the shared helpers are in
tests/helpers.py."""
import os

import pytest
import torch

import zoo  # noqa: F401  (registers the models with timm)
from tests.helpers import OfficialReference, load_reference


def pytest_configure(config: pytest.Config) -> None:
    """Under pytest-xdist, share the cores among the workers (and the interpreters they start): workers of as many
    threads as there are cores each wait on one another (measured 4x slower on a busy core, see README)."""
    workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '0'))
    if workers:
        threads = str(max(1, (os.cpu_count() or 1) // workers))
        os.environ['OMP_NUM_THREADS'] = threads
        torch.set_num_threads(int(threads))


@pytest.fixture(scope='session')
def reference():
    """``reference(name)`` -> :class:`OfficialReference` of ``tests/fixtures/official/{name}.safetensors``, read
    once per session."""
    cache = {}

    def get(name: str) -> OfficialReference:
        if name not in cache:
            cache[name] = load_reference(name)
        return cache[name]
    return get
