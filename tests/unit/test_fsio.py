"""Atomic file replacement with several writers at once (two moves preparing QEMU's TLS
directory together failed one of them: both used the same temporary name)."""

from __future__ import annotations

import stat
import threading
from pathlib import Path

from vmferry.fsio import replace_file
from vmferry.qemu.tls import X509Files, prepare_creds_dir


def test_concurrent_writers_never_fail_and_leave_one_whole_version(tmp_path: Path) -> None:
    target = tmp_path / "ca-cert.pem"
    versions = [bytes([65 + i]) * 50_000 for i in range(8)]
    errors: list[BaseException] = []
    start = threading.Barrier(len(versions))

    def writer(data: bytes) -> None:
        start.wait()
        try:
            for _ in range(50):
                replace_file(target, data, 0o644)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(v,)) for v in versions]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert target.read_bytes() in versions  # one writer's whole data, never a mix
    assert [p.name for p in tmp_path.iterdir()] == ["ca-cert.pem"]  # no temporary left


def test_mode_is_applied(tmp_path: Path) -> None:
    replace_file(tmp_path / "key.pem", b"k", 0o600)
    replace_file(tmp_path / "crl.pem", b"c", 0o644, sync=True)
    assert stat.S_IMODE((tmp_path / "key.pem").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "crl.pem").stat().st_mode) == 0o644


def test_two_moves_prepare_the_credentials_directory_at_once(tmp_path: Path) -> None:
    pki = tmp_path / "pki"
    pki.mkdir()
    for n, text in (("h.crt", "CERT"), ("h.key", "KEY"), ("ca.crt", "CA")):
        (pki / n).write_text(text)
    files = X509Files(pki / "h.crt", pki / "h.key", pki / "ca.crt")
    errors: list[BaseException] = []

    def prepare() -> None:
        try:
            for _ in range(30):
                prepare_creds_dir(files, tmp_path / "qemu")
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=prepare) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert (tmp_path / "qemu" / "ca-cert.pem").read_text() == "CA"
