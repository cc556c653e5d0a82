#!/usr/bin/env bash
# Make a local Debian bookworm base image with no registry: debootstrap (minbase) from Debian's mirror, trimmed,
# then `docker import`. The rootfs tarball is cached, so a rerun (or a fresh docker daemon) only imports it.
#   deploy/docker/make_base.sh IMAGE [PACKAGE,...]
#     IMAGE     e.g. prunefusion-base:bookworm
#     PACKAGES  extra packages (debootstrap --include), e.g. python3,python3-venv,ca-certificates
#   MIRROR      default http://deb.debian.org/debian
#   CACHE_DIR   default ${XDG_CACHE_HOME:-~/.cache}/prunefusion-deploy (rootfs tarballs and the .deb cache)
# Needs root (debootstrap). Skips everything when IMAGE already exists.
set -euo pipefail
if [ $# -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    exit $(( $# < 1 ))
fi
IMAGE=$1
PACKAGES=${2:-}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
CACHE_DIR=${CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/prunefusion-deploy}

if docker image inspect "$IMAGE" >/dev/null 2>&1; then
    echo "base $IMAGE: present"
    exit 0
fi
mkdir -p "$CACHE_DIR/debs"
# the tarball's name carries the package list, so changing it makes a new one
key=$(printf '%s|%s|%s' "$IMAGE" "$PACKAGES" "$MIRROR" | sha256sum | cut -c1-12)
tarball="$CACHE_DIR/${IMAGE//[:\/]/_}-$key.tar"
if [ ! -s "$tarball" ]; then
    root=$(mktemp -d "${TMPDIR:-/tmp}/prunefusion-rootfs.XXXXXX")
    trap 'rm -rf "$root"' EXIT
    echo "base $IMAGE: debootstrap bookworm (minbase${PACKAGES:+ + $PACKAGES})"
    debootstrap --variant=minbase --cache-dir="$CACHE_DIR/debs" ${PACKAGES:+--include="$PACKAGES"} \
        bookworm "$root" "$MIRROR" >"$root.log" 2>&1 || { tail -30 "$root.log"; rm -f "$root.log"; exit 1; }
    rm -f "$root.log"
    # what an image does not need: package caches and lists, docs, man pages, locales but C
    rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/var/log/* "$root"/tmp/* \
        "$root"/usr/share/doc/* "$root"/usr/share/man/* "$root"/usr/share/info/*
    find "$root"/usr/share/locale -mindepth 1 -maxdepth 1 ! -name 'locale.alias' -exec rm -rf {} +
    # the host's resolver and name must not leak into the image
    : >"$root/etc/resolv.conf"
    echo localhost >"$root/etc/hostname"
    tar --numeric-owner -C "$root" -cf "$tarball.part" .
    mv "$tarball.part" "$tarball"
fi
echo "base $IMAGE: docker import $(du -h "$tarball" | cut -f1) from $tarball"
docker import --change 'ENV LANG=C.UTF-8' --change 'CMD ["/bin/bash"]' "$tarball" "$IMAGE" >/dev/null
