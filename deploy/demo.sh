#!/usr/bin/env bash
# Runs keygate with config/example.toml in front of the stand-in SMS API on loopback,
# sends allowed and rejected requests with curl, prints each answer, and stops both.
set -euo pipefail
cd "$(dirname "$0")/.."

KEY_A=key_test_kb4UfsMTZfrpPJ-nmFrRGJNceCNtEc7o-7Rrwm7KI84   # campaign_5e1f2c4a, key "primary"
KEY_B=key_test_iqSwwEgKrLdFojP93p5V6zMuhmajASGdHT3kjIivKhE   # campaign_7b3d9e01, key "primary"
PROXY=http://127.0.0.1:8080
MESSAGES_A=$PROXY/api/v2/campaigns/campaign_5e1f2c4a/messages

# Pingora's build needs cmake, and the requests below are sent with curl.
missing=()
for tool in cmake curl; do
  command -v "$tool" >/dev/null 2>&1 || missing+=("$tool")
done
if [ "${#missing[@]}" -gt 0 ]; then
  echo "Installing ${missing[*]}..."
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
echo "Building keygate and the stand-in SMS API..."
cargo build --quiet --bin keygate --example sms_api

pids=()
logs=$(mktemp -d)
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$logs"
}
trap cleanup EXIT

wait_for_port() {
  for _ in $(seq 1 100); do
    # Any HTTP response will do, because a bare TCP probe would log a broken request.
    if curl --silent --output /dev/null "http://127.0.0.1:$1/"; then return 0; fi
    sleep 0.1
  done
  echo "Nothing responds on 127.0.0.1:$1. The logs:" >&2
  cat "$logs"/*.log >&2
  exit 1
}

for port in 8080 9000; do
  if (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "Port $port is already in use; stop what uses it and run this again." >&2
    exit 1
  fi
done

./target/debug/examples/sms_api 127.0.0.1:9000 2>"$logs/sms_api.log" &
pids+=($!)
./target/debug/keygate run --config config/example.toml >"$logs/keygate.log" 2>&1 &
pids+=($!)
wait_for_port 9000
wait_for_port 8080

show() {
  echo
  echo "# $1"
  shift
  echo "\$ curl --include $(printf '%q ' "$@")"
  curl --silent --show-error --include "$@" | tr -d '\r'
  echo
}

show "Allowed: campaign 5e1f2c4a's key from its allowed address 127.0.0.10" \
  --interface 127.0.0.10 -H "Authorization: Bearer $KEY_A" \
  -H 'Content-Type: application/json' -d '{"recipient":"+15550100"}' "$MESSAGES_A"
show "Rejected 403: the same request from an address on no allowlist" \
  --interface 127.0.0.1 -H "Authorization: Bearer $KEY_A" \
  -H 'Content-Type: application/json' -d '{"recipient":"+15550100"}' "$MESSAGES_A"
show "Rejected 401: no key" \
  --interface 127.0.0.10 -d '{"recipient":"+15550100"}' "$MESSAGES_A"
show "Rejected 401: an unknown key" \
  --interface 127.0.0.10 -H "Authorization: Bearer key_test_unknown" -d '{"recipient":"+15550100"}' "$MESSAGES_A"
show "Rejected 403: campaign 7b3d9e01's key used on campaign 5e1f2c4a's path" \
  --interface 127.0.0.20 -H "Authorization: Bearer $KEY_B" -d '{"recipient":"+15550100"}' "$MESSAGES_A"
show "Rejected 400: an encoded slash in the path" \
  --interface 127.0.0.10 --path-as-is -H "Authorization: Bearer $KEY_A" \
  "$PROXY/api/v2/campaigns/campaign_5e1f2c4a%2F..%2Fcampaign_7b3d9e01/messages"

echo
echo "# What the stand-in SMS API received under /api (only the allowed request):"
grep " /api/" "$logs/sms_api.log" || true
