#!/bin/sh
# Install p2pupd @VERSION@ for linux-@ARCH@ from this directory, with no network.
#
#   sudo ./install.sh [--python PYTHON] [--root DIR] [--prefix DIR] [--force]
#                     [--no-systemd] [--no-udev] [--no-path-link]
#
# Needs CPython @PYTHONS_COMMA@ on this machine (python3, or the first of
# python3.X that fits; --python picks one) and glibc @GLIBC@ or newer.
# Creates @PREFIX@/@VERSION@ (a virtualenv built from ./wheels with pip
# --no-index), points @PREFIX@/current at it, installs the systemd unit and
# the USB-stick udev rule, /etc/p2pupd/config.toml if absent, /var/lib/p2pupd,
# and /usr/local/bin/p2pupd. Running it again changes nothing that is right.
# --root DIR writes all of that below DIR (tests, image staging).
#
# This script only finds an interpreter; installer/ (Python, standard library
# only) does the rest. Exit codes: 0 done, 1 failed, 2 refused (nothing written).
set -eu

ARCH=@ARCH@
PYTHONS="@PYTHONS@"
VERSION=@VERSION@

here=$(cd -- "$(dirname -- "$0")" && pwd -P)
refuse() {
    printf 'p2pupd install: refused: %s\n' "$*" >&2
    exit 2
}

# --python is ours; every other argument goes to the installer. The loop
# rotates the arguments once, dropping --python and its value.
python=
n=$#
while [ "$n" -gt 0 ]; do
    arg=$1
    shift
    n=$((n - 1))
    case $arg in
    -h | --help)
        sed -n '2,16s/^# \{0,1\}//p' "$0"
        exit 0
        ;;
    --python)
        [ "$n" -gt 0 ] || refuse "--python needs an interpreter"
        python=$1
        shift
        n=$((n - 1))
        ;;
    --python=*) python=${arg#--python=} ;;
    *) set -- "$@" "$arg" ;;
    esac
done

os=$(uname -s)
machine=$(uname -m)
case $machine in
arm64) machine=aarch64 ;;
amd64) machine=x86_64 ;;
esac
[ "$os" = Linux ] || refuse "this artifact is for Linux; this machine runs $os"
[ "$machine" = "$ARCH" ] ||
    refuse "this artifact is for linux-$ARCH; this machine is linux-$machine: use p2pupd-$VERSION-linux-$machine.tar.gz"

minor_of() {
    "$1" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null
}
fits() {
    case " $PYTHONS " in *" $1 "*) return 0 ;; esac
    return 1
}

if [ -n "$python" ]; then
    command -v "$python" >/dev/null 2>&1 || refuse "--python $python: not found"
    have=$(minor_of "$python") || refuse "--python $python does not run"
    fits "$have" || refuse "--python $python is Python $have; this artifact has wheels for CPython @PYTHONS_COMMA@"
else
    # The distribution's python3 first (it gets the security updates), then
    # the newest python3.X this artifact has wheels for.
    found=
    for cand in python3 $(for v in $PYTHONS; do echo "python$v"; done | sort -r); do
        path=$(command -v "$cand" 2>/dev/null) || continue
        have=$(minor_of "$path") || continue
        if fits "$have"; then
            python=$path
            break
        fi
        found="$found $cand ($have)"
    done
    [ -n "$python" ] ||
        refuse "needs CPython @PYTHONS_COMMA@; found:${found:- no python3}. Install one from the distribution's packages, or pass --python PATH"
fi

# The real binary, not a shim or a python3 link a distribution upgrade may
# repoint to another minor version: the venv is bound to it.
exec "$(readlink -f -- "$(command -v "$python")")" -I "$here/installer" "$@"
