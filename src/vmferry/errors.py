"""Every failure a vmferry caller can catch.

The tree (HTTP status the API maps each one to)::

    FerryError                      500  base: message, field, fix
    ├── RefusedError                400  bad input; names the field and the fix; nothing changed
    │   └── OutsideStorageRootError 400  a path that is not under the host's storage roots
    ├── AuthError                   401  no or unknown client identity
    ├── ForbiddenError              403  the identity's role may not do this
    ├── ThrottledError              429  too many refused requests from this address
    ├── NotFoundError               404  no such VM / job / host
    ├── ConflictError               409  the name exists, or the VM is in the wrong state
    ├── InsufficientResourcesError  409  not enough free memory or disk on the host
    ├── HostError                   500  the host could not do it (QEMU failed to start, ...)
    └── UnreachableError            503  the agent could not be reached (client side only)

Lower layers raise these; the API turns them into ``{"error": {...}}`` bodies and the client turns
the bodies back into the same classes, so a CLI user sees the message the host wrote.
"""

from __future__ import annotations

from typing import Any, ClassVar, Protocol


class FerryError(Exception):
    """Base of every vmferry error: a message, optionally the offending field and the fix."""

    status: ClassVar[int] = 500
    code: ClassVar[str] = "error"

    def __init__(self, message: str, *, field: str | None = None, fix: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field
        self.fix = fix

    def __str__(self) -> str:
        text = self.message
        if self.fix:
            text += f" ({self.fix})"
        return text

    def to_dict(self) -> dict[str, Any]:
        """The JSON form used in API error bodies."""
        return {"code": self.code, "message": self.message, "field": self.field, "fix": self.fix}


class RefusedError(FerryError):
    """The request is invalid; nothing was changed."""

    status = 400
    code = "refused"


class OutsideStorageRootError(RefusedError):
    """A path is not inside one of the host's storage roots."""

    code = "outside-storage-root"


class AuthError(FerryError):
    """The caller did not prove an identity the agent accepts."""

    status = 401
    code = "unauthenticated"


class ForbiddenError(FerryError):
    """The caller's role does not allow the request (or its certificate names no role)."""

    status = 403
    code = "forbidden"


class ThrottledError(FerryError):
    """Too many refused requests from the caller's address; try again later."""

    status = 429
    code = "throttled"


class NotFoundError(FerryError):
    """The named object does not exist."""

    status = 404
    code = "not-found"


class ConflictError(FerryError):
    """The request conflicts with the current state (duplicate name, wrong VM state)."""

    status = 409
    code = "conflict"


class InsufficientResourcesError(FerryError):
    """The host lacks the memory or disk the request needs."""

    status = 409
    code = "insufficient-resources"


class HostError(FerryError):
    """The host failed to carry out a valid request."""

    status = 500
    code = "host-error"


class UnreachableError(FerryError):
    """The agent could not be reached or refused the TLS handshake."""

    status = 503
    code = "unreachable"


_BY_CODE: dict[str, type[FerryError]] = {
    cls.code: cls
    for cls in (
        FerryError,
        RefusedError,
        OutsideStorageRootError,
        AuthError,
        ForbiddenError,
        ThrottledError,
        NotFoundError,
        ConflictError,
        InsufficientResourcesError,
        HostError,
        UnreachableError,
    )
}


def error_from_dict(body: dict[str, Any]) -> FerryError:
    """Rebuild the error an API body describes (used by the client)."""
    cls = _BY_CODE.get(str(body.get("code", "error")), FerryError)
    return cls(
        str(body.get("message", "unknown error")), field=body.get("field"), fix=body.get("fix")
    )


class JsonResponse(Protocol):
    """What :func:`checked_json` needs of an HTTP response (httpx's fits)."""

    @property
    def status_code(self) -> int: ...

    def json(self) -> Any: ...


def checked_json(resp: JsonResponse, where: str) -> Any:
    """The JSON body of ``resp`` (None when it has none), after raising the error it carries."""
    try:
        body = resp.json()
    except ValueError:
        body = None
    check_response(resp.status_code, body, where)
    return body


def check_response(status: int, body: Any, where: str) -> None:
    """Raise the error an API response carries (by its body), or a plain one for its status."""
    if status < 400:
        return
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        raise error_from_dict(body["error"])
    raise FerryError(f"HTTP {status} from {where}")
