"""Identify processes by pid *and* start time, so a recycled pid is never mistaken for ours."""

from __future__ import annotations

from pathlib import Path


def _read_stat_fields(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat from field 3 (state) on, or None if gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # comm (field 2) may contain spaces and parentheses: split at the last ')'.
    _, sep, rest = raw.rpartition(")")
    if not sep:
        return None
    return rest.split()


def pid_start_time(pid: int) -> int | None:
    """Start time (clock ticks since boot, /proc/<pid>/stat field 22) or None."""
    if pid <= 0:
        return None
    fields = _read_stat_fields(pid)
    if fields is None or len(fields) < 20:
        return None
    try:
        return int(fields[19])  # field 22; fields[0] is field 3
    except ValueError:
        return None


def pid_state(pid: int) -> str | None:
    """Process state letter (R, S, Z, ...) or None if the pid does not exist."""
    if pid <= 0:
        return None
    fields = _read_stat_fields(pid)
    return fields[0] if fields else None


def pid_matches(pid: int, start_time: int) -> bool:
    """True if ``pid`` exists and is the same process (same start time)."""
    current = pid_start_time(pid)
    return current is not None and current == start_time
