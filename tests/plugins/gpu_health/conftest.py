"""Shared by the GPU tests: what a test installs into pynvml (a simulation, a tracer) is taken out again."""

from __future__ import annotations

from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def restore_nvml() -> Iterator[None]:
    try:
        import pynvml
    except ImportError:
        yield
        return
    previous = pynvml.nvmlLib
    yield
    pynvml.nvmlLib = previous
    pynvml._nvmlGetFunctionPointer_cache.clear()
