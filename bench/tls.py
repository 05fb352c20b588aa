"""Cost of the encrypted data plane: the same moves with TLS (the default) and without.

A 2-host lab whose migration network is marked trusted on both hosts (so ``--no-encryption``
is allowed). Scenarios (:data:`SCENARIOS`): an idle 1 GiB guest on the shared volume, a 1 GiB
guest with 512 MB of memory in use, and a shared-nothing move of an idle 1 GiB guest whose
disk holds 768 MiB of data. Each is moved h1 -> h2 with ``tls`` and ``clear`` variants,
alternating, on a migration link shaped to 1 Gbit/s and on an unshaped one (the veth's own
limit: there the CPU sets the pace, so the encryption cost shows most). Figures per run: the
job's time, copy phases, bytes, throughput and QEMU's downtime. Reports go to
``bench/results/tls.{md,json}``.

Run as root: ``.venv/bin/python -m bench.run --only tls [--runs N]`` (default 3).
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from bench.migrate import (
    LINK_RATE,
    Scenario,
    _create_guest,
    _git_state,
    _Guests,
    _median,
    _remove_everywhere,
    _wait_job,
)
from bench.migrate import phase_seconds as _phase_seconds
from vmferry.lab import Lab, net
from vmferry.lab.lab import wait_answer

RESULTS = Path(__file__).parent / "results"

MEMORY_MIB = 1024
BUDGET_S = 180.0
BOOT_TIMEOUT_S = 120.0
WARMUP_S = 2.0
SRC, DST = "h1", "h2"
COPY_PHASES = ("mirror", "precopy", "postcopy", "switchover")


SCENARIOS: tuple[Scenario, ...] = (
    Scenario("idle", "idle 1 GiB guest, shared volume (memory only)"),
    Scenario("mem512", "1 GiB guest, 512 MB in use (dirtier 512M@64M), shared volume",
             dirty="512M@64M"),
    Scenario("shared-nothing", "idle 1 GiB guest, 1 GiB disk with 768 MiB of data, "
             "shared-nothing (NBD mirror + memory)", shared=False, disk_mib=1024, fill_mib=768),
)  # fmt: skip

VARIANTS: dict[str, dict[str, Any]] = {"tls": {}, "clear": {"encryption": False}}
LINKS: tuple[str | None, ...] = (LINK_RATE, None)


def _link_name(rate: str | None) -> str:
    return rate or "unshaped"


def _warm_up(lab: Lab, sc: Scenario, ip: str) -> None:
    deadline = time.monotonic() + 120
    stat = wait_answer(lab, ip, BOOT_TIMEOUT_S)
    while sc.dirty and stat.get("dirty_rounds", 0) < 1 and time.monotonic() < deadline:
        time.sleep(0.5)
        stat = wait_answer(lab, ip, 10)
    time.sleep(WARMUP_S)


def run_one(
    lab: Lab, sc: Scenario, variant: str, link: str | None, repeat: int, guests: _Guests
) -> dict[str, Any]:
    """Boot a fresh guest on h1 and move it to h2 with the variant's options."""
    name = f"tls-{sc.key}-{variant}-{repeat}"
    ip = guests.next(lab)
    run: dict[str, Any] = {"scenario": sc.key, "variant": variant, "link": _link_name(link),
                           "repeat": repeat, "vm": name, "finished": False, "state": None,
                           "error": None}  # fmt: skip
    try:
        _create_guest(lab, sc, name, ip)
        _warm_up(lab, sc, ip)
        ep = lab.endpoint(DST)
        options = {**VARIANTS[variant], "timeout_s": BUDGET_S}
        with lab.client(SRC) as c:
            t0 = time.monotonic()
            job = c.move(name, {"destination": {"name": DST, "url": ep.url}, "options": options})
            done = _wait_job(c, job["id"], t0 + BUDGET_S + 20, lambda _j: None)
            final = done if done is not None else c.migration(job["id"])
        wait_answer(lab, ip, 30)
        run["state"] = final["state"]
        run["finished"] = final["state"] == "completed"
        run["encrypted"] = final.get("encrypted")
        run["mode"] = final.get("mode")
        run["total_s"] = final.get("total_s")
        run["qemu_downtime_ms"] = final.get("qemu_downtime_ms")
        run["phase_s"] = _phase_seconds(final)
        run["copy_s"] = round(sum(run["phase_s"].get(p, 0.0) for p in COPY_PHASES), 3)
        run["ram_bytes"] = int(final.get("bytes_sent") or 0)
        run["disk_bytes"] = int((final.get("progress") or {}).get("disk_total") or 0)
        moved = run["ram_bytes"] + run["disk_bytes"]
        run["mbit_s"] = round(moved * 8 / run["copy_s"] / 1e6, 1) if run["copy_s"] else None
        run["error"] = (final.get("error") or {}).get("message")
    except Exception as exc:  # record and go on with the next run
        run["error"] = f"{exc.__class__.__name__}: {exc}"
    finally:
        try:
            _remove_everywhere(lab, name)
        except Exception as exc:
            run["cleanup_error"] = f"{exc.__class__.__name__}: {exc}"
    return run


