#!/usr/bin/env bash
# CI, arm64 stage: the Raspberry Pi install and the edge path on arm64, in an emulated Debian
# bookworm root (qemu-user, Cortex-A76 like a Pi 5). Run as root, after the x86 install (it makes
# the x86 artifacts with this checkout's blockskip).
#
#   1. build the arm64 root (cached in $BLOCKSKIP_CI_CACHE, keyed by what goes into it) and run the
#      same deploy/pi/install.sh a Pi user runs, from this checkout, inside it;
#   2. `blockskip verify` of the signed bundle and base pack made on x86; a tampered copy refused;
#   3. `blockskip train` fp32 and NF4 on both sides; the adapters compared (.ci/arm64_check.py);
#   4. `blockskip generate` with ONNX Runtime fp32 and int8 and with torch; PSNR arm64 vs x86;
#   5. the agent, started as the installed systemd unit starts it, connected to mosquitto (as
#      deployed: TLS, passwords, ACL) on the x86 side, runs a train + generate job sent by
#      `blockskip fleet submit` through a host worker; the images come back with `fleet fetch`.
# Emulated times say nothing about a board's speed.
set -euo pipefail
cd "$(dirname "$0")/.."
CACHE=${BLOCKSKIP_CI_CACHE:-/var/cache/blockskip-ci}
PACKAGES=python3,python3-venv,python3-pip,systemd,sudo,ca-certificates,rsync
KEY=$(printf '%s\n' bookworm arm64 minbase "$PACKAGES" | sha256sum | cut -c1-16)
BASE="$CACHE/arm64-root-$KEY.tar"
export DEBIAN_FRONTEND=noninteractive
started=$SECONDS
step() { echo "== arm64 [$((SECONDS - started)) s] $*"; }

step "qemu-user and mmdebstrap"
apt-get install -y -q qemu-user-static binfmt-support mmdebstrap arch-test >/dev/null
mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
update-binfmts --enable qemu-aarch64 2>/dev/null || true
[[ "$(/usr/lib/arch-test/arm64)" == ok ]] || { echo "error: this machine cannot run arm64 binaries" >&2; exit 1; }

mkdir -p "$CACHE"
if [[ ! -f "$BASE" ]]; then
    step "building the arm64 root (bookworm minbase: $PACKAGES)"
    mmdebstrap --quiet --arch=arm64 --variant=minbase --include="$PACKAGES" bookworm "$CACHE/tmp-$KEY.tar"
    mv "$CACHE/tmp-$KEY.tar" "$BASE"
fi
WORK=$(mktemp -d /var/tmp/blockskip-arm64.XXXXXX)
ROOT="$WORK/root"
cleanup() {
    for m in proc/cpuinfo proc sys dev; do mountpoint -q "$ROOT/$m" && umount -l "$ROOT/$m"; done
    rm -rf "$WORK"
}
trap cleanup EXIT
mkdir "$ROOT"
tar -C "$ROOT" -xf "$BASE"
for d in proc sys dev; do mount --bind "/$d" "$ROOT/$d"; done
# Bookworm's qemu 7.2 shows emulated processes the host's x86 /proc/cpuinfo, on which ONNX Runtime
# (and torch >= 2.11) crash: give them a Pi 5's.
cat > "$WORK/cpuinfo" <<'EOF'
processor	: 0
BogoMIPS	: 108.00
Features	: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm lrcpc dcpop asimddp
CPU implementer	: 0x41
CPU architecture: 8
CPU variant	: 0x4
CPU part	: 0xd0b
CPU revision	: 1

Model		: Raspberry Pi 5 Model B Rev 1.0
EOF
mount --bind "$WORK/cpuinfo" "$ROOT/proc/cpuinfo"
cp /etc/resolv.conf "$ROOT/etc/resolv.conf"
# this machine reaches the registries through a TLS proxy whose CA is in the host's bundle
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$ROOT/etc/pip.conf"
mkdir -p "$ROOT/opt/src"
git ls-files -z | rsync -a --from0 --files-from=- ./ "$ROOT/opt/src/"

board() {  # a command in the emulated root, as the board runs it (clean environment)
    env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 QEMU_CPU=cortex-a76 chroot "$ROOT" "$@"
}

# the x86 side's mosquitto listens here in step 5; install.sh writes it into agent.yaml
PORT=$(python -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
step "deploy/pi/install.sh (the command a Pi user runs)"
board /opt/src/deploy/pi/install.sh --device-id ci-pi --broker-host 127.0.0.1 --broker-port "$PORT"
board /opt/blockskip/venv/bin/python -c "import importlib.metadata as m
names = sorted(d.metadata['Name'] for d in m.distributions())
assert not [n for n in names if n.lower().startswith(('nvidia-', 'triton'))], names
print(len(names), 'packages:', ', '.join(names))"

step "x86 artifacts: tiny FLUX, signed base packs and subject bundles (prepare)"
CI="$ROOT/opt/ci"
python .ci/arm64_check.py make "$CI"
BS=/opt/blockskip/venv/bin/blockskip

step "verify on arm64: signed bundle and base pack accepted, a tampered copy refused"
board $BS verify /opt/ci/bundle-fp32 --key /opt/ci/host.pub --require-signature
board $BS verify /opt/ci/base-nf4 --key /opt/ci/host.pub --require-signature
if board $BS verify /opt/ci/bundle-fp32-tampered --key /opt/ci/host.pub --require-signature; then
    echo "error: the tampered bundle verified on arm64" >&2
    exit 1
fi

for quant in fp32 nf4; do
    args=(train "bundle-$quant" --base-pack "base-$quant" --key host.pub --steps 10 --seed 0)
    step "train $quant on x86 and on arm64"
    (cd "$CI" && blockskip "${args[@]}" --out "x86/adapter-$quant" >/dev/null)
    board sh -c "cd /opt/ci && $BS ${args[*]} --out arm64/adapter-$quant >/dev/null"
done

for run in onnxruntime-fp32 onnxruntime-int8 torch; do
    args=(generate --model model --adapter x86/adapter-fp32 --bundle bundle-fp32 --key host.pub --bank-index 0
          --steps 4 --height 32 --width 32 --count 2 --backend "${run%-*}")
    [[ $run == *-* ]] && args+=(--precision "${run#*-}")  # torch: the model's own weights
    step "generate $run on x86 and on arm64 (the same x86 adapter)"
    (cd "$CI" && blockskip "${args[@]}" --cache-dir x86/engines --out "x86/$run" >/dev/null)
    board sh -c "cd /opt/ci && $BS ${args[*]} --cache-dir arm64/engines --out arm64/$run >/dev/null"
done

step "compare"
python .ci/arm64_check.py compare "$CI"

step "the agent over MQTT: fleet submit (train + generate) through a host worker, fleet fetch"
python .ci/arm64_check.py fleet "$CI" "$ROOT" "$PORT"
step "done"
