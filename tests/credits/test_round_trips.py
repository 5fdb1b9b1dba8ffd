"""Each credit mutation is one statement on the wire (a call of its
server-side function, its own transaction: no BEGIN or COMMIT), and a
retried request_id costs the same one statement."""

import uuid

import asyncpg
import pytest

from tests.credits.helpers import balance, grant, release, reserve, settle

pytestmark = pytest.mark.asyncio

# Statements other parts of the server may run meanwhile (health probes, the
# expiry sweeper), asyncpg's own type introspection (once per connection) and
# the unit's read-your-writes bookkeeping after a write (server.uow), and the
# statement_timeout a pooled connection gets back after a call with a deadline
# lowered it (uow.use_settings: only when it differs).
BACKGROUND = (
    "set_config($1, $2, false)",
    "SELECT 1",
    "credit_expire_lapsed",
    "'jit'",
    "typeinfo",
    "pg_current_wal_insert_lsn",
)


class Statements:
    """Records the SQL every driver connection of this process sends."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.sent: list[str] = []
        connection = asyncpg.connection.Connection
        do_execute, execute = connection._do_execute, connection.execute

        async def spy_do_execute(conn, query, *args, **kwargs):
            self.sent.append(query)
            return await do_execute(conn, query, *args, **kwargs)

        async def spy_execute(conn, query, *args, **kwargs):
            if not args:  # a simple query: BEGIN, COMMIT, SAVEPOINT ...
                self.sent.append(query)
            return await execute(conn, query, *args, **kwargs)

        monkeypatch.setattr(connection, "_do_execute", spy_do_execute)
        monkeypatch.setattr(connection, "execute", spy_execute)

    def take(self) -> list[str]:
        sent = [query for query in self.sent if not any(b in query for b in BACKGROUND)]
        self.sent.clear()
        return sent


async def test_each_mutation_is_one_statement(credit_stub, admin, alice, monkeypatch):
    await grant(credit_stub, admin, alice, 100)  # warms the statements up
    statements = Statements(monkeypatch)

    await grant(credit_stub, admin, alice, 100)
    assert [s.split("(")[0] for s in statements.take()] == ["SELECT * FROM credit_grant"]
    request_id = str(uuid.uuid4())
    for _ in range(2):
        held = await reserve(credit_stub, alice, 30, request_id=request_id)
        assert [s.split("(")[0] for s in statements.take()] == ["SELECT * FROM credit_reserve"]
    await settle(credit_stub, alice, held.id, 10, request_id=str(uuid.uuid4()))
    assert [s.split("(")[0] for s in statements.take()] == ["SELECT * FROM credit_resolve"]
    other = await reserve(credit_stub, alice, 30)
    statements.take()
    await release(credit_stub, alice, other.id)
    assert [s.split("(")[0] for s in statements.take()] == ["SELECT * FROM credit_resolve"]
    await balance(credit_stub, alice)
    assert [s.split("(")[0] for s in statements.take()] == ["SELECT * FROM credit_balances"]
