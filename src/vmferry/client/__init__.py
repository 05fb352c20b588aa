"""The Python client of vmferry, used by the CLI and the Admin Center."""

from vmferry.client._client import FerryClient
from vmferry.client._config import (
    ClientConfig,
    HostEndpoint,
    config_path,
    load_config,
    resolve_host,
    save_config,
)
from vmferry.errors import (
    AuthError,
    ConflictError,
    FerryError,
    HostError,
    InsufficientResourcesError,
    NotFoundError,
    OutsideStorageRootError,
    RefusedError,
    UnreachableError,
)

__all__ = [
    "AuthError",
    "ClientConfig",
    "ConflictError",
    "FerryClient",
    "FerryError",
    "HostEndpoint",
    "HostError",
    "InsufficientResourcesError",
    "NotFoundError",
    "OutsideStorageRootError",
    "RefusedError",
    "UnreachableError",
    "config_path",
    "load_config",
    "resolve_host",
    "save_config",
]
