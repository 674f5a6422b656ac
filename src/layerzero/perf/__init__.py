"""Measured selection: PerfDB (timings on disk), the bench harness, tune, warmup and solve.

Nothing here is imported by `import layerzero` except `perfdb`, which imports sqlite3 only when a
database is first opened.
"""
