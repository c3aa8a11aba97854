#!/usr/bin/env bash
# Starts metald from ./build with the guest image in ./build/guest as its asset
# directory, then creates and boots a demo VM through metaldctl and shows its
# console and info. metald keeps running in the background; stop it with
# `make demo-stop` (VMs are shut down and deleted first).
#
# Everything lives under ./.demo (data dir, tokens, log). Backend: QEMU when
# qemu-system-x86_64 exists (auto-detected), else metald refuses to start.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
DEMO=$ROOT/.demo
GUEST=$ROOT/build/guest
PORT=${METALD_DEMO_PORT:-8080}
BILLING_PORT=${METALD_DEMO_BILLING_PORT:-8081}
REGISTRY_PORT=${METALD_DEMO_REGISTRY_PORT:-8082}
METRICS_PORT=${METALD_DEMO_METRICS_PORT:-9464}
REGISTRY=127.0.0.1:$REGISTRY_PORT
ENDPOINT=http://127.0.0.1:$PORT
TOKEN=demo-token-0123456789
export METALD_ENDPOINT=$ENDPOINT METALD_TOKEN=$TOKEN
ctl() { "$ROOT/build/metaldctl" "$@"; }

stop() {
  if [ -f "$DEMO/metald.pid" ] && kill -0 "$(cat "$DEMO/metald.pid")" 2>/dev/null; then
    for id in $(ctl list --json 2>/dev/null | python3 -c 'import json,sys; print(" ".join(v["vm_id"] for v in json.load(sys.stdin)["vms"]))' 2>/dev/null); do
      ctl delete "$id" --force >/dev/null && echo "deleted VM $id"
    done
    sleep 3 # let the final batches and stop notices reach the billing service
    kill "$(cat "$DEMO/metald.pid")" && echo "metald stopped"
    rm -f "$DEMO/metald.pid"
    # The demo's host networking (a production metald keeps both across restarts).
    if [ -f "$DEMO/network" ]; then
      nft delete table inet metald 2>/dev/null && echo "nftables table inet metald removed"
      ip link del metald0 2>/dev/null && echo "gateway device metald0 removed"
      rm -f "$DEMO/network"
    fi
  else
    echo "metald (demo) is not running"
  fi
  if [ -f "$DEMO/registry.pid" ] && kill -0 "$(cat "$DEMO/registry.pid")" 2>/dev/null; then
    kill "$(cat "$DEMO/registry.pid")" && echo "demo registry stopped"
    rm -f "$DEMO/registry.pid"
  fi
  if [ -f "$DEMO/billing.pid" ] && kill -0 "$(cat "$DEMO/billing.pid")" 2>/dev/null; then
    sleep 1
    kill "$(cat "$DEMO/billing.pid")" && echo "billing server stopped"
    rm -f "$DEMO/billing.pid"
    ctl billing-report --db "$DEMO/billing.db" || true
  fi
}

if [ "${1:-}" = stop ]; then stop; exit 0; fi

if [ -f "$DEMO/metald.pid" ] && kill -0 "$(cat "$DEMO/metald.pid")" 2>/dev/null; then
  echo "a demo metald is already running (pid $(cat "$DEMO/metald.pid")); restarting it"
  stop
fi
mkdir -p "$DEMO"
echo "$TOKEN demo" > "$DEMO/tokens"
chmod 600 "$DEMO/tokens"

echo "==> starting the development billing service on 127.0.0.1:$BILLING_PORT (log: $DEMO/billing.log)"
setsid "$ROOT/build/metaldctl" billing-server --listen "127.0.0.1:$BILLING_PORT" --db "$DEMO/billing.db" \
  >"$DEMO/billing.log" 2>&1 < /dev/null &
echo $! > "$DEMO/billing.pid"

echo "==> starting a local OCI registry on $REGISTRY (Debian's docker-registry) with a demo image"
cat > "$DEMO/registry.yml" <<YML
version: 0.1
log:
  level: warn
storage:
  filesystem:
    rootdirectory: $DEMO/registry
http:
  addr: $REGISTRY
