#!/usr/bin/env bash
# Compares enricher's local inference with llama.cpp on the same GGUF file, the same prompt
# tokens and the same thread count; prints both and the ratio.
#
#   benches/llamacpp.sh                 # 300-token prompt, 64 generated, 2 threads
#   PROMPT_TOKENS=500 GEN_TOKENS=128 THREADS=2 benches/llamacpp.sh
#
# It installs llama-cpp-python into a virtual environment under ~/.cache/enricher (the first
# time it compiles llama.cpp, which takes a while; pip caches the wheel), and builds enricher
# in release mode.
set -euo pipefail
cd "$(dirname "$0")/.."
THREADS="${THREADS:-2}"
PROMPT_TOKENS="${PROMPT_TOKENS:-300}"
GEN_TOKENS="${GEN_TOKENS:-64}"
RUNS="${RUNS:-5}"
. benches/llamacpp_setup.sh
out="$(mktemp -d)"
export RAYON_NUM_THREADS="$THREADS" CANDLE_NUM_THREADS="$THREADS"
"$BIN" bench local --prompt-tokens "$PROMPT_TOKENS" --gen-tokens "$GEN_TOKENS" \
  --runs "$RUNS" --dump-prompt "$out/prompt.json" --json > "$out/enricher.json"
"$VENV/bin/python" benches/llamacpp_bench.py --model "$MODEL" --prompt "$out/prompt.json" \
  --threads "$THREADS" --runs "$RUNS" > "$out/llamacpp.json"
python3 - "$out/enricher.json" "$out/llamacpp.json" <<'PY'
import json, sys
e, l = json.load(open(sys.argv[1])), json.load(open(sys.argv[2]))
print(f"| engine | prompt tokens | prompt tok/s | gen tok/s | first token ms |")
print(f"| --- | --- | --- | --- | --- |")
print(f"| enricher | {e['prompt_tokens']} | {e['prompt_tokens_per_s']:.1f} | {e['gen_tokens_per_s']:.1f} | {e['time_to_first_token_ms']:.0f} |")
print(f"| llama.cpp | {l['prompt_tokens']} | {l['prompt_tokens_per_s']:.1f} | {l['gen_tokens_per_s']:.1f} | {l['time_to_first_token_ms']:.0f} |")
print(f"| ratio enricher/llama.cpp | | {e['prompt_tokens_per_s']/l['prompt_tokens_per_s']:.2f}x | {e['gen_tokens_per_s']/l['gen_tokens_per_s']:.2f}x | |")
print(f"\nenricher peak RSS {e['peak_rss_mib']:.0f} MiB with a {e['model_file_mib']:.0f} MiB model file")
PY
