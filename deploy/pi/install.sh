#!/usr/bin/env bash
# Install the blockskip agent on a Raspberry Pi 5 or any other CPU board (aarch64 or x86_64;
# Debian 12 / Raspberry Pi OS bookworm / Ubuntu 22.04+, Python >= 3.10), as a systemd service.
#
#   sudo deploy/pi/install.sh --device-id field-07 --broker-host mqtt.example.org
#
# Run it from a checkout of this repository on the board. It installs into /opt/blockskip/venv
# (CPU torch + the `edge` extra: ONNX Runtime, peft, paho-mqtt), creates the `blockskip` user,
# /var/lib/blockskip (data) and /etc/blockskip/agent.yaml (kept if it exists), and enables
# blockskip-agent.service. Re-running it upgrades the venv in place.
set -euo pipefail

usage() {
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    echo "options: --device-id ID  --broker-host HOST  [--broker-port 8883]  [--start]"
    echo "environment: TORCH_SPEC (default torch==2.13.0), TORCH_INDEX (default: PyPI on aarch64,"
    echo "             PyTorch's CPU index on x86_64)"
}

DEVICE_ID="" BROKER_HOST="" BROKER_PORT=8883 START=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --device-id) DEVICE_ID="${2:?--device-id needs a value}"; shift 2 ;;
        --broker-host) BROKER_HOST="${2:?--broker-host needs a value}"; shift 2 ;;
        --broker-port) BROKER_PORT="${2:?--broker-port needs a value}"; shift 2 ;;
        --start) START=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PREFIX=/opt/blockskip
VENV="$PREFIX/venv"
CONFIG=/etc/blockskip/agent.yaml
DATA=/var/lib/blockskip
TORCH_SPEC="${TORCH_SPEC:-torch==2.13.0}"
case "$(uname -m)" in
    aarch64) TORCH_INDEX="${TORCH_INDEX:-https://pypi.org/simple}" ;;   # PyPI's aarch64 torch is the CPU build
    x86_64) TORCH_INDEX="${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}" ;;  # PyPI's would pull CUDA
    *) echo "error: unsupported machine $(uname -m); use aarch64 or x86_64" >&2; exit 2 ;;
esac

if [[ $EUID -ne 0 ]]; then
    echo "error: run as root (sudo $0 ...)" >&2
    exit 2
fi
if [[ ! -f "$CONFIG" && ( -z "$DEVICE_ID" || -z "$BROKER_HOST" ) ]]; then
    echo "error: a first install needs --device-id and --broker-host (they go into $CONFIG)" >&2
    exit 2
fi
if [[ -n "$DEVICE_ID" && ! "$DEVICE_ID" =~ ^[A-Za-z0-9_.:-]{1,64}$ ]]; then
    echo "error: --device-id must be 1-64 characters of [A-Za-z0-9_.:-]" >&2
    exit 2
fi

echo "== system packages"
apt-get update -q
apt-get install -y -q --no-install-recommends python3-venv python3-pip rsync

echo "== user and directories"
getent group blockskip >/dev/null || groupadd --system blockskip
id -u blockskip >/dev/null 2>&1 || useradd --system --gid blockskip --home-dir "$DATA" --shell /usr/sbin/nologin blockskip
install -d -o blockskip -g blockskip -m 0750 "$DATA"
# Bundles and base packs arrive over SSH (blockskip deploy) from a user in the blockskip group; the
# agent writes its NAME.inuse lock files next to them (and unpacks a base pack .tar there), so the
# directories are writable by both. base-packs/ is the agent's base_packs_dir.
install -d -o blockskip -g blockskip -m 2775 "$DATA/bundles" "$DATA/base-packs"
install -d -o root -g blockskip -m 0750 /etc/blockskip

echo "== venv $VENV ($TORCH_SPEC from $TORCH_INDEX)"
install -d -m 0755 "$PREFIX"
python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
"$VENV/bin/pip" install -q --index-url "$TORCH_INDEX" "$TORCH_SPEC"
# Keep that torch: the edge extra must not replace it with another build.
"$VENV/bin/python" -c "import torch; print(f'torch=={torch.__version__}')" > "$PREFIX/torch-constraint.txt"
"$VENV/bin/pip" install -q -c "$PREFIX/torch-constraint.txt" "${REPO}[edge]"
"$VENV/bin/python" - <<'PY'
import onnxruntime, torch
assert torch.version.cuda is None, f"expected the CPU build of torch, got CUDA {torch.version.cuda}"
print("torch", torch.__version__, "(CPU); onnxruntime", onnxruntime.__version__, onnxruntime.get_available_providers())
PY
"$VENV/bin/blockskip" --version

if [[ -f "$CONFIG" ]]; then
    echo "== keeping the existing $CONFIG"
else
    echo "== writing $CONFIG"
    sed -e "s/@DEVICE_ID@/$DEVICE_ID/g" -e "s/@BROKER_HOST@/$BROKER_HOST/g" -e "s/@BROKER_PORT@/$BROKER_PORT/g" \
        "$REPO/deploy/pi/agent.yaml" > "$CONFIG.tmp"
    chown root:blockskip "$CONFIG.tmp"
    chmod 0640 "$CONFIG.tmp"
    mv "$CONFIG.tmp" "$CONFIG"
fi

echo "== systemd unit"
install -m 0644 "$REPO/deploy/systemd/blockskip-agent.service" /etc/systemd/system/blockskip-agent.service
systemctl daemon-reload
systemctl enable blockskip-agent.service
if [[ $START -eq 1 ]]; then
    systemctl restart blockskip-agent.service
    systemctl --no-pager status blockskip-agent.service || true
else
    echo "next: put the broker CA at /etc/blockskip/ca.crt, the password in /etc/blockskip/mqtt-password and the"
    echo "      host's bundle-signing public key at /etc/blockskip/host.pub (root:blockskip, mode 0640), then:"
    echo "      sudo systemctl start blockskip-agent && journalctl -fu blockskip-agent"
fi