YML
setsid docker-registry serve "$DEMO/registry.yml" >"$DEMO/registry.log" 2>&1 < /dev/null &
echo $! > "$DEMO/registry.pid"
for _ in $(seq 1 100); do curl -fsS "http://$REGISTRY/v2/" >/dev/null 2>&1 && break; sleep 0.1; done
scripts/demo-image.sh "$DEMO/image-build" "$REGISTRY" demo/hello:v1
echo "    pushed $REGISTRY/demo/hello:v1"

echo "==> starting metald on $ENDPOINT (data: $DEMO/data, log: $DEMO/metald.log)"
UNKEY_METALD_ADDRESS=127.0.0.1 \
UNKEY_METALD_PORT=$PORT \
UNKEY_METALD_DATA_DIR=$DEMO/data \
UNKEY_METALD_ASSET_DIRS=$GUEST \
UNKEY_METALD_AUTH_TOKENS_FILE=$DEMO/tokens \
UNKEY_METALD_BACKEND=${UNKEY_METALD_BACKEND:-auto} \
UNKEY_METALD_BILLING_ENDPOINT=http://127.0.0.1:$BILLING_PORT \
UNKEY_METALD_BILLING_FLUSH_MS=5000 \
UNKEY_METALD_GUEST_KERNEL=$GUEST/vmlinux \
UNKEY_METALD_GUEST_INITRD=$GUEST/initramfs.cpio.gz \
UNKEY_METALD_IMAGE_INSECURE_REGISTRIES=$REGISTRY \
UNKEY_METALD_OTEL_ENABLED=true \
UNKEY_METALD_OTEL_PROMETHEUS_ADDRESS=127.0.0.1 \
UNKEY_METALD_OTEL_PROMETHEUS_PORT=$METRICS_PORT \
  setsid "$ROOT/build/metald" >"$DEMO/metald.log" 2>&1 < /dev/null &
echo $! > "$DEMO/metald.pid"
# The API answers at once; with the auto backend QEMU proves KVM with a probe
# guest in the background (on hosts where KVM is broken, nested, it waits out
# UNKEY_METALD_QEMU_PROBE_TIMEOUT_SECONDS, 20 s, once per host boot), and the
# first VM waits for that decision.
echo "    waiting for metald"
for _ in $(seq 1 600); do
  if curl -fsS "$ENDPOINT/_/health" >/dev/null 2>&1; then break; fi
  if ! kill -0 "$(cat "$DEMO/metald.pid")" 2>/dev/null; then
    echo "metald exited; its log:"; cat "$DEMO/metald.log"; exit 1
  fi
  sleep 0.1
done
curl -fsS "$ENDPOINT/_/health"; echo

NET=()
if curl -fsS "$ENDPOINT/_/health" | grep -q '"network":"ok"'; then
  NET=(--port 0:80)
  touch "$DEMO/network"
  echo "==> creating and booting a demo VM with a network: its HTTP server on port 80 mapped to a host port"
else
  echo "==> host networking is not available here (see network_detail above); the demo VM gets no network"
fi
ID=demo-$(date +%s)
ctl create --id "$ID" --vcpus 1 --memory-mb 256 \
  --kernel "$GUEST/vmlinux" --initrd "$GUEST/initramfs.cpio.gz" \
  --kernel-args "console=ttyS0 quiet metald.httpd=80" --meta purpose=demo "${NET[@]}"
ctl boot "$ID"
CONSOLE=$(ctl info "$ID" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["backendInfo"]["console_log"])')
echo "==> waiting for the guest (console: $CONSOLE)"
for _ in $(seq 1 600); do
  if grep -q METALD_GUEST_READY "$CONSOLE" 2>/dev/null; then break; fi
  sleep 0.1
