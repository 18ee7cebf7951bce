#!/usr/bin/env bash
# `make demo`: what exists of the product, end to end on real Kafka and Redis:
# generate a history -> replay it into Kafka -> stream worker (windows in Redis + archive) -> nightly batch from the
# archive -> point-in-time training set -> a card's online features. The scored story (SPEC section 9) lands with
# `velocity demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
V=.venv/bin/velocity
RUN="demo-$(date +%s)"
export VELOCITY_DATA_DIR="data/$RUN"
export VELOCITY_KAFKA_TOPIC_TRANSACTIONS="$RUN.transactions"
export VELOCITY_KAFKA_TOPIC_DLQ="$RUN.transactions.dlq"
export VELOCITY_REDIS_KEY_PREFIX="vel:$RUN"

$V services status
$V generate --cards 500 --days 14 --seed 7 --out "$VELOCITY_DATA_DIR/history.parquet"
ROWS=$(.venv/bin/python -c "import pyarrow.parquet as pq; print(pq.read_metadata('$VELOCITY_DATA_DIR/history.parquet').num_rows)")

$V stream --group "$RUN" --metrics-port 9469 --archive-roll-s 5 --retention-ms 2592000000 --log-level warning \
  > "$VELOCITY_DATA_DIR/stream.log" 2>&1 &
WORKER=$!
trap 'kill $WORKER 2>/dev/null || true' EXIT
$V replay --input "$VELOCITY_DATA_DIR/history.parquet" --speed max

echo "waiting for the stream worker to process $ROWS transactions ..."
for _ in $(seq 1 600); do
  DONE=$( (curl -s localhost:9469/metrics 2>/dev/null || true) | awk '/^velocity_stream_events_total/ {s+=$2} END {print int(s)}')
  [ "${DONE:-0}" -ge "$ROWS" ] && break
  sleep 0.5
done
curl -s localhost:9469/metrics | grep -E '^velocity_stream_(events_total|dlq_total|freshness_p99)' || true
kill -TERM $WORKER && wait $WORKER || true
trap - EXIT

$V batch --start 2020-01-02 --end 2020-01-14 --engine duckdb
$V features training-set --start 2020-01-01 --end 2020-01-15 --out "$VELOCITY_DATA_DIR/training.parquet"
.venv/bin/python - <<PY
import pandas as pd
t = pd.read_parquet("$VELOCITY_DATA_DIR/training.parquet")
print(t.describe().T[["mean", "min", "max"]].round(3).to_string())
print(t[t.fraud_label == 1].head(8)[["card", "amount", "num_trans_last_10m", "amt_ratio1", "amt_ratio2", "count_ratio"]].to_string())
PY
PAN=$(.venv/bin/python -c "import pyarrow.parquet as pq; print(pq.read_table('$VELOCITY_DATA_DIR/history.parquet', columns=['cc_num']).column(0)[0])")
$V features get "$PAN" --at 1579046400000
