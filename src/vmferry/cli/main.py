"""``ferry``: the command line of vmferry."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from vmferry.cli.console import err, out
from vmferry.cli.console import fail as _fail
from vmferry.client import FerryClient, FerryError, load_config, resolve_host

app = typer.Typer(help="vmferry: move running VMs between hosts.", no_args_is_help=True)
vm_app = typer.Typer(help="Create and run VMs on one host.", no_args_is_help=True)
host_app = typer.Typer(help="Show and change a host's settings.", no_args_is_help=True)
lab_app = typer.Typer(
    help="A multi-host lab on this machine (network namespaces).", no_args_is_help=True
)
image_app = typer.Typer(help="The lab's guest image.", no_args_is_help=True)
app.add_typer(vm_app, name="vm")
app.add_typer(host_app, name="host")
app.add_typer(lab_app, name="lab")
app.add_typer(image_app, name="image")
migration_app = typer.Typer(help="Watch and cancel live moves.", no_args_is_help=True)
app.add_typer(migration_app, name="migration")
mignet_app = typer.Typer(help="Networks this host migrates over.", no_args_is_help=True)
host_app.add_typer(mignet_app, name="migration-network")


class Output(StrEnum):
    """How listings are printed."""

    table = "table"
    json = "json"


class _Globals:
    host: str | None = None
    output: Output = Output.table


G = _Globals()

OutputOpt = Annotated[
    Output | None, typer.Option("--output", "-o", help="table for people, json for scripts")
]


@app.callback()
def _main(
    host: Annotated[
        str | None, typer.Option("--host", "-H", help="Host name from the client config")
    ] = None,
    output: Annotated[Output, typer.Option("--output", "-o")] = Output.table,
) -> None:
    G.host = host
    G.output = output


@contextmanager
def _client() -> Iterator[FerryClient]:
    try:
        _, ep = resolve_host(G.host, load_config())
        with FerryClient(ep) as c:
            yield c
    except FerryError as exc:
        _fail(exc)


def _emit(data: Any, output: Output | None, render: Callable[[Any], None]) -> None:
    if (output or G.output) is Output.json:
        sys.stdout.write(json.dumps(data, indent=2) + "\n")
    else:
        render(data)


def _kv(data: dict[str, Any], title: str) -> None:
    t = Table(title=title, show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    for k, v in data.items():
        if isinstance(v, list | dict):
            v = json.dumps(v) if v else "-"
        t.add_row(k, "-" if v is None else str(v))
    out.print(t)


# -- vm --------------------------------------------------------------------------------------
def _vm_table(vms: list[dict[str, Any]]) -> None:
    t = Table()
    for col in ("NAME", "STATE", "HOST", "MEMORY", "VCPUS", "UPTIME", "PID", "IP"):
        t.add_column(col)
    for v in vms:
        up = v.get("uptime_s")
        t.add_row(
            v["name"],
            v["state"],
            v["host"],
            f"{v['memory_mib']} MiB",
            str(v["vcpus"]),
            "-" if up is None else f"{up:.0f}s",
            str(v.get("pid") or "-"),
            v.get("ip") or "-",
        )
    out.print(t)


def _vm_show(v: dict[str, Any]) -> None:
    _kv(v, f"VM {v['name']}")


@vm_app.command("list")
def vm_list(output: OutputOpt = None) -> None:
    """List the VMs of a host."""
    with _client() as c:
        _emit(c.vms(), output, _vm_table)


@vm_app.command("show")
def vm_show(name: str, output: OutputOpt = None) -> None:
    """Show one VM."""
    with _client() as c:
        _emit(c.vm(name), output, _vm_show)


@vm_app.command("create")
def vm_create(
    name: str,
    memory: Annotated[int, typer.Option("--memory", "-m", help="MiB")] = 256,
    vcpus: Annotated[int, typer.Option("--vcpus")] = 1,
    cpu: Annotated[str, typer.Option("--cpu", help="QEMU CPU model")] = "qemu64",
    disk: Annotated[list[int] | None, typer.Option("--disk", help="new qcow2 disk, MiB")] = None,
    nic: Annotated[
        list[str] | None, typer.Option("--nic", help="SWITCH or SWITCH=MAC (repeatable)")
    ] = None,
    ip: Annotated[str | None, typer.Option("--ip", help="probe guest address, CIDR")] = None,
    roles: Annotated[
        str | None, typer.Option("--roles", help="probe roles, comma separated")
    ] = None,
    dirty: Annotated[
        str | None, typer.Option("--dirty", help="SIZE@RATE[:full] for the dirty role")
    ] = None,
    boot: Annotated[str, typer.Option("--boot", help="probe | kernel | disk")] = "probe",
    kernel: Annotated[str | None, typer.Option("--kernel")] = None,
    initrd: Annotated[str | None, typer.Option("--initrd")] = None,
    cmdline: Annotated[str | None, typer.Option("--cmdline")] = None,
    storage_dir: Annotated[
        str | None, typer.Option("--storage-dir", help="under a storage root")
    ] = None,
    start: Annotated[bool, typer.Option("--start", help="start it once created")] = False,
    postcopy: Annotated[
        bool, typer.Option("--postcopy/--no-postcopy", help="may live moves use post-copy")
    ] = True,
    output: OutputOpt = None,
) -> None:
    """Create a VM (it stays off unless --start)."""
    nics = []
    for n in nic or []:
        sw, _, mac = n.partition("=")
        nics.append({"switch": sw, **({"mac": mac} if mac else {})})
    spec: dict[str, Any] = {
        "name": name,
        "memory_mib": memory,
        "vcpus": vcpus,
        "cpu_model": cpu,
        "disks": [{"size_mib": s} for s in disk or []],
        "nics": nics,
        "boot": {"kind": boot, "kernel": kernel, "initrd": initrd, "cmdline": cmdline},
        "storage_dir": storage_dir,
        "allow_postcopy": postcopy,
    }
    if boot == "probe":
        probe: dict[str, Any] = {"ip": ip, "dirty": dirty}
        if roles:
            probe["roles"] = [r.strip() for r in roles.split(",") if r.strip()]
        spec["probe"] = probe
    with _client() as c:
        vm = c.create_vm(spec)
        if start:
            vm = c.action(name, "start")
        _emit(vm, output, _vm_show)


def _action(name: str, action: str, output: Output | None, timeout: float = 60.0) -> None:
    with _client() as c:
        with err.status(f"{action} {name} …"):
            vm = c.action(name, action, timeout)
        _emit(vm, output, lambda v: out.print(f"{v['name']}: {v['state']}"))


@vm_app.command("start")
def vm_start(name: str, output: OutputOpt = None) -> None:
    """Start a VM (a saved VM is restored)."""
    _action(name, "start", output)


@vm_app.command("stop")
def vm_stop(name: str, output: OutputOpt = None) -> None:
    """Turn a VM off at once."""
    _action(name, "stop", output)


@vm_app.command("shutdown")
def vm_shutdown(
    name: str,
    timeout: Annotated[float, typer.Option(help="seconds before it is forced off")] = 60.0,
    output: OutputOpt = None,
) -> None:
    """Shut a VM down through ACPI; forced off after --timeout."""
    _action(name, "shutdown", output, timeout)


@vm_app.command("pause")
def vm_pause(name: str, output: OutputOpt = None) -> None:
    """Pause a running VM."""
    _action(name, "pause", output)


@vm_app.command("resume")
def vm_resume(name: str, output: OutputOpt = None) -> None:
    """Resume a paused VM."""
    _action(name, "resume", output)


@vm_app.command("save")
def vm_save(name: str, output: OutputOpt = None) -> None:
    """Save a VM's memory and device state to its storage folder and turn it off."""
    _action(name, "save", output)


@vm_app.command("restore")
def vm_restore(name: str, output: OutputOpt = None) -> None:
    """Restore a saved VM where it left off."""
    _action(name, "restore", output)


@vm_app.command("console")
def vm_console(
    name: str,
    lines: Annotated[int, typer.Option("--lines", "-n", min=1, max=10000)] = 50,
    output: OutputOpt = None,
) -> None:
    """Print the tail of a VM's serial console."""
    with _client() as c:
        text = c.console(name, lines)
        _emit(text, output, lambda ls: out.print("\n".join(ls), highlight=False, markup=False))


@vm_app.command("import")
def vm_import(
    path: Annotated[str, typer.Argument(help="the VM's folder (or vm.json) on a shared volume")],
    output: OutputOpt = None,
) -> None:
    """Register a VM from shared storage on this host (refused while it runs elsewhere)."""
    peers = {name: ep.url for name, ep in load_config().hosts.items()}
    with _client() as c:
        _emit(c.import_vm(path, peers), output, _vm_show)


@vm_app.command("delete")
def vm_delete(name: str) -> None:
    """Delete an off VM with its disks and configuration."""
    with _client() as c:
        c.delete_vm(name)
        out.print(f"deleted {name}")


