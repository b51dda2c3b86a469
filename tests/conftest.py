"""Shared test fixtures: privilege checks and unique names for kernel objects."""

from __future__ import annotations

import os
import uuid

import pytest


def pytest_collection_modifyitems(config, items):
    # Tests marked `root` need CAP_BPF/CAP_NET_ADMIN. CI runs as root, so there
    # they always run; elsewhere they are skipped with the reason spelled out.
    if os.geteuid() == 0:
        return
    skip = pytest.mark.skip(reason="needs root (BPF programs, network namespaces); CI runs it as root")
    for item in items:
        if "root" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def unique_prefix() -> str:
    """A short prefix for namespaces, links and pin paths, unique per test run.

    Interface names are limited to 15 bytes, so keep it short: 'es' + 6 hex.
    """
    return "es" + uuid.uuid4().hex[:6]
