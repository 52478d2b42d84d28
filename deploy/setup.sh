#!/usr/bin/env bash
# Idempotent set-up of a machine of this kind (Debian 12, root) for the orchestrator and its lab:
# QEMU 10 and libvirt 11 from bookworm-backports, then a virtualenv with the package and its tools.
# Re-running it is fast: every step checks first and does nothing when already done.
#
#   deploy/setup.sh            # packages + venv (.venv beside this repo)
#   VENV=/path deploy/setup.sh  # another venv location
set -euo pipefail

repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
venv=${VENV:-$repo/.venv}
log() { printf 'setup: %s\n' "$*" >&2; }
die() { printf 'setup: error: %s\n' "$*" >&2; exit 1; }

[ "$(id -u)" -eq 0 ] || die "must run as root (it installs Debian packages); run it with sudo"
[ -r /etc/os-release ] && . /etc/os-release
[ "${VERSION_CODENAME:-}" = bookworm ] || die "expects Debian 12 (bookworm), found ${PRETTY_NAME:-unknown}"

export DEBIAN_FRONTEND=noninteractive

# --- bookworm-backports, from the mirror this machine is already configured with -------------
backports=/etc/apt/sources.list.d/orchestrator-backports.sources
if [ ! -f "$backports" ]; then
    src=/etc/apt/sources.list.d/debian.sources
    [ -r "$src" ] || die "cannot find $src to derive the Debian mirror from; add bookworm-backports by hand"
    # First stanza whose Suites include plain 'bookworm': its URIs and Signed-By.
    read -r uri signed < <(awk '
        /^[[:space:]]*$/ { if (u && s && b) { print u, k; done=1; exit } u=""; s=""; k=""; b=0; next }
        /^URIs:/       { u=$2 }
        /^Suites:/     { for (i=2;i<=NF;i++) if ($i=="bookworm") b=1; s=1 }
        /^Signed-By:/  { k=$2 }
        END            { if (!done && u && s && b) print u, k }' "$src" | head -n1)
    [ -n "${uri:-}" ] || die "no bookworm entry in $src; add bookworm-backports by hand"
    log "adding bookworm-backports from the configured mirror"
    {
        echo "Types: deb"
        echo "URIs: $uri"
        echo "Suites: bookworm-backports"
        echo "Components: main"
        [ -n "${signed:-}" ] && echo "Signed-By: $signed"
    } > "$backports.tmp"
    mv "$backports.tmp" "$backports"
    rm -f /var/lib/apt/periodic/orchestrator-updated
fi

# --- Debian packages --------------------------------------------------------------------------
want_qemu() { dpkg-query -W -f='${Version}' qemu-system-x86 2>/dev/null | grep -q '^1:\(9\.[1-9]\|[1-9][0-9]\)'; }
want_libvirt() { dpkg-query -W -f='${Version}' libvirt-daemon 2>/dev/null | grep -q '^\(1[1-9]\|[2-9][0-9]\)\.'; }
# qemu-utils: qemu-img and qemu-io, for lab guests with a disk (storage migration).
pkgs=(qemu-system-x86 qemu-utils libvirt-daemon libvirt-daemon-driver-qemu libvirt-clients libvirt-dev)
build=(pkg-config gcc python3-dev sqlite3)
missing_build=()
for p in "${build[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing_build+=("$p"); done
have_pkgs() { for p in "${pkgs[@]}"; do dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || return 1; done; }
if ! want_qemu || ! want_libvirt || [ ${#missing_build[@]} -gt 0 ] || ! have_pkgs; then
    log "installing QEMU and libvirt from bookworm-backports (about 25 MB)"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends -t bookworm-backports "${pkgs[@]}" >/dev/null
    [ ${#missing_build[@]} -eq 0 ] || apt-get install -y -qq --no-install-recommends "${missing_build[@]}" >/dev/null
fi
want_qemu || die "QEMU >= 9.1 did not install; check 'apt-cache policy qemu-system-x86'"
want_libvirt || die "libvirt >= 11 did not install; check 'apt-cache policy libvirt-daemon'"
# Debian enables the default libvirtd on install where systemd runs; the lab runs its own daemons.

# --- lab workload guest image: a Debian cloud kernel + busybox initramfs -----------------------
# `orchestrator lab guest --workload dirty` boots it: /init (deploy/guest-image/init) starts
# orch-dirty (deploy/guest-image/orch-dirty.c, static), which rewrites memory at a set rate.
# Built from the distribution's own packages (apt-get download, no installation) into
# $ORCH_GUEST_IMAGE (default /var/lib/orchestrator/guest-image): vmlinuz, initrd.img. Rebuilt only
# when its sources in deploy/guest-image change.
image=${ORCH_GUEST_IMAGE:-/var/lib/orchestrator/guest-image}
image_src=$repo/deploy/guest-image
image_stamp=$(cat "$image_src/init" "$image_src/orch-dirty.c" | sha256sum | cut -d' ' -f1)
if [ ! -f "$image/vmlinuz" ] || [ ! -f "$image/initrd.img" ] \
    || [ "$(cat "$image/.built" 2>/dev/null)" != "$image_stamp" ]; then
    log "building the lab workload guest image in $image (about 28 MB download)"
    dpkg-query -W -f='${Status}' libc6-dev 2>/dev/null | grep -q 'ok installed' \
        || apt-get install -y -qq --no-install-recommends libc6-dev >/dev/null
    kernel_pkg() { apt-cache depends linux-image-cloud-amd64 2>/dev/null | awk '$1 == "Depends:" && $2 ~ /^linux-image-/ { print $2; exit }'; }
    kpkg=$(kernel_pkg)
    if [ -z "$kpkg" ]; then apt-get update -qq; kpkg=$(kernel_pkg); fi
    [ -n "$kpkg" ] || die "no linux-image-cloud-amd64 in the apt sources; check 'apt-cache policy linux-image-cloud-amd64'"
    work=$(mktemp -d /var/tmp/orchestrator-guest-image.XXXXXX)
    trap 'rm -rf "$work"' EXIT
    chown _apt "$work" 2>/dev/null || true  # apt-get download fetches as _apt
    (cd "$work" && apt-get download -qq "$kpkg" busybox-static) || die "apt-get download $kpkg busybox-static failed"
    mkdir -p "$work/root/bin" "$work/root/dev" "$work/root/proc" "$work/root/sys" "$work/root/tmp" "$work/out"
    dpkg-deb --fsys-tarfile "$work/${kpkg}"_*.deb | tar -x -C "$work" --wildcards './boot/vmlinuz-*'
    dpkg-deb --fsys-tarfile "$work"/busybox-static_*.deb | tar -x -C "$work/root" ./bin/busybox
    gcc -static -O2 -Wall -Wextra -Werror -o "$work/root/bin/orch-dirty" "$image_src/orch-dirty.c"
    install -m 0755 "$image_src/init" "$work/root/init"
    mknod "$work/root/dev/console" c 5 1 2>/dev/null || true  # the kernel's built-in one serves otherwise
    (cd "$work/root" && find . | "$work/root/bin/busybox" cpio -o -H newc -R 0:0 2>/dev/null) | gzip -9 > "$work/out/initrd.img"
    install -m 0644 "$work"/boot/vmlinuz-* "$work/out/vmlinuz"
    echo "$kpkg" > "$work/out/kernel"
    echo "$image_stamp" > "$work/out/.built"
    mkdir -p "$(dirname "$image")"
    rm -rf "$image.old"
    [ ! -e "$image" ] || mv "$image" "$image.old"
    mv "$work/out" "$image"
    rm -rf "$image.old" "$work"
    trap - EXIT
fi

# --- virtualenv -------------------------------------------------------------------------------
py=${PYTHON:-python3}
"$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || die "$py is older than 3.11"
if [ ! -x "$venv/bin/python" ]; then
    log "creating virtualenv $venv"
    "$py" -m venv "$venv"
fi
stamp="$venv/.orchestrator-installed"
if [ ! -f "$stamp" ] || [ "$repo/pyproject.toml" -nt "$stamp" ]; then
    log "installing the orchestrator and its test tools into $venv"
    "$venv/bin/pip" install -q --upgrade pip >/dev/null
    # compat mode: a plain path entry, not an import-hook finder that costs every Python start ~12 ms
    "$venv/bin/pip" install -q --config-settings editable_mode=compat -e "$repo[dev]"
    touch "$stamp"
fi
# Byte-compiled here (up-to-date files are skipped): a run that may not write __pycache__
# (PYTHONDONTWRITEBYTECODE, a root-owned checkout run by another user) would otherwise compile every
# changed module at each start, ~60 ms of `orchestrator migrate`.
"$venv/bin/python" -m compileall -q "$repo/orchestrator" >/dev/null || die "cannot byte-compile $repo/orchestrator"
# Man pages from the CLI's own help (orchestrator.commands.manpages) into the venv's share/man, where man(1)
# looks with $venv/bin on PATH (else: man -M "$venv/share/man" orchestrator-migrate). Generating takes
# ~0.2 s, so only when a module, or the installed packages, changed since the last time: a re-run
# costs a few `test -nt` (no process). The stamp is taken before generating: an edit made meanwhile
# is not missed.
man1=$venv/share/man/man1
man_stamp=$man1/.orchestrator-generated
man_stale() {
    [ -f "$man_stamp" ] && [ ! "$stamp" -nt "$man_stamp" ] || return 0
    for f in "$repo"/orchestrator/*.py "$repo"/orchestrator/*/*.py; do [ "$f" -nt "$man_stamp" ] && return 0; done
    return 1
}
if man_stale; then
    mkdir -p "$man1"
    touch "$man_stamp.new"
    if "$venv/bin/python" -m orchestrator.commands.manpages "$man1"; then
        mv "$man_stamp.new" "$man_stamp"
    else  # a nicety: not worth failing the set-up over (a module mid-edit); tried again next run
        rm -f "$man_stamp.new"
        log "warning: could not generate the man pages into $man1"
    fi
fi
log "ready: $venv/bin/orchestrator ($("$venv/bin/python" -c 'import libvirt; print("libvirt-python", libvirt.getVersion())'))"
