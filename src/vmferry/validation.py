"""Bounds and checks shared by every request model (a leaf module: any layer may import it).

The models carry the bounds as pydantic constraints, so FastAPI refuses a request with 400 naming
the field before any layer runs, and the OpenAPI spec documents them. Paths are also confined
to the storage roots where they are used (``host/storage.py``).
"""

from __future__ import annotations

import ipaddress
import re
from typing import Annotated
from urllib.parse import urlsplit

from pydantic import StringConstraints

#: Longest path a request may carry.
MAX_PATH_LEN = 1024
#: Most entries in a request's map (disk_map, switch_map, peers) or list of names.
MAX_ITEMS = 64
#: An agent's URL: scheme, host name or address, optional port.
AGENT_URL_RE = (
    r"^https?://([A-Za-z0-9][A-Za-z0-9.-]{0,252}|\[[0-9A-Fa-f:.]{2,45}\])(:[0-9]{1,5})?/?$"
)

#: A path in a request: 1..MAX_PATH_LEN characters, no control characters.
PathText = Annotated[
    str, StringConstraints(min_length=1, max_length=MAX_PATH_LEN, pattern=r"^[^\x00-\x1f\x7f]+$")
]
#: A short name or key in a request (disk, switch, host name).
ShortText = Annotated[str, StringConstraints(min_length=1, max_length=64)]


def check_agent_url(value: str) -> str:
    """``value`` if it looks like ``https://HOST[:PORT]``, else ValueError saying so."""
    try:
        parts = urlsplit(value)
        ok = re.match(AGENT_URL_RE, value) is not None and parts.port != 0
        if ok and parts.netloc.startswith("["):
            ipaddress.IPv6Address(parts.hostname or "")
    except ValueError:  # a port over 65535, a malformed IPv6 literal
        ok = False
    if not ok:
        raise ValueError(f"agent URL {value[:80]!r}: use https://HOST:PORT")
    return value
