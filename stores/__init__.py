"""The stores' infrastructure: the Redis online store and its Lua, the DuckDB and Spark offline engines, the
Parquet archive, Kafka topic administration and process helpers.

Everything here implements what `featurestore/` declares; `featurestore/` never imports from here.
"""
