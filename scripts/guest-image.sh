#!/usr/bin/env bash
# guest-image.sh OUT_DIR -- build the metald test guest from Debian packages.
#
# Outputs (in OUT_DIR):
#   bzImage            /boot/vmlinuz-* of the package that linux-image-cloud-amd64 depends on
#                      (an LZ4-compressed bzImage; QEMU -kernel, Cloud Hypervisor).
#   vmlinux            the uncompressed ELF 64-bit vmlinux extracted from it the way the kernel's
#                      scripts/extract-vmlinux does (Firecracker; QEMU microvm boots it via PVH).
#   initramfs.cpio.gz  busybox-static + the virtio/ACPI-button/evdev modules of the SAME kernel
#                      + the guest init described below + /metald-init (~3 MB).
#   rootfs.ext4        32 MiB ext4 (made with mkfs.ext4 -d, no mounting) with the same content.
#   guest-image.stamp  first line: cache key; then kernel release, package, module order.
#
# Cache: if all outputs exist and the stamp's first line matches (script version + hash of this
# file + requested kernel package + hash of metald-init's sources), the script exits at once.
# METALD_GUEST_FORCE=1 rebuilds.
# METALD_GUEST_KERNEL_PKG overrides the kernel (meta) package, METALD_GUEST_MODULES the module list. Concurrent runs serialise on
# OUT_DIR/.guest-image.lock; outputs are moved into place only when all are built.
# Host needs: apt-get (download only; the kernel is never installed), dpkg-deb, lz4 and
# mkfs.ext4 (e2fsprogs) -- installed with apt-get if missing (printed) -- gzip, grep, flock, and
# cargo (the project's toolchain) for metald-init.
#
# metald-init (the init/ crate, docs/IMAGES.md "Guest init"): built here with
#   RUSTFLAGS="-C target-feature=+crt-static" cargo build --locked --profile guest-init \
#     -p metald-init --target x86_64-unknown-linux-gnu --target-dir build/init-target
# (static glibc: no musl target on these machines; its own target dir so the daemon's build is
# not invalidated; METALD_INIT_TARGET_DIR overrides it) and checked to be static. It goes to
# /metald-init in the initramfs only, and runs INSTEAD of the busybox init below when the kernel
# command line says rdinit=/metald-init. It loads /etc/metald/modules, then the lists
# /etc/metald/modules-overlay (overlay) and, for an erofs base, /etc/metald/modules-erofs.
#
# Kernel facts: Debian's cloud kernel has EXT4 and the 8250 serial console built in but ALL virtio
# drivers, the ACPI button driver and evdev as modules, so a guest always needs the initramfs:
#   -kernel bzImage|vmlinux -initrd initramfs.cpio.gz -append "console=ttyS0 ..."
# Under QEMU TCG also pass tsc_early_khz=<host TSC kHz> (from /proc/cpuinfo "cpu MHz" * 1000),
# otherwise ~1 boot in 10 hangs calibrating the TSC. `quiet` keeps the console readable and
# `cryptomgr.notests` saves ~0.4 s under TCG. Verified QEMU (7.2, TCG) command line:
#   qemu-system-x86_64 -M microvm -accel tcg,tb-size=64 -m 256 -smp 1 -nodefaults -no-user-config
#     -display none -serial file:console.log -kernel OUT/vmlinux -initrd OUT/initramfs.cpio.gz
#     -append "console=ttyS0 tsc_early_khz=$KHZ quiet cryptomgr.notests"
#     -qmp unix:qmp.sock,server,nowait -S
# (vmlinux boots via PVH in ~1.7-2.5 s; bzImage works too but is ~0.5 s slower and after
# system_reset sometimes 3-7 s slower under TCG. Do not use -no-reboot: it turns a reboot into an
# exit. Keep microvm's rtc on: rtc=off adds ~2 s.)
#
# Guest behaviour (initramfs /init, then busybox init with /etc/inittab and /etc/metald/*):
#   * mounts proc, sys, devtmpfs; insmods the modules in dependency order (list in
#     /etc/metald/modules; overlay/erofs are staged too but only metald-init loads them; the .deb has no modules.dep, the order is computed here from each
#     .ko's "depends=" modinfo field).
#   * Root switch: if the kernel command line has metald.root=/dev/XXX (or root=/dev/XXX), /init
#     waits up to 10 s for that block device, mounts it as ext4 (rw unless `ro` is given) and
#     switch_root's into it; its /sbin/init runs the same logic. If the device never shows up it
#     prints "METALD_GUEST_ERROR root device ... not found" and stays on the initramfs.
#     E.g. QEMU microvm: -drive id=root,file=rootfs.ext4,format=raw,if=none
#                        -device virtio-blk-device,drive=root  + append "metald.root=/dev/vda rw"
#   * Console (ttyS0 via /dev/console) lines, each on its own line:
#       METALD_GUEST_ROOT=initramfs | METALD_GUEST_ROOT=ext4
#       METALD_BOOT_COUNT=<n>          (ext4 root mounted rw only; persisted on the disk)
#       METALD_NET_UP <iface> <cidr>   (with metald.ip=)
#       METALD_GUEST_READY             (userspace is up)
#       METALD_TICK <n>                (every second, or metald.tick=S, from then on, n = 1, 2, ...)
#       METALD_TICKFILE <lines>        (with metald.tickfile=)
#       METALD_RESEED <16 hex digits>  (a clone took its new generation: see metald-init below)
#       METALD_GUEST_SHUTDOWN_REASON=<power-button|ctrl-alt-del|poweroff_after|reboot_after>
#       METALD_GUEST_POWEROFF          (always printed right before `poweroff -f`; with
#                                      metald.stop=reboot, Firecracker's, `reboot -f` instead: it
#                                      has no power-off device and a reboot=k reboot ends it)
#       METALD_GUEST_REBOOT            (printed before `reboot -f`)
#   * ACPI power button (QEMU system_powerdown, microvm GED -> PNP0C0C): button.ko + evdev.ko
#     give a "Power Button" /dev/input/eventN; a watcher blocks reading one event from it and then
#     powers off. Ctrl-Alt-Del (Firecracker SendCtrlAltDel, i8042 built in): busybox init gets
#     SIGINT and runs ::ctrlaltdel:, which powers off. QEMU system_reset simply reboots the guest.
#   * Kernel command line options:
#       metald.burn=N            start N busy loops (`while :; do :; done &`), N=1 usual
#       metald.tick=S            seconds between ticks (default 1; fractions work: 0.05)
#       metald.tickfile=PATH     also append each tick's number to PATH (synced) and print
#                                METALD_TICKFILE <lines in PATH> after each tick (a tick whose
#                                append fails, e.g. on a root remounted read-only, is not printed)
#       metald.poweroff_after=S  power off by itself after S seconds
#       metald.reboot_after=S    reboot by itself after S seconds
#       metald.ip=CIDR metald.gw=IP metald.iface=eth0   static network config (virtio-net)
#       metald.net=MAC,IP4/LEN,GW4,IP6/LEN,GW6   (repeatable) what metald leased a managed NIC;
#                                the interface is found by MAC; prints METALD_NET_UP <if> <ip4> <ip6>
#       metald.dns=A,B           nameservers for /etc/resolv.conf
#       metald.ping=IP[,IP]      print METALD_PING <ip> ok|fail every second for a minute
#       metald.tcp=IP:PORT[,..]  print METALD_TCP <ip:port> ok <answer>|fail likewise
#       metald.spoofmac=MAC      take another MAC after network setup (anti-spoofing tests)
#       metald.spoof=SRC@IP      every second an ICMP echo to IP from SRC (not leased):
#                                METALD_SPOOF_SENT <n>
#       metald.httpd=PORT        busybox httpd on PORT serving /srv/www (index.html = "metald-guest")
#       metald.sink=PORT         TCP server (busybox nc -ll): reads to the end of the stream, answers
#                                the byte count; console: METALD_SINK <bytes>
#       metald.source=PORT       TCP server: reads a byte count N (one line), sends N zero bytes and
#                                closes; console: METALD_SOURCE <bytes>   (rate-limit tests)
set -euo pipefail

