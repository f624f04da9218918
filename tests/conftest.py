"""Fixtures shared by the suite live in tests/release_env.py and tests/trust_env.py."""

pytest_plugins = ["tests.release_env", "tests.trust_env"]
