"""Benchmarks; nothing in the product imports this package."""
