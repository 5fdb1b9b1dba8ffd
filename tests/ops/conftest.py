"""Fixtures of the operations tests."""

import os
from concurrent.futures import ThreadPoolExecutor

import pytest


@pytest.fixture
def databases(postgres):
    """Makes empty databases on the embedded server; drops them afterwards."""
    if postgres.embedded is None:
        pytest.skip("needs the embedded database, to create databases of its own")
    made = []

    def make(purpose: str) -> str:
        name = f"observatory_{purpose}_{os.getpid()}_{len(made)}"
        made.append(name)
        # In a thread of its own: it runs an event loop, and tests call it from theirs.
        with ThreadPoolExecutor(1) as thread:
            return thread.submit(postgres.embedded.ensure_database, name, fresh=True).result()

    yield make
    for name in made:
        postgres.embedded.drop_database(name)