# -- host ------------------------------------------------------------------------------------
@host_app.command("show")
def host_show(output: OutputOpt = None) -> None:
    """Show a host: CPU, memory, storage roots, switches, VMs."""
    with _client() as c:
        _emit(c.host(), output, lambda h: _kv(h, f"host {h['name']}"))


@host_app.command("set")
def host_set(
    accelerator: Annotated[str | None, typer.Option(help="kvm | tcg")] = None,
    storage_root: Annotated[
        list[str] | None, typer.Option("--storage-root", help="replace the roots (repeatable)")
    ] = None,
    add_storage_root: Annotated[list[str] | None, typer.Option("--add-storage-root")] = None,
    remove_storage_root: Annotated[list[str] | None, typer.Option("--remove-storage-root")] = None,
    switch: Annotated[
        list[str] | None, typer.Option("--switch", help="NAME=BRIDGE[:UPLINK] (repeatable)")
    ] = None,
    remove_switch: Annotated[list[str] | None, typer.Option("--remove-switch")] = None,
    memory_reserve: Annotated[int | None, typer.Option("--memory-reserve", help="MiB")] = None,
    migration_enabled: Annotated[
        bool | None, typer.Option("--migration-enabled/--migration-disabled")
    ] = None,
    max_concurrent: Annotated[
        int | None, typer.Option("--max-concurrent", help="live moves at once")
    ] = None,
    transport: Annotated[
        str | None, typer.Option("--transport", help="tcp | compression | multichannel")
    ] = None,
    streams: Annotated[int | None, typer.Option("--streams", help="multichannel streams")] = None,
    send_queue: Annotated[
        float | None,
        typer.Option(
            "--send-queue",
            help="ms of unsent data a migration socket may queue at its rate (0 = kernel default)",
        ),
    ] = None,
    downtime_aim: Annotated[
        float | None,
        typer.Option(
            "--downtime-aim",
            help="share of a move's downtime target QEMU aims at in its first passes (0.05-1)",
        ),
    ] = None,
    storage_max_concurrent: Annotated[
        int | None, typer.Option("--storage-max-concurrent", help="storage moves at once")
    ] = None,
    migration_authentication: Annotated[
        str | None,
        typer.Option(
            "--migration-authentication",
            help="local (moves start only on this host) | delegated (signed move tickets)",
        ),
    ] = None,
    output: OutputOpt = None,
) -> None:
    """Change host settings."""
    with _client() as c:
        cur = c.settings()
        changes: dict[str, Any] = {}
        if accelerator is not None:
            changes["accelerator"] = accelerator
        if memory_reserve is not None:
            changes["memory_reserve_mib"] = memory_reserve
        roots = list(storage_root) if storage_root else list(cur["storage_roots"])
        roots += [r for r in add_storage_root or [] if r not in roots]
        roots = [r for r in roots if r not in (remove_storage_root or [])]
        if roots != cur["storage_roots"]:
            changes["storage_roots"] = roots
        switches = dict(cur["switches"])
        for s in switch or []:
            name, eq, rest = s.partition("=")
            if not eq or not rest:
                _fail(FerryError(f"--switch {s!r} is not NAME=BRIDGE[:UPLINK]", field="--switch"))
            bridge, _, uplink = rest.partition(":")
            switches[name] = {"bridge": bridge, "uplink": uplink or None}
        for name in remove_switch or []:
            switches.pop(name, None)
        if switches != cur["switches"]:
            changes["switches"] = switches
        mig = dict(cur["migration"])
        for key, val in (
            ("enabled", migration_enabled),
            ("max_concurrent", max_concurrent),
            ("transport", transport),
            ("streams", streams),
            ("authentication", migration_authentication),
            ("send_queue_ms", send_queue),
            ("downtime_aim", downtime_aim),
        ):
            if val is not None:
                mig[key] = val
        if mig != cur["migration"]:
            changes["migration"] = mig
        store = dict(cur.get("storage") or {})
        if storage_max_concurrent is not None:
            store["max_concurrent"] = storage_max_concurrent
        if store != (cur.get("storage") or {}):
            changes["storage"] = store
        new = c.update_settings(**changes) if changes else cur
        _emit(new, output, lambda s: _kv(s, "settings"))


@mignet_app.command("list")
def mignet_list(output: OutputOpt = None) -> None:
    """Show the migration networks, in the order they are tried."""
    with _client() as c:
        mig = c.settings()["migration"]
        trusted = set(mig.get("trusted_networks") or [])
        nets = [{"network": n, "trusted": n in trusted} for n in mig["networks"]]
        _emit(nets, output, lambda ns: out.print("\n".join(
            f"{i}. {n['network']}" + (" (trusted: --no-encryption allowed)" if n["trusted"] else "")
            for i, n in enumerate(ns, 1))))  # fmt: skip


@mignet_app.command("add")
def mignet_add(
    cidr: Annotated[str, typer.Argument(help="a CIDR, or 'any'")],
    position: Annotated[int | None, typer.Option(help="1 = tried first")] = None,
    trusted: Annotated[
        bool,
        typer.Option(
            "--trusted/--untrusted", help="an isolated network where moves may run unencrypted"
        ),
    ] = False,
) -> None:
    """Add a migration network (replaces 'any' when it is the only entry)."""
    import ipaddress

    if cidr != "any":
        try:
            cidr = str(ipaddress.ip_network(cidr, strict=False))
        except ValueError:
            _fail(FerryError(f"{cidr!r} is not a CIDR (or 'any')", field="cidr"))
    if trusted and cidr == "any":
        _fail(FerryError("'any' cannot be trusted", field="--trusted",
                         fix="name the network: migration-network add CIDR --trusted"))  # fmt: skip
    with _client() as c:
        mig = dict(c.settings()["migration"])
        nets = [n for n in mig["networks"] if n != "any" or cidr == "any"]
        if cidr in nets:
            nets.remove(cidr)
        nets.insert((position - 1) if position else len(nets), cidr)
        mig["networks"] = nets
        kept = [n for n in mig.get("trusted_networks") or [] if n in nets and n != cidr]
        mig["trusted_networks"] = [*kept, cidr] if trusted else kept
        new = c.update_settings(migration=mig)
        _print_networks(new["migration"])


def _print_networks(mig: dict[str, Any]) -> None:
    trusted = set(mig.get("trusted_networks") or [])
    out.print("migration networks: " + ", ".join(
        n + (" (trusted)" if n in trusted else "") for n in mig["networks"]))  # fmt: skip


@mignet_app.command("remove")
def mignet_remove(cidr: str) -> None:
    """Remove a migration network."""
    with _client() as c:
        mig = dict(c.settings()["migration"])
        if cidr not in mig["networks"]:
            _fail(FerryError(f"{cidr} is not a migration network here", field="cidr"))
        mig["networks"] = [n for n in mig["networks"] if n != cidr]
        mig["trusted_networks"] = [n for n in mig.get("trusted_networks") or [] if n != cidr]
        if not mig["networks"]:
            _fail(FerryError("a host needs at least one migration network", field="cidr",
                             fix="add another first, or use --migration-disabled"))  # fmt: skip
        new = c.update_settings(migration=mig)
        _print_networks(new["migration"])


# -- move ------------------------------------------------------------------------------------
def _pairs(values: list[str] | None, opt: str) -> dict[str, str]:
    result = {}
    for v in values or []:
        k, eq, val = v.partition("=")
        if not eq or not k or not val:
            _fail(FerryError(f"{opt} {v!r} is not OLD=NEW", field=opt))
        result[k] = val
    return result


def _find_vm(name: str) -> str:
    from vmferry.client import FerryClient as _C

    cfg = load_config()
    for host, ep in cfg.hosts.items():
        try:
            with _C(ep, timeout=5) as c:
                if any(v["name"] == name for v in c.vms()):
                    return host
        except FerryError:
            continue
    _fail(FerryError(f"no configured host has a VM named {name!r}", field="vm",
                     fix="pass --host SOURCE"))  # fmt: skip


