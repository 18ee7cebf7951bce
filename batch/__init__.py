"""The nightly batch: 1-week snapshots (offline + Redis) and point-in-time training sets, on Spark or DuckDB."""
