#!/usr/bin/env bash
# A Python base image for deploy/Dockerfile made from Debian's packages with mmdebstrap, for machines that
# reach a Debian mirror but no container registry (python:3.12-slim cannot be pulled there):
#
#   deploy/debian-base.sh [--engine podman|docker] [--suite bookworm] [--mirror URL] IMAGE
#   deploy/build-image.sh --python-image IMAGE ...
#
# A minbase Debian with python3, python3-venv, ca-certificates and passwd (for useradd), the suite's
# security and point-release updates, and no documentation, manual pages or translations (copyright
# files stay), as Debian's own slim images do. bookworm has Python 3.11; trixie has 3.13.
# Needs root (or mmdebstrap's unshare mode) and `apt-get install mmdebstrap`.
set -euo pipefail

engine=podman suite=bookworm mirror=http://deb.debian.org/debian
usage() { sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --engine) engine=$2; shift 2 ;;
        --suite) suite=$2; shift 2 ;;
        --mirror) mirror=$2; shift 2 ;;
        -h | --help) usage ;;
        -*) echo "debian-base.sh: error: unknown option $1" >&2; usage 2 >&2 ;;
        *) break ;;
    esac
done
[[ $# -eq 1 ]] || { echo "debian-base.sh: error: give exactly one IMAGE name" >&2; exit 2; }
image=$1
command -v mmdebstrap > /dev/null || { echo "debian-base.sh: error: mmdebstrap not found (apt-get install mmdebstrap)" >&2; exit 2; }
command -v "$engine" > /dev/null || { echo "debian-base.sh: error: $engine not found" >&2; exit 2; }

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
slim=()
for dir in doc man info locale lintian; do
    slim+=(--dpkgopt="path-exclude=/usr/share/$dir/*")
done
slim+=(--dpkgopt="path-include=/usr/share/doc/*/copyright")

# merged-usr: the /usr layout without the usrmerge package (and the Perl it pulls in).
if ! mmdebstrap --variant=minbase --include=ca-certificates,python3,python3-venv,passwd \
    --hook-dir=/usr/share/mmdebstrap/hooks/merged-usr "${slim[@]}" \
    "$suite" "$tmp/base.tar" \
    "deb $mirror $suite main" "deb $mirror $suite-updates main" \
    "deb ${mirror%/debian}/debian-security $suite-security main" > "$tmp/mmdebstrap.log" 2>&1; then
    tail -n 30 "$tmp/mmdebstrap.log" >&2
    echo "debian-base.sh: error: mmdebstrap failed (its log's end is above)" >&2
    exit 1
fi
"$engine" import --message "Debian $suite minbase + python3 (deploy/debian-base.sh)" \
    "$tmp/base.tar" "$image" > /dev/null
echo "$image: Debian $suite, $("$engine" run --rm "$image" python3 --version)"