@app.command("move")
def move(
    vm: str,
    to: Annotated[str, typer.Option("--to", help="destination host (client config name)")],
    storage_path: Annotated[
        str | None, typer.Option("--storage-path", help="copy every file to this directory")
    ] = None,
    disk_map: Annotated[
        list[str] | None, typer.Option("--disk-map", help="DISK=DEST_FILE (repeatable)")
    ] = None,
    vm_only: Annotated[
        bool, typer.Option("--vm-only", help="disks stay where they are (shared volume)")
    ] = False,
    switch_map: Annotated[
        list[str] | None, typer.Option("--switch-map", help="OLD=NEW switch name")
    ] = None,
    transport: Annotated[str | None, typer.Option(help="tcp | compression | multichannel")] = None,
    streams: Annotated[int | None, typer.Option(help="streams for multichannel")] = None,
    bandwidth: Annotated[int | None, typer.Option(help="cap in Mbit/s")] = None,
    policy: Annotated[str, typer.Option(help="auto | precopy | postcopy")] = "auto",
    downtime_target: Annotated[int, typer.Option("--downtime-target", help="ms")] = 50,
    timeout: Annotated[float | None, typer.Option(help="seconds")] = None,
    on_timeout: Annotated[str, typer.Option("--on-timeout", help="abort | force")] = "abort",
    what_if: Annotated[bool, typer.Option("--what-if", help="check and plan only")] = False,
    quick: Annotated[
        bool, typer.Option("--quick", help="save to the shared volume, restore on the destination")
    ] = False,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="return once started")] = False,
    no_encryption: Annotated[
        bool,
        typer.Option(
            "--no-encryption",
            help="clear-text stream; only over a migration network marked trusted",
        ),
    ] = False,
    output: OutputOpt = None,
) -> None:
    """Live-move a running VM to another host (shared storage or shared-nothing)."""
    cfg = load_config()
    dest_ep = cfg.hosts.get(to)
    if dest_ep is None:
        _fail(FerryError(f"unknown destination host {to!r}", field="--to",
                         fix="known hosts: " + ", ".join(sorted(cfg.hosts))))  # fmt: skip
        return
    if G.host is None:
        G.host = _find_vm(vm)
    request: dict[str, Any] = {
        "destination": {"name": to, "url": dest_ep.url},
        "what_if": what_if,
        "options": {
            "storage_path": storage_path,
            "disk_map": _pairs(disk_map, "--disk-map"),
            "vm_only": vm_only,
            "switch_map": _pairs(switch_map, "--switch-map"),
            "transport": transport,
            "streams": streams,
            "bandwidth_mbps": bandwidth,
            "policy": policy,
            "downtime_target_ms": downtime_target,
            "timeout_s": timeout,
            "on_timeout": on_timeout,
            "quick": quick,
            "encryption": not no_encryption,
        },
    }
    with _client() as c:
        result = c.move(vm, request)
        if what_if:
            _emit(result, output, _quick_what_if if quick else _what_if_table)
            if not result["ok"]:
                raise typer.Exit(1)
            return
        if no_wait:
            _emit(result, output, lambda j: out.print(f"migration {j['id']} started"))
            return
        job = _watch(c, result["id"], quiet=(output or G.output) is Output.json)
        _emit(job, output, _job_show)
        if job["state"] != "completed":
            raise typer.Exit(1)


def _what_if_table(plan: dict[str, Any]) -> None:
    _what_if_checks(plan)
    out.print(
        f"mode {plan['mode']}, {plan['bytes_to_move'] / 2**20:.0f} MiB to move, predicted "
        f"≈ {plan['predicted_s']} s at {plan['link_mbps_assumed']} Mbit/s ({plan['note']})"
    )


def _watch(c: FerryClient, job_id: str, quiet: bool) -> dict[str, Any]:
    import time as _time

    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    cols = (
        TextColumn("[bold]{task.fields[phase]:<10}"),
        BarColumn(),
        TextColumn("{task.percentage:>3.0f}%"),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
    )
    with Progress(*cols, console=err, disable=quiet, transient=False) as bar:
        task = bar.add_task("move", total=100, phase="queued", detail="")
        while True:
            job = c.migration(job_id)
            p = job["progress"]
            total = p["ram_total"] + p["disk_total"]
            done = p["ram_transferred"] + p["disk_transferred"]
            pct = min(99.0, 100.0 * done / total) if total else 0.0
            if job["state"] == "completed":
                pct = 100.0
            detail = (
                f"{done / 2**20:,.0f} MiB sent, {p['ram_remaining'] / 2**20:,.0f} MiB left, "
                f"{p['mbps']:.0f} Mbit/s, pass {p['passes']}"
            )
            if job.get("kind") == "storage":
                detail = (f"{done / 2**20:,.0f} of {total / 2**20:,.0f} MiB copied, "
                          f"{p['mbps']:.0f} Mbit/s")  # fmt: skip
            if job.get("kind") == "quick":
                detail = f"{done / 2**20:,.0f} MiB of state saved" if done else ""
            if p.get("expected_downtime_ms") is not None:
                detail += f", downtime ≈ {p['expected_downtime_ms']} ms"
            if p.get("eta_s") is not None:
                detail += f", ETA {p['eta_s']:.0f} s"
            if job.get("queue_position"):
                detail = f"waiting, position {job['queue_position']}"
            bar.update(task, completed=pct, phase=job["phase"], detail=detail)
            if job["state"] in ("completed", "failed", "cancelled"):
                return job
            _time.sleep(0.2)


def _encryption_word(encrypted: bool | None) -> str:
    if encrypted is None:
        return "encryption -"
    return "encrypted (TLS)" if encrypted else "unencrypted"


def _job_show(job: dict[str, Any]) -> None:
    if job.get("kind") == "storage":
        _storage_job_show(job)
        return
    if job.get("kind") == "quick":
        _quick_job_show(job)
        return
    t = Table(title=f"migration {job['id']}: {job['vm']} {job['source']} → {job['destination']}",
              title_justify="left")  # fmt: skip
    t.add_column("PHASE")
    t.add_column("SECONDS", justify="right")
    for ph in job["phases"]:
        secs = None if ph["ended_at"] is None else ph["ended_at"] - ph["started_at"]
        t.add_row(ph["phase"], "-" if secs is None else f"{secs:.3f}")
    out.print(t)
    state = job["state"]
    color = {"completed": "green", "failed": "red", "cancelled": "yellow"}.get(state, "white")
    out.print(
        f"[{color}]{state}[/] — mode {job.get('mode')}, transport {job.get('transport')}, "
        f"{_encryption_word(job.get('encrypted'))}, "
        f"address {job.get('address')}, total {job.get('total_s')} s, QEMU downtime "
        f"{job.get('qemu_downtime_ms')} ms (the source's view; the guest's blackout is longer)"
    )
    for e in job.get("escalations") or []:
        out.print(f"  escalation: {e}")
    if job.get("error"):
        e = job["error"]
        out.print(f"[red]failed in {e['phase']}:[/] {e['message']}", highlight=False)
        if e.get("fix"):
            out.print(f"  fix: {e['fix']}", highlight=False)


@app.command("move-storage")
def move_storage(
    vm: str,
    to: Annotated[
        str | None, typer.Option("--to", help="folder for every file (under a storage root)")
    ] = None,
    disk_map: Annotated[
        list[str] | None, typer.Option("--disk-map", help="DISK=PATH (file or folder; repeatable)")
    ] = None,
    config_to: Annotated[
        str | None, typer.Option("--config-to", help="folder for the configuration")
    ] = None,
    state_to: Annotated[
        str | None, typer.Option("--state-to", help="folder for the saved state")
    ] = None,
    bandwidth: Annotated[int | None, typer.Option(help="copy rate cap in Mbit/s")] = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="return once started")] = False,
    output: OutputOpt = None,
) -> None:
    """Move a VM's files to other folders on its host; a running VM keeps running."""
    request: dict[str, Any] = {
        "to": to,
        "disk_map": _pairs(disk_map, "--disk-map"),
        "config_to": config_to,
        "state_to": state_to,
        "bandwidth_mbps": bandwidth,
    }
    with _client() as c:
        result = c.move_storage(vm, request)
        if no_wait:
            _emit(result, output, lambda j: out.print(f"storage move {j['id']} started"))
            return
        job = _watch(c, result["id"], quiet=(output or G.output) is Output.json)
        _emit(job, output, _job_show)
        if job["state"] != "completed":
            raise typer.Exit(1)


def _storage_job_show(job: dict[str, Any]) -> None:
    t = Table(title=f"storage move {job['id']}: {job['vm']} on {job['source']} ({job.get('mode')})",
              title_justify="left")  # fmt: skip
    t.add_column("PHASE")
    t.add_column("SECONDS", justify="right")
    for ph in job["phases"]:
        secs = None if ph["ended_at"] is None else ph["ended_at"] - ph["started_at"]
        t.add_row(ph["phase"], "-" if secs is None else f"{secs:.3f}")
    out.print(t)
    for f in (job.get("storage") or {}).get("files", []):
        out.print(f"  {f.get('disk') or f['kind']}: {f['src']} → {f['dst']}", highlight=False)
    state = job["state"]
    color = {"completed": "green", "failed": "red", "cancelled": "yellow"}.get(state, "white")
    out.print(f"[{color}]{state}[/] — total {job.get('total_s')} s")
    for e in job.get("escalations") or []:
        out.print(f"  note: {e}", highlight=False)
    if job.get("error"):
        e = job["error"]
        out.print(f"[red]failed in {e['phase']}:[/] {e['message']}", highlight=False)
        if e.get("fix"):
            out.print(f"  fix: {e['fix']}", highlight=False)


def _downtime(job: dict[str, Any]) -> str:
    """The listing's DOWNTIME: the measured outage of a quick move, else QEMU's figure."""
    ms = job.get("downtime_ms") if job.get("kind") == "quick" else job.get("qemu_downtime_ms")
    return "-" if ms is None else f"{ms} ms"


def _quick_what_if(plan: dict[str, Any]) -> None:
    _what_if_checks(plan)
    out.print(f"quick move of a {plan['state']} VM; files stay in {plan['storage_dir']}; "
              f"{plan['note']}")  # fmt: skip


