#!/bin/sh
# ML Defender stand-in component: what a sniffer, ml-detector, firewall or rag process does with
# the config plane, and nothing else. It reads its JSON config at start and again on SIGHUP (the
# defender-agent sidecar sends one after each new config) and logs one JSON line per read with the
# config's "version" and the file's sha256, so a person or a test can tell which config runs.
#
#   stand-in [CONFIG_PATH]    default: $STAND_IN_CONFIG, else /var/run/ml-defender/config/config.json
#
# Environment: STAND_IN_NAME (logged as "component"; default: $HOSTNAME). SIGTERM/SIGINT end it
# with status 0. Runs on busybox sh (the stand-in image) or any POSIX sh with sed and sha256sum.
set -u
config="${1:-${STAND_IN_CONFIG:-/var/run/ml-defender/config/config.json}}"
name="${STAND_IN_NAME:-${HOSTNAME:-stand-in}}"

log() {
  printf '{"time":"%s","component":"%s",%s}\n' "$(date -u +%Y-%m-%dT%H:%M:%SZ)" "$name" "$1"
}

load() {
  if [ ! -f "$config" ]; then
    log "\"event\":\"waiting\",\"trigger\":\"$1\",\"reason\":\"no config file yet\""
    return
  fi
  # The agent writes indented JSON: the top-level "version" is on its own line, two spaces in.
  version=$(sed -n 's/^  "version": *"\([^"\\]*\)".*/\1/p' "$config" | head -n 1)
  digest=$(sha256sum "$config" | cut -d ' ' -f 1)
  if [ -z "$version" ]; then
    log "\"event\":\"bad_config\",\"trigger\":\"$1\",\"reason\":\"no top-level version\",\"sha256\":\"$digest\""
    return
  fi
  log "\"event\":\"loaded\",\"trigger\":\"$1\",\"version\":\"$version\",\"sha256\":\"$digest\""
}

if [ ! -c /dev/null ]; then
  # Background jobs read from /dev/null; without it the loop below would spin. Every container
  # runtime provides it, so its absence is a broken environment: say so and stop.
  log "\"event\":\"failed\",\"reason\":\"/dev/null is missing\""
  exit 1
fi
hup=0
trap 'hup=1' HUP
trap 'log "\"event\":\"stopping\""; exit 0' TERM INT
log "\"event\":\"started\",\"pid\":$$"
load start
while :; do
  # A trapped signal ends `wait` at once; the short sleep bounds the one race left (a SIGHUP
  # between the check and the wait) to two seconds.
  sleep 2 &
  wait $! || true
  kill $! 2>/dev/null || true
  if [ "$hup" = 1 ]; then
    hup=0
    load SIGHUP
  fi
done