done
grep -m1 METALD_GUEST_READY "$CONSOLE" || { echo "guest did not come up; console:"; tail -20 "$CONSOLE"; exit 1; }
sleep 1
ctl info "$ID"
ctl list
if [ ${#NET[@]} -gt 0 ]; then
  HOST_PORT=$(ctl info "$ID" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["networkInfo"]["portMappings"][0]["hostPort"])')
  grep -m1 METALD_NET_UP "$CONSOLE" || true
  echo "==> the guest's web server through its port mapping: curl http://127.0.0.1:$HOST_PORT/"
  ok=""
  for _ in $(seq 1 50); do
    if out=$(curl -fsS -m 2 "http://127.0.0.1:$HOST_PORT/" 2>/dev/null); then ok=1; echo "$out"; break; fi
    sleep 0.2
  done
  [ -n "$ok" ] || { echo "the guest did not answer on port $HOST_PORT"; exit 1; }
fi
IMG=img-$(date +%s)
IMG_NET=()
[ ${#NET[@]} -gt 0 ] && IMG_NET=(--port 0:8080)
echo "==> running a container image as a VM: metaldctl create --image $REGISTRY/demo/hello:v1 --env GREETING=hi ${IMG_NET[*]} -- from-the-demo"
ctl create --id "$IMG" --vcpus 1 --memory-mb 256 --image "$REGISTRY/demo/hello:v1" --env GREETING=hi "${IMG_NET[@]}" \
  -- from-the-demo
ctl boot "$IMG"
IMG_CONSOLE=$(ctl info "$IMG" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["backendInfo"]["console_log"])')
for _ in $(seq 1 600); do
  if grep -q "hello from a container image" "$IMG_CONSOLE" 2>/dev/null; then break; fi
  sleep 0.1
done
grep -m1 "hello from a container image" "$IMG_CONSOLE" || { echo "the image's workload did not start; console:"; tail -20 "$IMG_CONSOLE"; exit 1; }
ctl info "$IMG"
if [ ${#IMG_NET[@]} -gt 0 ]; then
  IMG_PORT=$(ctl info "$IMG" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["networkInfo"]["portMappings"][0]["hostPort"])')
  echo "==> the image's web server through its port mapping: curl http://127.0.0.1:$IMG_PORT/"
  ok=""
  for _ in $(seq 1 50); do
    if out=$(curl -fsS -m 2 "http://127.0.0.1:$IMG_PORT/" 2>/dev/null); then ok=1; echo "$out"; break; fi
    sleep 0.2
  done
  [ -n "$ok" ] || { echo "the image's workload did not answer on port $IMG_PORT"; exit 1; }
fi
echo "==> billing: samples every 100 ms, sent every 5 s; waiting for the first batch"
sleep 6
ctl billing-report --db "$DEMO/billing.db"
# Telemetry: OpenTelemetry is on; its Prometheus endpoint serves metald's metrics (the spec's
# metald_vm_operations_total, per-VM billing counters, RPC/HTTP and process metrics). Traces
# and metrics are also pushed over OTLP to localhost:4318 when a collector listens there.
HOST_ID=$(ctl info "$ID" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["backendInfo"]["host_id"])')
METRICS=http://127.0.0.1:$METRICS_PORT/metrics
echo "==> telemetry: curl -s $METRICS | grep -E 'vm_id=\"$HOST_ID\"|metald_vm_operations_total'"
curl -fsS "$METRICS" | grep -E "vm_id=\"$HOST_ID\"|^metald_vm_operations_total\{.*operation=\"(create|boot)\"|^metald_vm_stops_total" \
  || { echo "no metrics for the demo VM at $METRICS"; exit 1; }
cat <<TXT

metald is running (pid $(cat "$DEMO/metald.pid")), with VM $ID and image VM $IMG booted.
Try:
  export METALD_ENDPOINT=$ENDPOINT METALD_TOKEN=$TOKEN
  ./build/metaldctl pause $ID && ./build/metaldctl resume $ID
  ./build/metaldctl suspend $ID && ./build/metaldctl resume $ID    # to disk and back: its ticks go on
  ./build/metaldctl snapshot $ID --name warm && ./build/metaldctl create --from-snapshot warm   # a clone
  ./build/metaldctl shutdown $ID && ./build/metaldctl boot $ID
  ./build/metaldctl shutdown $IMG && ./build/metaldctl info $IMG     # the workload got SIGTERM: its exit
  ./build/metaldctl create --image $REGISTRY/demo/hello:v1 -- other args   # the cached image: no pull
  tail -f $CONSOLE
  ./build/metaldctl billing-report --db $DEMO/billing.db   # usage the billing service received
  ./build/metaldctl console $ID --follow                   # the guest's serial console, live
  curl -s $METRICS                   # Prometheus metrics (docs/METRICS.md); demo VM: vm_id="$HOST_ID"
Stop everything with: make demo-stop
TXT