def _what_if_checks(plan: dict[str, Any]) -> None:
    t = Table(title=f"what if {plan['vm']} moved {plan['source']} → {plan['destination']}",
              title_justify="left")  # fmt: skip
    t.add_column("CHECK")
    t.add_column("")
    t.add_column("DETAIL")
    for ch in plan["checks"]:
        detail = ch["message"] + (f"  → {ch['fix']}" if ch.get("fix") else "")
        t.add_row(ch["name"], "[green]ok[/]" if ch["ok"] else "[red]FAIL[/]", detail)
    out.print(t)


def _quick_job_show(job: dict[str, Any]) -> None:
    t = Table(title=f"quick move {job['id']}: {job['vm']} {job['source']} → "
              f"{job['destination']}", title_justify="left")  # fmt: skip
    t.add_column("PHASE")
    t.add_column("SECONDS", justify="right")
    for ph in job["phases"]:
        secs = None if ph["ended_at"] is None else ph["ended_at"] - ph["started_at"]
        t.add_row(ph["phase"], "-" if secs is None else f"{secs:.3f}")
    out.print(t)
    state = job["state"]
    color = {"completed": "green", "failed": "red", "cancelled": "yellow"}.get(state, "white")
    if job.get("downtime_ms") is not None:
        outage = f"guest outage {job['downtime_ms']} ms (paused on {job['source']} → running "
        outage += f"on {job['destination']})"
    else:
        outage = f"no guest outage (the VM was {job.get('vm_state') or '?'})"
    out.print(f"[{color}]{state}[/] — total {job.get('total_s')} s, "
              f"{job.get('bytes_sent', 0) / 2**20:,.0f} MiB of state, {outage}")  # fmt: skip
    for e in job.get("escalations") or []:
        out.print(f"  note: {e}", highlight=False)
    if job.get("error"):
        e = job["error"]
        out.print(f"[red]failed in {e['phase']}:[/] {e['message']}", highlight=False)
        if e.get("fix"):
            out.print(f"  fix: {e['fix']}", highlight=False)


@migration_app.command("list")
def migration_list(output: OutputOpt = None) -> None:
    """Moves started from a host, newest first."""
    with _client() as c:
        jobs = c.migrations()

    def render(js: list[dict[str, Any]]) -> None:
        t = Table()
        for col in ("ID", "VM", "FROM", "TO", "STATE", "PHASE", "MODE", "TOTAL", "DOWNTIME"):
            t.add_column(col)
        for j in js:
            t.add_row(j["id"], j["vm"], j["source"], j["destination"], j["state"], j["phase"],
                      j.get("mode") or "-", f"{j['total_s']:.1f}s" if j.get("total_s") else "-",
                      _downtime(j))  # fmt: skip
        out.print(t)

    _emit(jobs, output, render)


@migration_app.command("show")
def migration_show(
    job_id: str,
    trace: Annotated[
        bool, typer.Option("--trace", help="the phase timeline and the memory passes")
    ] = False,
    output: OutputOpt = None,
) -> None:
    """One move with its phases, times and outcome (--trace: its timeline and passes)."""
    with _client() as c:
        if trace:
            _emit(c.migration_trace(job_id), output, _trace_show)
        else:
            _emit(c.migration(job_id), output, _job_show)


def _trace_show(tr: dict[str, Any]) -> None:
    """``ferry migration show ID --trace``: phase timeline, then one row per memory pass."""
    out.print(f"{tr['kind']} move {tr['id']}: {tr['vm']} {tr['source']} → {tr['destination']} "
              f"({tr['state']}, {tr.get('total_s')} s)", highlight=False)  # fmt: skip
    t = Table()
    for col in ("PHASE", "AT s", "SECS"):
        t.add_column(col, justify="left" if col == "PHASE" else "right")
    for ph in tr["phases"]:
        t.add_row(ph["phase"], f"{ph['start_s']:.3f}",
                  f"{ph['duration_s']:.3f}" + (" …" if ph["open"] else ""))  # fmt: skip
    out.print(t)
    if not tr["passes"]:
        out.print("no memory passes recorded", highlight=False)
    else:
        p = Table(title="memory passes", title_justify="left", box=None, pad_edge=False)
        for col in ("PASS", "PHASE", "AT s", "SECS", "SENT MiB", "LEFT MiB", "DIRTY MB/s",
                    "Mbit/s", "THR %"):  # fmt: skip
            p.add_column(col, justify="left" if col == "PHASE" else "right")
        for r in tr["passes"]:
            p.add_row(str(r["pass"]), r["phase"], f"{r['start_s']:.3f}", f"{r['duration_s']:.3f}",
                      f"{r['bytes'] / 2**20:,.1f}", f"{r['remaining_bytes'] / 2**20:,.1f}",
                      f"{r['dirty_rate_bps'] / 1e6:,.1f}", f"{r['mbps']:,.0f}",
                      "-" if r["throttle_pct"] is None else str(r["throttle_pct"]))  # fmt: skip
        out.print(p)
    disk = [s for s in tr["samples"] if s["disk_total"]]
    if disk:
        last = disk[-1]
        done, total = last["disk_transferred"] / 2**20, last["disk_total"] / 2**20
        out.print(f"disk copy: {done:,.1f} of {total:,.1f} MiB at {last['t']:.1f} s",
                  highlight=False)  # fmt: skip
    out.print(f"{len(tr['samples'])} samples (every {tr['interval_s']:g} s and at each pass or "
              f"phase; {tr['dropped_samples']} thinned out); --output json for all of them",
              highlight=False)  # fmt: skip


@migration_app.command("cancel")
def migration_cancel(job_id: str) -> None:
    """Cancel a move before switchover; the VM keeps running on the source."""
    with _client() as c:
        c.cancel_migration(job_id)
        job = _watch(c, job_id, quiet=True)
        _job_show(job)


@migration_app.command("complete")
def migration_complete(job_id: str) -> None:
    """Finish a move whose hand-over failed after the guest already moved (the source copy
    stays paused until then): the destination agent takes the VM over, the source lets go."""
    with _client() as c:
        _job_show(c.complete_migration(job_id))


# -- image -----------------------------------------------------------------------------------
@image_app.command("build")
def image_build(
    force: Annotated[bool, typer.Option(help="rebuild even if cached")] = False,
    output: OutputOpt = None,
) -> None:
    """Build the lab's guest image (kernel + initramfs with the probe); cached by content."""
    from vmferry.guest import build_image

    with err.status("building the guest image …"):
        img = build_image(force=force)
    data = {
        "kernel": str(img.kernel),
        "initrd": str(img.initrd),
        "digest": img.digest,
        "kernel_version": img.kernel_version,
    }
    _emit(data, output, lambda d: _kv(d, "guest image"))


# -- lab -------------------------------------------------------------------------------------
LabDirOpt = Annotated[Path | None, typer.Option("--dir", help="lab directory")]


@lab_app.command("up")
def lab_up(
    hosts: Annotated[int, typer.Option("--hosts", min=1, max=16)] = 2,
    link: Annotated[
        str | None, typer.Option("--link", help="migration link rate, e.g. 1gbit")
    ] = None,
    lab_dir: LabDirOpt = None,
    output: OutputOpt = None,
    etcd_members: Annotated[
        int, typer.Option("--etcd-members", min=0, max=9, help="lab etcd members (0 = none)")
    ] = 3,
) -> None:
    """Build N hosts in network namespaces, each with its own ferryd, and an etcd cluster."""
    from vmferry.lab import Lab

    lab = Lab(lab_dir)
    try:
        with err.status(f"building a {hosts}-host lab …"):
            status = lab.up(hosts, link, etcd_members=etcd_members)
    except FerryError as exc:
        _fail(exc)
    _emit(status, output, _lab_table)


@lab_app.command("down")
def lab_down(lab_dir: LabDirOpt = None) -> None:
    """Remove everything the lab made, from its own records."""
    from vmferry.lab import Lab

    removed = Lab(lab_dir).down()
    out.print(f"lab down: removed {len(removed)} item(s)")


@lab_app.command("status")
def lab_status(lab_dir: LabDirOpt = None, output: OutputOpt = None) -> None:
    """Show the lab's hosts and whether their agents answer."""
    from vmferry.lab import Lab

    try:
        status = Lab(lab_dir).status()
    except FerryError as exc:
        _fail(exc)
    _emit(status, output, _lab_table)


@lab_app.command("probe")
def lab_probe(
    kind: Annotated[str, typer.Argument(help="udp | tcp | stat")],
    ip: Annotated[str, typer.Argument(help="guest address on the lab's VM network")],
    count: Annotated[int, typer.Option(min=1, max=10000)] = 5,
    interval: Annotated[float, typer.Option(min=0.0, max=10.0)] = 0.1,
    lab_dir: LabDirOpt = None,
    output: OutputOpt = None,
) -> None:
    """Probe a guest from the lab's client namespace (UDP echo, TCP echo, probe counters)."""
    from vmferry.lab import Lab
    from vmferry.lab.lab import probe

    if kind not in ("udp", "tcp", "stat"):
        _fail(FerryError(f"probe kind {kind!r} is unknown", field="kind", fix="udp, tcp or stat"))
    try:
        result = probe(Lab(lab_dir), kind, ip, count, interval)
    except FerryError as exc:
        _fail(exc)
    _emit(result, output, lambda r: _kv(r, f"{kind} probe of {ip}"))
    if "error" in result or result.get("received", 1) == 0 or result.get("echoed", 1) == 0:
        raise typer.Exit(1)


