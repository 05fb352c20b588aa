"""Where the client finds agents: a JSON file of named hosts with URL and certificates."""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel

from vmferry.errors import NotFoundError, RefusedError


class HostEndpoint(BaseModel):
    """One agent: its URL and the certificates used to talk to it."""

    url: str
    ca: str
    cert: str | None = None
    key: str | None = None


class ClientConfig(BaseModel):
    """The client configuration file (written by ``ferry lab up``, editable by hand)."""

    hosts: dict[str, HostEndpoint] = {}
    default_host: str | None = None


def config_path() -> Path:
    """``$FERRY_CONFIG``, else ``~/.config/vmferry/client.json``."""
    env = os.environ.get("FERRY_CONFIG")
    if env:
        return Path(env)
    return Path.home() / ".config" / "vmferry" / "client.json"


def load_config(path: Path | None = None) -> ClientConfig:
    """Read the client configuration; an absent file is an empty configuration."""
    p = path or config_path()
    if not p.exists():
        return ClientConfig()
    try:
        return ClientConfig.model_validate(json.loads(p.read_text()))
    except (ValueError, json.JSONDecodeError) as exc:
        raise RefusedError(f"client configuration {p} is not valid: {exc}", field="config") from exc


def save_config(cfg: ClientConfig, path: Path | None = None) -> Path:
    """Write the client configuration atomically."""
    p = path or config_path()
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(".tmp")
    tmp.write_text(cfg.model_dump_json(indent=2))
    os.replace(tmp, p)
    return p


def resolve_host(name: str | None, cfg: ClientConfig) -> tuple[str, HostEndpoint]:
    """Pick the endpoint for ``name`` (or the default host)."""
    chosen = name or cfg.default_host
    if chosen is None:
        if len(cfg.hosts) == 1:
            chosen = next(iter(cfg.hosts))
        else:
            raise RefusedError(
                "no host given",
                field="--host",
                fix="pass --host NAME (known: " + (", ".join(sorted(cfg.hosts)) or "none") + ")",
            )
    ep = cfg.hosts.get(chosen)
    if ep is None:
        raise NotFoundError(
            f"unknown host {chosen!r} in {config_path()}",
            field="--host",
            fix="known hosts: " + (", ".join(sorted(cfg.hosts)) or "none; run ferry lab up"),
        )
    return chosen, ep
