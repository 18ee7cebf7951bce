"""Ingest: a realistic generated card-transaction history, and a replay producer into Kafka."""
