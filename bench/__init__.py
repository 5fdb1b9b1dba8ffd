"""Observatory benchmarks (`make bench`, or `python -m bench [--quick]`).

Not part of the test suite. One run starts a fresh embedded PostgreSQL
database in .data/bench, migrates it, runs the service under test in its own
process, measures ingest, GetContent and ListContent against their baselines
(raw asyncpg, and a bare grpc.aio server) and writes bench/results/content.md.
"""
