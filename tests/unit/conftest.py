"""Shared fixtures of the unit tests."""

from __future__ import annotations

import shutil
from collections.abc import Iterator

import pytest
from test_cluster_store import LoopbackEtcd


@pytest.fixture(scope="module")
def etcd_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real one-member etcd on 127.0.0.1 for the module's tests."""
    if shutil.which("etcd") is None:
        pytest.skip("needs etcd (etcd-server)")
    srv = LoopbackEtcd(tmp_path_factory.mktemp("etcd") / "data")
    srv.start()
    try:
        yield srv.url
    finally:
        srv.stop()
