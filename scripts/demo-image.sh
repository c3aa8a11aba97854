#!/usr/bin/env bash
# Builds the demo's container image offline and pushes it to a registry:
# busybox-static with its applets in /bin, a user `app` (1000:1000) and
# /app/run.sh, which prints what it was given and serves a page with busybox
# httpd on port 8080. Built with umoci (Debian), pushed with skopeo.
#
#   scripts/demo-image.sh <work dir> <registry host:port> <repo:tag>
set -euo pipefail
WORK=$1 REGISTRY=$2 REF=$3
TAG=${REF##*:} REPO=${REF%:*}
rm -rf "$WORK"; mkdir -p "$WORK"
umoci init --layout "$WORK/layout"
umoci new --image "$WORK/layout:$TAG"
umoci unpack --rootless --image "$WORK/layout:$TAG" "$WORK/bundle" >/dev/null
R=$WORK/bundle/rootfs
mkdir -p "$R/bin" "$R/etc" "$R/app"
cp /bin/busybox "$R/bin/busybox"
for a in $(/bin/busybox --list); do [ "$a" = busybox ] || ln -sf busybox "$R/bin/$a"; done
printf 'root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000:app:/app:/bin/sh\n' > "$R/etc/passwd"
printf 'root:x:0:\napp:x:1000:\n' > "$R/etc/group"
cat > "$R/app/run.sh" <<'SH'
#!/bin/sh
echo "hello from a container image: $(id -un) in $(pwd), GREETING=$GREETING, args: $*"
mkdir -p /tmp/www && echo "$GREETING from $(hostname), a container image run by metald" > /tmp/www/index.html
exec httpd -f -p 8080 -h /tmp/www
SH
chmod 755 "$R/app/run.sh"
umoci repack --image "$WORK/layout:$TAG" "$WORK/bundle" >/dev/null
umoci config --image "$WORK/layout:$TAG" --config.entrypoint=/app/run.sh --config.cmd=--demo \
  --config.env=GREETING=hello --config.workingdir=/app --config.user=app
skopeo copy --quiet --insecure-policy --dest-tls-verify=false "oci:$WORK/layout:$TAG" "docker://$REGISTRY/$REPO:$TAG"
