"""Unit tests for the guest image builder (no network, no QEMU)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from vmferry import guest
from vmferry.guest import image as gi


def test_exports() -> None:
    assert guest.PROBE_ROLES == ("heartbeat", "udpecho", "tcpecho", "dirty", "disk", "power")
    assert set(guest.__all__) >= {
        "GuestImage",
        "build_image",
        "default_cache_dir",
        "guest_cmdline",
        "PROBE_ROLES",
    }


def test_cmdline_full() -> None:
    line = guest.guest_cmdline(
        "10.1.0.5/24",
        ["heartbeat", "udpecho", "dirty", "disk", "heartbeat"],
        gateway="10.1.0.1",
        hostname="vm-1",
        dirty="128M@0",
        disk="/dev/vda",
    )
    assert line.split() == [
        "console=ttyS0",
        "quiet",
        "panic=-1",
        "ferry.ip=10.1.0.5/24",
        "ferry.gw=10.1.0.1",
        "ferry.hostname=vm-1",
        "ferry.roles=heartbeat,udpecho,dirty,disk",
        "ferry.dirty=128M@0",
        "ferry.disk=/dev/vda",
    ]


def test_cmdline_minimal() -> None:
    assert guest.guest_cmdline(None, []) == "console=ttyS0 quiet panic=-1"
    assert guest.guest_cmdline(None, "heartbeat,power").endswith("ferry.roles=heartbeat,power")


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"ip": "10.0.0.1/24", "roles": ["heartbeat", "sing"]}, "sing"),
        ({"ip": "10.0.0.1", "roles": []}, "prefix"),
        ({"ip": "10.0.0.300/24", "roles": []}, "10.0.0.300"),
        ({"ip": None, "roles": [], "gateway": "10.0.0.1"}, "gateway"),
        ({"ip": "10.0.0.2/24", "roles": [], "gateway": "nope"}, "nope"),
        ({"ip": None, "roles": [], "hostname": "bad name"}, "hostname"),
        ({"ip": None, "roles": ["dirty"], "dirty": "lots"}, "lots"),
        ({"ip": None, "roles": ["disk"], "disk": "vda"}, "vda"),
        ({"ip": None, "roles": ["disk"], "disk": "/dev/vda quiet"}, "/dev/vda quiet"),
    ],
)
def test_cmdline_rejects(kwargs: dict[str, object], needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        guest.guest_cmdline(**kwargs)  # type: ignore[arg-type]


def test_validate_roles() -> None:
    assert guest.validate_roles(["disk", " power ", "disk", ""]) == ("disk", "power")
    with pytest.raises(ValueError, match="'Heartbeat'"):
        guest.validate_roles(["Heartbeat"])


def _digest(**over: object) -> str:
    args: dict[str, object] = {
        "probe_src": b"int main(){}",
        "init_src": b"#!/bin/sh\n",
        "busybox": b"\x7fELF...",
        "kernel_package": "linux-image-6.1.0-1-cloud-amd64=6.1.1-1",
    }
    args.update(over)
    return gi.compute_digest(**args)  # type: ignore[arg-type]


def test_digest_stable_and_sensitive() -> None:
    base = _digest()
    assert base == _digest() and len(base) == 64
    variants = [
        _digest(probe_src=b"int main(){ }"),
        _digest(init_src=b"#!/bin/sh \n"),
        _digest(busybox=b"\x7fELF..!"),
        _digest(kernel_package="linux-image-6.1.0-2-cloud-amd64=6.1.2-1"),
        _digest(modules=gi.GUEST_MODULES[:-1]),
        # Moving bytes between fields must change the digest (length framing).
        _digest(probe_src=b"int main(){}#", init_src=b"!/bin/sh\n"),
    ]
    assert base not in variants and len(set(variants)) == len(variants)


def test_digest_of_packaged_sources_is_stable() -> None:
    def real() -> str:
        return gi.compute_digest(
            probe_src=gi._source_bytes("probe.c"),
            init_src=gi._source_bytes("init.sh"),
            busybox=b"bb",
            kernel_package="k=1",
        )

    assert real() == real()


def test_static_elf_detection() -> None:
    assert not gi.is_static_elf(b"#!/bin/sh\n")
    bb = Path("/bin/busybox")
    if bb.exists():
        assert gi.is_static_elf(bb.read_bytes())
    ls = shutil.which("ls")
    if ls:
        assert not gi.is_static_elf(Path(ls).read_bytes())


def test_default_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VMFERRY_CACHE", str(tmp_path / "c"))
    assert guest.default_cache_dir() == tmp_path / "c" and (tmp_path / "c").is_dir()


def test_build_image_with_fake_kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Assemble, pack and cache an image around a fake kernel package."""
    for tool in ("gcc", "cpio"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not installed")
    if not gi.is_static_elf(gi.BUSYBOX_PATH.read_bytes() if gi.BUSYBOX_PATH.exists() else b""):
        pytest.skip("static busybox not installed")
    pkg = gi.KernelPackage("linux-image-9.9.9-1-cloud-amd64", "9.9.9-1")
    kdir = tmp_path / "fakekernel"
    (kdir / "boot").mkdir(parents=True)
    (kdir / "boot" / f"vmlinuz-{pkg.release}").write_bytes(b"KERNEL")
    moddir = kdir / "lib" / "modules" / pkg.release / "kernel" / "drivers"
    moddir.mkdir(parents=True)
    for m in gi.GUEST_MODULES:
        (moddir / f"{m}.ko").write_bytes(m.encode())
    fetches: list[Path] = []

    def fake_fetch(cache_dir: Path, package: gi.KernelPackage | None = None) -> Path:
        fetches.append(cache_dir)
        return kdir

    monkeypatch.setattr(gi, "resolve_kernel_package", lambda: pkg)
    monkeypatch.setattr(gi, "fetch_kernel", fake_fetch)
    cache = tmp_path / "cache"

    img = gi.build_image(cache)
    assert img.kernel_version == pkg.release
    assert img.kernel.read_bytes() == b"KERNEL"
    assert img.kernel.parent == cache / "images" / img.digest
    listing = (
        subprocess.run(
            ["cpio", "-it", "--quiet"], stdin=img.initrd.open("rb"), capture_output=True, check=True
        )
        .stdout.decode()
        .split()
    )
    for name in (
        "init",
        "bin/busybox",
        "bin/sh",
        "bin/ip",
        "bin/insmod",
        "bin/probe",
        "lib/modules/virtio_net.ko",
        "lib/modules/evdev.ko",
        "proc",
        "dev",
    ):
        assert name in listing
    assert not any(p.name.startswith(".tmp") for p in (cache / "images").iterdir())

    again = gi.build_image(cache)
    assert again == img and len(fetches) == 1  # cached by content hash
    forced = gi.build_image(cache, force=True)
    assert forced == img and len(fetches) == 2
