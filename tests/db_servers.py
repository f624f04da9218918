"""Fixtures: a throwaway PostgreSQL and Redis per test session (``bench/servers.py``),
a fresh PostgreSQL schema and a clean Redis database per test. Tests that need them
are skipped, with the reason, where the servers are not installed (``.ci/run`` installs
Debian's ``postgresql`` and ``redis-server``, so CI always runs them)."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest

from bench.servers import (
    PostgresServer,
    RedisServer,
    postgres_missing,
    redis_missing,
    run_postgres,
    run_redis,
)

_schemas = itertools.count(1)


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    missing = postgres_missing()
    if missing is not None:
        pytest.skip(f"PostgreSQL tests skipped: {missing}")
    with run_postgres(fsync=False) as server:
        yield server


@pytest.fixture
def pg_url(postgres_server: PostgresServer) -> Iterator[str]:
    """A PostgreSQL URL whose search path is a new, empty schema (dropped after)."""
    schema = f"test_{next(_schemas)}"
    postgres_server.psql(f"CREATE SCHEMA {schema}")
    yield postgres_server.url(schema=schema)
    postgres_server.psql(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    missing = redis_missing()
    if missing is not None:
        pytest.skip(f"Redis tests skipped: {missing}")
    with run_redis() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> Iterator[str]:
    """The throwaway Redis's URL, its database empty."""
    import redis  # only the tests that use Redis need the client

    client = redis.Redis(unix_socket_path=str(redis_server.socket))
    client.flushall()
    client.close()
    yield redis_server.url
