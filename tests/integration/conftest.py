"""A real 2-host lab shared by the integration tests of one session (needs root and QEMU)."""

from __future__ import annotations

import contextlib
import os
import shutil
import ssl
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest

from vmferry.client import FerryClient, FerryError
from vmferry.lab import Lab
from vmferry.lab.lab import probe
from vmferry.security.tickets import SignedTicket, sign_ticket

T = TypeVar("T")

needs_lab = [
    pytest.mark.integration,
    pytest.mark.skipif(os.geteuid() != 0, reason="the lab needs root"),
    pytest.mark.skipif(shutil.which("qemu-system-x86_64") is None, reason="needs QEMU"),
]


def wait_for(fn: Callable[[], T | None], timeout: float, what: str, interval: float = 0.25) -> T:
    """Call ``fn`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = fn()
            if value:
                return value
        except Exception as exc:
            last = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what} (last error: {last})")


class LabHandle:
    """The lab plus helpers the tests share."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.topo = lab.topology()
        self._next_guest = 0

    def client(self, host: str) -> FerryClient:
        return self.lab.client(host)

    def guest_ip(self) -> str:
        """A fresh guest address for each VM a test creates."""
        self._next_guest += 1
        return self.topo.guest_ip(self._next_guest)

    def probe(self, kind: str, ip: str, **kw: Any) -> dict[str, Any]:
        return probe(self.lab, kind, ip, **kw)

    def stat(self, ip: str) -> dict[str, Any]:
        """The guest probe's counters; raises if the guest does not answer."""
        result = self.probe("stat", ip, count=1, timeout=1.0)
        if "error" in result:
            raise AssertionError(result["error"])
        return result

    def wait_guest(self, ip: str, timeout: float = 60) -> dict[str, Any]:
        """Wait until the guest at ``ip`` answers STAT (it has booted)."""
        return wait_for(lambda: self.stat(ip), timeout, f"guest {ip} to answer")

    def make_vm(
        self,
        host: str,
        name: str,
        roles: str = "",
        disk_mib: int = 0,
        memory: int = 256,
        start: bool = True,
    ) -> tuple[dict[str, Any], str]:
        """Create (and start) a probe VM on ``host`` with a NIC on the external switch."""
        ip = self.guest_ip()
        spec: dict[str, Any] = {
            "name": name,
            "memory_mib": memory,
            "disks": [{"size_mib": disk_mib}] if disk_mib else [],
            "nics": [{"switch": "external"}],
            "probe": {"ip": f"{ip}/24"},
        }
        if roles:
            spec["probe"]["roles"] = roles.split(",")
        with self.client(host) as c:
            vm = c.create_vm(spec)
            if start:
                vm = c.action(name, "start")
        return vm, ip

    def remove_vm(self, host: str, name: str) -> None:
        with self.client(host) as c:
            if c.vm(name)["state"] not in ("off", "saved", "crashed"):
                c.action(name, "stop")
            c.delete_vm(name)


@pytest.fixture(scope="session")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabHandle]:
    """A 2-host lab for the whole session, torn down at the end."""
    if os.geteuid() != 0 or shutil.which("qemu-system-x86_64") is None:
        pytest.skip("the lab needs root and QEMU")
    base = tmp_path_factory.mktemp("lab")
    os.environ["FERRY_CONFIG"] = str(base / "client.json")
    lab = Lab(base / "lab")
    lab.up(2)
    try:
        yield LabHandle(lab)
    finally:
        lab.down()


def serial_lines(lab: LabHandle, host: str, vm: str, prefix: str) -> list[str]:
    """Lines of the VM's serial console that start with ``prefix``."""
    with lab.client(host) as c:
        return [ln for ln in c.console(vm, 2000) if ln.startswith(prefix)]


def files_under(p: Path) -> set[str]:
    """Every path below ``p`` (for nothing-changed assertions)."""
    return {str(x) for x in p.rglob("*")}


def move(
    lab: LabHandle, src: str, vm: str, dst: str, wait: bool = True, **options: Any
) -> dict[str, Any]:
    """Start a live move through the API and (by default) wait for it to end."""
    ep = lab.lab.endpoint(dst)
    with lab.client(src) as c:
        job = c.move(vm, {"destination": {"name": dst, "url": ep.url}, "options": options})
        if not wait:
            return job
        return wait_job(lab, src, job["id"])


def wait_job(lab: LabHandle, src: str, job_id: str, timeout: float = 300) -> dict[str, Any]:
    """Wait for a move to complete, fail or be cancelled."""
    with lab.client(src) as c:
        return wait_for(
            lambda: (
                (j := c.migration(job_id))["state"] in ("completed", "failed", "cancelled") and j
            ),
            timeout,
            f"migration {job_id}",
            interval=0.2,
        )


def vm_names(lab: LabHandle, host: str) -> list[str]:
    """Names of the VMs a host has."""
    with lab.client(host) as c:
        return [v["name"] for v in c.vms()]


def cleanup_vms(lab: LabHandle, *names: str) -> None:
    """Cancel any move of these VMs, then delete them wherever they are."""
    for host in ("h1", "h2"):
        with lab.client(host) as c:
            for j in c.migrations():
                if j["vm"] in names and j["state"] in ("queued", "running"):
                    with contextlib.suppress(FerryError):
                        c.cancel_migration(j["id"])
                    wait_job(lab, host, j["id"])
    for host in ("h1", "h2"):
        for n in names:
            if n in vm_names(lab, host):
                lab.remove_vm(host, n)


def start_stuck_move(lab: LabHandle, vm: str, **options: Any) -> tuple[int, dict[str, Any]]:
    """Start moving ``vm`` from h1 to h2 in a way that cannot converge (pre-copy only at
    40 Mbit/s, for a VM that rewrites whole pages: ``dirty=SIZE@0:full``, which XBZRLE cannot
    shrink) and wait until it copies memory.

    Returns the source QEMU's pid and the job.
    """
    with lab.client("h1") as c:
        pid = int(c.vm(vm)["pid"])
    job = move(lab, "h1", vm, "h2", wait=False, policy="precopy", bandwidth_mbps=40, **options)
    with lab.client("h1") as c:
        wait_for(lambda: c.migration(job["id"])["phase"] == "precopy", 60, "precopy")
    return pid, job


def admin_ticket(lab: LabHandle, vm: str, **kw: Any) -> SignedTicket:
    """A move ticket signed with the lab admin's certificate (h1 -> h2 unless told)."""
    pki = lab.lab.dir / "pki"
    args: dict[str, Any] = {"vm": vm, "source": "h1", "destination": "h2"}
    args.update(kw)
    return sign_ticket(pki / "admin.crt", pki / "admin.key", **args)


def post_incoming(lab: LabHandle, cert: Path, key: Path, body: dict[str, Any]) -> httpx.Response:
    """POST an incoming move to h2's agent with the given client certificate."""
    ep = lab.lab.endpoint("h2")
    ctx = ssl.create_default_context(cafile=ep.ca)
    ctx.load_cert_chain(str(cert), str(key))
    with httpx.Client(verify=ctx, timeout=30) as http:
        return http.post(f"{ep.url}/v1/migrations/incoming", json=body)
