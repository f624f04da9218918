"""Fixtures shared by the suite live in tests/release_env.py, tests/trust_env.py,
tests/tracker_asgi.py, tests/db_servers.py, tests/dbus_bus.py and tests/swtpm.py."""

pytest_plugins = ["tests.release_env", "tests.trust_env", "tests.tracker_asgi",
                  "tests.db_servers", "tests.dbus_bus", "tests.swtpm"]
