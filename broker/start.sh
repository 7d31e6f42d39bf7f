#!/bin/sh
# Start Mosquitto in the eclipse-mosquitto container with broker/mosquitto.conf.
# The TLS listener (8883) is left out, with a note, while its certificate is
# missing, so the broker runs before `llm-bridge broker tls` was ever used.
# CONF_DIR and MOSQUITTO_OUT are for the tests; MOSQUITTO_DRY_RUN=1 only
# prints the configuration.
set -eu
conf_dir="${CONF_DIR:-/mosquitto/config}"
out="${MOSQUITTO_OUT:-/tmp/mosquitto.conf}"
drop=""
if [ ! -r "$conf_dir/certs/server.crt" ] || [ ! -r "$conf_dir/certs/server.key" ]; then
    echo "broker/start.sh: no $conf_dir/certs/server.crt: the TLS listener 8883 is off" >&2
    drop="8883"
fi
# A listener block runs from its `listener PORT` line to the next one (as in
# bridge/ops/brokerconf.py): keep every line except those of the dropped blocks.
awk -v drop=" $drop " '
    BEGIN { keep = 1 }
    /^[ \t]*listener[ \t]+[0-9]+/ { keep = index(drop, " " $2 " ") == 0 }
    keep
' "$conf_dir/mosquitto.conf" > "$out"
if [ "${MOSQUITTO_DRY_RUN:-0}" = 1 ]; then
    cat "$out"
    exit 0
fi
exec mosquitto -c "$out"
