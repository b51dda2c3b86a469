"""Benchmarks that `make bench` runs: each module measures one part and returns plain dicts.

Modules here measure; they assert nothing, so a slow CI machine never fails a
build.  Tests check behaviour, and may reuse a module's measuring helpers.
"""
