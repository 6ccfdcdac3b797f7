# Sourced by the llama.cpp comparison scripts (run from the repository root): makes the
# llama-cpp-python[server] virtual environment under ~/.cache/enricher (the first time it
# compiles llama.cpp, which takes a while; pip caches the wheel), builds enricher in release
# mode and fetches the default model. Sets VENV, MODEL and BIN.
VENV="${LLAMACPP_VENV:-$HOME/.cache/enricher/llamacpp-venv}"
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
"$VENV/bin/python" -c "import llama_cpp.server" 2>/dev/null || {
  echo "installing llama-cpp-python[server] 0.3.36 (compiles llama.cpp once)..." >&2
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$VENV/bin/pip" install -q "llama-cpp-python[server]==0.3.36"
}
cargo build --release -q
BIN="${CARGO_TARGET_DIR:-target}/release/enricher"
"$BIN" models fetch >/dev/null
