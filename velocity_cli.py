"""The `velocity` command: one CLI assembled from each package's own commands."""

from __future__ import annotations

import logging
import os
import sys

import typer

from stores.cli import app as features_app

app = typer.Typer(
    help="Velocity: a streaming feature store with real-time card-fraud scoring.\n\n"
    "Configuration comes from flags and VELOCITY_* environment variables (see README).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register() -> None:
    from batch.cli import register as register_batch
    from batch.consistency_cli import register as register_consistency
    from demo.cli import register as register_demo
    from ingest.cli import register as register_ingest
    from model.cli import register as register_model
    from services.cli import app as services_app
    from serving.cli import register as register_serving
    from streaming.cli import register as register_streaming

    app.add_typer(services_app, name="services")
    app.add_typer(features_app, name="features")
    register_ingest(app)
    register_streaming(app)
    register_batch(app, features_app)
    from batch.rebuild_cli import register as register_rebuild

    register_rebuild(features_app)
    register_serving(app)
    register_model(app)
    register_demo(app)
    register_consistency(app)
    from batch.monitor_cli import register as register_monitor

    register_monitor(app)


def _configure_logging() -> None:
    from featurestore.entity import install_excepthook_redaction, install_pan_redaction

    logging.basicConfig(
        level=os.environ.get("VELOCITY_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # PANs are masked in every log record (a log-record factory, so it survives faust replacing the handlers
    # when the stream worker starts) and in uncaught tracebacks.
    install_pan_redaction()
    install_excepthook_redaction()
    # kafka-python and aiokafka narrate every connection at INFO; keep their warnings only.
    for noisy in ("kafka", "aiokafka"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


_register()


def main() -> None:
    _configure_logging()
    from featurestore.entity import SecretsConfigError

    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except SecretsConfigError as exc:  # a bad VELOCITY_ENTITY_SECRETS: one line, no secret in it
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
