#!/usr/bin/env bash
# Build the mnist-serve images from deploy/Dockerfile, from any directory, with docker or podman:
#
#   deploy/build-image.sh [--engine docker|podman] [--target cpu|cuda|all] [--name NAME]
#                         [--python-image IMAGE] [--ca-bundle FILE] [--network MODE] [-- ENGINE-BUILD-ARGS]
#
#   --engine        the container engine (default: podman if installed, else docker)
#   --target        cpu (default), cuda, or all: both, sharing their common stages
#   --name          image name; tags are NAME:VERSION-cpu and NAME:VERSION-cuda (default: mnist-serve,
#                   VERSION from pyproject.toml)
#   --python-image  the Python base (default: the Dockerfile's python:3.12-slim); deploy/debian-base.sh
#                   makes one from Debian packages where no registry is reachable
#   --ca-bundle     a CA bundle for pip (behind a TLS-inspecting proxy): passed as the build secret
#                   pip-ca, used by the pip steps only, never stored in the image
#   --network       the build's network (e.g. host, where the build's default network has no route out)
#
# Every Python package comes at its version in constraints.txt. Prints each image's size and that of its
# /opt/venv.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)

engine="" target=cpu name=mnist-serve python_image="" ca_bundle="" network=""
usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-0}"; }
fail() { echo "build-image.sh: error: $*" >&2; exit 2; }
while [[ $# -gt 0 ]]; do
    case "$1" in
        --engine) engine=$2; shift 2 ;;
        --target) target=$2; shift 2 ;;
        --name) name=$2; shift 2 ;;
        --python-image) python_image=$2; shift 2 ;;
        --ca-bundle) ca_bundle=$2; shift 2 ;;
        --network) network=$2; shift 2 ;;
        -h | --help) usage ;;
        --) shift; break ;;
        *) echo "build-image.sh: error: unknown argument $1" >&2; usage 2 >&2 ;;
    esac
done
if [[ -z $engine ]]; then
    engine=$(command -v podman > /dev/null && echo podman || echo docker)
fi
command -v "$engine" > /dev/null || fail "$engine not found"
case "$target" in
    cpu | cuda) targets=("$target") ;;
    all) targets=(cpu cuda) ;;
    *) fail "--target must be cpu, cuda or all, not $target" ;;
esac
[[ -z $ca_bundle || -s $ca_bundle ]] || fail "--ca-bundle $ca_bundle: no such non-empty file"
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$root/pyproject.toml")

build=("$engine" build --file "$root/deploy/Dockerfile")
[[ -n $python_image ]] && build+=(--build-arg "PYTHON_IMAGE=$python_image")
[[ -n $ca_bundle ]] && build+=(--secret "id=pip-ca,src=$(realpath "$ca_bundle")")
[[ -n $network ]] && build+=(--network "$network")
if [[ $engine == docker ]]; then
    export DOCKER_BUILDKIT=1 # RUN --mount=type=secret
fi

for t in "${targets[@]}"; do
    tag="$name:$version-$t"
    echo "== build $tag ($engine, base ${python_image:-python:3.12-slim})"
    start=$SECONDS
    "${build[@]}" --target "$t" --tag "$tag" "$@" "$root"
    bytes=$("$engine" image inspect --format '{{.Size}}' "$tag")
    venv=$("$engine" run --rm --entrypoint du "$tag" -sb /opt/venv | cut -f1)
    echo "$tag: image $((bytes / 1000000)) MB, /opt/venv $((venv / 1000000)) MB, built in $((SECONDS - start)) s"
done