SCRIPT_VERSION=1
KERNEL_META=${METALD_GUEST_KERNEL_PKG:-linux-image-cloud-amd64}
ROOTFS_MB=32
# Modules the guest loads (their dependencies are added automatically). Each insmod costs
# ~15-20 ms under TCG; add e.g. vmw_vsock_virtio_transport virtio_rng if needed. virtio_console
# carries a clone's new generation (metald's org.metald.generation port, docs/SNAPSHOTS.md).
WANT_MODULES=${METALD_GUEST_MODULES:-virtio_mmio virtio_pci virtio_blk virtio_net virtio_console button evdev}
# Modules only metald-init loads (image guests): the overlay root, and erofs for an erofs base.
IMAGE_MODULES="overlay erofs"
TARGET_TRIPLE=x86_64-unknown-linux-gnu

log() { echo "guest-image: $*" >&2; }
die() { echo "guest-image: ERROR: $*" >&2; exit 1; }

[[ $# -eq 1 && -n $1 ]] || die "usage: $0 OUT_DIR"
mkdir -p "$1"
OUT=$(cd "$1" && pwd)
SELF=$(readlink -f "${BASH_SOURCE[0]}")
REPO=$(cd "$(dirname "$SELF")/.." && pwd)
INIT_TARGET_DIR=${METALD_INIT_TARGET_DIR:-$REPO/build/init-target}
# metald-init's inputs: its crate, the lock file, the root manifest (workspace, profile).
INIT_HASH=$(cd "$REPO" && find init -type f \( -name '*.rs' -o -name Cargo.toml \) -print0 | LC_ALL=C sort -z |
  xargs -0 cat Cargo.toml Cargo.lock | sha256sum | cut -c1-16)
STAMP_KEY="metald-guest-image v$SCRIPT_VERSION script=$(sha256sum "$SELF" | cut -c1-16) kernel=$KERNEL_META modules=${WANT_MODULES//[$'\n\t ']/,} init=$INIT_HASH"
OUTPUTS=(bzImage vmlinux initramfs.cpio.gz rootfs.ext4)

up_to_date() {
  [[ -z ${METALD_GUEST_FORCE:-} ]] || return 1
  local f
  for f in "${OUTPUTS[@]}"; do [[ -s $OUT/$f ]] || return 1; done
  [[ -f $OUT/guest-image.stamp && "$(head -n1 "$OUT/guest-image.stamp")" == "$STAMP_KEY" ]]
}
if up_to_date; then log "up to date in $OUT"; exit 0; fi

exec 9>"$OUT/.guest-image.lock"
flock 9
if up_to_date; then log "up to date in $OUT (built concurrently)"; exit 0; fi
T0=$SECONDS

WORK=$(mktemp -d "${TMPDIR:-/tmp}/metald-guest.XXXXXX")
trap 'rm -rf "$WORK"' EXIT

# ---------------------------------------------------------------- host tools
APT_UPDATED=
apt_update_once() {
  [[ -z $APT_UPDATED ]] || return 0
  APT_UPDATED=1
  log "running apt-get update"
  apt-get update -qq >&2 || log "apt-get update failed"
}
need_tool() { # need_tool COMMAND DEBIAN_PACKAGE
  command -v "$1" >/dev/null 2>&1 && return 0
  log "installing host package $2 (for $1)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -qq --no-install-recommends "$2" >&2 ||
    { apt_update_once; apt-get install -y -qq --no-install-recommends "$2" >&2; } ||
    die "cannot install $2"
  command -v "$1" >/dev/null 2>&1 || die "$1 still missing after installing $2"
}
export PATH="$PATH:/usr/sbin:/sbin"
need_tool lz4 lz4
need_tool mkfs.ext4 e2fsprogs
need_tool file file
command -v cargo >/dev/null || die "cargo not found (metald-init is built with the project's Rust toolchain)"
for t in apt-get apt-cache dpkg-deb gzip grep flock sha256sum od; do
  command -v "$t" >/dev/null || die "missing host tool $t"
done

# ---------------------------------------------------------------- download
resolve_kernel_pkg() {
  if [[ $KERNEL_META =~ ^linux-image-[0-9] ]]; then echo "$KERNEL_META"; return; fi
  apt-cache depends "$KERNEL_META" 2>/dev/null |
    awk '$1 ~ /Depends:$/ && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}
KPKG=$(resolve_kernel_pkg)
if [[ -z $KPKG ]]; then apt_update_once; KPKG=$(resolve_kernel_pkg); fi
[[ -n $KPKG ]] || die "cannot resolve the kernel package behind $KERNEL_META (apt-cache depends)"

APT_OPTS=()
[[ $EUID -eq 0 ]] && APT_OPTS=(-o APT::Sandbox::User=root)
mkdir -p "$WORK/debs"
download() {
  (cd "$WORK/debs" && apt-get download -qq "${APT_OPTS[@]}" "$@" >&2)
}
log "downloading $KPKG busybox-static"
download "$KPKG" busybox-static || { apt_update_once; download "$KPKG" busybox-static; } ||
  die "apt-get download $KPKG busybox-static failed"
KDEB=$(ls "$WORK"/debs/"${KPKG}"_*.deb)
BDEB=$(ls "$WORK"/debs/busybox-static_*.deb)
KVER=$(dpkg-deb -f "$KDEB" Version)
BVER=$(dpkg-deb -f "$BDEB" Version)

mkdir -p "$WORK/k" "$WORK/bb"
dpkg-deb -x "$KDEB" "$WORK/k"
dpkg-deb -x "$BDEB" "$WORK/bb"
BUSYBOX=$WORK/bb/bin/busybox
[[ -x $BUSYBOX ]] || die "busybox not found in $BDEB"

VMLINUZ=$(find "$WORK/k/boot" -name 'vmlinuz-*' 2>/dev/null | head -n1)
[[ -n $VMLINUZ ]] || die "no /boot/vmlinuz-* in $KDEB"
KREL=${VMLINUZ##*/vmlinuz-}
MODDIR=$WORK/k/lib/modules/$KREL
[[ -d $MODDIR ]] || die "no lib/modules/$KREL in $KDEB"
log "kernel $KPKG $KVER (release $KREL), busybox-static $BVER"

mkdir -p "$WORK/out"
cp "$VMLINUZ" "$WORK/out/bzImage"

# ---------------------------------------------------------------- vmlinux (extract-vmlinux)
is_elf64() { [[ "$(od -An -tx1 -N5 "$1" | tr -d ' \n')" == 7f454c4602 ]]; }
extract_vmlinux() { # like scripts/extract-vmlinux: try each LZ4 (legacy) magic offset
  local img=$1 out=$2 off
  # shellcheck disable=SC2013 # offsets are plain numbers
  for off in $(LC_ALL=C grep -obUaP '\x02\x21\x4c\x18' "$img" | cut -d: -f1); do
    tail -c "+$((off + 1))" "$img" | lz4 -dc >"$out" 2>/dev/null || true
    if [[ -s $out ]] && is_elf64 "$out"; then
      log "vmlinux: LZ4 payload at offset $off"
      return 0
    fi
  done
  return 1
}
extract_vmlinux "$WORK/out/bzImage" "$WORK/out/vmlinux" ||
  die "could not extract an ELF vmlinux from $VMLINUZ (not LZ4-compressed?)"

# ---------------------------------------------------------------- modules
declare -A MODFILE=() MODSTATE=()
while IFS= read -r f; do
  b=${f##*/}; b=${b%%.ko*}; MODFILE[${b//-/_}]=$f
done < <(find "$MODDIR/kernel" -name '*.ko' -o -name '*.ko.xz' -o -name '*.ko.zst' -o -name '*.ko.gz')
BUILTIN=" $(sed -e 's#.*/##' -e 's#\.ko$##' -e 's#-#_#g' "$MODDIR/modules.builtin" 2>/dev/null | tr '\n' ' ') "
MODSTAGE=$WORK/modules
mkdir -p "$MODSTAGE"
MODORDER=()
stage_module() { # decompress/copy module $1 to $MODSTAGE/$1.ko
  local m=$1 f=${MODFILE[$1]}
  case $f in
    *.ko) cp "$f" "$MODSTAGE/$m.ko" ;;
    *.ko.xz) xz -dc "$f" >"$MODSTAGE/$m.ko" ;;
    *.ko.zst) need_tool zstd zstd; zstd -qdc "$f" >"$MODSTAGE/$m.ko" ;;
    *.ko.gz) gzip -dc "$f" >"$MODSTAGE/$m.ko" ;;
  esac
}
visit_module() {
  local m=${1//-/_} deps d
  case ${MODSTATE[$m]:-} in "done") return 0 ;; busy) die "module dependency cycle at $m" ;; esac
  if [[ -z ${MODFILE[$m]:-} ]]; then
    [[ $BUILTIN == *" $m "* ]] && { MODSTATE[$m]="done"; return 0; }
    die "module $m is neither a .ko in $KPKG nor built in"
  fi
  MODSTATE[$m]=busy
  stage_module "$m"
  deps=$(tr '\0' '\n' <"$MODSTAGE/$m.ko" | LC_ALL=C grep -a -m1 '^depends=' | cut -d= -f2- || true)
  for d in ${deps//,/ }; do visit_module "$d"; done
  MODSTATE[$m]="done"
  MODORDER+=("$m")
}
for m in $WANT_MODULES; do visit_module "$m"; done
log "module order: ${MODORDER[*]}"
# Each image module's own list: what it needs beyond the base modules, dependencies first.
declare -A IMAGE_ORDER=()
for m in $IMAGE_MODULES; do
  n=${#MODORDER[@]}
  visit_module "$m"
  IMAGE_ORDER[$m]="${MODORDER[*]:$n}"
  log "module order for $m: ${IMAGE_ORDER[$m]}"
done
MODORDER=("${MODORDER[@]:0:$((${#MODORDER[@]} - $(echo "${IMAGE_ORDER[*]}" | wc -w)))}")

# ---------------------------------------------------------------- metald-init
log "building metald-init (static) in $INIT_TARGET_DIR"
(
  cd "$REPO"
  unset CARGO_ENCODED_RUSTFLAGS CARGO_BUILD_TARGET CARGO_TARGET_DIR
  RUSTFLAGS="-C target-feature=+crt-static" cargo build --locked --quiet --profile guest-init \
    -p metald-init --target "$TARGET_TRIPLE" --target-dir "$INIT_TARGET_DIR" >&2
) || die "cargo build of metald-init failed"
INIT_BIN=$INIT_TARGET_DIR/$TARGET_TRIPLE/guest-init/metald-init
file -b "$INIT_BIN" | grep -q 'static' || die "$INIT_BIN is not statically linked: $(file -b "$INIT_BIN")"

# ---------------------------------------------------------------- guest tree
make_tree() { # make_tree DIR ROOTKIND
  local r=$1 kind=$2 a
  mkdir -p "$r"/{bin,sbin,usr/bin,usr/sbin,dev,proc,sys,run,tmp,root,newroot,mnt,var/lib}
  mkdir -p "$r/etc/metald" "$r/lib/modules/$KREL" "$r/srv/www"
  chmod 1777 "$r/tmp"
  cp "$BUSYBOX" "$r/bin/busybox"
  for a in $("$BUSYBOX" --list-full); do
    [[ -e $r/$a ]] || ln -s /bin/busybox "$r/$a"
  done
  cp "$MODSTAGE"/*.ko "$r/lib/modules/$KREL/"
  printf '%s\n' "${MODORDER[@]}" >"$r/etc/metald/modules"
  for a in $IMAGE_MODULES; do
    printf '%s\n' ${IMAGE_ORDER[$a]} >"$r/etc/metald/modules-$a"
  done
  # Both trees: the busybox init runs `metald-init generation` too (fresh randomness for clones).
  cp "$INIT_BIN" "$r/metald-init"
  echo "$kind" >"$r/etc/metald/rootkind"
  echo "$KREL" >"$r/etc/metald/kernel-release"
  echo metald-guest >"$r/etc/hostname"
  echo metald-guest >"$r/srv/www/index.html"
  echo 'root:x:0:0:root:/root:/bin/sh' >"$r/etc/passwd"
  echo 'root:x:0:' >"$r/etc/group"

  cat >"$r/etc/inittab" <<'EOF'
::sysinit:/etc/metald/rc
::once:/etc/metald/ticker
::ctrlaltdel:/etc/metald/poweroff ctrl-alt-del
::shutdown:/bin/sync
EOF

  cat >"$r/etc/metald/lib.sh" <<'EOF'
# sourced by the metald guest scripts
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
CMDLINE=$(cat /proc/cmdline 2>/dev/null)
# param NAME -> prints the value of NAME=VALUE (or 1 for a bare NAME), fails if absent
param() {
  local a v='' found=1
  set -f
  for a in $CMDLINE; do
    case "$a" in "$1="*) v=${a#*=}; found=0 ;; "$1") v=1; found=0 ;; esac
  done
  set +f
  [ $found = 0 ] && echo "$v"
  return $found
}
early_mounts() {
  [ -e /proc/self ] || mount -t proc proc /proc
  CMDLINE=$(cat /proc/cmdline)
  [ -d /sys/kernel ] || mount -t sysfs sysfs /sys
  grep -q ' /dev devtmpfs ' /proc/mounts || mount -t devtmpfs devtmpfs /dev
  mkdir -p /dev/pts /dev/shm
  grep -q ' /dev/pts ' /proc/mounts || mount -t devpts devpts /dev/pts
  grep -q ' /run ' /proc/mounts || mount -t tmpfs -o mode=755 tmpfs /run
}
load_modules() {
  local m dir
  dir=/lib/modules/$(uname -r)
  [ -d "$dir" ] || echo "METALD_GUEST_ERROR no modules for kernel $(uname -r) (built for $(cat /etc/metald/kernel-release))"
  for m in $(cat /etc/metald/modules); do # one plain name a line
    [ -d "/sys/module/$m" ] && continue
    insmod "$dir/$m.ko" || echo "METALD_GUEST_ERROR insmod $m failed"
  done
}
EOF

  cat >"$r/init" <<'EOF'
#!/bin/sh
# metald initramfs /init: mounts, modules, optional switch_root into an ext4 root.
. /etc/metald/lib.sh
early_mounts
exec </dev/console >/dev/console 2>&1
load_modules
root=$(param metald.root || param root || true)
case "$root" in
  /dev/*)
    i=0
    while [ ! -b "$root" ] && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    if [ -b "$root" ]; then
      mode=rw; param ro >/dev/null && mode=ro
      fstype=$(param rootfstype || echo ext4)
      if mount -t "$fstype" -o "$mode" "$root" /newroot && [ -x /newroot/sbin/init ]; then
        for d in dev proc sys run; do mount --move /$d /newroot/$d; done
        exec switch_root /newroot /sbin/init
      fi
      echo "METALD_GUEST_ERROR cannot mount root $root"
      umount /newroot 2>/dev/null
    else
      echo "METALD_GUEST_ERROR root device $root not found"
    fi ;;
esac
exec /sbin/init
EOF

  cat >"$r/etc/metald/rc" <<'EOF'
#!/bin/sh
# busybox init ::sysinit: -- runs on the initramfs and on the ext4 root alike.
. /etc/metald/lib.sh
early_mounts
load_modules
hostname -F /etc/hostname
ip link set lo up 2>/dev/null
kind=$(cat /etc/metald/rootkind)
echo "METALD_GUEST_ROOT=$kind"
if [ "$kind" = ext4 ] && grep -q ' / ext4 rw' /proc/mounts; then
  n=$(cat /var/lib/metald-boot-count 2>/dev/null || echo 0)
  n=$((n + 1)); echo "$n" >/var/lib/metald-boot-count; sync
  echo "METALD_BOOT_COUNT=$n"
fi
# ACPI power button (button.ko registers an input device named "Power Button").
for i in /sys/class/input/input*; do
  [ "$(cat "$i/name" 2>/dev/null)" = "Power Button" ] || continue
  for e in "$i"/event*; do
    [ -e "$e" ] || continue
    ( dd if="/dev/input/${e##*/}" of=/dev/null bs=24 count=1 2>/dev/null &&
      exec /etc/metald/poweroff power-button ) &
  done
done
if ip=$(param metald.ip); then
  ifc=$(param metald.iface || echo eth0)
  i=0; while [ ! -e "/sys/class/net/$ifc" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
  if ip addr add "$ip" dev "$ifc" && ip link set "$ifc" up; then
    gw=$(param metald.gw) && ip route add default via "$gw"
    echo "METALD_NET_UP $ifc $ip"
  else
    echo "METALD_GUEST_ERROR network setup of $ifc failed"
  fi
fi
# metald-managed NICs: metald.net=<mac>,<ipv4>/<len>,<gw4>,<ipv6>/<len>,<gw6> (one per NIC,
# parts empty when absent), matched to the interface by MAC; metald.dns=<a>,<b>.
nets=''
set -f
for a in $CMDLINE; do
  case "$a" in metald.net=*) nets="$nets ${a#metald.net=}" ;; esac
done
set +f
for a in $nets; do
  IFS=, read -r mac ip4 gw4 ip6 gw6 <<NET
$a
NET
  ifc=''; i=0
  while [ -z "$ifc" ] && [ $i -lt 50 ]; do
    for d in /sys/class/net/*; do
      [ "$(cat "$d/address" 2>/dev/null)" = "$mac" ] && ifc=${d##*/}
    done
    [ -n "$ifc" ] || { sleep 0.1; i=$((i + 1)); }
  done
  if [ -z "$ifc" ]; then
    echo "METALD_GUEST_ERROR no interface with MAC $mac (have: $(cat /sys/class/net/*/address 2>/dev/null | tr '\n' ' '))"
    continue
  fi
  echo 0 >"/proc/sys/net/ipv6/conf/$ifc/accept_dad" 2>/dev/null
  ip link set "$ifc" up
  ok=1
  if [ -n "$ip4" ]; then
    ip addr add "$ip4" dev "$ifc" || ok=0
    [ -n "$gw4" ] && { ip route add default via "$gw4" dev "$ifc" 2>/dev/null || true; }
  fi
  if [ -n "$ip6" ]; then
    ip -6 addr add "$ip6" dev "$ifc" || ok=0
    [ -n "$gw6" ] && { ip -6 route add default via "$gw6" dev "$ifc" 2>/dev/null || true; }
  fi
  if [ $ok = 1 ]; then echo "METALD_NET_UP $ifc ${ip4:--} ${ip6:--}"; else echo "METALD_GUEST_ERROR network setup of $ifc failed"; fi
