"""Shared I/O adapters with no domain knowledge: durable files, HTTP serving.

``infra`` depends on nothing of ours; every component may use it.
"""
