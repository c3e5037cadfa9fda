"""The HTTP API and dashboard of Conveyor (``conveyor server up``)."""

from conveyor.service.api.app import create_app

__all__ = ["create_app"]
