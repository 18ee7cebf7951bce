"""Typed configuration from flags and VELOCITY_* environment variables (pydantic-settings)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from featurestore.definitions import DEFAULT_ALLOWED_LATENESS_MS, DEFAULT_EVENT_RETENTION_MS, DEFAULT_MAX_FUTURE_MS
from featurestore.entity import EntitySecrets, SecretsConfigError


class RedisSettings(BaseSettings):
    """Where the online store lives. Password and TLS options are passed straight to redis-py."""

    model_config = SettingsConfigDict(env_prefix="VELOCITY_REDIS_")

    host: str = "127.0.0.1"
    port: int = 6379
    db: int = 0
    username: str | None = None
    password: str | None = None
    ssl: bool = False
    ssl_ca_certs: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_cert_reqs: str = "required"
    socket_timeout_s: float = 2.0
    connect_timeout_s: float = 1.0
    #: Versioned prefix: a change of key layout bumps it, so old and new layouts never mix.
    key_prefix: str = "vel:v1"
    #: Redis Cluster mode (VELOCITY_REDIS_CLUSTER=true): host:port is a seed node, the clients discover the rest;
    #: `cluster_nodes` ("host:port,host:port") adds further seeds. Every component follows it (stores.redis_online).
    cluster: bool = False
    cluster_nodes: str = ""

    def seeds(self) -> list[tuple[str, int]]:
        """The cluster's seed nodes: host:port first, then `cluster_nodes`."""
        out = [(self.host, self.port)]
        for item in self.cluster_nodes.replace(" ", "").split(","):
            if item:
                host, _, port = item.rpartition(":")
                out.append((host or "127.0.0.1", int(port)))
        return out

    def client_kwargs(self) -> dict:
        kwargs: dict = {
            "host": self.host,
            "port": self.port,
            "db": self.db,
            "username": self.username,
            "password": self.password,
            "socket_timeout": self.socket_timeout_s,
            "socket_connect_timeout": self.connect_timeout_s,
        }
        if self.ssl:
            kwargs.update(
                ssl=True,
                ssl_ca_certs=self.ssl_ca_certs,
                ssl_certfile=self.ssl_certfile,
                ssl_keyfile=self.ssl_keyfile,
                ssl_cert_reqs=self.ssl_cert_reqs,
            )
        return kwargs


class KafkaSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VELOCITY_KAFKA_")

    bootstrap: str = "127.0.0.1:9092"
    topic_transactions: str = "transactions"
    topic_dlq: str = "transactions.dlq"
    topic_scores: str = "scores"
    topic_alerts: str = "alerts"
    #: Late fraud labels ({"txn_id", "fraud_label", "labeled_at"}, key txn_id) and their dead letters.
    topic_labels: str = "labels"
    topic_labels_dlq: str = "labels.dlq"
    partitions: int = 4
    #: Topic `retention.ms`. Messages carry their event time as Kafka timestamp, and a replayed history is
    #: months or years old: any time-based retention would have the broker delete it within minutes of the
    #: replay (its retention check runs every 5 minutes). -1 keeps messages until deleted by size or by hand.
    topic_retention_ms: int = -1
    #: Security of every Kafka client (replay, stream worker, API, DLQ replay, consistency check, topic admin):
    #: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL; turned into each library's arguments by stores/kafka_security.py.
    security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = "PLAINTEXT"
    sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = "SCRAM-SHA-256"
    sasl_username: str | None = None
    sasl_password: str | None = None
    #: TLS (SSL, SASL_SSL): the CA bundle that signed the brokers' certificates (None: the system's), and a client
    #: certificate and key for mutual TLS.
    ssl_cafile: str | None = None
    ssl_certfile: str | None = None
    ssl_keyfile: str | None = None
    ssl_check_hostname: bool = True


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="VELOCITY_")

    #: Secret for the PAN -> entity-key HMAC. Set it in production; the default only suits local runs. It is the
    #: version-1 secret; with `entity_secrets` set it becomes an `EntitySecrets` (a str: the current secret).
    entity_secret: str = "velocity-local-dev-secret"
    #: Versioned secrets for a key rotation, "2:<new>,1:<old>" (the highest version signs new keys; version 1 is
    #: VELOCITY_ENTITY_SECRET unless listed), or a file of `N:secret` lines (featurestore/entity.py).
    entity_secrets: str | None = None
    entity_secrets_file: Path | None = None
    data_dir: Path = Path("data")
    run_dir: Path = Path(".velocity")
    allowed_lateness_ms: int = DEFAULT_ALLOWED_LATENESS_MS
    event_retention_ms: int = DEFAULT_EVENT_RETENTION_MS
    #: Event times further ahead of the worker's clock are dead-lettered with reason `future`.
    max_future_ms: int = DEFAULT_MAX_FUTURE_MS
    #: A backfilled snapshot is recorded as published at its cut-off plus this delay (SPEC section 4).
    snapshot_publish_delay_ms: int = 0
    redis: RedisSettings = Field(default_factory=RedisSettings)
    kafka: KafkaSettings = Field(default_factory=KafkaSettings)

    @model_validator(mode="after")
    def _entity_secret_versions(self) -> Settings:
        """Turn VELOCITY_ENTITY_SECRETS / _FILE into the versioned secrets (the old single secret is version 1)."""
        # Not a ValueError: pydantic would wrap it and print the input, secrets included.
        spec = self.entity_secrets
        if self.entity_secrets_file is not None:
            try:
                spec = ",".join(x for x in [spec, self.entity_secrets_file.read_text()] if x)
            except OSError as exc:
                raise SecretsConfigError(f"VELOCITY_ENTITY_SECRETS_FILE {self.entity_secrets_file}: "
                                         f"{exc.strerror or exc}") from None
        if spec:
            v1 = self.entity_secret if "entity_secret" in self.model_fields_set else None
            try:
                self.entity_secret = EntitySecrets.parse(spec, v1)
            except ValueError as exc:
                raise SecretsConfigError(str(exc)) from None
        return self

    @property
    def offline_dir(self) -> Path:
        return self.data_dir / "offline"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
