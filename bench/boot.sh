#!/usr/bin/env bash
# bench/boot.sh -- boot benchmark of issue 3: CreateVm -> METALD_GUEST_READY through metald
# vs. the same QEMU command line started directly (A/B alternating, medians and ratio), and
# metald's RSS with 0 and 10 VMs. The work is done by benches/boot.rs; see its header for the
# METALD_BENCH_* knobs. Needs qemu-system-x86_64; builds the guest image if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo bench --bench boot "$@"
