"""pytest setup: ``import zoo`` registers the models with timm before any test; shared helpers are in helpers.py."""
import pytest

import zoo  # noqa: F401  (registers the models with timm)
from helpers import OfficialReference, load_reference


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