def _lab_table(status: dict[str, Any]) -> None:
    t = Table(title=f"lab {status.get('tag', '?')} ({status.get('dir')})", title_justify="left")
    for col in ("HOST", "NAMESPACE", "MGMT", "MIGRATION", "AGENT"):
        t.add_column(col)
    for h in status.get("hosts", []):
        t.add_row(h["name"], h["netns"], h["mgmt_ip"], h["migration_ip"], h.get("agent", "?"))
    out.print(t)
    if status.get("client_netns"):
        out.print(
            f"client namespace {status['client_netns']} ({status.get('client_ip')}), "
            f"guests on {status.get('vm_cidr')}, "
            f"migration link {status.get('link_rate') or 'unlimited'}"
        )
    if status.get("etcd"):
        members = ", ".join(
            f"{m['name']} {m['ip']} ({'running' if m.get('running') else 'stopped'})"
            for m in status["etcd"]
        )
        out.print(f"etcd: {members}")


# -- cluster (cluster/) ------------------------------------------------------------------------
cluster_app = typer.Typer(help="Failover clusters on etcd: nodes, leases, leader, volumes.",
                          no_args_is_help=True)  # fmt: skip
app.add_typer(cluster_app, name="cluster")
volume_app = typer.Typer(help="Shared volumes every node of a cluster sees.", no_args_is_help=True)
cluster_app.add_typer(volume_app, name="volume")
ClusterOpt = Annotated[
    str | None, typer.Option("--cluster", "-c", help="cluster name (default: the host's own)")
]


def _node_url(node: str) -> str:
    """The agent URL of a host named in the client config."""
    ep = load_config().hosts.get(node)
    if ep is None:
        _fail(FerryError(f"unknown host {node!r} in the client config", field="nodes",
                         fix="known: " + ", ".join(sorted(load_config().hosts))))  # fmt: skip
    return ep.url


def _self_name() -> str:
    name, _ = resolve_host(G.host, load_config())
    return name


def _cluster_show(st: dict[str, Any]) -> None:
    t = Table(title=f"cluster {st['name']} (leader: {st.get('leader') or 'none'})",
              title_justify="left")  # fmt: skip
    for col in ("NODE", "STATE", "LEASE", "LEADER", "CLUSTERED VMS", "LAST FENCED", "URL"):
        t.add_column(col)
    for n in st["nodes"]:
        fenced = n.get("last_fenced_at")
        d = n.get("drain") or {}
        state = n.get("state", "-")
        if d:
            state += f" ({d['kind']} {d['status']}: {len(d['moved'])} moved"
            state += f", {len(d['failed'])} failed)" if d["failed"] else ")"
        t.add_row(
            n["name"],
            state,
            n["lease"],
            "*" if n["leader"] else "",
            ", ".join(n["clustered_vms"]) or "-",
            "-" if not fenced else f"{fenced:.0f} ({', '.join(n['last_fenced_vms']) or 'no VM'})",
            n["url"],
        )
    out.print(t)
    vols = st.get("volumes") or []
    out.print("volumes: " + (", ".join(v["path"] for v in vols) or "none"))
    etcd = st.get("etcd")
    if etcd:
        ok = sum(1 for e in etcd if e.get("ok"))
        out.print(f"etcd: {ok}/{len(etcd)} endpoints answer")
    ctl = st.get("controller") or {}
    for vm, why in (ctl.get("unplaced") or {}).items():
        out.print(f"[red]not placed[/red] {vm}: {why}")
    if st.get("events"):
        _events_table(st["events"][-5:])


@cluster_app.command("create")
def cluster_create(
    name: str,
    nodes: Annotated[str, typer.Option("--nodes", help="host names, comma separated")],
    force: Annotated[bool, typer.Option("--force", help="create even if validation fails")] = False,
    output: OutputOpt = None,
) -> None:
    """Create a cluster of the named hosts (each must run ferryd connected to the same etcd).

    The hosts are validated first (see `ferry cluster validate`); a failed test refuses.
    """
    names = [n.strip() for n in nodes.split(",") if n.strip()]
    with _client() as c:
        st = c.cluster_create(name, {n: _node_url(n) for n in names}, force=force)
    _emit(st, output, _cluster_show)


def _validate_show(rep: dict[str, Any]) -> None:
    colour = {"pass": "green", "warning": "yellow", "fail": "red"}
    t = Table(title=f"validation: {rep['result']}", title_justify="left")
    for col in ("TEST", "SCOPE", "RESULT", "DETAIL"):
        t.add_column(col)
    for ch in rep["checks"]:
        detail = ch["message"] + (f"  → {ch['fix']}" if ch.get("fix") else "")
        res = ch["result"]
        t.add_row(ch["test"], ch["scope"], f"[{colour[res]}]{res}[/]", detail)
    out.print(t)


@cluster_app.command("validate")
def cluster_validate(
    name: Annotated[str | None, typer.Argument(help="an existing cluster")] = None,
    nodes: Annotated[
        str | None, typer.Option("--nodes", help="validate these hosts instead (comma separated)")
    ] = None,
    volume: Annotated[
        list[str] | None, typer.Option("--volume", help="a shared volume to check (repeatable)")
    ] = None,
    output: OutputOpt = None,
) -> None:
    """Check nodes per node and pairwise: version, CPU, switches, volumes, networks, clocks, etcd.

    Exits 1 when a test fails (warnings do not).
    """
    urls = None
    if nodes:
        urls = {n.strip(): _node_url(n.strip()) for n in nodes.split(",") if n.strip()}
    with _client() as c:
        rep = c.cluster_validate(name, urls, volume)
    _emit(rep, output, _validate_show)
    if rep["result"] == "fail":
        raise typer.Exit(1)


@cluster_app.command("join")
def cluster_join(
    name: str,
    node: Annotated[
        str | None, typer.Option("--node", help="host to add (default: --host)")
    ] = None,
    output: OutputOpt = None,
) -> None:
    """Add a host to a cluster."""
    node = node or _self_name()
    with _client() as c:
        st = c.cluster_join(name, node, _node_url(node))
    _emit(st, output, _cluster_show)


@cluster_app.command("leave")
def cluster_leave(
    node: Annotated[
        str | None, typer.Option("--node", help="host to remove (default: --host)")
    ] = None,
    cluster: ClusterOpt = None,
    output: OutputOpt = None,
) -> None:
    """Remove a host from its cluster."""
    node = node or _self_name()
    with _client() as c:
        name = cluster or c.cluster_status()["name"]
        st = c.cluster_leave(name, node)
    _emit(st, output, _cluster_show)


@cluster_app.command("status")
def cluster_status(name: Annotated[str | None, typer.Argument()] = None,
                   output: OutputOpt = None) -> None:  # fmt: skip
    """Nodes and their leases, the leader, shared volumes, clustered VMs, etcd health."""
    with _client() as c:
        st = c.cluster_status(name)
    _emit(st, output, _cluster_show)


@cluster_app.command("destroy")
def cluster_destroy(name: str) -> None:
    """Delete a cluster; its nodes become standalone hosts (VMs keep running)."""
    with _client() as c:
        res = c.cluster_destroy(name)
    out.print(f"cluster {name} destroyed; standalone again: {', '.join(res['nodes'])}")


@volume_app.command("add")
def volume_add(path: str, cluster: ClusterOpt = None, output: OutputOpt = None) -> None:
    """Check that every node sees PATH and can write to it, then add it."""
    with _client() as c:
        res = c.cluster_volume_add(path, cluster)
    _emit(res, output, lambda r: _cluster_show(r["cluster"]))


@volume_app.command("list")
def volume_list(cluster: ClusterOpt = None, output: OutputOpt = None) -> None:
    """The cluster's shared volumes."""
    with _client() as c:
        vols = c.cluster_volumes(cluster)

    def render(vs: list[dict[str, Any]]) -> None:
        t = Table()
        for col in ("PATH", "CHECKED ON"):
            t.add_column(col)
        for v in vs:
            t.add_row(v["path"], ", ".join(v["checked"]))
        out.print(t)

    _emit(vols, output, render)


@volume_app.command("remove")
def volume_remove(path: str, cluster: ClusterOpt = None, output: OutputOpt = None) -> None:
    """Forget a shared volume (its files stay)."""
    with _client() as c:
        st = c.cluster_volume_remove(path, cluster)
    _emit(st, output, _cluster_show)


