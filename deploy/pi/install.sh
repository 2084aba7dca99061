#!/usr/bin/env bash
# Install the blockskip agent on a Raspberry Pi 5 or any other CPU board (aarch64 or x86_64;
# Debian 12 / Raspberry Pi OS bookworm / Ubuntu 22.04+, Python >= 3.10), as a systemd service.
#
#   sudo deploy/pi/install.sh --device-id field-07 --broker-host mqtt.example.org
#
# Run it from a checkout of this repository on the board. It installs into /opt/blockskip/venv
# (CPU torch + the `edge` extra: ONNX Runtime, peft, paho-mqtt), creates the `blockskip` user,
# /var/lib/blockskip (data) and /etc/blockskip/agent.yaml (kept if it exists), and enables
# blockskip-agent.service (also with no running systemd, e.g. an image prepared offline: then it is
# enabled for the next boot). Re-running it upgrades the venv in place.
# torch: on aarch64 2.10.0 from PyPI, the newest CPU-only aarch64 wheel there (from 2.11 on PyPI's
# aarch64 wheels are CUDA builds that pull ~3 GB of nvidia-* packages); on x86_64 2.13.0 from
# PyTorch's CPU index. Before installing, deploy/pi/torch_wheel.py reads the chosen wheel's metadata
# and refuses a CUDA build; a newer CPU torch for aarch64: TORCH_INDEX=https://download.pytorch.org/whl/cpu
# TORCH_SPEC=torch==X.Y.Z.
set -euo pipefail

usage() {
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'
    echo "options: --device-id ID  --broker-host HOST  [--broker-port 8883]  [--start]"
    echo "         --print-torch MACHINE  (print the torch spec and index used on MACHINE, and exit)"
    echo "environment: TORCH_SPEC (default torch==2.10.0 on aarch64, torch==2.13.0 on x86_64),"
    echo "             TORCH_INDEX (default: PyPI on aarch64, PyTorch's CPU index on x86_64)"
}

# The torch a CPU board gets, per machine: "SPEC INDEX"
torch_for() {
    case "$1" in
        aarch64) echo "${TORCH_SPEC:-torch==2.10.0} ${TORCH_INDEX:-https://pypi.org/simple}" ;;
        x86_64) echo "${TORCH_SPEC:-torch==2.13.0} ${TORCH_INDEX:-https://download.pytorch.org/whl/cpu}" ;;
        *) return 1 ;;
    esac
}

DEVICE_ID="" BROKER_HOST="" BROKER_PORT=8883 START=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --device-id) DEVICE_ID="${2:?--device-id needs a value}"; shift 2 ;;
        --broker-host) BROKER_HOST="${2:?--broker-host needs a value}"; shift 2 ;;
        --broker-port) BROKER_PORT="${2:?--broker-port needs a value}"; shift 2 ;;
        --start) START=1; shift ;;
        --print-torch) torch_for "${2:?--print-torch needs a machine}" || { echo "error: unsupported machine $2" >&2; exit 2; }
                       exit 0 ;;
        -h|--help) usage; exit 0 ;;
        *) echo "error: unknown option $1" >&2; usage >&2; exit 2 ;;
    esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PREFIX=/opt/blockskip
VENV="$PREFIX/venv"
CONFIG=/etc/blockskip/agent.yaml
DATA=/var/lib/blockskip
if ! read -r TORCH_SPEC TORCH_INDEX < <(torch_for "$(uname -m)"); then
    echo "error: unsupported machine $(uname -m); use aarch64 or x86_64" >&2
    exit 2
fi

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
# Refuse a CUDA build before downloading it: the wheel's own requirements, read from pip's report.
"$VENV/bin/python" "$REPO/deploy/pi/torch_wheel.py" --index-url "$TORCH_INDEX" "$TORCH_SPEC"
"$VENV/bin/pip" install -q --index-url "$TORCH_INDEX" "$TORCH_SPEC"
# Keep that torch: the edge extra must not replace it with another build. The constraint is the
# installed distribution's version (2.10.0), not torch.__version__ (2.10.0+cpu: no index has that).
"$VENV/bin/python" -c "import importlib.metadata as m; print('torch==' + m.version('torch'))" \
    > "$PREFIX/torch-constraint.txt"
"$VENV/bin/pip" install -q -c "$PREFIX/torch-constraint.txt" "${REPO}[edge]"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as metadata

import onnxruntime
import torch

assert torch.version.cuda is None, f"expected the CPU build of torch, got CUDA {torch.version.cuda}"
cuda = sorted(d.metadata["Name"] for d in metadata.distributions()
              if d.metadata["Name"].lower().startswith(("nvidia-", "triton")))
assert not cuda, f"CUDA packages in a CPU board's venv: {', '.join(cuda)}"
print("torch", torch.__version__, "(CPU, no nvidia-* packages); onnxruntime", onnxruntime.__version__,
      onnxruntime.get_available_providers())
PY
"$VENV/bin/blockskip" --version
echo "venv: $(du -sh "$VENV" | cut -f1)"

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
if [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
    systemctl enable blockskip-agent.service
else
    # No running systemd (an SD card image prepared offline, a chroot): enable it for the next boot.
    echo "no running systemd here: blockskip-agent.service is enabled for the next boot"
    SYSTEMD_OFFLINE=1 systemctl enable blockskip-agent.service
    if [[ $START -eq 1 ]]; then
        echo "error: --start needs a running systemd; the agent starts at the next boot" >&2
        exit 2
    fi
fi
if [[ $START -eq 1 ]]; then
    systemctl restart blockskip-agent.service
    systemctl --no-pager status blockskip-agent.service || true
else
    echo "next: put the broker CA at /etc/blockskip/ca.crt, the password in /etc/blockskip/mqtt-password and the"
    echo "      host's bundle-signing public key at /etc/blockskip/host.pub (root:blockskip, mode 0640), then:"
    echo "      sudo systemctl start blockskip-agent && journalctl -fu blockskip-agent"
fi
