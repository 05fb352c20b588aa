"""``ferry admin serve`` (the web Admin Center) and ``ferry admin token`` (log-in tokens)."""

from __future__ import annotations

import json
import logging
import ssl
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer

from vmferry.cli.console import err
from vmferry.cli.console import fail as _fail
from vmferry.client import FerryError, load_config, resolve_host
from vmferry.errors import RefusedError, UnreachableError, checked_json

admin_app = typer.Typer(help="The web Admin Center.", no_args_is_help=True)


def _default_state_dir() -> Path:
    return Path.home() / ".local" / "state" / "vmferry" / "admin-center"


@admin_app.command("serve")
def serve(
    tls_cert: Annotated[
        Path, typer.Option("--tls-cert", help="HTTPS certificate (ferry cert issue server ...)")
    ],
    tls_key: Annotated[Path, typer.Option("--tls-key", help="its key")],
    listen: Annotated[str, typer.Option("--listen", help="ADDRESS:PORT")] = "127.0.0.1:8443",
    hosts: Annotated[
        str | None,
        typer.Option("--hosts", help="comma-separated hosts of the client config (default: all)"),
    ] = None,
    tls_ca: Annotated[
        Path | None,
        typer.Option("--tls-ca", help="CA of user certificates (default: the hosts' CA)"),
    ] = None,
    cert: Annotated[
        Path | None,
        typer.Option("--cert", help="the Admin Center's own user certificate (role admin)"),
    ] = None,
    key: Annotated[Path | None, typer.Option("--key", help="its key")] = None,
    crl: Annotated[
        Path | None, typer.Option("--crl", help="the CA's crl.pem (re-read when it changes)")
    ] = None,
    state_dir: Annotated[
        Path | None,
        typer.Option("--state-dir", help="audit log (default ~/.local/state/vmferry/admin-center)"),
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level")] = "info",
) -> None:
    """Serve the Admin Center over HTTPS; it calls the agents with its own certificate."""
    from vmferry.web import Agents, ServerTLS, WebSettings, create_app, make_server
    from vmferry.web.server import check_service_cert

    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    try:
        if (cert is None) != (key is None):
            raise RefusedError("--cert and --key go together", field="--cert")
        names = [h.strip() for h in hosts.split(",") if h.strip()] if hosts else None
        from vmferry.web import service_endpoints

        eps = service_endpoints(
            load_config(), names, str(cert) if cert else None, str(key) if key else None
        )
        first = next(iter(eps.values()))
        if first.cert is None or first.key is None:
            raise RefusedError(
                "no certificate to call the agents with",
                field="--cert",
                fix="ferry cert issue user admin-center-svc --role admin; pass --cert/--key",
            )
        check_service_cert(Path(first.cert))
        ca = tls_ca or Path(first.ca)
        state = state_dir or _default_state_dir()
        state.mkdir(parents=True, exist_ok=True, mode=0o700)
        agents = Agents(eps)
        app = create_app(agents, WebSettings(state_dir=state, crl_file=crl, ca=ca))
        server = make_server(app, listen, ServerTLS(tls_cert, tls_key, ca), log_level)
    except FerryError as exc:
        _fail(exc)
    err.print(f"Admin Center on https://{listen} for {', '.join(agents.names)}; "
              f"audit log in {state / 'audit'}")  # fmt: skip
    try:
        server.run()
    finally:
        agents.close()


@admin_app.command("token")
def token(
    url: Annotated[
        str, typer.Option("--url", help="the Admin Center, e.g. https://127.0.0.1:8443")
    ],
    host: Annotated[
        str | None, typer.Option("--host", help="take certificates from this client-config host")
    ] = None,
    cert: Annotated[Path | None, typer.Option("--cert", help="your user certificate")] = None,
    key: Annotated[Path | None, typer.Option("--key", help="its key")] = None,
    ca: Annotated[Path | None, typer.Option("--ca", help="the vmferry CA")] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Get a short-lived, single-use log-in token for the Admin Center with your certificate."""
    try:
        result = request_token(url, host, cert, key, ca)
    except FerryError as exc:
        _fail(exc)
    if json_out:
        sys.stdout.write(json.dumps(result) + "\n")
        return
    left = result["expires_at"] - time.time()
    err.print(f"token for {result['cn']} (role {result['role']}), valid {left:.0f} s, usable once:")
    sys.stdout.write(result["token"] + "\n")


def request_token(
    url: str, host: str | None, cert: Path | None, key: Path | None, ca: Path | None
) -> dict[str, Any]:
    """``POST /login/token`` to the Admin Center over mutual TLS; its JSON answer."""
    if cert is None or key is None or ca is None:
        _, ep = resolve_host(host, load_config())
        cert = cert or (Path(ep.cert) if ep.cert else None)
        key = key or (Path(ep.key) if ep.key else None)
        ca = ca or Path(ep.ca)
    if cert is None or key is None:
        raise RefusedError("no user certificate", field="--cert", fix="pass --cert and --key")
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(str(cert), str(key))
    target = url.rstrip("/") + "/login/token"
    try:
        with httpx.Client(verify=ctx, timeout=15, trust_env=False) as http:
            resp = http.post(target)
    except httpx.TransportError as exc:
        raise UnreachableError(
            f"cannot reach the Admin Center at {url}: {exc}",
            fix="is ferry admin serve running there, and does its certificate name this address?",
        ) from exc
    body = checked_json(resp, target)
    if not isinstance(body, dict) or "token" not in body:
        raise UnreachableError(f"{target} did not answer with a token")
    return body