def _set_trusted(lab: Lab, trusted: bool) -> None:
    cidr = lab.topology().migration_cidr
    for host in (SRC, DST):
        with lab.client(host) as c:
            mig = dict(c.settings()["migration"])
            mig["trusted_networks"] = [cidr] if trusted else []
            c.update_settings(migration=mig)


def run_all(
    lab_dir: Path, runs_per: int, only: Sequence[str] | None = None
) -> list[dict[str, Any]]:
    """Bring up a 2-host lab, run every scenario, link and variant (alternating), tear down."""
    lab = Lab(lab_dir)
    rows: list[dict[str, Any]] = []
    guests = _Guests()
    try:
        lab.up(2, link_rate=LINK_RATE)
        _set_trusted(lab, True)
        for link in LINKS:
            for h in (SRC, DST):
                net.set_link_rate(lab.topology(), h, link)
            for sc in SCENARIOS:
                if only and sc.key not in only:
                    continue
                for repeat in range(runs_per):
                    for variant in VARIANTS:
                        t0 = time.monotonic()
                        row = run_one(lab, sc, variant, link, repeat, guests)
                        rows.append(row)
                        print(f"{sc.key}/{_link_name(link)}/{variant} #{repeat + 1}: "
                              f"{row['state']} total={row.get('total_s')} "
                              f"copy={row.get('copy_s')} mbit/s={row.get('mbit_s')} "
                              f"downtime={row.get('qemu_downtime_ms')} err={row['error']} "
                              f"({time.monotonic() - t0:.0f} s)", flush=True)  # fmt: skip
    finally:
        lab.down()
    return rows


