#!/usr/bin/env bash
# Installs the Debian packages metald's tests and demo need, when missing.
# Idempotent: does nothing (and needs no network) when all are present.
set -euo pipefail

need=()
have() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
for pkg in qemu-system-x86 busybox-static cpio e2fsprogs erofs-utils file lz4 prometheus nftables iproute2 \
  docker-registry skopeo umoci apache2-utils systemd; do
  have "$pkg" || need+=("$pkg")
done
if ! command -v npm >/dev/null 2>&1; then need+=(npm); fi

if [ ${#need[@]} -eq 0 ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
echo "installing Debian packages: ${need[*]}"
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
