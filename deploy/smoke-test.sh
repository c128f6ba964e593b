#!/usr/bin/env bash
# A three-broker cluster in Docker, tested for real: build the image, start it with
# compose, write with acks=all through a leader's loss and a broker cut off from the
# network, and read everything back. Skipped (exit 0, saying why) without Docker.
set -euo pipefail
cd "$(dirname "$0")"

if ! docker info >/dev/null 2>&1; then
    echo "deploy smoke test skipped: 'docker info' failed (no Docker engine reachable)"
    exit 0
fi
if docker compose version >/dev/null 2>&1; then
    compose_cmd=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
    compose_cmd=(docker-compose)
else
    echo "deploy smoke test skipped: neither 'docker compose' nor 'docker-compose' is installed"
    exit 0
fi

project="sluice-smoke-$$"
export SLUICE_IMAGE="sluice:smoke-$$"
compose() { "${compose_cmd[@]}" -p "$project" -f docker-compose.yml "$@"; }
cleanup() {
    compose down -v --remove-orphans >/dev/null 2>&1 || true
    docker image rm "$SLUICE_IMAGE" >/dev/null 2>&1 || true
}
trap cleanup EXIT

brokers=127.0.0.1:19201,127.0.0.1:19202,127.0.0.1:19203
sluice() { timeout 120 ../target/release/sluice --brokers "$brokers" "$@"; }
step() { echo "== $*"; }
fail() { echo "FAILED: $*" >&2; exit 1; }

# Waits (at most $1 seconds) until the command in the other arguments succeeds.
wait_until() {
    local limit=$1; shift
    local deadline=$((SECONDS + limit))
    until "$@" >/dev/null 2>&1; do
        ((SECONDS < deadline)) || return 1
        sleep 1
    done
}

container() { compose ps -q "broker$1"; }
healthy() {
    for i in 1 2 3; do
        [[ "$(docker inspect --format '{{.State.Health.Status}}' "$(container "$i")")" == healthy ]] || return 1
    done
}
# The topic's partition 0 as one line of JSON, from any broker that answers.
partition() { sluice --output json topic describe smoke | grep -o '"partitions":\[{[^]]*\][^}]*}'; }
# A field of it: a number, or a list printed sorted and comma-separated.
field() {
    partition | grep -o "\"$1\":\(\[[^]]*\]\|[0-9-]*\)" | cut -d: -f2 | tr -d '[]' \
        | tr ',' '\n' | sort -n | paste -sd, -
}
isr_is() { [[ "$(field isr)" == "$1" ]]; }
isr_size() { [[ "$(field isr | tr ',' '\n' | grep -c .)" == "$1" ]]; }

step "1. build the image (offline: host binaries, FROM scratch) and start three brokers"
./build-image.sh --offline
compose up -d
wait_until 120 healthy || fail "brokers not healthy within 120 s"

step "2. topic smoke: replication factor 3, min.insync.replicas=2; 10,000 records, acks=all"
sluice topic create smoke --partitions 1 --replication-factor 3 --config min.insync.replicas=2
wait_until 30 isr_is 1,2,3 || fail "new partition not in sync on all three"
seq 0 9999 | sluice produce smoke --acks all

step "3. kill the partition leader's container; 10,000 more with acks=all; restart it"
leader=$(field leader)
echo "leader is broker $leader"
compose kill "broker$leader"
seq 10000 19999 | sluice produce smoke --acks all
compose start "broker$leader"
wait_until 90 isr_is 1,2,3 || fail "broker $leader did not rejoin the ISR: $(partition)"

step "4. cut a follower off the network: the ISR shrinks, acks=all still works; reconnect"
leader=$(field leader)
follower=$(( leader % 3 + 1 ))
network="$(docker inspect --format '{{range $k, $v := .NetworkSettings.Networks}}{{$k}}{{end}}' "$(container "$follower")")"
echo "disconnecting broker $follower from $network"
docker network disconnect "$network" "$(container "$follower")"
wait_until 90 isr_size 2 || fail "ISR did not shrink: $(partition)"
seq 20000 20999 | sluice produce smoke --acks all
docker network connect --alias "broker$follower" "$network" "$(container "$follower")"
wait_until 90 isr_is 1,2,3 || fail "broker $follower did not rejoin the ISR: $(partition)"

step "5. read everything: 21,000 records, once each, in order"
got=$(sluice consume smoke --from-beginning --max-messages 21000 --timeout-ms 60000)
if ! diff <(seq 0 20999) <(printf '%s\n' "$got") >/dev/null; then
    diff <(seq 0 20999) <(printf '%s\n' "$got") | head -20 >&2 || true
    fail "read back $(printf '%s\n' "$got" | grep -c .) records, not 0..20999 in order"
fi
echo "deploy smoke test passed"
