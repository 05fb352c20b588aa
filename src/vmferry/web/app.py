"""The Admin Center's web application: server-rendered pages (Jinja2), htmx forms, SSE progress.

Every page reads the agents through :class:`~vmferry.web.agents.Agents`; every action checks
the logged-in user's role against the agents' rule table for the agent route it calls, then
calls that route with the Admin Center's own certificate, and writes the user's action to the
Admin Center's audit log (the agents' audit logs name the Admin Center).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Form, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup

from vmferry import __version__
from vmferry.errors import AuthError, FerryError, ForbiddenError, RefusedError
from vmferry.security.audit import AuditLog, AuditRecord, outcome_of
from vmferry.web import charts
from vmferry.web.agents import TERMINAL, Agents
from vmferry.web.auth import COOKIE, Logins, RevocationCheck, User, peer_cert, user_from_cert

HERE = Path(__file__).parent
#: Names and ids that go into agent URLs (VMs, nodes, clusters, jobs): plain characters only.
PLAIN_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
LEVELS = ("debug", "info", "warning", "error")
#: SSE streams end after this many ticks (the browser's EventSource reconnects by itself).
STREAM_TICKS = 600
STREAM_INTERVAL_S = 1.0
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'"
)


@dataclass
class WebSettings:
    """How the Admin Center runs (the parts the application needs)."""

    state_dir: Path
    crl_file: Path | None = None
    ca: Path | None = None
    token_ttl_s: float = 300.0
    session_ttl_s: float = 8 * 3600.0
    stream_interval_s: float = STREAM_INTERVAL_S
    stream_ticks: int = STREAM_TICKS


class LoginNeeded(Exception):
    """No certificate and no valid session."""


def _fmt_duration(seconds: Any) -> str:
    if seconds is None:
        return "-"
    s = int(float(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h {s % 3600 // 60:02d}m"
    return f"{s // 86400}d {s % 86400 // 3600:02d}h"


def _fmt_time(t: Any) -> str:
    if t is None:
        return "-"
    tm = float(t)
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(tm)) + f".{int(tm % 1 * 1000):03d}"


def _fmt_mib(n: Any) -> str:
    return "-" if n is None else f"{int(n):,} MiB"


def _env() -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(HERE / "templates")),
        autoescape=select_autoescape(default=True, default_for_string=True),
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["duration"] = _fmt_duration
    env.filters["when"] = _fmt_time
    env.filters["mib"] = _fmt_mib
    env.globals["version"] = __version__
    return env


def _pairs(text: str, what: str) -> dict[str, str]:
    """``NAME=PATH`` lines (blank lines skipped) as a dict; a bad line is refused."""
    out: dict[str, str] = {}
    for n, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line:
            continue
        k, eq, v = line.partition("=")
        if not eq or not k.strip() or not v.strip():
            raise RefusedError(f"{what} line {n} {line!r} is not NAME=PATH", field=what)
        out[k.strip()] = v.strip()
    return out


def _plain(value: str, what: str) -> str:
    """``value`` if it may go into an agent URL, else a 400 naming ``what``."""
    if not PLAIN_RE.match(value) or ".." in value:
        raise RefusedError(f"{what} {value!r} is not a valid name", field=what)
    return value


def create_app(agents: Agents, settings: WebSettings) -> FastAPI:
    """Build the Admin Center for ``agents``."""
    env = _env()
    logins = Logins(settings.token_ttl_s, settings.session_ttl_s)
    revocation = RevocationCheck(settings.crl_file, settings.ca, lambda: agents.revoked_serials())
    audit_log = AuditLog(settings.state_dir / "audit")
    app = FastAPI(title="vmferry Admin Center", version=__version__, docs_url=None,
                  redoc_url=None, openapi_url=None)  # fmt: skip
    app.state.agents = agents
    app.state.logins = logins
    app.state.audit = audit_log
    app.mount("/static", StaticFiles(directory=str(HERE / "static")), name="static")

    # -- helpers ----------------------------------------------------------------------------
    def current_user(request: Request) -> User:
        cert = peer_cert(request.scope)
        if cert is not None:
            user = user_from_cert(cert, "certificate")
        else:
            found = logins.session(request.cookies.get(COOKIE))
            if found is None:
                raise LoginNeeded()
            user = found
        revocation.check(user)
        return user

    def is_htmx(request: Request) -> bool:
        return request.headers.get("hx-request") == "true"

    def render(request: Request, name: str, ctx: dict[str, Any], status: int = 200) -> HTMLResponse:
        html = env.get_template(name).render(**{"request": request, "user": None, **ctx})
        return HTMLResponse(html, status_code=status)

    def fragment(name: str, ctx: dict[str, Any]) -> str:
        return env.get_template(name).render(**ctx)

    async def record(request: Request, user: User | None, status: int, message: str | None) -> None:
        rec = AuditRecord(
            time=time.time(),
            cn=user.cn if user else None,
            role=user.role.value if user else None,
            address=request.client.host if request.client else None,
            method=request.method,
            path=request.url.path,
            status=status,
            outcome=outcome_of(status),
            message=message,
        )
        await asyncio.to_thread(audit_log.append, rec)

    def go(request: Request, url: str) -> Response:
        """Redirect (htmx follows HX-Redirect, a plain form follows 303)."""
        if is_htmx(request):
            return Response(status_code=204, headers={"HX-Redirect": url})
        return RedirectResponse(url, status_code=303)

    async def act(
        request: Request,
        method: str,
        agent_route: str,
        what: str,
        fn: Callable[[User], Awaitable[Response]],
    ) -> Response:
        """Run one user action: role check, the call, and the audit record either way."""
        user = current_user(request)
        try:
            user.require(method, agent_route)
            response = await fn(user)
        except FerryError as exc:
            await record(request, user, exc.status, f"{what}: {exc.message}")
            raise
        await record(request, user, response.status_code, what)
        return response

    def same_origin(request: Request) -> None:
        origin = request.headers.get("origin")
        if origin and origin != "null":
            want = f"{request.url.scheme}://{request.url.netloc}"
            if origin != want:
                raise ForbiddenError(f"request from another origin ({origin})")

    # -- errors and headers -----------------------------------------------------------------
    @app.middleware("http")
    async def headers(
        request: Request, call_next: Callable[[Request], Awaitable[Response]]
    ) -> Response:
        if request.method == "POST" and request.url.path != "/login/token":
            try:
                same_origin(request)
            except ForbiddenError as exc:
                return HTMLResponse(exc.message, status_code=403)
        response = await call_next(request)
        response.headers.setdefault("Content-Security-Policy", CSP)
        response.headers.setdefault("X-Content-Type-Options", "nosniff")
        response.headers.setdefault("Referrer-Policy", "no-referrer")
        response.headers.setdefault("Cache-Control", "no-store")
        return response

    @app.exception_handler(LoginNeeded)
    async def login_needed(request: Request, _: LoginNeeded) -> Response:
        if request.url.path.endswith("/stream"):
            return Response("log in first", status_code=401)
        if is_htmx(request):
            return Response(status_code=401, headers={"HX-Redirect": "/login"})
        return RedirectResponse("/login", status_code=303)

    @app.exception_handler(FerryError)
    async def ferry_error(request: Request, exc: FerryError) -> Response:
        if request.url.path == "/login/token":
            return JSONResponse({"error": exc.to_dict()}, status_code=exc.status)
        ctx = {"error": exc, "user": None}
        if is_htmx(request):
            # htmx swaps only 2xx answers by default: show the error in the target
            return HTMLResponse(fragment("_error.html", ctx), status_code=200)
        return render(request, "error.html", ctx, status=exc.status)

    # -- log in -----------------------------------------------------------------------------
    @app.get("/login")
    async def login_page(request: Request) -> Response:
        if peer_cert(request.scope) is not None:
            return RedirectResponse("/", status_code=303)
        return render(request, "login.html", {"message": None})

    @app.post("/login")
    async def login(request: Request, token: str = Form(max_length=200)) -> Response:
        try:
            user, sid, expires = logins.redeem(token)
            revocation.check(user)
        except AuthError as exc:
            await record(request, None, exc.status, f"log in with a token: {exc.message}")
            return render(request, "login.html", {"message": exc.message}, status=401)
        await record(request, user, 303, "logged in with a token")
        resp = RedirectResponse("/", status_code=303)
        resp.set_cookie(
            COOKIE, sid, max_age=int(expires - time.time()), httponly=True, secure=True,
            samesite="strict", path="/",
        )  # fmt: skip
        return resp

    @app.post("/login/token")
    async def login_token(request: Request) -> JSONResponse:
        cert = peer_cert(request.scope)
        if cert is None:
            raise AuthError(
                "a user certificate is required to get a token",
                fix="ferry admin token --url URL (uses your client configuration's certificate)",
            )
        try:
            user = user_from_cert(cert, "certificate")
            revocation.check(user)
        except FerryError as exc:
            await record(request, None, exc.status, f"token refused: {exc.message}")
            raise
        token, expires = logins.issue_token(user)
        await record(request, user, 200, "token issued")
        return JSONResponse(
            {"token": token, "expires_at": expires, "cn": user.cn, "role": user.role.value}
        )

    @app.post("/logout")
    async def logout(request: Request) -> Response:
        sid = request.cookies.get(COOKIE)
        user = logins.session(sid)
        logins.logout(sid)
        await record(request, user, 303, "logged out")
        resp = RedirectResponse("/login", status_code=303)
        resp.delete_cookie(COOKIE, path="/", secure=True, httponly=True, samesite="strict")
        return resp

    # -- dashboard --------------------------------------------------------------------------
    @app.get("/")
    async def dashboard(request: Request) -> Response:
        user = current_user(request)
        hosts, cluster = await asyncio.gather(
            asyncio.to_thread(agents.hosts), asyncio.to_thread(agents.cluster)
        )
        clustered = {v.get("name") for v in (cluster or {}).get("vms", [])}
        vms = sorted(
            ({**v, "owner": h.name} for h in hosts for v in h.vms), key=lambda v: v["name"]
        )
        return render(
            request,
            "dashboard.html",
            {"user": user, "hosts": hosts, "cluster": cluster, "vms": vms,
             "clustered": clustered, "now": time.time()},
        )  # fmt: skip

    @app.post("/vms/{host}/{name}/action")
    async def vm_action(
        request: Request, host: str, name: str, action: str = Form(max_length=20)
    ) -> Response:
        _plain(name, "vm")
        if action not in ("start", "shutdown", "stop", "pause", "resume", "restore"):
            raise RefusedError(f"unknown action {action!r}", field="action")

        async def run(_: User) -> Response:
            await asyncio.to_thread(agents.client(agents.known(host)).action, name, action)
            return go(request, "/")

        return await act(request, "POST", "/v1/vms/{name}/actions", f"{action} {name} on {host}",
                         run)  # fmt: skip

    # -- cluster: drain / resume ------------------------------------------------------------
    @app.post("/cluster/{cluster}/nodes/{node}/drain")
    async def drain(request: Request, cluster: str, node: str) -> Response:
        _plain(cluster, "cluster")
        _plain(node, "node")

        async def run(_: User) -> Response:
            c = agents.client(agents.names[0])
            await asyncio.to_thread(c.cluster_drain, cluster, node)
            return go(request, "/")

        return await act(request, "POST", "/v1/cluster/{name}/nodes/{node}/drain",
                         f"drain {node} of {cluster}", run)  # fmt: skip

    @app.post("/cluster/{cluster}/nodes/{node}/resume")
    async def resume(
        request: Request, cluster: str, node: str, failback: bool = Form(default=False)
    ) -> Response:
        _plain(cluster, "cluster")
        _plain(node, "node")

        async def run(_: User) -> Response:
            c = agents.client(agents.names[0])
            await asyncio.to_thread(c.cluster_resume, cluster, node, failback)
            return go(request, "/")

        what = f"resume {node} of {cluster}" + (" with failback" if failback else "")
        return await act(request, "POST", "/v1/cluster/{name}/nodes/{node}/resume", what, run)

    # -- moves ------------------------------------------------------------------------------
    @app.get("/moves")
    async def moves(request: Request) -> Response:
        user = current_user(request)
        jobs, errors = await asyncio.to_thread(agents.jobs)
        return render(request, "moves.html", {"user": user, "jobs": jobs, "errors": errors})

    async def sse(
        request: Request, tick: Callable[[], Awaitable[tuple[str, bool]]]
    ) -> StreamingResponse:
        """An SSE stream of ``update`` events (HTML fragments) while something changes; a
        ``done`` event ends it when ``tick`` says so. Bounded by ``stream_ticks``."""

        async def events() -> AsyncIterator[str]:
            yield "retry: 2000\n\n"
            last = None
            for i in range(settings.stream_ticks):
                if await request.is_disconnected():
                    return
                html, done = await tick()
                if html != last:
                    last = html
                    yield (
                        "event: update\n"
                        + "".join(f"data: {ln}\n" for ln in html.splitlines() or [""])
                        + "\n"
                    )
                elif i % 15 == 0:
                    yield ": keep-alive\n\n"
                if done:
                    yield "event: done\ndata: done\n\n"
                    return
                await asyncio.sleep(settings.stream_interval_s)

        return StreamingResponse(
            events(), media_type="text/event-stream", headers={"X-Accel-Buffering": "no"}
        )

    @app.get("/moves/stream")
    async def moves_stream(request: Request) -> StreamingResponse:
        user = current_user(request)

        async def tick() -> tuple[str, bool]:
            jobs, errors = await asyncio.to_thread(agents.jobs)
            return fragment("_moves_rows.html", {"jobs": jobs, "errors": errors,
                                                 "user": user}), False  # fmt: skip

        return await sse(request, tick)

    def _move_context(vm: str) -> dict[str, Any]:
        source, record = agents.find_vm(vm)
        cluster = agents.cluster()
        clustered = any(v.get("name") == vm for v in (cluster or {}).get("vms", []))
        return {
            "vm": record,
            "source": source,
            "destinations": [h for h in agents.names if h != source],
            "clustered": clustered,
            "cluster": cluster,
        }

    @app.get("/move")
    async def move_page(request: Request, vm: str = "") -> Response:
        user = current_user(request)
        if not vm:
            hosts = await asyncio.to_thread(agents.hosts)
            names = sorted(v["name"] for h in hosts for v in h.vms)
            return render(request, "move_pick.html", {"user": user, "names": names})
        ctx = await asyncio.to_thread(_move_context, vm)
        return render(request, "move.html", {"user": user, **ctx})

    def _best_candidate(source: str, cluster: dict[str, Any] | None, vm_mib: int) -> str:
        """For the what-if of "best possible node": the up node with the most free memory.
        The cluster's own placement makes the final choice when the move starts."""
        if not cluster:
            raise RefusedError(
                '"best possible node" needs a cluster', field="destination",
                fix="pick a destination host",
            )  # fmt: skip
        up: list[str] = [
            str(n["name"])
            for n in cluster.get("nodes", [])
            if n.get("state") == "up" and n["name"] != source and n["name"] in agents.endpoints
        ]
        free: dict[str, int] = {}
        for h in agents.hosts():
            if h.name in up and not h.error:
                free[h.name] = int(h.info.get("memory_free_for_vms_mib") or 0)
        fits = [n for n in up if free.get(n, 0) >= vm_mib]
        if not fits:
            raise RefusedError(
                "no node of the cluster is up, unpaused and has room for this VM",
                field="destination",
                fix="resume a node, or free memory",
            )
        return max(fits, key=lambda n: free[n])

    def _move_request(form: dict[str, str], dest: str, clustered: bool = False) -> dict[str, Any]:
        """The agent's move request for the wizard's form. A clustered VM moves through the
        cluster, which keeps its files on the shared volume (VM only): its what-if checks
        exactly that, whatever storage the form names."""
        storage = form.get("storage", "single")
        options: dict[str, Any] = {"quick": form.get("mode") == "quick"}
        if clustered:
            options["vm_only"] = not options["quick"]
        elif not options["quick"]:
            if storage == "vm-only":
                options["vm_only"] = True
            elif storage == "per-item":
                options["disk_map"] = _pairs(form.get("disk_map", ""), "disk_map")
            elif form.get("storage_path", "").strip():
                options["storage_path"] = form["storage_path"].strip()
        return {
            "destination": {"name": dest, "url": agents.url(dest)},
            "options": options,
        }

    async def _form(request: Request) -> dict[str, str]:
        data = await request.form()
        return {k: str(v)[:4000] for k, v in data.items() if isinstance(v, str)}

    @app.post("/move/what-if")
    async def move_what_if(request: Request) -> Response:
        form = await _form(request)
        vm = form.get("vm", "")

        async def run(user: User) -> Response:
            ctx = await asyncio.to_thread(_move_context, vm)
            dest = form.get("destination", "")
            best = dest == "best"
            if best:
                dest = await asyncio.to_thread(
                    _best_candidate, ctx["source"], ctx["cluster"], int(ctx["vm"]["memory_mib"])
                )
            req = _move_request(form, agents.known(dest), ctx["clustered"])
            plan = await asyncio.to_thread(
                agents.client(ctx["source"]).move, vm, {**req, "what_if": True}
            )
            html = fragment("_what_if.html", {
                "plan": plan, "form": form, "best": best, "candidate": dest, "user": user,
                "clustered": ctx["clustered"], "quick": req["options"]["quick"],
            })  # fmt: skip
            return HTMLResponse(html)

        return await act(request, "POST", "/v1/vms/{name}/move", f"what-if move of {vm}", run)

    @app.post("/move/start")
    async def move_start(request: Request) -> Response:
        form = await _form(request)
        vm = form.get("vm", "")
        dest = form.get("destination", "")
        current_user(request)  # log-in first, then read which route the move takes
        ctx = await asyncio.to_thread(_move_context, vm)
        quick = form.get("mode") == "quick"

        async def run(_: User) -> Response:
            if ctx["clustered"]:
                best = dest == "best"
                res = await asyncio.to_thread(
                    agents.client(ctx["source"]).cluster_vm_move,
                    vm, None if best else agents.known(dest), best, quick,
                )  # fmt: skip
                owner = str(res.get("from") or ctx["source"])
                return go(request, f"/migrations/{owner}/{res['job']['id']}")
            req = _move_request(form, agents.known(dest))
            job = await asyncio.to_thread(agents.client(ctx["source"]).move, vm, req)
            return go(request, f"/migrations/{ctx['source']}/{job['id']}")

        route = "/v1/cluster/vms/{name}/move" if ctx["clustered"] else "/v1/vms/{name}/move"
        return await act(request, "POST", route, f"move {vm} to {dest}", run)

    # -- storage moves ----------------------------------------------------------------------
    @app.get("/storage")
    async def storage_page(request: Request, vm: str) -> Response:
        user = current_user(request)
        host, record = await asyncio.to_thread(agents.find_vm, vm)
        return render(request, "storage.html", {"user": user, "vm": record, "host": host})

    @app.post("/storage/start")
    async def storage_start(request: Request) -> Response:
        form = await _form(request)
        vm = form.get("vm", "")

        async def run(_: User) -> Response:
            host, _rec = await asyncio.to_thread(agents.find_vm, vm)
            bw = form.get("bandwidth_mbps", "").strip()
            req: dict[str, Any] = {
                "to": form.get("to", "").strip() or None,
                "disk_map": _pairs(form.get("disk_map", ""), "disk_map"),
                "config_to": form.get("config_to", "").strip() or None,
                "state_to": form.get("state_to", "").strip() or None,
                "bandwidth_mbps": int(bw) if bw.isdigit() else None,
            }
            job = await asyncio.to_thread(agents.client(host).move_storage, vm, req)
            return go(request, f"/migrations/{host}/{job['id']}")

        return await act(request, "POST", "/v1/vms/{name}/move-storage",
                         f"storage move of {vm}", run)  # fmt: skip

    # -- one migration ----------------------------------------------------------------------
    @app.get("/migrations/{host}/{job_id}")
    async def migration_page(request: Request, host: str, job_id: str) -> Response:
        user = current_user(request)
        agents.known(host)
        _plain(job_id, "job")
        job = await asyncio.to_thread(agents.job, host, job_id)
        trace = await asyncio.to_thread(agents.trace, host, job_id)
        hosts = [h for h in {host, job.get("destination", "")} if h in agents.endpoints]
        evs, _ = await asyncio.to_thread(agents.events, sorted(hosts), job=job_id, limit=200)
        passes, source = charts.passes_svg(job, trace)
        return render(request, "migration.html", {
            "user": user, "job": job, "host": host, "events": evs,
            "phases_svg": Markup(charts.phases_svg(job)), "passes_svg": Markup(passes),
            "passes_source": source, "terminal": job.get("state") in TERMINAL,
            "pass_rows": charts.pass_rows(trace),
        })  # fmt: skip

    @app.get("/migrations/{host}/{job_id}/stream")
    async def migration_stream(request: Request, host: str, job_id: str) -> StreamingResponse:
        current_user(request)
        agents.known(host)
        _plain(job_id, "job")

        async def tick() -> tuple[str, bool]:
            job = await asyncio.to_thread(agents.job, host, job_id)
            return fragment("_job_progress.html", {"job": job}), job.get("state") in TERMINAL

        return await sse(request, tick)

    @app.post("/migrations/{host}/{job_id}/cancel")
    async def migration_cancel(request: Request, host: str, job_id: str) -> Response:
        _plain(job_id, "job")

        async def run(_: User) -> Response:
            await asyncio.to_thread(agents.client(agents.known(host)).cancel_migration, job_id)
            return go(request, f"/migrations/{host}/{job_id}")

        return await act(request, "POST", "/v1/migrations/{job_id}/cancel",
                         f"cancel migration {job_id} on {host}", run)  # fmt: skip

    # -- event log --------------------------------------------------------------------------
    @app.get("/events")
    async def events_page(
        request: Request,
        host: str = "",
        vm: str = "",
        job: str = "",
        level: str = "",
        kind: str = "",
        since: str = "",
    ) -> Response:
        user = current_user(request)
        if level and level not in LEVELS:
            raise RefusedError(f"unknown level {level!r}", field="level", fix=", ".join(LEVELS))
        minutes = int(since) if since.isdigit() else None
        hosts = [agents.known(host)] if host else agents.names
        filters = {"vm": vm or None, "job": job or None, "level": level or None,
                   "kind": kind or None, "limit": 200,
                   "since": time.time() - minutes * 60 if minutes else None}  # fmt: skip
        rows, errors = await asyncio.to_thread(agents.events, hosts, **filters)
        rows.reverse()  # newest first on the page
        return render(request, "events.html", {
            "user": user, "events": rows, "errors": errors, "levels": LEVELS,
            "hosts": agents.names,
            "f": {"host": host, "vm": vm, "job": job, "level": level, "kind": kind,
                  "since": since},
        })  # fmt: skip

    @app.get("/whoami")
    async def whoami(request: Request) -> JSONResponse:
        user = current_user(request)
        return JSONResponse({"cn": user.cn, "role": user.role.value, "via": user.via})

    return app
