#!/usr/bin/env bash
# Instructions per GetVmInfo call with telemetry disabled vs enabled (rate
# 1.0, OTLP export), counted by valgrind's callgrind: a figure that does not
# move with this shared machine's speed swings, beside the throughput ratio
# of `cargo bench --bench telemetry_overhead` (which does).
#
# Each side runs the telemetry_overhead bench binary twice, with N1 and N2
# calls; the difference divided by N2 - N1 is the cost of one call (client,
# server, span export and the in-process OTLP sink), with start-up (daemon
# start, 1,000 VMs seeded) cancelled out. Under the two-core saturation the
# bench measures, throughput goes as 1 / CPU per call, so
# disabled / enabled instructions estimates the throughput ratio.
#
# The counts are not exact to the instruction: how often the runtime's
# threads park and wake differs from run to run (about +-600 per call here),
# so the measurement is repeated (REPEAT, default 3) and the median printed
# with the range.
#
# Usage: bench/telemetry_instructions.sh   (env N1, N2: calls; defaults 1000, 3000; REPEAT)
set -euo pipefail
cd "$(dirname "$0")/.."

N1=${N1:-1000}
N2=${N2:-3000}
REPEAT=${REPEAT:-3}
command -v valgrind >/dev/null || { echo "needs valgrind (apt-get install valgrind)" >&2; exit 1; }

bin=$(cargo bench --bench telemetry_overhead --no-run --message-format=json 2>/dev/null |
  python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("executable") and m.get("target", {}).get("name") == "telemetry_overhead":
        print(m["executable"])')
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT

run() { # side calls
  METALD_BENCH_PROFILE=$1 METALD_BENCH_CALLS=$2 METALD_BENCH_ROUNDS=1 METALD_BENCH_CLIENTS=4 \
    valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bin" --bench >"$out/$1.$2.log" 2>&1
  sed -n 's/.*Collected : \([0-9]*\).*/\1/p' "$out/$1.$2.log"
}

: >"$out/results"
for r in $(seq "$REPEAT"); do
  line=""
  for side in disabled enabled; do
    run "$side" "$N1" >"$out/$side.a" &
    run "$side" "$N2" >"$out/$side.b" &
    wait
    a=$(cat "$out/$side.a") b=$(cat "$out/$side.b")
    line="$line $(( (b - a) / (N2 - N1) ))"
  done
  echo "$line" >>"$out/results"
done
python3 - "$out/results" "$N1" "$N2" <<'PY'
import statistics, sys
rows = [tuple(map(int, l.split())) for l in open(sys.argv[1]) if l.strip()]
d = statistics.median(r[0] for r in rows)
e = statistics.median(r[1] for r in rows)
extra = sorted(r[1] - r[0] for r in rows)
ratios = sorted(r[0] / r[1] for r in rows)
print(f"instructions per GetVmInfo call (client + server + export, callgrind, calls {sys.argv[2]} -> {sys.argv[3]}, "
      f"median of {len(rows)} runs):")
print(f"  disabled (baseline) {d:.0f}")
print(f"  enabled (rate 1.0)  {e:.0f}   telemetry +{statistics.median(extra):.0f} per call (runs: {extra})")
print(f"estimated throughput ratio enabled/disabled = {statistics.median(ratios):.3f} "
      f"(range {ratios[0]:.3f}..{ratios[-1]:.3f}; goal >= 0.9)")
PY