done
# Spoofing probes for the network tests: take another MAC, or send from an address not leased.
if mac=$(param metald.spoofmac); then
  ip link set eth0 down; ip link set eth0 address "$mac"; ip link set eth0 up
  echo "METALD_SPOOFMAC $mac"
fi
if s=$(param metald.spoof); then
  src=${s%@*}; dst=${s#*@}
  ip addr add "$src/32" dev eth0
  ( i=0; while [ $i -lt 60 ]; do
      ping -c 1 -W 1 -I "$src" "$dst" >/dev/null 2>&1
      echo "METALD_SPOOF_SENT $i"
      i=$((i + 1)); sleep 1
    done ) &
fi
if dns=$(param metald.dns); then
  : >/etc/resolv.conf
  for s in $(echo "$dns" | tr , ' '); do echo "nameserver $s" >>/etc/resolv.conf; done
fi
if port=$(param metald.httpd); then httpd -p "$port" -h /srv/www; fi
if port=$(param metald.sink); then nc -ll -p "$port" -e /etc/metald/sink & fi
if port=$(param metald.source); then nc -ll -p "$port" -e /etc/metald/source & fi
# Reachability probes for the network tests, once a second for a minute:
#   metald.ping=IP[,IP...]        -> METALD_PING <ip> ok|fail
#   metald.tcp=IP:PORT[,...]      -> METALD_TCP <ip:port> ok <first line of the answer> | fail
if targets=$(param metald.ping); then
  ( i=0; while [ $i -lt 60 ]; do
      for t in $(echo "$targets" | tr , ' '); do
        if ping -c 1 -W 1 "$t" >/dev/null 2>&1; then echo "METALD_PING $t ok"; else echo "METALD_PING $t fail"; fi
      done
      i=$((i + 1)); sleep 1
    done ) &
fi
if targets=$(param metald.tcp); then
  ( i=0; while [ $i -lt 60 ]; do
      for t in $(echo "$targets" | tr , ' '); do
        if a=$(echo probe | nc -w 2 "${t%:*}" "${t##*:}" 2>/dev/null | head -n 1) && [ -n "$a" ]; then
          echo "METALD_TCP $t ok $a"
        else
          echo "METALD_TCP $t fail"
        fi
      done
      i=$((i + 1)); sleep 1
    done ) &
fi
# A clone's new generation (docs/SNAPSHOTS.md "Fresh randomness"): metald-init watches metald's
# virtio console port and reseeds the kernel's random number generator (METALD_RESEED).
[ -x /metald-init ] && /metald-init generation &
if n=$(param metald.burn); then
  i=0; while [ $i -lt "$n" ]; do ( while :; do :; done ) & i=$((i + 1)); done
fi
if s=$(param metald.poweroff_after); then
  ( sleep "$s"; exec /etc/metald/poweroff poweroff_after ) &
fi
if s=$(param metald.reboot_after); then
  ( sleep "$s"; echo "METALD_GUEST_SHUTDOWN_REASON=reboot_after"; echo METALD_GUEST_REBOOT
    sync; mount -o remount,ro / 2>/dev/null; reboot -f ) &
fi
echo METALD_GUEST_READY
EOF

  # nc -e: stdin and stdout are the connection.
  cat >"$r/etc/metald/sink" <<'EOF'
#!/bin/sh
n=$(wc -c | tr -d ' ')
echo "$n"
echo "METALD_SINK $n" >/dev/console
EOF

  cat >"$r/etc/metald/source" <<'EOF'
#!/bin/sh
read -r n
head -c "$n" /dev/zero
echo "METALD_SOURCE $n" >/dev/console
EOF

  cat >"$r/etc/metald/ticker" <<'EOF'
#!/bin/sh
. /etc/metald/lib.sh
n=0
s=$(param metald.tick) || s=1
if f=$(param metald.tickfile); then
  # Each tick also goes to a file on the guest's disk (written through to it), and the console
  # shows how many lines the file holds: a save/restore test sees the file survive. A tick is
  # printed only once it is on the disk (a power-off remounts the root read-only under it).
  while :; do
    n=$((n + 1))
    if echo "$n" 2>/dev/null >>"$f" && { sync "$f" 2>/dev/null || sync; }; then
      echo "METALD_TICK $n"; echo "METALD_TICKFILE $(wc -l <"$f" | tr -d ' ')"
    fi
    sleep "$s"
  done
fi
while :; do n=$((n + 1)); echo "METALD_TICK $n"; sleep "$s"; done
EOF

  cat >"$r/etc/metald/poweroff" <<'EOF'
#!/bin/sh
# poweroff REASON: print the markers and power off at once (busybox poweroff -f syncs first).
exec >/dev/console 2>&1
echo "METALD_GUEST_SHUTDOWN_REASON=${1:-unknown}"
echo METALD_GUEST_POWEROFF
sync
mount -o remount,ro / 2>/dev/null
# Firecracker has no power-off device; a reboot (reboot=k) ends it.
case " $(cat /proc/cmdline) " in *" metald.stop=reboot "*) exec reboot -f ;; esac
exec poweroff -f
EOF
  chmod 755 "$r/init" "$r/etc/metald/rc" "$r/etc/metald/ticker" "$r/etc/metald/poweroff" \
    "$r/etc/metald/sink" "$r/etc/metald/source"
  [[ $kind == ext4 ]] && rm -f "$r/init"
  return 0
}

