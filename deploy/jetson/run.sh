#!/usr/bin/env bash
# Start (or restart) the blockskip agent container on a Jetson, supervised by Docker.
#   sudo deploy/jetson/run.sh            # image blockskip-agent:jp6, see deploy/README.md
# Environment: IMAGE, CONFIG_DIR (holds agent.yaml and the files it names), DATA_DIR (data_dir).
set -euo pipefail

IMAGE="${IMAGE:-blockskip-agent:jp6}"
NAME="${NAME:-blockskip-agent}"
CONFIG_DIR="${CONFIG_DIR:-/etc/blockskip}"
DATA_DIR="${DATA_DIR:-/var/lib/blockskip}"

if [[ ! -f "$CONFIG_DIR/agent.yaml" ]]; then
    echo "error: $CONFIG_DIR/agent.yaml is missing (deploy/README.md, step 'Configure')" >&2
    exit 2
fi
if [[ ! -d "$DATA_DIR" ]]; then
    echo "error: data directory $DATA_DIR is missing: sudo install -d -o 10001 -g 10001 -m 2775 $DATA_DIR" >&2
    exit 2
fi

docker rm -f "$NAME" >/dev/null 2>&1 || true
# --runtime nvidia: the GPU, CUDA driver and device nodes of the Jetson.
# --restart unless-stopped: Docker restarts the agent when it fails and at boot.
# --pid host: the lock file a training job writes (bundle.inuse) holds a pid that
#   `blockskip deploy` checks with kill -0 on the board, so it must be a board pid.
# --network host: the agent reaches a broker on the board's 127.0.0.1 (the mosquitto bridge).
# --stop-timeout: SIGTERM, then up to 330 s for the running job to checkpoint.
exec docker run --detach --name "$NAME" \
    --runtime nvidia \
    --restart unless-stopped \
    --pid host \
    --network host \
    --group-add video \
    --stop-timeout 330 \
    --volume "$CONFIG_DIR:/etc/blockskip:ro" \
    --volume "$DATA_DIR:/var/lib/blockskip" \
    "$IMAGE" --config /etc/blockskip/agent.yaml
