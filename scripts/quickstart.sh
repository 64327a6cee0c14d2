#!/usr/bin/env bash
# Set up a virtualenv and run the main job on the built-in default: the `dates` model is trained (only if the
# shipped checkpoint is missing), evaluated on its held-out test split, exported to ONNX into models/, served
# over gRPC, and asked for one streamed prediction with its attention (terminal + out/attention.png).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh train,export,cpu,plot
A="$VENV/bin/attnserve"

if [ ! -f checkpoints/dates/model.safetensors ]; then
  "$A" train --task dates --out checkpoints/dates --seed 0
fi
"$A" evaluate checkpoints/dates
"$A" export checkpoints/dates --repo models --name dates --if-changed
"$A" inspect "models/dates/$(ls models/dates | grep -E '^[0-9]+$' | sort -n | tail -1)"

mkdir -p out
# 127.0.0.1:50051 unless ATTNSERVE_ADDRESS says otherwise or the port is taken (then any free port).
ADDRESS=${ATTNSERVE_ADDRESS:-$("$VENV/bin/python" - <<'PY'
import socket
s = socket.socket()
try:
    s.bind(("127.0.0.1", 50051))
except OSError:
    s.bind(("127.0.0.1", 0))
print(f"127.0.0.1:{s.getsockname()[1]}")
PY
)}
"$A" serve --repo models --address "$ADDRESS" --metrics-port -1 --drain-seconds 0 > out/server.log 2>&1 &
SERVER=$!
trap 'kill -TERM $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 60); do
  "$VENV/bin/python" -m serving.client.healthcheck "$ADDRESS" >/dev/null 2>&1 && break
  kill -0 $SERVER 2>/dev/null || { cat out/server.log; exit 1; }
  sleep 0.5
done
"$A" models --server "$ADDRESS" --info
"$A" generate "mardi 3 mars 2021" --server "$ADDRESS" --attention cross --mean --plot out/attention.png
