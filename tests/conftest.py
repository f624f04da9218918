"""Fixtures shared by the suite live in tests/release_env.py, tests/trust_env.py and
tests/tracker_asgi.py."""

pytest_plugins = ["tests.release_env", "tests.trust_env", "tests.tracker_asgi"]
