#!/usr/bin/env bash
# Checks the Prometheus rules (deploy/prometheus/geomatch-rules.yml) and runs their unit
# tests with promtool, installing it (Debian's prometheus package) when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v promtool >/dev/null 2>&1; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus >/dev/null
    # The package may start a Prometheus server (on :9090): stop it, so nothing listens
    # by surprise.
    service prometheus stop >/dev/null 2>&1 ||
        /etc/init.d/prometheus stop >/dev/null 2>&1 ||
        systemctl stop prometheus >/dev/null 2>&1 || true
fi
promtool --version | head -n 1

echo "== promtool check rules"
promtool check rules deploy/prometheus/geomatch-rules.yml
echo "== promtool test rules"
promtool test rules deploy/prometheus/geomatch-rules.test.yml
