"""The rehearsal runs only when asked (``make rehearsal``, which sets REHEARSAL=1): it takes minutes, not seconds."""

import os

import pytest


def pytest_collection_modifyitems(config, items):
    if os.environ.get("REHEARSAL") == "1":
        return
    skip = pytest.mark.skip(reason="the ImageNet-shaped rehearsal runs with `make rehearsal` (REHEARSAL=1)")
    here = os.path.dirname(__file__)
    for item in items:
        if str(item.fspath).startswith(here):
            item.add_marker(skip)
