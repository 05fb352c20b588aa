"""Who may start a move, and which moves this agent accepts (``migration.authentication``).

The source side (:meth:`MoveAuthority.check_start`) runs before a move request reaches the
migration layer; the destination side (:meth:`MoveAuthority.check_incoming`) before an
incoming move is prepared or a quick move received. Both use :mod:`vmferry.security.tickets`
and the caller's verified certificate (:class:`~vmferry.security.roles.Principal`), so the
migration layer never sees identities. See docs/security.md.
"""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

from cryptography import x509

from vmferry.errors import ForbiddenError
from vmferry.host.settings import HostSettings
from vmferry.security.pki import Revocations
from vmferry.security.roles import Principal, Role
from vmferry.security.tickets import (
    NonceStore,
    Service,
    SignedTicket,
    Verified,
    cert_uris,
    check_binding,
    may_delegate,
    verify_ticket,
)

#: (VM name) -> (owner node, node it is moving to) of a clustered VM, or None.
PlannedMoveOf = Callable[[str], Awaitable[tuple[str, str | None] | None]]


def is_local(address: str, server_address: str | None) -> bool:
    """Whether a client at ``address`` runs on this host.

    Loopback, or the very address the client reached us on: a TCP handshake from another
    machine cannot complete with our own address as its source.
    """
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return ip.is_loopback or (server_address is not None and address == server_address)


class MoveAuthority:
    """This agent's move-initiation rules (``app.state.move_authority``)."""

    def __init__(
        self,
        settings: Callable[[], HostSettings],
        state_dir: Path,
        ca: Path | None,
        own_cert: Path | None,
        revocations: Callable[[], Revocations | None],
        planned_move_of: PlannedMoveOf,
    ) -> None:
        self._settings = settings
        self.ca = ca
        self.own_uris = (
            cert_uris(x509.load_pem_x509_certificate(own_cert.read_bytes())) if own_cert else []
        )
        self._revocations = revocations
        self._planned = planned_move_of
        self.nonces = NonceStore(state_dir / "security" / "ticket-nonces.json")

    def _mode(self) -> str:
        return self._settings().migration.authentication

    def _verify(self, ticket: SignedTicket) -> Verified:
        assert self.ca is not None
        crl = self._revocations()
        return verify_ticket(ticket, self.ca, revoked=crl.serials if crl else ())

    async def check_start(
        self,
        who: Principal,
        server_address: str | None,
        *,
        vm: str,
        destination: str,
        service: Service,
        ticket: SignedTicket | None,
        what_if: bool,
    ) -> None:
        """Refuse a move this host may not start for ``who`` (source side)."""
        if who.role is None or self.ca is None:  # in-process tests without certificates
            return
        own = self._settings().name
        local = is_local(who.address, server_address)
        if self._mode() == "local" and not local:
            raise ForbiddenError(
                f"host {own} accepts moves started only on the host itself "
                f"(migration.authentication = local); {who.cn} called from {who.address}",
                field="migration.authentication",
                fix=f"run ferry on {own} itself, or let remote admins start moves with "
                f"signed tickets: ferry host set --migration-authentication delegated",
            )
        if ticket is None:
            if self._mode() == "delegated" and not local:
                raise ForbiddenError(
                    f"host {own} needs a move ticket signed by the user for a move started "
                    "from another machine (migration.authentication = delegated)",
                    field="ticket",
                    fix="start the move with ferry, which signs one with your certificate",
                )
            return
        v = await self._accept(ticket, vm=vm, source=own, destination=destination,
                               service=service, source_uris=self.own_uris, use=not what_if,
                               user=who.cn)  # fmt: skip
        if who.serial is not None and v.serial != who.serial:
            raise ForbiddenError(
                "move ticket refused: it was signed with another certificate than the "
                "one that sent the request",
                field="ticket",
                fix="sign the ticket with the certificate you call the agent with",
            )

    async def check_incoming(
        self,
        caller: Principal,
        *,
        vm: str,
        source: str,
        service: Service,
        ticket: SignedTicket | None,
        dry_run: bool,
    ) -> None:
        """Refuse a move this host may not receive from ``caller`` (destination side)."""
        if caller.role is None or self.ca is None:
            return
        own = self._settings().name
        if caller.role is not Role.host or caller.cn != source:
            raise ForbiddenError(
                f"incoming move refused: the request says it comes from {source!r} but was "
                f"sent by {caller.cn!r} (role {caller.role.value})",
                field="source",
                fix="only the source host's agent, with its own certificate, sends moves",
            )
        if ticket is None:
            planned = await self._planned(vm)
            if planned is not None and planned == (source, own):
                return  # a cluster move: the nodes act with their node identities
            if self._mode() == "delegated":
                raise ForbiddenError(
                    f"host {own} receives moves only with a ticket signed by the user who "
                    f"started them (migration.authentication = delegated); {source} sent none",
                    field="ticket",
                    fix=f"start the move with ferry from another machine, or set {source} and "
                    f"{own} to the same mode (ferry host set --migration-authentication ...)",
                )
            return
        await self._accept(ticket, vm=vm, source=source, destination=own, service=service,
                           source_uris=caller.uris, use=not dry_run)  # fmt: skip

    async def _accept(
        self,
        ticket: SignedTicket,
        *,
        vm: str,
        source: str,
        destination: str,
        service: Service,
        source_uris: Sequence[str],
        use: bool,
        user: str | None = None,
    ) -> Verified:
        """Verify a ticket, its binding and the source's delegation target; record its nonce
        when ``use`` (not for a what-if or dry run)."""
        v = await asyncio.to_thread(self._verify, ticket)
        check_binding(v, vm=vm, source=source, destination=destination, service=service, user=user)
        if not may_delegate(source_uris, service, destination):
            raise ForbiddenError(
                f"host {source} may not act for users towards {destination} ({service} moves): "
                "its certificate does not list that delegation target",
                field="source",
                fix=f"reissue {source}'s certificate with --delegate {destination}:{service} "
                "(ferry cert issue host ...) and restart its agent",
            )
        if use:
            await asyncio.to_thread(self.nonces.use, v.claims)
        return v
