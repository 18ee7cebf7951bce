"""`velocity stream`: the faust worker."""

from __future__ import annotations

from pathlib import Path

import typer


def register(app: typer.Typer) -> None:
    @app.command()
    def stream(
        group: str = typer.Option("velocity-stream", help="Consumer group; workers with the same group share partitions."),
        bootstrap: str = typer.Option(None, help="Kafka brokers (env VELOCITY_KAFKA_BOOTSTRAP, default 127.0.0.1:9092)."),
        topic: str = typer.Option(None, help="Input topic (default transactions)."),
        dlq_topic: str = typer.Option(None, help="Dead-letter topic (default transactions.dlq)."),
        score: bool = typer.Option(True, help="Score each transaction after its window update with the current "
                                   "model (answers to --scores-topic, FRAUD also to --alerts-topic). Without a "
                                   "current model the worker aggregates and archives only, and says so."),
        scores_topic: str = typer.Option(None, help="Topic for the stream's scores (env VELOCITY_KAFKA_TOPIC_SCORES, "
                                         "default scores)."),
        alerts_topic: str = typer.Option(None, help="Topic for FRAUD decisions (env VELOCITY_KAFKA_TOPIC_ALERTS, "
                                         "default alerts)."),
        labels_topic: str = typer.Option(None, help="Fraud labels to archive to the offline label store (env "
                                         "VELOCITY_KAFKA_TOPIC_LABELS, default labels; \"\" = off)."),
        labels_dlq_topic: str = typer.Option(None, help="Dead letters of malformed labels (default labels.dlq)."),
        models_dir: Path = typer.Option(None, help="Model directory whose current model scores (default "
                                        "$VELOCITY_DATA_DIR/models)."),
        batch_size: int = typer.Option(2000, help="Max messages per batch (one Redis round trip per batch)."),
        metrics_port: int = typer.Option(9464, help="Prometheus metrics port (0 = off)."),
        metrics_host: str = typer.Option("127.0.0.1", help="Address the metrics server binds (0.0.0.0 in a container)."),
        offline_dir: Path = typer.Option(None, help="Offline store root for the archive (default $VELOCITY_DATA_DIR/offline)."),
        archive: bool = typer.Option(True, help="Archive every valid transaction to Parquet in the offline store."),
        archive_roll_s: float = typer.Option(60, help="Roll the archive spool into Parquet at least this often (s)."),
        key_prefix: str = typer.Option(None, help="Redis key prefix (env VELOCITY_REDIS_KEY_PREFIX, default vel:v1)."),
        allowed_lateness_ms: int = typer.Option(None, help="Events further behind their card's newest event are late "
                                                "(env VELOCITY_ALLOWED_LATENESS_MS, default 10 min)."),
        retention_ms: int = typer.Option(None, help="How long window events and txn_id records stay online "
                                         "(event time; env VELOCITY_EVENT_RETENTION_MS, default 1 day)."),
        log_level: str = typer.Option("info", help="Log level."),
    ) -> None:
        """Run the stream worker: exact 10-minute windows per card in Redis, archive to Parquet, DLQ bad input.

        At-least-once delivery with idempotent writes: a killed worker resumes from committed offsets and
        neither loses nor double-counts a transaction. Stop it with Ctrl-C or SIGTERM.
        """
        from streaming.worker import default_config, run

        overrides = {"group": group, "batch_size": batch_size,
                     "metrics_port": metrics_port, "metrics_host": metrics_host,
                     "archive_roll_s": archive_roll_s}
        overrides["score"] = score
        for name, value in (("bootstrap", bootstrap), ("topic", topic), ("dlq_topic", dlq_topic),
                            ("scores_topic", scores_topic), ("alerts_topic", alerts_topic), ("models_dir", models_dir),
                            ("labels_topic", labels_topic), ("labels_dlq_topic", labels_dlq_topic),
                            ("key_prefix", key_prefix), ("allowed_lateness_ms", allowed_lateness_ms),
                            ("retention_ms", retention_ms), ("offline_dir", offline_dir)):
            if value is not None:
                overrides[name] = value
        cfg = default_config(**overrides)
        if not archive:
            cfg.offline_dir = None
        from stores.kafka_security import KafkaSecurityError

        try:
            run(cfg, loglevel=log_level)
        except KafkaSecurityError as exc:  # refused credentials: one clear line, not a traceback
            typer.echo(f"error: {exc}", err=True)
            raise typer.Exit(2) from None