FIGURES = ("total_s", "copy_s", "mbit_s", "qemu_downtime_ms", "ram_bytes", "disk_bytes")


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
    """Medians over the finished runs of each scenario/link and variant, plus TLS ÷ clear."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for sc in SCENARIOS:
        for link in LINKS:
            key = f"{sc.key}@{_link_name(link)}"
            for variant in VARIANTS:
                mine = [r for r in runs if r["scenario"] == sc.key
                        and r["link"] == _link_name(link) and r["variant"] == variant]  # fmt: skip
                if not mine:
                    continue
                ok = [r for r in mine if r["finished"]]
                s: dict[str, Any] = {f: _median(r.get(f) for r in ok) for f in FIGURES}
                s["runs"], s["finished"] = len(mine), len(ok)
                s["encrypted"] = sorted({str(r.get("encrypted")) for r in ok})
                s["errors"] = sorted({r["error"] for r in mine if r.get("error")})
                out.setdefault(key, {})[variant] = s
            both = out.get(key, {})
            if "tls" in both and "clear" in both:
                tls, clear = both["tls"], both["clear"]
                both["ratio"] = {
                    f: round(tls[f] / clear[f], 3) if tls.get(f) and clear.get(f) else None
                    for f in ("total_s", "copy_s", "mbit_s")
                }
    return out


def _fmt(v: float | None, spec: str = ".2f") -> str:
    return "—" if v is None else f"{v:{spec}}"


def write_markdown(doc: dict[str, Any], path: Path) -> None:
    """The human report."""
    summary: dict[str, dict[str, dict[str, Any]]] = doc["summary"]
    lines = [
        "# tls — cost of the encrypted data plane",
        "",
        f"Command: `{doc['command']}` — {doc['date']}, {doc['machine']['cpus']} CPUs, TCG, "
        f"commit {doc['engine']['commit'][:10]} (+ uncommitted changes in src: "
        f"{'yes' if doc['engine']['src_changes'] else 'no'}), {doc['runs_per']} run(s) per cell.",
        "",
        "Each row: the same guest set-up moved h1 → h2 with TLS (the default: QEMU "
        "`tls-creds-x509` with the hosts' certificates on the migration stream and the NBD "
        "mirror) and without (`--no-encryption` over a trusted network). Medians over the "
        "finished runs. `copy s` = mirror + precopy + postcopy + switchover phases; `Mbit/s` = "
        "(RAM bytes sent + disk bytes) * 8 / copy s.",
        "",
        "| scenario | link | variant | finished | total s | copy s | Mbit/s | QEMU downtime ms "
        "| RAM MB | disk MB | TLS ÷ clear (total, copy) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, both in summary.items():
        sc, link = key.split("@")
        ratio = both.get("ratio") or {}
        for variant in VARIANTS:
            s = both.get(variant)
            if s is None:
                continue
            ratio_text = (f"{_fmt(ratio.get('total_s'))}, {_fmt(ratio.get('copy_s'))}"
                          if variant == "tls" and ratio else "")  # fmt: skip
            lines.append(
                f"| {sc} | {link} | {variant} | {s['finished']}/{s['runs']} "
                f"| {_fmt(s['total_s'])} | {_fmt(s['copy_s'])} | {_fmt(s['mbit_s'], '.0f')} "
                f"| {_fmt(s['qemu_downtime_ms'], '.0f')} "
                f"| {_fmt((s['ram_bytes'] or 0) / 1e6, '.0f')} "
                f"| {_fmt((s['disk_bytes'] or 0) / 1e6, '.0f')} | {ratio_text} |"
            )
    errors = sorted({e for both in summary.values() for v in VARIANTS
                     for e in (both.get(v) or {}).get("errors", [])})  # fmt: skip
    lines += ["", "Scenarios:", ""]
    lines += [f"* `{sc['key']}` — {sc['what']}" for sc in doc["scenarios"]]
    if errors:
        lines += ["", "Errors:", "", *(f"* {e}" for e in errors)]
    lines += ["", *doc.get("notes", [])]
    path.write_text("\n".join(lines) + "\n")


NOTES = [
    "Notes:",
    "",
    "* The guests run under TCG on a 2-CPU machine shared with the lab's agents, so QEMU's "
    "encryption competes with the guest's emulation for the same cores; on KVM hosts with AES "
    "instructions the cost is smaller.",
    "* The `unshaped` link is a veth pair through a bridge: its rate is set by the CPU, which "
    "makes the cost of encryption visible; on the 1 Gbit/s link the wire sets the pace.",
    "* `disk MB` is the mirror job's length (the whole virtual disk); its unallocated part "
    "crosses the wire as zero-writes, so `Mbit/s` overstates the wire rate of shared-nothing "
    "moves (the same way for both variants).",
    "* The move benchmark (`bench/results/migrate.md`) now runs with encryption on (the default) "
    "for both its vmferry and baseline variants.",
]


def report(runs: list[dict[str, Any]], command: str, runs_per: int, out: Path = RESULTS) -> None:
    """Write bench/results/tls.{json,md}."""
    out.mkdir(parents=True, exist_ok=True)
    doc = {
        "benchmark": "tls",
        "command": command,
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "kernel": platform.release()},
        "engine": _git_state(),
        "runs_per": runs_per,
        "memory_mib": MEMORY_MIB,
        "links": [_link_name(x) for x in LINKS],
        "scenarios": [asdict(sc) for sc in SCENARIOS],
        "variants": VARIANTS,
        "summary": summarize(runs),
        "runs": runs,
        "notes": NOTES,
    }
    (out / "tls.json").write_text(json.dumps(doc, indent=1, default=str) + "\n")
    write_markdown(doc, out / "tls.md")
    print(f"wrote {out / 'tls.md'} and .json")


def main(argv: list[str] | None = None) -> None:
    """``python -m bench.tls``: this benchmark alone (see bench.run)."""
    import argparse
    import sys
    import tempfile

    ap = argparse.ArgumentParser(prog="bench.tls")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--scenarios", help="comma-separated subset of: "
                    + ",".join(sc.key for sc in SCENARIOS))  # fmt: skip
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    base = Path(tempfile.mkdtemp(prefix="vmferry-bench-"))
    os.environ["FERRY_CONFIG"] = str(base / "client.json")
    only = args.scenarios.split(",") if args.scenarios else None
    runs_per = max(1, min(args.runs, 10))
    rows = run_all(base / "lab", runs_per, only)
    cmd = shlex.join(["python", "-m", "bench.tls", *(sys.argv[1:] if argv is None else argv)])
    report(rows, cmd, runs_per, args.out)


if __name__ == "__main__":
    main()
