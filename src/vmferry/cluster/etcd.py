"""A small, blocking etcd v3 client over several endpoints (etcd3gw underneath).

etcd3gw speaks etcd's gRPC gateway (JSON over HTTPS, ``/v3/``; etcd >= 3.4) with client
certificates. This wrapper adds what the cluster layer needs on top: several endpoints with
fail-over (the last endpoint that answered is tried first), a hard timeout per request, and
transactions built from plain Python values. Every call blocks: the async layers run it with
``asyncio.to_thread``.
"""

from __future__ import annotations

import base64
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit

import requests
from etcd3gw.client import Etcd3Client
from etcd3gw.exceptions import Etcd3Exception

T = TypeVar("T")

API_PATH = "/v3/"


class EtcdUnavailable(Exception):
    """No endpoint answered (no quorum, all members down, or this node is cut off)."""


def _b64(data: str | bytes) -> str:
    raw = data.encode() if isinstance(data, str) else data
    return base64.b64encode(raw).decode()


def _unb64(data: str) -> bytes:
    return base64.b64decode(data)


def prefix_end(prefix: str) -> str:
    """The range end that selects every key starting with ``prefix``."""
    raw = bytearray(prefix.encode())
    raw[-1] += 1
    return bytes(raw).decode()


@dataclass(frozen=True)
class KV:
    """One key with its value and revisions."""

    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    lease: int = 0


# -- transactions ----------------------------------------------------------------------------
@dataclass
class Txn:
    """A transaction: compares, then the success or the failure operations.

    Compare helpers: ``absent(key)`` (never created), ``present(key)``, ``value_is(key, v)``,
    ``mod_is(key, rev)``. Operations: ``put``, ``delete``, ``delete_prefix``.
    """

    compare: list[dict[str, Any]] = field(default_factory=list)
    success: list[dict[str, Any]] = field(default_factory=list)
    failure: list[dict[str, Any]] = field(default_factory=list)

    def absent(self, key: str) -> Txn:
        self.compare.append(
            {"key": _b64(key), "result": "EQUAL", "target": "CREATE", "create_revision": "0"}
        )
        return self

    def present(self, key: str) -> Txn:
        self.compare.append(
            {"key": _b64(key), "result": "GREATER", "target": "CREATE", "create_revision": "0"}
        )
        return self

    def value_is(self, key: str, value: str | bytes) -> Txn:
        self.compare.append(
            {"key": _b64(key), "result": "EQUAL", "target": "VALUE", "value": _b64(value)}
        )
        return self

    def mod_is(self, key: str, revision: int) -> Txn:
        self.compare.append(
            {"key": _b64(key), "result": "EQUAL", "target": "MOD", "mod_revision": str(revision)}
        )
        return self

    def unchanged_since(self, prefix: str, revision: int) -> Txn:
        """No key under ``prefix`` was written after ``revision`` (an optimistic lock)."""
        self.compare.append({
            "key": _b64(prefix), "range_end": _b64(prefix_end(prefix)), "result": "LESS",
            "target": "MOD", "mod_revision": str(revision + 1),
        })  # fmt: skip
        return self

    @staticmethod
    def put(key: str, value: str | bytes, lease: int = 0) -> dict[str, Any]:
        req: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            req["lease"] = str(lease)
        return {"request_put": req}

    @staticmethod
    def delete(key: str) -> dict[str, Any]:
        return {"request_delete_range": {"key": _b64(key)}}

    @staticmethod
    def delete_prefix(prefix: str) -> dict[str, Any]:
        return {
            "request_delete_range": {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix))}
        }

    def body(self) -> dict[str, Any]:
        return {"compare": self.compare, "success": self.success, "failure": self.failure}


def _kv(item: dict[str, Any]) -> KV:
    return KV(
        key=_unb64(item["key"]).decode(),
        value=_unb64(item.get("value", "")),
        create_revision=int(item.get("create_revision", 0)),
        mod_revision=int(item.get("mod_revision", 0)),
        lease=int(item.get("lease", 0)),
    )


