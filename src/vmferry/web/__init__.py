"""The web Admin Center (``ferry admin serve``): dashboard, moves, wizard, event log.

An edge like ``cli/``: it talks to agents only through :class:`vmferry.client.FerryClient`,
with its own certificate. See docs/admin-center.md.
"""

from vmferry.web.agents import Agents, service_endpoints
from vmferry.web.app import WebSettings, create_app
from vmferry.web.auth import Logins, User
from vmferry.web.server import ServerTLS, make_server, start_in_thread

__all__ = [
    "Agents",
    "Logins",
    "ServerTLS",
    "User",
    "WebSettings",
    "create_app",
    "make_server",
    "service_endpoints",
    "start_in_thread",
]
