"""Kafka security (SASL/SCRAM, PLAIN, TLS) from one settings source, as each client library wants it.

The settings are `VELOCITY_KAFKA_SECURITY_PROTOCOL`, `_SASL_MECHANISM`, `_SASL_USERNAME`, `_SASL_PASSWORD`,
`_SSL_CAFILE`, `_SSL_CERTFILE`, `_SSL_KEYFILE` and `_SSL_CHECK_HOSTNAME` (featurestore/config.py KafkaSettings).
Every Kafka client of the product takes its arguments from here, so one set of variables secures all of them:
kafka-python (replay, DLQ replay, consistency check, topic admin), aiokafka (the API's producer, the dashboard's
feed), faust (the stream worker) and librdkafka/confluent-kafka style configuration for external tools.
"""

from __future__ import annotations

import ssl
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from featurestore.config import KafkaSettings


class KafkaSecurityError(ValueError):
    """The Kafka security settings are inconsistent; the message names the variable to set."""


def _settings(settings: KafkaSettings | None) -> KafkaSettings:
    if settings is None:
        from featurestore.config import KafkaSettings

        settings = KafkaSettings()
    proto = settings.security_protocol
    if proto.startswith("SASL_") and not (settings.sasl_username and settings.sasl_password):
        raise KafkaSecurityError(f"VELOCITY_KAFKA_SECURITY_PROTOCOL={proto} needs VELOCITY_KAFKA_SASL_USERNAME and "
                                 "VELOCITY_KAFKA_SASL_PASSWORD")
    return settings


def _uses_tls(s: KafkaSettings) -> bool:
    return s.security_protocol in ("SSL", "SASL_SSL")


def _uses_sasl(s: KafkaSettings) -> bool:
    return s.security_protocol.startswith("SASL_")


def ssl_context(settings: KafkaSettings | None = None) -> ssl.SSLContext | None:
    """The TLS context for SSL / SASL_SSL (None for plaintext): verifies the brokers against `ssl_cafile` (or the
    system's CAs), with a client certificate when one is configured."""
    s = _settings(settings)
    if not _uses_tls(s):
        return None
    ctx = ssl.create_default_context(cafile=s.ssl_cafile)
    ctx.check_hostname = s.ssl_check_hostname
    if s.ssl_certfile:
        ctx.load_cert_chain(s.ssl_certfile, s.ssl_keyfile)
    return ctx


def _python_client_kwargs(s: KafkaSettings) -> dict:
    """What kafka-python and aiokafka share: the protocol, SASL credentials and the TLS context."""
    if s.security_protocol == "PLAINTEXT":
        return {}
    kwargs: dict = {"security_protocol": s.security_protocol}
    if _uses_sasl(s):
        kwargs.update(sasl_mechanism=s.sasl_mechanism, sasl_plain_username=s.sasl_username,
                      sasl_plain_password=s.sasl_password)
    if _uses_tls(s):
        kwargs["ssl_context"] = ssl_context(s)
    return kwargs


def kafka_python_kwargs(settings: KafkaSettings | None = None) -> dict:
    """Arguments for kafka-python's KafkaProducer / KafkaConsumer / KafkaAdminClient (empty for PLAINTEXT)."""
    s = _settings(settings)
    kwargs = _python_client_kwargs(s)
    if "ssl_context" in kwargs:
        kwargs["ssl_check_hostname"] = s.ssl_check_hostname  # kafka-python checks it apart from the context
    return kwargs


def aiokafka_kwargs(settings: KafkaSettings | None = None) -> dict:
    """Arguments for aiokafka's producer, consumer and admin client (empty for PLAINTEXT)."""
    return _python_client_kwargs(_settings(settings))