class Etcd:
    """etcd over a list of endpoints (``https://IP:2379``) with TLS client certificates."""

    def __init__(
        self,
        endpoints: Sequence[str],
        ca: str | None = None,
        cert: str | None = None,
        key: str | None = None,
        timeout: float = 2.0,
    ) -> None:
        if not endpoints:
            raise ValueError("no etcd endpoints")
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self._clients: list[Etcd3Client] = []
        for ep in self.endpoints:
            u = urlsplit(ep)
            if u.scheme not in ("http", "https") or not u.hostname:
                raise ValueError(f"etcd endpoint {ep!r} is not http(s)://HOST:PORT")
            session = requests.Session()
            # No proxies or CA bundle from the environment (REQUESTS_CA_BUNDLE would replace
            # the cluster's CA): etcd is reached directly, verified against ``ca`` only.
            session.trust_env = False
            if ca:
                session.verify = ca
            if cert and key:
                session.cert = (cert, key)
            self._clients.append(
                Etcd3Client(
                    host=u.hostname,
                    port=u.port or 2379,
                    protocol=u.scheme,
                    timeout=timeout,
                    api_path=API_PATH,
                    session=session,
                )
            )
        self._preferred = 0
        self._lock = threading.Lock()

    def close(self) -> None:
        """Close every endpoint's connection pool."""
        for c in self._clients:
            c.session.close()

    # -- plumbing ---------------------------------------------------------------------------
    def _call(self, fn: Callable[[Etcd3Client], T], budget: float | None = None) -> T:
        """Run ``fn`` on the preferred endpoint, then the others, until one answers."""
        import time

        deadline = None if budget is None else time.monotonic() + budget
        errors: list[str] = []
        with self._lock:
            start = self._preferred
        n = len(self._clients)
        for i in range(n):
            idx = (start + i) % n
            if deadline is not None and time.monotonic() >= deadline:
                errors.append("time budget spent")
                break
            try:
                result = fn(self._clients[idx])
            except (Etcd3Exception, requests.RequestException, OSError) as exc:
                errors.append(f"{self.endpoints[idx]}: {_short(exc)}")
                continue
            with self._lock:
                self._preferred = idx
            return result
        raise EtcdUnavailable("etcd did not answer: " + "; ".join(errors))

    def _post(self, path: str, body: dict[str, Any], budget: float | None = None) -> Any:
        return self._call(lambda c: c.post(c.get_url(path), json=body), budget)

    # -- key-value --------------------------------------------------------------------------
    def get(self, key: str) -> KV | None:
        """One key (linearizable read), or None."""
        data = self._post("/kv/range", {"key": _b64(key)})
        kvs = data.get("kvs") or []
        return _kv(kvs[0]) if kvs else None

    def get_prefix(self, prefix: str, budget: float | None = None) -> list[KV]:
        """Every key under ``prefix``, sorted by key."""
        data = self._post(
            "/kv/range",
            {"key": _b64(prefix), "range_end": _b64(prefix_end(prefix)), "sort_order": "ASCEND",
             "sort_target": "KEY"},
            budget,
        )  # fmt: skip
        return [_kv(i) for i in data.get("kvs") or []]

    def put(self, key: str, value: str | bytes, lease: int = 0) -> None:
        """Write one key (optionally attached to a lease)."""
        self._post("/kv/put", Txn.put(key, value, lease)["request_put"])

    def delete(self, key: str) -> int:
        """Delete one key; how many were deleted."""
        data = self._post("/kv/deleterange", {"key": _b64(key)})
        return int(data.get("deleted", 0))

    def txn(self, txn: Txn, budget: float | None = None) -> tuple[bool, list[dict[str, Any]]]:
        """Run a transaction; (whether the compares held, the raw responses)."""
        data = self._post("/kv/txn", txn.body(), budget)
        return bool(data.get("succeeded", False)), list(data.get("responses") or [])

    # -- leases -----------------------------------------------------------------------------
    def grant(self, ttl: int, budget: float | None = None) -> int:
        """A new lease of ``ttl`` seconds; its id."""
        data = self._post("/lease/grant", {"TTL": ttl, "ID": 0}, budget)
        return int(data["ID"])

    def keepalive(self, lease: int, budget: float | None = None) -> int:
        """Renew a lease; the TTL it has now (0 when it had already expired)."""
        data = self._post("/lease/keepalive", {"ID": lease}, budget)
        return int(data.get("result", data).get("TTL", 0))

    def revoke(self, lease: int) -> None:
        """End a lease now (its keys are deleted)."""
        self._post("/kv/lease/revoke", {"ID": lease})

    def lease_ttl(self, lease: int) -> int:
        """Whole seconds the lease has left (0 in its last second; -1 when it is gone)."""
        data = self._post("/kv/lease/timetolive", {"ID": lease})
        return int(data.get("TTL", 0))  # the gateway's JSON leaves out a TTL of 0

    # -- health -----------------------------------------------------------------------------
    def health(self) -> list[dict[str, Any]]:
        """Each endpoint's view: reachable, its member id, the leader it follows, raft term."""
        out = []
        for ep, c in zip(self.endpoints, self._clients, strict=True):
            try:
                st = c.post(c.get_url("/maintenance/status"), json={})
                out.append({
                    "endpoint": ep,
                    "ok": True,
                    "member": str(st.get("header", {}).get("member_id", "")),
                    "leader": str(st.get("leader", "")),
                    "version": st.get("version"),
                    "raft_term": int(st.get("raftTerm", 0)),
                })  # fmt: skip
            except (Etcd3Exception, requests.RequestException, OSError) as exc:
                out.append({"endpoint": ep, "ok": False, "error": _short(exc)})
        return out


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{exc.__class__.__name__}: {text[0][:200] if text else ''}"
