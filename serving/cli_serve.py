"""`velocity serve`: the scoring HTTP API on uvicorn (uvloop, httptools), one worker process by default."""

from __future__ import annotations

import typer


def serve(
    host: str = typer.Option("127.0.0.1", help="Address to bind (0.0.0.0 in a container)."),
    port: int = typer.Option(8000, help="Port to listen on."),
    workers: int = typer.Option(1, min=1, help="Worker processes (each with its own Redis pool, Kafka producer "
                                "and model copy). One is the measured configuration."),
    key_prefix: str = typer.Option(None, help="Redis key prefix (env VELOCITY_REDIS_KEY_PREFIX, default vel:v1)."),
    access_log: bool = typer.Option(True, help="Log every request (card numbers never appear: they travel in "
                                    "bodies only, and every log line is PAN-masked)."),
    log_level: str = typer.Option("info", help="Log level of the server."),
) -> None:
    """Serve the scoring API: POST /v1/score, /v1/score/batch, /v1/features, /healthz, /readyz, /metrics, /docs.

    Scores with the current model (`velocity models use`; reloaded without a restart when it changes), reads
    features from Redis in one round trip, and publishes each tokenized transaction to Kafka's `transactions`
    topic (Kafka is not required: an unpublished answer says so). Limits and budgets: VELOCITY_SERVE_* (README).
    """
    import os

    import uvicorn

    from featurestore.config import get_settings
    from featurestore.entity import warn_if_default_secret

    if key_prefix is not None:
        os.environ["VELOCITY_REDIS_KEY_PREFIX"] = key_prefix  # worker processes read the settings again
        get_settings.cache_clear()
    warn_if_default_secret(get_settings().entity_secret, "serve")
    from serving.app import ServeSettings
    from serving.auth import AuthConfigError, load_tokens
    from stores.kafka_security import KafkaSecurityError, aiokafka_kwargs

    try:  # configuration a user can get wrong: one clear line, before the server starts
        serve_settings = ServeSettings()
        load_tokens(serve_settings.api_token, serve_settings.api_token_file)
        aiokafka_kwargs(get_settings().kafka)
    except (AuthConfigError, KafkaSecurityError) as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    # httptools, each answer's head and body in one socket write (serving/http_protocol.py)
    uvicorn.run("serving.app:create_app", factory=True, host=host, port=port, workers=workers, loop="uvloop",
                http="serving.http_protocol:HttpProtocol", access_log=access_log, log_level=log_level.lower(),
                lifespan="on", server_header=False, date_header=False)