# initramfs: cpio (newc) by busybox cpio + a hand-made entry for /dev/console (no mknod needed).
make_tree "$WORK/initramfs" initramfs
cpio_console_entry() { # newc header for dev/console (char 5:1, 0600), then the trailer
  local name=dev/console
  printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
    999999 $((0x2000 | 0600)) 0 0 1 0 0 0 0 5 1 $((${#name} + 1)) 0
  printf '%s\0\0\0\0' "$name" | head -c $(( ((110 + ${#name} + 1 + 3) / 4) * 4 - 110 ))
  local t=TRAILER!!!
  printf '070701%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X%08X' \
    0 0 0 0 1 0 0 0 0 0 0 $((${#t} + 1)) 0
  printf '%s\0\0\0\0' "$t" | head -c $(( ((110 + ${#t} + 1 + 3) / 4) * 4 - 110 ))
}
(
  cd "$WORK/initramfs"
  find . -mindepth 1 | LC_ALL=C sort | sed 's#^\./##' | "$BUSYBOX" cpio -o -H newc 2>/dev/null
  cpio_console_entry
) | gzip -9n >"$WORK/out/initramfs.cpio.gz"

# rootfs.ext4
make_tree "$WORK/rootfs" ext4
if [[ $EUID -eq 0 ]]; then mknod -m 600 "$WORK/rootfs/dev/console" c 5 1; fi
truncate -s "${ROOTFS_MB}M" "$WORK/out/rootfs.ext4"
mkfs.ext4 -q -F -L metald-root -E root_owner=0:0 -d "$WORK/rootfs" "$WORK/out/rootfs.ext4" >&2

# ---------------------------------------------------------------- checks + install
is_elf64 "$WORK/out/vmlinux" || die "vmlinux is not ELF64"
gzip -t "$WORK/out/initramfs.cpio.gz"
{
  echo "$STAMP_KEY"
  echo "kernel_package=$KPKG"
  echo "kernel_version=$KVER"
  echo "kernel_release=$KREL"
  echo "busybox_version=$BVER"
  echo "modules=${MODORDER[*]}"
  for a in $IMAGE_MODULES; do echo "modules_$a=${IMAGE_ORDER[$a]}"; done
  echo "metald_init_bytes=$(stat -c %s "$INIT_BIN")"
} >"$WORK/out/guest-image.stamp"
rm -f "$OUT/guest-image.stamp"
for f in "${OUTPUTS[@]}"; do mv -f "$WORK/out/$f" "$OUT/$f"; done
mv -f "$WORK/out/guest-image.stamp" "$OUT/guest-image.stamp"
log "built in $((SECONDS - T0)) s:"
(cd "$OUT" && ls -l "${OUTPUTS[@]}" guest-image.stamp >&2)
