"""The lab: N vmferry hosts on one machine, each a network namespace running its own ferryd.

``Lab.up`` builds the network (:mod:`vmferry.lab.net`), a CA with a certificate per agent (role
host) and user certificates ``pki/admin|operator|viewer.crt`` (with those roles; the client
configuration uses admin), a state directory and storage per host, a shared volume every host sees,
starts the agents and writes the client configuration so ``ferry --host h1 ...`` works.
``Lab.down`` removes all of it from the lab's own records, also after a crash.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import secrets
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from vmferry.client import (
    FerryClient,
    FerryError,
    HostEndpoint,
    load_config,
    save_config,
)
from vmferry.errors import ConflictError, HostError, RefusedError
from vmferry.host.vms import socket_root
from vmferry.lab import etcd as lab_etcd
from vmferry.lab import net
from vmferry.lab.procs import spawn_in_netns, stop_pid
from vmferry.lab.records import LabRecords, pid_matches
from vmferry.qemu import QemuProcess
from vmferry.security import CertificateAuthority, Role

log = logging.getLogger("vmferry.lab")

AGENT_PORT = 7443
EXTERNAL_SWITCH = "external"
HOST_BRIDGE = "br-ext"


@contextlib.contextmanager
def _network_lock() -> Iterator[None]:
    """Serialise the choice of a lab's subnet block between labs on this machine."""
    path = Path("/run/vmferry/lab-network.lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def default_lab_dir() -> Path:
    """``$VMFERRY_LAB_DIR``, else ``/var/tmp/vmferry-lab``."""
    return Path(os.environ.get("VMFERRY_LAB_DIR", "/var/tmp/vmferry-lab"))


class Lab:
    """One lab, kept in one directory."""

    def __init__(self, lab_dir: Path | None = None) -> None:
        self.dir = (lab_dir or default_lab_dir()).absolute()
        self.state_path = self.dir / "lab.json"

    # -- queries ---------------------------------------------------------------------------
    def _state(self) -> dict[str, Any]:
        if not self.state_path.exists():
            raise RefusedError(f"no lab is up in {self.dir}", fix="run: ferry lab up")
        data: dict[str, Any] = json.loads(self.state_path.read_text())
        return data

    def topology(self) -> net.Topology:
        """The network of the running lab."""
        return net.Topology.from_json(self._state()["topology"])

    def endpoint(self, host: str) -> HostEndpoint:
        """How to reach the agent of lab host ``host``."""
        ep = self._state()["endpoints"].get(host)
        if ep is None:
            raise RefusedError(f"no lab host {host!r}", field="host")
        return HostEndpoint.model_validate(ep)

    def client(self, host: str) -> FerryClient:
        """A client for the agent of ``host`` (checks the address routes via the lab)."""
        topo = self.topology()
        net.check_lab_route(topo, topo.host(host).mgmt_ip)
        return FerryClient(self.endpoint(host))

    def host_dir(self, host: str) -> Path:
        """The directory of one lab host (state, storage, logs)."""
        return self.dir / "hosts" / host

    @property
    def shared_dir(self) -> Path:
        """The shared volume every lab host sees."""
        return self.dir / "shared"

    def status(self) -> dict[str, Any]:
        """Hosts, addresses and whether each agent answers."""
        st = self._state()
        topo = net.Topology.from_json(st["topology"])
        hosts = []
        for h in topo.hosts:
            agent = "down"
            try:
                with self.client(h.name) as c:
                    c.health()
                    agent = "up"
            except (FerryError, net.LabNetError) as exc:
                agent = f"down ({exc})"
            hosts.append({**h.__dict__, "agent": agent})
        return {
            "dir": str(self.dir),
            "tag": topo.tag,
            "hosts": hosts,
            "client_netns": topo.client_netns,
            "client_ip": topo.client_ip,
            "vm_cidr": topo.vm_cidr,
            "mgmt_cidr": topo.mgmt_cidr,
            "migration_cidr": topo.migration_cidr,
            "link_rate": topo.link_rate,
            "shared_dir": str(self.shared_dir),
            "etcd": [
                {**m.__dict__, "url": m.client_url, "running": self.etcd_pid(m.name) is not None}
                for m in self.etcd_members()
            ],
        }

    # -- up ----------------------------------------------------------------------------------
    def up(
        self,
        n_hosts: int = 2,
        link_rate: str | None = None,
        agent_timeout: float = 30,
        etcd_members: int = 3,
    ) -> dict[str, Any]:
        """Build the lab, start its etcd members and every agent; a failed up is torn down."""
        if self.state_path.exists():
            raise ConflictError(
                f"a lab is already up in {self.dir}", fix="run ferry lab down first"
            )
        if os.geteuid() != 0:
            raise RefusedError("the lab needs root (network namespaces, bridges, taps)")
        if (self.dir / "records.jsonl").exists():
            log.info("tearing down what a half-finished lab left in %s", self.dir)
            self.down()
        if link_rate is not None:
            try:
                net.parse_rate(link_rate)
            except (ValueError, net.LabNetError) as exc:
                raise RefusedError(
                    f"--link {link_rate!r} is not a rate", field="--link", fix="e.g. 1gbit, 500mbit"
                ) from exc
        if not 0 <= etcd_members <= lab_etcd.MAX_MEMBERS:
            raise RefusedError(
                f"--etcd-members {etcd_members} is out of range",
                field="--etcd-members",
                fix=f"0 (no etcd) to {lab_etcd.MAX_MEMBERS}; 3 tolerates the loss of one",
            )
        if etcd_members and shutil.which("etcd") is None:
            raise RefusedError(
                "etcd is not installed",
                field="--etcd-members",
                fix="run scripts/setup.sh (Debian: apt-get install etcd-server), or pass 0",
            )
        from vmferry.guest import build_image

        build_image()  # before the network: a cold build downloads the kernel
        self.dir.mkdir(parents=True, exist_ok=True)
        records = LabRecords(self.dir)
        try:
            return self._up(records, n_hosts, link_rate, agent_timeout, etcd_members)
        except BaseException:
            log.error("lab up failed; removing what it made")
            self.down()
            raise

    def _up(
        self,
        records: LabRecords,
        n_hosts: int,
        link_rate: str | None,
        agent_timeout: float,
        etcd_members: int = 3,
    ) -> dict[str, Any]:
        records.add("dir", path=str(self.dir / "hosts"))
        records.add("dir", path=str(self.shared_dir))
        records.add("dir", path=str(self.dir / "pki"))
        tag = secrets.token_hex(2)
        try:
            # Labs brought up at the same moment would pick the same free block: choose and
            # claim it (the root namespace's lab address) under one machine-wide lock.
            with _network_lock():
                index = net.choose_index(set())
                topo = net.build(self.dir, records, n_hosts, link_rate, index, tag)
        except net.LabNetError as exc:
            raise HostError(f"lab network: {exc}") from exc
        ca = CertificateAuthority.create(self.dir / "pki", f"vmferry lab {tag} CA")
        admin = ca.issue(self.dir / "pki", "admin", role=Role.admin)
        for role in (Role.viewer, Role.operator):  # for tests of the roles (docs/security.md)
            ca.issue(self.dir / "pki", role.value, role=role)
        self.shared_dir.mkdir(parents=True, exist_ok=True)
        members = self._up_etcd(records, topo, ca, admin.cert, admin.key, etcd_members)
        endpoints_etcd = [m.client_url for m in members]
        endpoints: dict[str, dict[str, Any]] = {}
        for h in topo.hosts:
            hdir = self.host_dir(h.name)
            state = hdir / "state"
            storage = hdir / "storage"
            state.mkdir(parents=True, exist_ok=True)
            storage.mkdir(parents=True, exist_ok=True)
            # every lab host may act for users towards every other (constrained delegation)
            ca.issue(
                hdir / "tls", h.name, role=Role.host, server_names=[h.mgmt_ip, h.name],
                delegate=[f"{o.name}" for o in topo.hosts if o.name != h.name],
            )  # fmt: skip
            settings = {
                "name": h.name,
                "accelerator": "tcg",
                "storage_roots": [str(storage), str(self.shared_dir)],
                "switches": {EXTERNAL_SWITCH: {"bridge": HOST_BRIDGE, "uplink": h.uplink}},
                "memory_reserve_mib": 256,
                "migration": {"networks": [topo.migration_cidr]},
            }
            if endpoints_etcd:  # the agent reaches etcd with its own certificate
                settings["cluster"] = {
                    "etcd": {
                        "endpoints": endpoints_etcd,
                        "ca": str(ca.cert_path),
                        "cert": str(hdir / "tls" / f"{h.name}.crt"),
                        "key": str(hdir / "tls" / f"{h.name}.key"),
                    }
                }
            (state / "settings.json").write_text(json.dumps(settings, indent=2))
            self._spawn_agent(records, h)
            endpoints[h.name] = HostEndpoint(
                url=f"https://{h.mgmt_ip}:{AGENT_PORT}",
                ca=str(ca.cert_path),
                cert=str(admin.cert),
                key=str(admin.key),
            ).model_dump()
        state_doc = {
            "topology": topo.to_json(),
            "endpoints": endpoints,
            "etcd": lab_etcd.to_json(members),
            "created_at": time.time(),
        }
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state_doc, indent=2))
        os.replace(tmp, self.state_path)
        for h in topo.hosts:
            self._wait_agent(h.name, agent_timeout)
        self._register_client_config(endpoints)
        return self.status()

    # -- etcd (lab/etcd.py) -------------------------------------------------------------------
    def _up_etcd(
        self,
        records: LabRecords,
        topo: net.Topology,
        ca: CertificateAuthority,
        cert: Path,
        key: Path,
        n: int,
    ) -> list[lab_etcd.EtcdMember]:
        members = lab_etcd.plan(topo, self.dir, n)
        if not members:
            return []
        try:
            lab_etcd.build_network(records, topo, members)
        except net.LabNetError as exc:
            raise HostError(f"lab etcd network: {exc}") from exc
        lab_etcd.start(records, self.dir, ca, members, topo.tag)
        net.check_lab_route(topo, members[0].ip)
        try:
            lab_etcd.wait_healthy(
                [m.client_url for m in members], str(ca.cert_path), str(cert), str(key), 30
            )
        except RuntimeError as exc:
            raise HostError(str(exc)) from exc
        return members

    def etcd_members(self) -> list[lab_etcd.EtcdMember]:
        """The lab's etcd members (empty when it was brought up with 0)."""
        return lab_etcd.from_json(self._state().get("etcd", []))

    def etcd_member(self, name: str) -> lab_etcd.EtcdMember:
        """One etcd member by name ("e1", ...)."""
        for m in self.etcd_members():
            if m.name == name:
                return m
        raise RefusedError(f"no lab etcd member {name!r}", field="member")

    def etcd_client(self, timeout: float = 2.0) -> Any:
        """An etcd client (:class:`vmferry.cluster.etcd.Etcd`) with the admin certificate."""
        from vmferry.cluster.etcd import Etcd

        topo = self.topology()
        members = self.etcd_members()
        if not members:
            raise RefusedError("this lab has no etcd", fix="ferry lab up --etcd-members 3")
        net.check_lab_route(topo, members[0].ip)
        pki = self.dir / "pki"
        return Etcd(
            [m.client_url for m in members],
            str(pki / "ca.crt"),
            str(pki / "admin.crt"),
            str(pki / "admin.key"),
            timeout=timeout,
        )

    def etcd_pid(self, name: str) -> int | None:
        """The pid of a running etcd member (from the lab's records)."""
        for e in reversed(LabRecords(self.dir).entries()):
            if e.get("kind") == "pid" and e.get("what") == f"etcd {name}":
                pid, start = int(e["pid"]), int(e.get("start_time") or 0)
                return pid if start and pid_matches(pid, start) else None
        return None

    def stop_etcd_member(self, name: str) -> None:
        """Stop one etcd member (SIGTERM, then SIGKILL), by its recorded pid + start time."""
        self.etcd_member(name)
        for e in LabRecords(self.dir).entries():
            if e.get("kind") == "pid" and e.get("what") == f"etcd {name}":
                stop_pid(int(e["pid"]), int(e.get("start_time") or 0) or None, timeout=5)

    def start_etcd_member(self, name: str) -> None:
        """Start a stopped etcd member again (same data directory, same command line)."""
        m = self.etcd_member(name)
        if self.etcd_pid(name) is not None:
            raise ConflictError(f"etcd member {name} is already running")
        lab_etcd.restart_member(LabRecords(self.dir), self.dir, m)

    def set_mgmt_link(self, host: str, up: bool) -> None:
        """Unplug (or plug back) a host's management cable: its fabric-side port goes down.

        The host then reaches neither etcd nor the other agents, and the CLI cannot reach it.
        """
        topo = self.topology()
        h = topo.host(host)
        from pyroute2 import IPRoute

        with IPRoute(netns=topo.fabric_netns, flags=0) as fab:
            idx = fab.link_lookup(ifname=net.fabric_port(h.name, "m"))
            if not idx:
                raise HostError(f"no management port for {host} in the lab fabric")
            fab.link("set", index=idx[0], state="up" if up else "down")

    def _spawn_agent(self, records: LabRecords, h: net.HostNet) -> int:
        hdir = self.host_dir(h.name)
        argv = [
            sys.executable, "-m", "vmferry.api.server",
            "--state-dir", str(hdir / "state"),
            "--listen", f"{h.mgmt_ip}:{AGENT_PORT}",
            "--tls-cert", str(hdir / "tls" / f"{h.name}.crt"),
            "--tls-key", str(hdir / "tls" / f"{h.name}.key"),
            "--tls-ca", str(self.dir / "pki" / "ca.crt"),
        ]  # fmt: skip
        return spawn_in_netns(records, h.netns, argv, hdir / "ferryd.log", f"ferryd {h.name}")

    def agent_pid(self, host: str) -> int | None:
        """The pid of the running ferryd of ``host`` (from the lab's records)."""
        for e in reversed(LabRecords(self.dir).entries()):
            if e.get("kind") == "pid" and e.get("what") == f"ferryd {host}":
                pid, start = int(e["pid"]), int(e.get("start_time") or 0)
                return pid if start and pid_matches(pid, start) else None
        return None

    def kill_agent(self, host: str) -> None:
        """SIGKILL a host's ferryd, as a crash would (its VMs keep running)."""
        for e in LabRecords(self.dir).entries():
            if e.get("kind") == "pid" and e.get("what") == f"ferryd {host}":
                pid, start = int(e["pid"]), int(e.get("start_time") or 0)
                if start and pid_matches(pid, start):
                    os.kill(pid, 9)
                    stop_pid(pid, start, timeout=5)

    def start_agent(self, host: str, timeout: float = 30) -> None:
        """Start a host's ferryd again (after :meth:`kill_agent` or a crash)."""
        if self.agent_pid(host) is not None:
            raise ConflictError(f"ferryd on {host} is already running")
        self._spawn_agent(LabRecords(self.dir), self.topology().host(host))
        self._wait_agent(host, timeout)

    def _wait_agent(self, host: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                with self.client(host) as c:
                    c.health()
                    return
            except FerryError as exc:
                last = exc
                time.sleep(0.2)
        logf = self.host_dir(host) / "ferryd.log"
        tail = logf.read_text()[-2000:] if logf.exists() else ""
        raise HostError(f"ferryd on {host} did not answer within {timeout:.0f} s: {last}\n{tail}")

    def _register_client_config(self, endpoints: dict[str, dict[str, Any]]) -> None:
        cfg = load_config()
        for name, ep in endpoints.items():
            cfg.hosts[name] = HostEndpoint.model_validate(ep)
        if cfg.default_host is None:
            cfg.default_host = "h1"
        path = save_config(cfg)
        st = self._state()
        st["client_config"] = str(path)
        self.state_path.write_text(json.dumps(st, indent=2))

    # -- down --------------------------------------------------------------------------------
    def _qemu_processes(self) -> list[QemuProcess]:
        found = []
        for rt in (self.dir / "hosts").glob("*/state/run/*/runtime.json"):
            try:
                data = json.loads(rt.read_text())
            except (OSError, ValueError):
                continue
            if data.get("pid") and data.get("start_time"):
                found.append(QemuProcess(int(data["pid"]), int(data["start_time"])))
        return found

    def down(self) -> list[str]:
        """Stop agents and VMs, delete namespaces, links and files the lab recorded."""
        removed: list[str] = []
        records = LabRecords(self.dir)
        entries = records.entries() if self.dir.exists() else []
        for e in entries:
            if e.get("kind") == "pid":
                pid, start = int(e["pid"]), int(e.get("start_time") or 0)
                if start and pid_matches(pid, start) and stop_pid(pid, start):
                    removed.append(f"process {pid} ({e.get('what')})")
        for proc in self._qemu_processes():
            if proc.alive():
                proc.kill()
                removed.append(f"qemu {proc.pid}")
        for state in (self.dir / "hosts").glob("*/state"):
            shutil.rmtree(socket_root(state), ignore_errors=True)
        removed += net.teardown(records)
        self._unregister_client_config()
        for e in entries:
            if e.get("kind") == "dir":
                p = Path(str(e["path"]))
                if p.exists() and p.is_relative_to(self.dir):
                    shutil.rmtree(p, ignore_errors=True)
                    removed.append(f"dir {p}")
        for f in ("lab.json", "topology.json"):
            (self.dir / f).unlink(missing_ok=True)
        if self.dir.exists():
            records.clear()
        return removed

    def _unregister_client_config(self) -> None:
        if not self.state_path.exists():
            return
        try:
            st = json.loads(self.state_path.read_text())
        except ValueError:
            return
        cfg = load_config()
        changed = False
        for name, ep in st.get("endpoints", {}).items():
            have = cfg.hosts.get(name)
            if have is not None and have.url == ep["url"]:
                del cfg.hosts[name]
                changed = True
        if cfg.default_host not in cfg.hosts:
            cfg.default_host = None
        if changed:
            save_config(cfg)


def _probe_argv(kind: str, ip: str, count: int, interval: float, timeout: float) -> list[str]:
    return [
        sys.executable, "-m", "vmferry.lab.probe", kind, ip,
        "--count", str(count), "--interval", str(interval), "--timeout", str(timeout),
    ]  # fmt: skip


def probe(
    lab: Lab, kind: str, ip: str, count: int = 5, interval: float = 0.1, timeout: float = 1.0
) -> dict[str, Any]:
    """Run a probe from the client namespace against a guest address on the lab's VM network."""
    import ipaddress

    from vmferry.lab.procs import run_in_netns

    topo = lab.topology()
    if ipaddress.ip_address(ip) not in ipaddress.ip_network(topo.vm_cidr):
        raise RefusedError(f"{ip} is not on the lab's VM network {topo.vm_cidr}", field="ip")
    budget = count * (interval + timeout) + 15
    done = run_in_netns(topo.client_netns, _probe_argv(kind, ip, count, interval, timeout), budget)
    if done.returncode != 0:
        raise HostError(f"probe {kind} {ip} failed: {done.stderr.strip()}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


# -- background probes (blackout / session) while a VM migrates --------------------------------

BACKGROUND_KINDS = ("blackout", "session")


def wait_answer(lab: Lab, ip: str, timeout: float) -> dict[str, Any]:
    """Wait until the guest at ``ip`` answers STAT (it has booted or resumed); its counters."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r = probe(lab, "stat", ip, count=1, timeout=0.3)
        if "error" not in r:
            return r
        time.sleep(0.2)
    raise HostError(f"guest {ip} did not answer within {timeout:.0f} s")


class BackgroundProbe:
    """A probe running in the lab's client namespace until :meth:`stop` (or its duration ends)."""

    def __init__(
        self, pid: int, kind: str, out: Path, start_time: int, log_path: Path, duration: float
    ) -> None:
        self.pid = pid
        self.kind = kind
        self.out = out
        self.start_time = start_time  # 0 if it had already exited: then never signalled
        self.log_path = log_path
        self.duration = duration

    def __repr__(self) -> str:
        return f"BackgroundProbe(pid={self.pid}, kind={self.kind!r}, out={str(self.out)!r})"

    def running(self) -> bool:
        """True while the probe process (same pid and start time) is alive (not a zombie)."""
        from vmferry.procinfo import pid_state

        return (
            bool(self.start_time)
            and pid_matches(self.pid, self.start_time)
            and pid_state(self.pid) not in ("Z", "X")
        )

    def _result(self, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not self.out.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        try:
            result: dict[str, Any] = json.loads(self.out.read_text())
        except (OSError, ValueError) as exc:
            tail = self.log_path.read_text()[-2000:] if self.log_path.exists() else ""
            raise HostError(
                f"probe {self.kind} wrote no result to {self.out}: {exc}\n{tail}"
            ) from exc
        return result

    def wait(self, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the probe to finish on its own (its duration) and return its result."""
        budget = self.duration + 40 if timeout is None else timeout
        deadline = time.monotonic() + budget
        while self.running() and time.monotonic() < deadline:
            if self.out.exists():
                break
            time.sleep(0.1)
        return self.stop(max(1.0, deadline - time.monotonic()))

    def stop(self, timeout: float = 30) -> dict[str, Any]:
        """SIGTERM the probe if it is still ours and running, then return its JSON result."""
        t_end = time.monotonic() + timeout
        # stop_pid signals only while pid + start time still match (never a recycled pid),
        # does nothing for a probe that already exited, and reaps our child.
        stop_pid(self.pid, self.start_time or None, timeout=max(1.0, timeout - 1))
        return self._result(max(0.5, t_end - time.monotonic()))


def start_probe(
    lab: Lab,
    kind: str,
    ip: str,
    duration: float,
    interval_ms: float | None = None,
    ready_timeout: float = 20,
) -> BackgroundProbe:
    """Start a ``blackout`` or ``session`` probe against a guest address from the client netns.

    The process is recorded in the lab's records (``ferry lab down`` stops it); its result
    goes to ``<lab_dir>/probes/<kind>-<n>.json``. Returns once the probe is measuring.
    """
    import ipaddress

    from vmferry.lab.probe import MAX_DURATION_S, READY_MARK
    from vmferry.procinfo import pid_start_time

    if kind not in BACKGROUND_KINDS:
        raise RefusedError(f"no background probe {kind!r}", field="kind", fix="blackout|session")
    if not 0 < duration <= MAX_DURATION_S:
        raise RefusedError(f"duration must be in (0, {MAX_DURATION_S:.0f}] s", field="duration")
    if interval_ms is not None and not 0.1 <= interval_ms <= 60_000:
        raise RefusedError("interval_ms must be in [0.1, 60000]", field="interval_ms")
    topo = lab.topology()
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError as exc:
        raise RefusedError(f"{ip!r} is not an IP address", field="ip") from exc
    if addr not in ipaddress.ip_network(topo.vm_cidr):
        raise RefusedError(f"{ip} is not on the lab's VM network {topo.vm_cidr}", field="ip")
    records = LabRecords(lab.dir)
    pdir = lab.dir / "probes"
    if not pdir.exists():
        records.add("dir", path=str(pdir))
        pdir.mkdir(parents=True, exist_ok=True)
    for n in range(1, 100_000):
        log_path = pdir / f"{kind}-{n}.log"
        out = pdir / f"{kind}-{n}.json"
        try:  # reserve the number: the log is created exclusively
            os.close(os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644))
        except FileExistsError:
            continue
        if not out.exists():
            break
    else:
        raise HostError(f"too many probe results in {pdir}")
    argv = [sys.executable, "-m", "vmferry.lab.probe", kind, str(addr),
            "--duration", str(duration), "--out", str(out)]  # fmt: skip
    if interval_ms is not None:
        argv += ["--interval-ms", str(interval_ms)]
    pid = spawn_in_netns(records, topo.client_netns, argv, log_path, f"probe {kind} {addr}")
    handle = BackgroundProbe(
        pid=pid,
        kind=kind,
        out=out,
        start_time=pid_start_time(pid) or 0,
        log_path=log_path,
        duration=duration,
    )
    # Python start-up (importing vmferry.lab) takes most of a second: return only once the probe
    # is measuring (and has its SIGTERM handler), so the caller can start the migration.
    deadline = time.monotonic() + ready_timeout
    while READY_MARK not in log_path.read_text(errors="replace"):
        if not handle.running():
            break  # it failed early (e.g. connection refused); stop() returns its result
        if time.monotonic() >= deadline:
            handle.stop(timeout=5)
            raise HostError(f"probe {kind} {addr} not ready within {ready_timeout:.0f} s")
        time.sleep(0.02)
    return handle
