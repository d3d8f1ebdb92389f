#!/usr/bin/env bash
# Launch a prefill node (kv_producer): chunked prefill over its prefix cache, pushes KV to decode nodes.
# Takes exactly `pdserve prefill`'s flags (see `pdserve prefill --help`), e.g.
#   deploy/prefill.sh --model models/tiny-llama --rpc-port 7100 --events-port 7101 --http-port 7102 --kv-transfer-config '{"kv_connector":"tcp"}'
# Every process of one cluster must share the frame-signing secret: export PDSERVE_KV_SECRET (or pass
# --kv-secret). Sockets bind --host (127.0.0.1 unless given). $PDSERVE_PYTHON picks the interpreter
# (default: the repository's .venv, else python3 with pdserve installed).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PDSERVE_PYTHON:-$repo/.venv/bin/python}"
[ -x "$py" ] || py="$(command -v python3)"
if [ -z "${PDSERVE_KV_SECRET:-}" ] && [[ " $* " != *" --kv-secret"* ]]; then
    echo "deploy/prefill.sh: warning: PDSERVE_KV_SECRET is not set; frames are signed with the public development secret" >&2
fi
cd "$repo"
exec "$py" -m pdserve --log-level "${PDSERVE_LOG_LEVEL:-INFO}" prefill "$@"