# -- clustered VMs and failover (cluster/vms.py, cluster/controller.py) -------------------------
cvm_app = typer.Typer(help="Clustered (highly available) VMs.", no_args_is_help=True)
cluster_app.add_typer(cvm_app, name="vm")
PriorityOpt = Annotated[
    str | None,
    typer.Option("--priority", help="high | medium | low | no-auto-start (failover order)"),
]
PreferredOpt = Annotated[
    str | None, typer.Option("--preferred", help="preferred owners, best first: h1,h2")
]
PossibleOpt = Annotated[
    str | None, typer.Option("--possible", help="the only nodes it may run on: h1,h2")
]
AntiOpt = Annotated[
    str | None,
    typer.Option("--anti-affinity", help="group whose VMs are spread over nodes ('' clears)"),
]


def _cvm_props(
    priority: str | None, preferred: str | None, possible: str | None, anti: str | None
) -> dict[str, Any]:
    props: dict[str, Any] = {}
    if priority is not None:
        props["priority"] = priority
    for key, val in (("preferred", preferred), ("possible", possible)):
        if val is not None:
            props[key] = [n.strip() for n in val.split(",") if n.strip()]
    if anti is not None:
        props["anti_affinity"] = anti
    return props


def _cvm_table(rows: list[dict[str, Any]]) -> None:
    t = Table(title="clustered VMs", title_justify="left")
    for col in ("VM", "OWNER", "LEASE", "PRIORITY", "PREFERRED", "POSSIBLE", "ANTI-AFFINITY"):
        t.add_column(col)
    for r in rows:
        t.add_row(
            r["name"] + (" (restarting)" if r.get("restart_pending") else "")
            + (f" (moving to {r['moving_to']})" if r.get("moving_to") else "")
            + (" (kept off)" if r.get("keep_off") else ""),
            r["node"], r.get("owner_lease", "-"), r["priority"],
            ",".join(r["preferred"]) or "-", ",".join(r["possible"]) or "any",
            r.get("anti_affinity") or "-",
        )  # fmt: skip
    out.print(t)


@cvm_app.command("add")
def cluster_vm_add(
    name: str,
    priority: PriorityOpt = None,
    preferred: PreferredOpt = None,
    possible: PossibleOpt = None,
    anti_affinity: AntiOpt = None,
    output: OutputOpt = None,
) -> None:
    """Make a running (or stopped) VM highly available; ask the host that has it (--host).

    No downtime: only the cluster's records change. Its files must be on a shared volume.
    """
    with _client() as c:
        row = c.cluster_vm_add(name, **_cvm_props(priority, preferred, possible, anti_affinity))
    _emit(row, output, lambda r: _cvm_table([r]))


@cvm_app.command("set")
def cluster_vm_set(
    name: str,
    priority: PriorityOpt = None,
    preferred: PreferredOpt = None,
    possible: PossibleOpt = None,
    anti_affinity: AntiOpt = None,
    cluster: ClusterOpt = None,
    output: OutputOpt = None,
) -> None:
    """Change a clustered VM's priority, preferred/possible owners or anti-affinity group."""
    props = _cvm_props(priority, preferred, possible, anti_affinity)
    if not props:
        fix = "give --priority, --preferred, --possible or --anti-affinity"
        _fail(FerryError("nothing to change", field="options", fix=fix))
    with _client() as c:
        row = c.cluster_vm_set(name, cluster, **props)
    _emit(row, output, lambda r: _cvm_table([r]))


@cvm_app.command("remove")
def cluster_vm_remove(name: str, cluster: ClusterOpt = None, output: OutputOpt = None) -> None:
    """Stop clustering a VM; it keeps running where it is."""
    with _client() as c:
        res = c.cluster_vm_remove(name, cluster)
    _emit(res, output, lambda r: out.print(f"VM {r['removed']} is no longer clustered "
                                           f"(it stays on {r['node']})"))  # fmt: skip


@cvm_app.command("list")
def cluster_vm_list(cluster: ClusterOpt = None, output: OutputOpt = None) -> None:
    """Clustered VMs: owner, owner's lease, priority, owners, anti-affinity group."""
    with _client() as c:
        rows = c.cluster_vms(cluster)
    _emit(rows, output, _cvm_table)


def _events_table(evs: list[dict[str, Any]]) -> None:
    t = Table(title="cluster events", title_justify="left")
    for col in ("AT", "KIND", "VM", "FROM", "TO", "WHY", "TIMES"):
        t.add_column(col)
    for e in evs:
        tm = e.get("timings") or {}
        times = ", ".join(f"{k}={v}" for k, v in tm.items() if not k.endswith("_at"))
        t.add_row(
            time.strftime("%H:%M:%S", time.localtime(e["at"])), e["kind"], e.get("vm") or "-",
            e.get("from_node") or "-", e.get("node") or "-", e.get("reason") or "", times or "-",
        )  # fmt: skip
    out.print(t)


@cluster_app.command("events")
def cluster_events(
    cluster: ClusterOpt = None,
    limit: Annotated[int, typer.Option("--limit", "-n")] = 50,
    output: OutputOpt = None,
) -> None:
    """What the cluster did: failovers (from, to, why, how long), unplaced VMs, changes."""
    with _client() as c:
        evs = c.cluster_events(cluster, limit)
    _emit(evs, output, _events_table)


# -- event logs (host/events.py) -----------------------------------------------------------------
def _events_of(hosts: list[str], **filters: Any) -> list[dict[str, Any]]:
    """Events of the named hosts, merged by time (a host that does not answer is reported)."""
    cfg = load_config()
    rows: list[dict[str, Any]] = []
    for name in hosts:
        ep = cfg.hosts.get(name)
        if ep is None:
            _fail(FerryError(f"unknown host {name!r}", field="--host",
                             fix="known: " + ", ".join(sorted(cfg.hosts))))  # fmt: skip
        try:
            with FerryClient(ep, timeout=10) as c:
                rows += c.events(**filters)
        except FerryError as exc:
            err.print(f"[yellow]{name}: {exc.message}[/]")
    return sorted(rows, key=lambda e: (e["at"], e["host"], e["id"]))


def _events_print(rows: list[dict[str, Any]]) -> None:
    colors = {"error": "red", "warning": "yellow", "debug": "dim"}
    for e in rows:
        t = time.strftime("%H:%M:%S", time.localtime(e["at"])) + f".{int(e['at'] % 1 * 1000):03d}"
        c = colors.get(e["level"])
        lvl = f"[{c}]{e['level']:<7}[/]" if c else f"{e['level']:<7}"
        where = " ".join(x for x in (e.get("vm"), e.get("job")) if x)
        out.print(f"{t} {e['host']:<6} {lvl} {e['kind']:<18} {where} {e['message']}",
                  highlight=False)  # fmt: skip


def _event_out(e: dict[str, Any], json_out: bool) -> None:
    if json_out:
        sys.stdout.write(json.dumps(e) + "\n")
    else:
        _events_print([e])


@app.command("events")
def events_cmd(
    hosts: Annotated[
        list[str] | None, typer.Option("--host", help="only these hosts (default: every host)")
    ] = None,
    vm: Annotated[str | None, typer.Option("--vm")] = None,
    job: Annotated[str | None, typer.Option("--job", help="a migration job id")] = None,
    level: Annotated[
        str | None, typer.Option("--level", help="debug | info | warning | error (and above)")
    ] = None,
    kind: Annotated[str | None, typer.Option("--kind")] = None,
    since: Annotated[float | None, typer.Option("--since", help="seconds ago (e.g. 3600) ")] = None,
    limit: Annotated[int, typer.Option("--limit", "-n")] = 100,
    follow: Annotated[
        bool, typer.Option("--follow", "-f", help="keep printing new events")
    ] = False,
    output: OutputOpt = None,
) -> None:
    """What the hosts did and refused: moves and their phases, refusals, failovers, fences."""
    names = hosts or ([G.host] if G.host else sorted(load_config().hosts))
    flt: dict[str, Any] = {"vm": vm, "job": job, "level": level, "kind": kind,
                           "since": time.time() - since if since else None}  # fmt: skip
    rows = _events_of(names, **flt, limit=limit)
    if not follow:
        _emit(rows, output, _events_print)
        return
    json_out = (output or G.output) is Output.json
    last = {n: 0 for n in names}
    for e in rows:
        last[e["host"]] = max(last.get(e["host"], 0), e["id"])
        _event_out(e, json_out)
    try:
        while True:  # until Ctrl-C
            time.sleep(1.0)
            for n in names:
                new = _events_of([n], **flt, after=last.get(n, 0), limit=1000)
                for e in new:
                    last[n] = max(last.get(n, 0), e["id"])
                    _event_out(e, json_out)
                sys.stdout.flush()
    except KeyboardInterrupt:
        return


