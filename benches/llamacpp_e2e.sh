#!/usr/bin/env bash
# End-to-end products/minute: the same products and channels through the whole pipeline
# (prompt -> model -> checks -> repair -> draft), three ways on the same model file and cores:
#   1. the local provider, one draft at a time (no batching),
#   2. the local provider, CONCURRENCY (default 8) drafts at once (decoded together),
#   3. the `openai` provider against llama.cpp's OpenAI-compatible server
#      (llama-cpp-python[server]), CONCURRENCY requests in flight.
#
#   benches/llamacpp_e2e.sh                       # 50 WDC dev products x seo,amazon,social
#   LIMIT=20 CONCURRENCY=4 CHANNELS=seo benches/llamacpp_e2e.sh
#   ONLY=server benches/llamacpp_e2e.sh           # just the llama.cpp server run
#
# Uses the virtual environment of benches/llamacpp_setup.sh (created on first use, which compiles
# llama.cpp once). Reports go to $OUT (default: a temporary directory); the summary lines
# are printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS="${THREADS:-2}"
LIMIT="${LIMIT:-50}"
CONCURRENCY="${CONCURRENCY:-8}"   # the service default batch
CHANNELS="${CHANNELS:-seo,amazon,social}"
INPUT="${INPUT:-../shared/data/products/wdc-pave-dev.jsonl}"
PORT="${PORT:-18765}"
OUT="${OUT:-$(mktemp -d)}"
mkdir -p "$OUT"
. benches/llamacpp_setup.sh
export RAYON_NUM_THREADS="$THREADS"
run() { # name, extra args...
  local name="$1"; shift
  "$BIN" eval --input "$INPUT" --channels "$CHANNELS" --limit "$LIMIT" --report "$OUT/$name.md" "$@" \
    > "$OUT/$name.log" 2>&1
  grep -m1 '^Throughput' "$OUT/$name.md" | sed "s/^/$name: /"
}

if [ "${ONLY:-}" != server ]; then
  run local-c1 --concurrency 1
  run "local-c$CONCURRENCY" --concurrency "$CONCURRENCY"
fi

"$VENV/bin/python" -m llama_cpp.server --model "$MODEL" --n_threads "$THREADS" \
  --n_threads_batch "$THREADS" --n_ctx 8192 --chat_format chatml --host 127.0.0.1 --port "$PORT" \
  > "$OUT/llamacpp-server.log" 2>&1 &
server=$!
trap 'kill $server 2>/dev/null || true' EXIT
for _ in $(seq 1 120); do
  curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null && break
  sleep 1
done
# The server answers one request at a time, so a request waits behind the others in flight:
# the per-request timeout must cover that queue (the default 60 s did not on a slower CPU).
OPENAI_BASE_URL="http://127.0.0.1:$PORT/v1" OPENAI_API_KEY=unused OPENAI_MODEL="$MODEL" \
  ENRICHER_PROVIDERS__OPENAI__CONCURRENCY="$CONCURRENCY" \
  ENRICHER_PROVIDERS__OPENAI__TIMEOUT_S="${SERVER_TIMEOUT_S:-600}" \
  run "llamacpp-server-c$CONCURRENCY" --provider openai --concurrency "$CONCURRENCY"
echo "reports in $OUT"
