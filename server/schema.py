"""Every table the service uses, on one MetaData: what Alembic compares the
migrations against. Each domain keeps its tables beside its repository
(`server/<domain>/tables.py`) on `server.tables.metadata`; importing them here
registers them."""

from __future__ import annotations

import server.actors.tables
import server.content.tables
import server.credits.tables  # noqa: F401
from server.tables import metadata
from server.vectors import tables as _vector_tables  # noqa: F401

__all__ = ["metadata"]
