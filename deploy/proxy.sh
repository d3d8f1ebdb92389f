#!/usr/bin/env bash
# Launch the OpenAI-compatible proxy: --node names each node's events endpoint.
# Takes exactly `pdserve proxy`'s flags (see `pdserve proxy --help`), e.g.
#   deploy/proxy.sh --model models/tiny-llama --port 8000 --node tcp://127.0.0.1:7101 --node tcp://127.0.0.1:7201 [--redis-url redis://127.0.0.1:6379/0]
# Every process of one cluster must share the frame-signing secret: export PDSERVE_KV_SECRET (or pass
# --kv-secret). Sockets bind --host (127.0.0.1 unless given). $PDSERVE_PYTHON picks the interpreter
# (default: the repository's .venv, else python3 with pdserve installed).
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PDSERVE_PYTHON:-$repo/.venv/bin/python}"
[ -x "$py" ] || py="$(command -v python3)"
if [ -z "${PDSERVE_KV_SECRET:-}" ] && [[ " $* " != *" --kv-secret"* ]]; then
    echo "deploy/proxy.sh: warning: PDSERVE_KV_SECRET is not set; frames are signed with the public development secret" >&2
fi
cd "$repo"
exec "$py" -m pdserve --log-level "${PDSERVE_LOG_LEVEL:-INFO}" proxy "$@"
