"""ferryd's HTTP API: validate, authorize, call the host layer."""

from vmferry.api.app import create_app

__all__ = ["create_app"]