@cluster_app.command("log")
def cluster_log(
    copy: Annotated[Path, typer.Option("--copy", help="directory to write <node>.jsonl into")],
    cluster: ClusterOpt = None,
    since: Annotated[float | None, typer.Option("--since", help="seconds ago")] = None,
) -> None:
    """Gather every node's event log into a directory (one JSON-lines file per node)."""
    with _client() as c:
        st = c.cluster_status(cluster)
    cfg = load_config()
    copy.mkdir(parents=True, exist_ok=True)
    missing = []
    for n in st["nodes"]:
        if n["name"] not in cfg.hosts:
            missing.append(n["name"])
            continue
        rows = _events_of([n["name"]], since=time.time() - since if since else None,
                          limit=10_000)  # fmt: skip
        path = copy / f"{n['name']}.jsonl"
        path.write_text("".join(json.dumps(e) + "\n" for e in rows))
        out.print(f"{n['name']}: {len(rows)} events → {path}")
    (copy / "cluster.json").write_text(json.dumps(st, indent=1) + "\n")
    if missing:
        err.print(f"[yellow]not in the client config, not gathered: {', '.join(missing)}[/]")
        raise typer.Exit(1)


# -- planned moves, drain, resume (cluster/planned.py) -------------------------------------------
@cluster_app.command("move")
def cluster_move(
    vm: str,
    to: Annotated[str | None, typer.Option("--to", help="destination node")] = None,
    best: Annotated[bool, typer.Option("--best", help="the best possible node")] = False,
    quick: Annotated[bool, typer.Option("--quick", help="quick move (save, restore)")] = False,
    cluster: ClusterOpt = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="return once started")] = False,
    output: OutputOpt = None,
) -> None:
    """Move a clustered VM to another node, live by default; the cluster records its new owner."""
    with _client() as c:
        res = c.cluster_vm_move(vm, to, best, quick, cluster)
    job = res["job"]
    if no_wait:
        _emit(
            res,
            output,
            lambda r: out.print(
                f"moving {vm} from {r['from']} to {r['to']}: migration {job['id']} on {r['from']}"
            ),
        )
        return
    if (output or G.output) is not Output.json:
        err.print(f"{res['reason']}: {vm} from {res['from']} to {res['to']}")
    if res["from"] not in load_config().hosts:
        _fail(
            FerryError(
                f"migration {job['id']} runs on {res['from']}, which the client config lacks",
                fix=f"watch it with: ferry --host {res['from']} migration show {job['id']}",
            )
        )
    G.host = res["from"]
    with _client() as c:
        done = _watch(c, job["id"], quiet=(output or G.output) is Output.json)
    _emit({**res, "job": done}, output, lambda r: _job_show(r["job"]))
    if done["state"] != "completed":
        raise typer.Exit(1)


def _drain_progress(st: dict[str, Any], node: str) -> dict[str, Any] | None:
    return next((n.get("drain") for n in st["nodes"] if n["name"] == node), None)


def _wait_drain(c: FerryClient, cluster: str, node: str, quiet: bool) -> dict[str, Any]:
    """Poll the cluster until the drain (failback) of ``node`` ends (bounded: 2 h)."""
    deadline = time.monotonic() + 7200
    shown: set[str] = set()
    while True:
        d = _drain_progress(c.cluster_status(cluster), node) or {}
        for vm, to in sorted(d.get("moved", {}).items()):
            if not quiet and f"m{vm}" not in shown:
                err.print(f"  moved {vm} to {to}")
                shown.add(f"m{vm}")
        for vm, why in sorted(d.get("failed", {}).items()):
            if not quiet and f"f{vm}" not in shown:
                err.print(f"  [yellow]could not move {vm}[/]: {why}")
                shown.add(f"f{vm}")
        if d.get("status") != "running" or time.monotonic() > deadline:
            return d
        time.sleep(0.5)


@cluster_app.command("drain")
def cluster_drain(
    node: str,
    cluster: ClusterOpt = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="return once started")] = False,
    output: OutputOpt = None,
) -> None:
    """Pause a node and move its clustered VMs live to the best possible nodes (maintenance)."""
    with _client() as c:
        name = cluster or c.cluster_status()["name"]
        rec = c.cluster_drain(name, node)
        if no_wait:
            _emit(rec, output, lambda r: out.print(f"draining {node}; see ferry cluster status"))
            return
        d = _wait_drain(c, name, node, quiet=(output or G.output) is Output.json)
    _emit(
        d,
        output,
        lambda r: out.print(
            f"drain of {node} {r.get('status')}: {len(r.get('moved', {}))} moved, "
            f"{len(r.get('failed', {}))} could not move; {node} stays paused "
            f"(ferry cluster resume {node} [--failback])"
        ),
    )
    if d.get("status") != "done":
        raise typer.Exit(1)


@cluster_app.command("resume")
def cluster_resume(
    node: str,
    failback: Annotated[
        bool, typer.Option("--failback", help="move back the VMs its drain moved away")
    ] = False,
    cluster: ClusterOpt = None,
    no_wait: Annotated[bool, typer.Option("--no-wait", help="return once started")] = False,
    output: OutputOpt = None,
) -> None:
    """Unpause a node (it takes VMs again); with --failback, bring its VMs back live."""
    with _client() as c:
        name = cluster or c.cluster_status()["name"]
        rec = c.cluster_resume(name, node, failback)
        if not failback or no_wait:
            _emit(rec, output, lambda r: out.print(f"{node} resumed"))
            return
        d = _wait_drain(c, name, node, quiet=(output or G.output) is Output.json)
    _emit(
        d,
        output,
        lambda r: out.print(
            f"failback to {node} {r.get('status')}: {len(r.get('moved', {}))} moved back, "
            f"{len(r.get('failed', {}))} could not move"
        ),
    )
    if d.get("status") != "done":
        raise typer.Exit(1)


# -- security: CA, certificates, revocation, audit log (docs/security.md) ----------------------
ca_app = typer.Typer(help="The CA of your hosts and users.", no_args_is_help=True)
app.add_typer(ca_app, name="ca")
cert_app = typer.Typer(help="Issue, list and revoke certificates.", no_args_is_help=True)
app.add_typer(cert_app, name="cert")
issue_app = typer.Typer(help="Issue a host or user certificate.", no_args_is_help=True)
cert_app.add_typer(issue_app, name="issue")


def _default_ca_dir() -> Path:
    return Path.home() / ".config" / "vmferry" / "ca"


CaDirOpt = Annotated[
    Path | None,
    typer.Option(
        "--ca-dir",
        envvar="FERRY_CA_DIR",
        help="the CA's directory (default ~/.config/vmferry/ca)",
    ),
]
OutDirOpt = Annotated[
    Path | None,
    typer.Option("--out", help="where NAME.crt and NAME.key go (default CA-DIR/certs)"),
]
DaysOpt = Annotated[int, typer.Option("--days", min=1, max=3650, help="validity in days")]


def _ca(ca_dir: Path | None) -> Any:
    from vmferry.security import CertificateAuthority

    return CertificateAuthority(ca_dir or _default_ca_dir())


def _issued(paths: Any, ca: Any, output: Output | None) -> None:
    row = next(c for c in reversed(ca.certificates()) if c["path"] == str(paths.cert.resolve()))
    data = {**row, "key": str(paths.key), "ca": str(paths.ca)}
    _emit(
        data,
        output,
        lambda d: out.print(
            f"issued {d['name']} ({'role ' + d['role'] if d['role'] else 'server only, no role'}"
            f", serial {d['serial']}): "
            f"{d['path']}, key {d['key']}"
        ),
    )


@ca_app.command("init")
def ca_init(
    directory: Annotated[Path | None, typer.Argument(help="default ~/.config/vmferry/ca")] = None,
    name: Annotated[str, typer.Option("--name", help="the CA's common name")] = "vmferry CA",
) -> None:
    """Create a CA (ca.crt, ca.key, index.json, crl.pem); an existing one is kept."""
    from vmferry.security import CertificateAuthority

    d = directory or _default_ca_dir()
    existed = (d / "ca.key").exists()
    ca = CertificateAuthority.create(d, name)
    out.print(
        f"{'kept the existing' if existed else 'created a'} CA in {d}: give every agent "
        f"{ca.cert_path} as --tls-ca; keep {ca.key_path} private"
    )


@issue_app.command("host")
def cert_issue_host(
    name: str,
    ip: Annotated[list[str], typer.Option("--ip", help="an address the agent is reached on")],
    dns: Annotated[list[str] | None, typer.Option("--dns", help="a DNS name of the host")] = None,
    delegate: Annotated[
        list[str] | None,
        typer.Option(
            "--delegate",
            help="where this host may act for a user who signed a move ticket: HOST, "
            "HOST:live,quick or '*' (repeatable; none: it cannot start delegated moves)",
        ),
    ] = None,
    ca_dir: CaDirOpt = None,
    out_dir: OutDirOpt = None,
    days: DaysOpt = 825,
    output: OutputOpt = None,
) -> None:
    """Issue an agent's certificate (role host): server and client, names and addresses,
    delegation targets (docs/security.md: move initiation)."""
    import ipaddress

    for a in ip:
        try:
            ipaddress.ip_address(a)
        except ValueError:
            _fail(FerryError(f"{a!r} is not an IP address", field="--ip", fix="--ip 192.0.2.10"))
    try:
        ca = _ca(ca_dir)
        paths = ca.issue(
            out_dir or ca.dir / "certs", name, role="host",
            server_names=[*ip, *(dns or [])], days=days, delegate=delegate,
        )  # fmt: skip
    except FerryError as exc:
        _fail(exc)
    _issued(paths, ca, output)


