# Sourced by the llama.cpp comparison scripts (run from the repository root): makes the
# llama-cpp-python[server] virtual environment under ~/.cache/enricher (the first time it
# compiles llama.cpp, which takes a while; pip caches the wheel), builds enricher in release
# mode and fetches the default model. Sets VENV, MODEL and BIN.
VENV="${LLAMACPP_VENV:-$HOME/.cache/enricher/llamacpp-venv}"
MODEL=models/SmolLM2-135M-Instruct.Q4_1.gguf
if [ ! -x "$VENV/bin/python" ]; then python3 -m venv "$VENV"; fi
"$VENV/bin/python" -c "import llama_cpp.server" 2>/dev/null || {
  echo "installing llama-cpp-python[server] 0.3.36 (compiles llama.cpp once)..." >&2
  pip_args=()
  # llama.cpp's native build turns on its AMX backend on CPUs with AMX (Sapphire Rapids and
  # later); on such a CPU that build crashed (segmentation fault) loading this model. There,
  # build for the CPU's vector features named one by one (AVX-512 VNNI included) without
  # AMX; the wheel is then neither taken from nor put in pip's cache, which may hold a
  # native one.
  if [ -z "${CMAKE_ARGS:-}" ] && grep -qw amx_tile /proc/cpuinfo 2>/dev/null; then
    flags="-DGGML_NATIVE=OFF -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"
    # cpuinfo flag:ggml option
    for f in avx:AVX avx2:AVX2 fma:FMA f16c:F16C bmi2:BMI2 avx512f:AVX512 \
      avx512vbmi:AVX512_VBMI avx512_vnni:AVX512_VNNI avx512_bf16:AVX512_BF16 avx_vnni:AVX_VNNI; do
      on=OFF
      grep -qw "${f%%:*}" /proc/cpuinfo && on=ON
      flags="$flags -DGGML_${f#*:}=$on"
    done
    export CMAKE_ARGS="$flags"
    pip_args+=(--no-cache-dir)
    echo "this CPU has AMX: building llama.cpp without it ($CMAKE_ARGS)" >&2
  fi
  CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" "$VENV/bin/pip" install -q "${pip_args[@]}" \
    "llama-cpp-python[server]==0.3.36"
}
cargo build --release -q
BIN="${CARGO_TARGET_DIR:-target}/release/enricher"
"$BIN" models fetch >/dev/null
