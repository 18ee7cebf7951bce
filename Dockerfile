# The velocity app image: the same CLI (`velocity ...`) as the local path, with Java for the PySpark batch job.
FROM python:3.11-slim-bookworm

RUN apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jre-headless curl \
    && rm -rf /var/lib/apt/lists/*

ENV PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VELOCITY_DATA_DIR=/data \
    VELOCITY_RUN_DIR=/data/run

WORKDIR /app
# Dependencies first (pinned, same lock file as `make install`), so code changes do not reinstall them.
COPY requirements.lock ./
RUN pip install -r requirements.lock

COPY pyproject.toml README.md velocity_cli.py ./
# Every package pyproject.toml lists (tests/test_compose_static.py keeps the two lists equal).
COPY featurestore ./featurestore
COPY stores ./stores
COPY ingest ./ingest
COPY streaming ./streaming
COPY batch ./batch
COPY model ./model
COPY serving ./serving
COPY services ./services
COPY demo ./demo
RUN pip install --no-deps . && mkdir -p /data

VOLUME ["/data"]
ENTRYPOINT ["velocity"]
CMD ["--help"]
