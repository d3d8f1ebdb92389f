#!/usr/bin/env bash
# Launch a decode node (kv_consumer): reserves blocks, receives KV, continuous batching, streams tokens.
# Takes exactly `pdserve decode`'s flags (see `pdserve decode --help`), e.g.
#   deploy/decode.sh --model models/tiny-llama --rpc-port 7200 --events-port 7201 --http-port 7202 --kv-transfer-config '{"kv_connector":"tcp"}'
# Every process of one cluster must share the frame-signing secret: export PDSERVE_KV_SECRET (or pass
# --kv-secret). Sockets bind --host (127.0.0.1 unless given). $PDSERVE_PYTHON picks the interpreter
# (default: the repository's .venv, else python3 with pdserve installed).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PDSERVE_PYTHON:-$repo/.venv/bin/python}"
[ -x "$py" ] || py="$(command -v python3)"
if [ -z "${PDSERVE_KV_SECRET:-}" ] && [[ " $* " != *" --kv-secret"* ]]; then
    echo "deploy/decode.sh: warning: PDSERVE_KV_SECRET is not set; frames are signed with the public development secret" >&2
fi
cd "$repo"
exec "$py" -m pdserve --log-level "${PDSERVE_LOG_LEVEL:-INFO}" decode "$@"
