"""Content's links to its authors' actors, as actor merges and splits change
them. The content table belongs to content: the actors domain changes its
author links only through this repository, inside its own unit of work."""

from __future__ import annotations

import uuid
from collections.abc import Sequence

from sqlalchemy import Text, any_, func, tuple_
from sqlalchemy.dialects.postgresql import ARRAY, UUID
from sqlalchemy.sql.expression import bindparam, select

from server.content.tables import content
from server.uow import UnitOfWork

# The content of :owner by any of :from_actors (author_id) is re-pointed to :to_actor.
_REPOINT = (
    content.update()
    .where(
        content.c.owner_id == bindparam("owner"),
        content.c.author_id == any_(bindparam("from_actors", type_=ARRAY(UUID()))),
    )
    .values(author_id=bindparam("to_actor"), update_time=func.now())
)

_accounts = (
    func.unnest(
        bindparam("platforms", type_=ARRAY(Text)),
        bindparam("platform_user_ids", type_=ARRAY(Text)),
    )
    .table_valued("platform", "platform_user_id")
    .render_derived(name="accounts")
)
# Likewise, but only the rows written by one of the given platform accounts.
_REPOINT_ACCOUNTS = _REPOINT.where(
    tuple_(content.c.platform, content.c.author_platform_id).in_(
        select(_accounts.c.platform, _accounts.c.platform_user_id)
    )
)


class ContentAuthorRepository:
    def __init__(self, uow: UnitOfWork) -> None:
        self._conn = uow.conn

    async def repoint(
        self, owner_id: uuid.UUID, from_actors: Sequence[uuid.UUID], to_actor: uuid.UUID
    ) -> int:
        """Sets author_id to `to_actor` on the owner's content by `from_actors`;
        returns how many rows changed."""
        result = await self._conn.execute(
            _REPOINT,
            {"owner": owner_id, "from_actors": list(from_actors), "to_actor": to_actor},
        )
        return int(result.rowcount)

    async def repoint_accounts(
        self,
        owner_id: uuid.UUID,
        from_actor: uuid.UUID,
        to_actor: uuid.UUID,
        accounts: Sequence[tuple[str, str]],
    ) -> int:
        """Sets author_id to `to_actor` on the owner's content by `from_actor`
        written by one of `accounts` (platform, platform user ID)."""
        result = await self._conn.execute(
            _REPOINT_ACCOUNTS,
            {
                "owner": owner_id,
                "from_actors": [from_actor],
                "to_actor": to_actor,
                "platforms": [platform for platform, _ in accounts],
                "platform_user_ids": [user_id for _, user_id in accounts],
            },
        )
        return int(result.rowcount)