@issue_app.command("server")
def cert_issue_server(
    name: str,
    ip: Annotated[
        list[str] | None, typer.Option("--ip", help="an address clients connect to")
    ] = None,
    dns: Annotated[list[str] | None, typer.Option("--dns", help="a DNS name of the server")] = None,
    ca_dir: CaDirOpt = None,
    out_dir: OutDirOpt = None,
    days: DaysOpt = 825,
    output: OutputOpt = None,
) -> None:
    """Issue a server-only certificate with no role (the Admin Center's HTTPS): agents refuse
    it as a client, so its key cannot act as a host or a user."""
    import ipaddress

    for a in ip or []:
        try:
            ipaddress.ip_address(a)
        except ValueError:
            _fail(FerryError(f"{a!r} is not an IP address", field="--ip", fix="--ip 192.0.2.10"))
    if not ip and not dns:
        _fail(
            FerryError(
                "a server certificate needs a name",
                field="--ip",
                fix="--ip ADDRESS and/or --dns NAME (what browsers connect to)",
            )
        )
    try:
        ca = _ca(ca_dir)
        paths = ca.issue(
            out_dir or ca.dir / "certs", name, role=None,
            server_names=[*(ip or []), *(dns or [])], client=False, days=days,
        )  # fmt: skip
    except FerryError as exc:
        _fail(exc)
    _issued(paths, ca, output)


class RoleChoice(StrEnum):
    """The roles a user certificate may carry."""

    viewer = "viewer"
    operator = "operator"
    admin = "admin"


@issue_app.command("user")
def cert_issue_user(
    name: str,
    role: Annotated[RoleChoice, typer.Option("--role", help="viewer, operator or admin")],
    ca_dir: CaDirOpt = None,
    out_dir: OutDirOpt = None,
    days: DaysOpt = 365,
    output: OutputOpt = None,
) -> None:
    """Issue a user's client certificate with a role (docs/security.md: the roles table)."""
    try:
        ca = _ca(ca_dir)
        paths = ca.issue(out_dir or ca.dir / "certs", name, role=role.value, days=days)
    except FerryError as exc:
        _fail(exc)
    _issued(paths, ca, output)


def _cert_table(rows: list[dict[str, Any]]) -> None:
    t = Table()
    for col in ("NAME", "ROLE", "SERIAL", "STATE", "EXPIRES", "NAMES"):
        t.add_column(col)
    for r in rows:
        t.add_row(
            r["name"],
            r["role"] or "-",
            r["serial"],
            r["state"],
            time.strftime("%Y-%m-%d", time.gmtime(r["not_after"])),
            ", ".join(r["names"]) or "-",
        )
    out.print(t)


@cert_app.command("list")
def cert_list(ca_dir: CaDirOpt = None, output: OutputOpt = None) -> None:
    """Every certificate the CA issued: role, serial, valid / expired / revoked."""
    ca = _ca(ca_dir)
    if not ca.exists():
        _fail(FerryError(f"no CA in {ca.dir}", field="--ca-dir", fix=f"ferry ca init {ca.dir}"))
    _emit(ca.certificates(), output, _cert_table)


def _push_crl(pem: str) -> dict[str, str]:
    """PUT the CRL to every host of the client configuration; host → "ok" or the error."""
    results: dict[str, str] = {}
    for name, ep in sorted(load_config().hosts.items()):
        try:
            with FerryClient(ep, timeout=10) as c:
                got = c.request("PUT", "/v1/security/crl", json={"crl": pem})
            results[name] = f"ok (CRL number {got['crl']['number']})"
        except FerryError as exc:
            results[name] = f"failed: {exc}"
    return results


def _push_report(results: dict[str, str], output: Output | None, head: dict[str, Any]) -> None:
    data = {**head, "hosts": results}

    def render(d: dict[str, Any]) -> None:
        for k, v in head.items():
            out.print(f"{k}: {v}")
        if not results:
            out.print("no hosts in the client configuration: nothing pushed")
        for host, res in results.items():
            out.print(f"  {host}: {res}")

    _emit(data, output, render)
    if any(not r.startswith("ok") for r in results.values()):
        err.print("some hosts did not take the revocation list; fix: ferry cert push-crl")
        raise typer.Exit(1)


@cert_app.command("revoke")
def cert_revoke(
    name_or_serial: Annotated[str, typer.Argument(metavar="NAME|SERIAL")],
    reason: Annotated[str, typer.Option("--reason", help="kept in the CA's index")] = "",
    push: Annotated[
        bool, typer.Option("--push/--no-push", help="send the CRL to every configured host")
    ] = True,
    ca_dir: CaDirOpt = None,
    output: OutputOpt = None,
) -> None:
    """Revoke by name (every valid certificate of it) or serial; push the CRL to the hosts."""
    ca = _ca(ca_dir)
    try:
        done = ca.revoke(name_or_serial, reason)
    except FerryError as exc:
        _fail(exc)
    head = {"revoked": ", ".join(f"{c['name']} ({c['serial']})" for c in done)}
    _push_report(_push_crl(ca.crl_pem()) if push else {}, output, head)


@cert_app.command("push-crl")
def cert_push_crl(ca_dir: CaDirOpt = None, output: OutputOpt = None) -> None:
    """Sign the revocation list afresh (valid another year) and send it to every host of the
    client configuration; run it at least yearly (agents skip an expired list)."""
    ca = _ca(ca_dir)
    if not ca.exists():
        _fail(FerryError(f"no CA in {ca.dir}", field="--ca-dir", fix=f"ferry ca init {ca.dir}"))
    _push_report(_push_crl(ca.renew_crl()), output, {"crl": str(ca.crl_path)})


def _since(text: str) -> float:
    """``30m``, ``2h``, ``7d`` ago, or an ISO date/time, as a Unix time."""
    import datetime as dt

    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text and text[-1] in units and text[:-1].isdigit():
        return time.time() - int(text[:-1]) * units[text[-1]]
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        _fail(FerryError(f"--since {text!r}: not a duration or date", field="--since",
                         fix="--since 30m, 2h, 7d or 2026-01-31T12:00"))  # fmt: skip
        raise
    if when.tzinfo is None:
        when = when.astimezone()
    return when.timestamp()


def _audit_table(rows: list[dict[str, Any]]) -> None:
    t = Table()
    for col in ("TIME", "WHO", "ROLE", "FROM", "REQUEST", "STATUS", "OUTCOME"):
        t.add_column(col)
    for r in rows:
        t.add_row(
            time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r["time"])),
            r.get("cn") or "-",
            r.get("role") or "-",
            r.get("address") or "-",
            f"{r['method']} {r['path']}",
            str(r["status"]),
            r["outcome"] + (f": {r['message']}" if r.get("message") else ""),
        )
    out.print(t)


@app.command("audit")
def audit(
    since: Annotated[str | None, typer.Option("--since", help="30m, 2h, 7d or a date")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=10_000)] = 200,
    who: Annotated[str | None, typer.Option("--who", help="only this certificate name")] = None,
    output: OutputOpt = None,
) -> None:
    """The host's audit log: every mutating or refused call (admin only)."""
    from urllib.parse import urlencode

    params: dict[str, Any] = {"limit": limit}
    if since:
        params["since"] = _since(since)
    if who:
        params["cn"] = who
    with _client() as c:
        rows = c.request("GET", f"/v1/audit?{urlencode(params)}")
    _emit(rows, output, _audit_table)


@app.command("whoami")
def whoami(output: OutputOpt = None) -> None:
    """The identity a host sees for your certificate: name, role, address."""
    with _client() as c:
        me = c.request("GET", "/v1/security/whoami")
    _emit(me, output, lambda d: _kv(d, "you, as the host sees you"))


@app.command("doctor")
def doctor(
    src: Annotated[str, typer.Argument(help="source host (client config name)")],
    dst: Annotated[str, typer.Argument(help="destination host (client config name)")],
    output: OutputOpt = None,
) -> None:
    """Run the live-migration troubleshooting list between two hosts (client/doctor.py)."""
    from vmferry.client import doctor as doc

    cfg = load_config()
    for opt, name in (("SRC", src), ("DST", dst)):
        if name not in cfg.hosts:
            known = ", ".join(sorted(cfg.hosts)) or "none"
            _fail(FerryError(f"unknown host {name!r}", field=opt, fix=f"known hosts: {known}"))
    if src == dst:
        _fail(FerryError("SRC and DST are the same host", field="DST", fix="name two hosts"))
    api = doc.ClientDoctorApi(cfg)
    try:
        checks = doc.run(api, src, dst)
    finally:
        api.close()
    _emit([c.model_dump() for c in checks], output, lambda _: out.print(doc.render(checks),
          highlight=False, markup=False, soft_wrap=True))  # fmt: skip
    raise typer.Exit(doc.exit_code(checks))


# -- the web Admin Center (cli/admin.py, web/, docs/admin-center.md) -------------------------------
from vmferry.cli.admin import admin_app  # noqa: E402

app.add_typer(admin_app, name="admin")


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()