def faust_app_kwargs(settings: KafkaSettings | None = None) -> dict:
    """`broker_credentials` for a faust App (empty for PLAINTEXT): SASL (over TLS for SASL_SSL) or TLS alone."""
    s = _settings(settings)
    if s.security_protocol == "PLAINTEXT":
        return {}
    import faust

    ctx = ssl_context(s)
    if _uses_sasl(s):
        return {"broker_credentials": faust.SASLCredentials(username=s.sasl_username, password=s.sasl_password,
                                                            mechanism=s.sasl_mechanism, ssl_context=ctx)}
    return {"broker_credentials": faust.SSLCredentials(ctx)}


def confluent_config(settings: KafkaSettings | None = None) -> dict:
    """The same settings as librdkafka (confluent-kafka) configuration keys."""
    s = _settings(settings)
    conf: dict = {"security.protocol": s.security_protocol.lower()}
    if _uses_sasl(s):
        conf.update({"sasl.mechanisms": s.sasl_mechanism, "sasl.username": s.sasl_username,
                     "sasl.password": s.sasl_password})
    if _uses_tls(s):
        if s.ssl_cafile:
            conf["ssl.ca.location"] = s.ssl_cafile
        if s.ssl_certfile:
            conf["ssl.certificate.location"] = s.ssl_certfile
        if s.ssl_keyfile:
            conf["ssl.key.location"] = s.ssl_keyfile
        conf["enable.ssl.certificate.verification"] = True
        conf["ssl.endpoint.identification.algorithm"] = "https" if s.ssl_check_hostname else "none"
    return conf


def describe(settings: KafkaSettings | None = None) -> str:
    """One line for logs and error messages (never the password)."""
    s = _settings(settings)
    who = f" as {s.sasl_username} ({s.sasl_mechanism})" if _uses_sasl(s) else ""
    return f"{s.security_protocol}{who}"


def check_credentials(bootstrap: str, settings: KafkaSettings | None = None, timeout_s: float = 10.0) -> None:
    """Connect once to the first reachable bootstrap broker and authenticate; raise KafkaSecurityError with one
    clear line when the broker refuses the credentials (clients otherwise only say "unable to bootstrap" after
    their timeout). Unreachable brokers are not this check's business: it returns, and the client reports them."""
    import asyncio

    s = _settings(settings)
    if s.security_protocol == "PLAINTEXT":
        return
    from aiokafka.conn import create_conn

    async def probe(host: str, port: int) -> None:
        conn = await asyncio.wait_for(create_conn(host, port, request_timeout_ms=int(timeout_s * 1000),
                                                  client_id="velocity-credentials-check", **aiokafka_kwargs(s)),
                                      timeout_s)
        conn.close()

    for server in bootstrap.split(","):
        host, _, port = server.strip().rpartition(":")
        try:
            asyncio.run(probe(host or "127.0.0.1", int(port)))
            return
        except Exception as exc:
            text = f"{type(exc).__name__} {exc}"
            if "SaslAuthenticationFailed" in text or "Authentication failed" in text:
                raise KafkaSecurityError(
                    f"Kafka at {server.strip()} refused the credentials ({describe(s)}): check "
                    "VELOCITY_KAFKA_SASL_USERNAME and VELOCITY_KAFKA_SASL_PASSWORD") from None
            if "IllegalSaslState" in text or "UnsupportedSaslMechanism" in text:
                raise KafkaSecurityError(
                    f"Kafka at {server.strip()} does not accept {describe(s)} on this listener: check "
                    "VELOCITY_KAFKA_SECURITY_PROTOCOL and VELOCITY_KAFKA_SASL_MECHANISM") from None
            if isinstance(exc, ssl.SSLError):
                raise KafkaSecurityError(f"TLS with Kafka at {server.strip()} failed ({exc.reason or exc}): check "
                                         "VELOCITY_KAFKA_SSL_CAFILE and VELOCITY_KAFKA_SECURITY_PROTOCOL") from None


def explain_kafka_failure(settings: KafkaSettings) -> str | None:
    """Why a client could not connect, when it is the security settings (one line), else None."""
    try:
        check_credentials(settings.bootstrap, settings)
    except KafkaSecurityError as exc:
        return str(exc)
    return None
