"""Shared fixtures of the unit tests."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cluster_store import LoopbackEtcd

from vmferry.security import CertificateAuthority


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


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    """A fresh CA in the test's temporary directory."""
    return CertificateAuthority.create(tmp_path / "ca", "test CA")
