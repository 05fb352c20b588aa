"""Boot the real guest image under QEMU TCG (downloads the kernel on first run)."""

from __future__ import annotations

import itertools
import json
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vmferry.guest import GuestImage, build_image, guest_cmdline

pytestmark = pytest.mark.integration

QEMU = "qemu-system-x86_64"
VERIFY_RE = re.compile(r"FERRY-DISK-VERIFY last=(\d+) gaps=(\d+) corrupt=(\d+) torn=(\d+)")


@pytest.fixture(scope="module")
def image() -> GuestImage:
    if shutil.which(QEMU) is None or shutil.which("qemu-img") is None:
        pytest.skip("QEMU not installed")
    return build_image()


class Guest:
    """One QEMU process with its serial console logged to a file."""

    def __init__(self, image: GuestImage, workdir: Path, cmdline: str, *extra: str) -> None:
        self.serial = workdir / "serial.log"
        self.serial.unlink(missing_ok=True)
        cmd = [
            QEMU, "-machine", "q35,accel=tcg", "-m", "256", "-nodefaults", "-no-user-config",
            "-display", "none", "-nic", "none", "-serial", f"file:{self.serial}",
            "-kernel", str(image.kernel), "-initrd", str(image.initrd), "-append", cmdline,
            *extra,
        ]  # fmt: skip
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def text(self) -> str:
        try:
            return self.serial.read_text(errors="replace").replace("\r", "")
        except FileNotFoundError:
            return ""

    def wait_for(self, pattern: str, timeout: float = 60.0) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        rx = re.compile(pattern, re.M)
        while time.monotonic() < deadline:
            m = rx.search(self.text())
            if m:
                return m
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode() if self.proc.stderr else ""
                raise AssertionError(f"QEMU exited ({self.proc.returncode}): {err}")
            time.sleep(0.05)
        raise AssertionError(
            f"timeout waiting for {pattern!r}; serial tail:\n{self.text()[-2000:]}"
        )

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=30)


@pytest.fixture
def guests() -> Iterator[list[Guest]]:
    started: list[Guest] = []
    yield started
    for g in started:
        g.kill()


def test_boot_heartbeat_and_disk(image: GuestImage, tmp_path: Path, guests: list[Guest]) -> None:
    disk = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-f", "qcow2", str(disk), "64M"], check=True,
                   capture_output=True)  # fmt: skip
    drive = ("-device", "virtio-blk-pci,drive=d0",
             "-drive", f"if=none,id=d0,file={disk},format=qcow2")  # fmt: skip
    cmdline = guest_cmdline(None, ["heartbeat", "disk"])

    g = Guest(image, tmp_path, cmdline, *drive)
    guests.append(g)
    g.wait_for(r"^FERRY-READY ip=none roles=heartbeat,disk$")
    boot = time.monotonic() - g.started
    print(f"\nguest boot time (QEMU start -> FERRY-READY): {boot:.2f}s")
    first = VERIFY_RE.search(g.wait_for(r"^FERRY-DISK-VERIFY .*$").group(0))
    assert first and first.groups() == ("0", "0", "0", "0")
    g.wait_for(r"^FERRY-HB 4 \d+$", timeout=30)
    hbs = [(int(n), int(ms)) for n, ms in re.findall(r"^FERRY-HB (\d+) (\d+)$", g.text(), re.M)]
    assert [n for n, _ in hbs] == list(range(1, len(hbs) + 1))
    assert all(b[1] > a[1] for a, b in itertools.pairwise(hbs))
    g.wait_for(r"^FERRY-DISK-ACK \d+$")
    time.sleep(1.0)
    g.kill()  # hard stop: everything acknowledged must survive
    acks = [int(a) for a in re.findall(r"^FERRY-DISK-ACK (\d+)$", g.text(), re.M)]
    assert acks and acks == sorted(acks)

    g2 = Guest(image, tmp_path, cmdline, *drive)
    guests.append(g2)
    m = VERIFY_RE.search(g2.wait_for(r"^FERRY-DISK-VERIFY .*$").group(0))
    assert m
    last, gaps, corrupt, _torn = map(int, m.groups())
    assert last >= acks[-1] and gaps == 0 and corrupt == 0
    assert g2.wait_for(r"^FERRY-DISK-ACK (\d+)$").group(1) == str(last + 1)


def _qmp(sock_path: Path, *commands: str, timeout: float = 10.0) -> None:
    """Send raw QMP commands, waiting for each command's return."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(sock_path))
        f = s.makefile("rwb")
        assert "QMP" in json.loads(f.readline())
        for cmd in commands:
            f.write(json.dumps({"execute": cmd}).encode() + b"\n")
            f.flush()
            while True:  # skip asynchronous events until the reply arrives
                reply = json.loads(f.readline())
                if "return" in reply or "error" in reply:
                    break
            assert "return" in reply, reply


def test_acpi_powerdown(image: GuestImage, tmp_path: Path, guests: list[Guest]) -> None:
    sock = tmp_path / "qmp.sock"
    g = Guest(image, tmp_path, guest_cmdline(None, ["heartbeat", "power"]),
              "-qmp", f"unix:{sock},server=on,wait=off")  # fmt: skip
    guests.append(g)
    g.wait_for(r"^FERRY-HB 2 \d+$")
    sent = time.monotonic()
    _qmp(sock, "qmp_capabilities", "system_powerdown")
    try:
        g.proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        raise AssertionError("guest did not power off:\n" + g.text()[-1500:]) from None
    assert g.proc.returncode == 0
    print(f"\npowerdown -> QEMU exit: {time.monotonic() - sent:.2f}s")
    assert "FERRY-POWEROFF" in g.text()
