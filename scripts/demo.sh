#!/usr/bin/env bash
# `make demo`: runs what exists of the product end to end on real Kafka and Redis.
# It grows with each issue; the full story (SPEC section 9) lands with `velocity demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
V=.venv/bin/velocity
$V services status
