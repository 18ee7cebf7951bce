#!/usr/bin/env bash
# The machine-level prerequisites, shared by `make` and `.ci/run`: Python 3.11, Java 17+, Maven (fetches the pinned
# Kafka jars), redis-server, and Debian's chromium (the dashboard's browser test drives it with Playwright; never
# `playwright install`, which would download a browser build of its own). Missing Debian packages are installed with apt-get when this runs as root or with
# passwordless sudo; otherwise it prints the one command to run and exits 1. Safe to run again: it only installs
# what is missing.
set -euo pipefail

PYTHON="${PYTHON:-python3.11}"
fail() { printf 'error: %s\n' "$*" >&2; exit 1; }

command -v "$PYTHON" >/dev/null ||
  fail "$PYTHON is required (Debian/Ubuntu: apt-get install -y python3.11 python3.11-venv; or set PYTHON=/path/to/python3.11)"
"$PYTHON" -c 'import venv, ensurepip' 2>/dev/null ||
  fail "$PYTHON cannot create virtual environments (Debian/Ubuntu: apt-get install -y python3.11-venv)"

need=()
command -v redis-server >/dev/null || need+=(redis-server)
command -v mvn >/dev/null || need+=(maven)
command -v java >/dev/null || need+=(openjdk-17-jre-headless)
[ -x /usr/bin/chromium ] || need+=(chromium)

if ((${#need[@]})); then
  if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
  elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    SUDO=(sudo)
  else
    fail "missing system packages: ${need[*]}; install them with: sudo apt-get update && sudo apt-get install -y ${need[*]}"
  fi
  echo "installing system packages: ${need[*]} (apt-get)"
  "${SUDO[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq "${need[@]}" >/dev/null
fi

java_major=$(java -version 2>&1 | sed -n 's/.*version "\([0-9]*\).*/\1/p' | sed -n 1p)
[ -n "$java_major" ] && [ "$java_major" -ge 17 ] ||
  fail "Java 17 or newer is required for Kafka (found: $(java -version 2>&1 | sed -n 1p)); install openjdk-17-jre-headless"

# sed reads to the end: `head` would close the pipe early, and under pipefail a broken pipe fails the run.
echo "system packages: $("$PYTHON" --version 2>&1), java $java_major, $(mvn -B -v 2>/dev/null | sed -n 1p | sed "s/\x1b\[[0-9;]*m//g" | cut -d" " -f1-3), $(redis-server --version | cut -d' ' -f1-3), $(/usr/bin/chromium --version 2>/dev/null | cut -d' ' -f1-2)"
