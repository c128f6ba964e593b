#!/usr/bin/env bash
# Builds the Sluice image (default tag sluice:local, or $SLUICE_IMAGE).
#
#   deploy/build-image.sh            # deploy/Dockerfile: builds from source in Docker
#   deploy/build-image.sh --offline  # no registry needed: binaries built here, FROM scratch
set -euo pipefail
cd "$(dirname "$0")/.."
image=${SLUICE_IMAGE:-sluice:local}

if [[ "${1:-}" != "--offline" ]]; then
    exec docker build -f deploy/Dockerfile -t "$image" .
fi

cargo build --release --locked --bin sluice-broker --bin sluice
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT
mkdir -p "$stage/rootfs/usr/local/bin" "$stage/rootfs/etc" "$stage/data"
for bin in sluice-broker sluice; do
    cp "target/release/$bin" "$stage/rootfs/usr/local/bin/"
    strip "$stage/rootfs/usr/local/bin/$bin" 2>/dev/null || true
done
# The C library, its loader and the few others the binaries link, at the same paths.
libs=$(for bin in sluice-broker sluice; do
    ldd "target/release/$bin" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'
done | sort -u)
for lib in $libs; do
    mkdir -p "$stage/rootfs$(dirname "$lib")"
    cp -L "$lib" "$stage/rootfs$lib"
done
echo 'sluice:x:10001:10001:sluice:/data:/nonexistent' > "$stage/rootfs/etc/passwd"
echo 'sluice:x:10001:' > "$stage/rootfs/etc/group"
echo 'hosts: files dns' > "$stage/rootfs/etc/nsswitch.conf"
cp deploy/Dockerfile.offline "$stage/Dockerfile"
docker build -t "$image" "$stage"
