#!/usr/bin/env bash
# Make llama.cpp's own environment for benchmarks/serve_llamacpp.py, apart from the project's .venv:
#   VENV/                 a virtual environment with llama-cpp-python's Python bindings (and gguf, numpy, pillow)
#   VENV/lib-stock/       llama.cpp's shared libraries and llama-mtmd-cli, built from the source that
#                         llama-cpp-python's sdist vendors, as released
#   VENV/lib-fixed/       the same with one line of tools/mtmd/models/llava.cpp changed: the CLS embedding is
#                         concatenated BEFORE the patch embeddings, where clip.cpp (and CLIP) expect it
#
#   scripts/make_llamacpp_venv.sh [VENV]      # VENV defaults to .venvs/llamacpp (git-ignored)
#
# Needs cmake and g++ (Debian: apt-get install cmake g++). About 10-15 minutes on 2 cores. The bindings are
# installed without their own build (LLAMA_BUILD=OFF) and pointed at lib-stock or lib-fixed at run time through
# LLAMA_CPP_LIB_PATH and MTMD_CPP_LIB, so llama.cpp is compiled once and only libmtmd is rebuilt for the fix.
set -euo pipefail

VENV="${1:-.venvs/llamacpp}"
VERSION="0.3.36"
PYTHON="${PYTHON:-python3}"
JOBS="${JOBS:-$(nproc)}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PYTHON" -m venv "$VENV"
fi
VENV="$(cd "$VENV" && pwd)"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip

SRC="$VENV/src"
mkdir -p "$SRC"
if [ ! -d "$SRC/llama_cpp_python-$VERSION" ]; then
    "${PIP[@]}" download -q --no-deps --no-binary :all: "llama-cpp-python==$VERSION" -d "$SRC"
    tar -xzf "$SRC/llama_cpp_python-$VERSION.tar.gz" -C "$SRC"
fi
PKG="$SRC/llama_cpp_python-$VERSION"
LLAMA="$PKG/vendor/llama.cpp"

# the Python bindings only: llama.cpp itself is built below
CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" "${PIP[@]}" install -q "$PKG" "gguf==0.19.0" numpy pillow

BUILD="$VENV/build"
cmake -S "$LLAMA" -B "$BUILD" -DCMAKE_BUILD_TYPE=Release -DBUILD_SHARED_LIBS=ON -DLLAMA_CURL=OFF \
    -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DGGML_NATIVE=ON >/dev/null
build_into() {
    cmake --build "$BUILD" -j "$JOBS" --target llama mtmd llama-mtmd-cli
    rm -rf "$1" && mkdir -p "$1"
    find "$BUILD" \( -name '*.so' -o -name '*.so.*' -o -name 'llama-mtmd-cli' \) -exec cp -a {} "$1"/ \;
}

LLAVA_CPP="$LLAMA/tools/mtmd/models/llava.cpp"
STOCK_LINE='inp = ggml_concat(ctx0, inp, model.class_embedding, 1);'
FIXED_LINE='inp = ggml_concat(ctx0, model.class_embedding, inp, 1);'
if grep -qF "$FIXED_LINE" "$LLAVA_CPP"; then   # a rerun: undo the fix to build the stock libraries
    sed -i "s/$FIXED_LINE/$STOCK_LINE/" "$LLAVA_CPP"
fi
grep -qF "$STOCK_LINE" "$LLAVA_CPP" || { echo "make_llamacpp_venv.sh: the CLS concat line is not in $LLAVA_CPP" >&2; exit 1; }
build_into "$VENV/lib-stock"
sed -i "s/$STOCK_LINE/$FIXED_LINE/" "$LLAVA_CPP"
grep -qF "$FIXED_LINE" "$LLAVA_CPP"
build_into "$VENV/lib-fixed"
cmp -s "$VENV/lib-stock/libmtmd.so" "$VENV/lib-fixed/libmtmd.so" && { echo "the fix changed nothing in libmtmd" >&2; exit 1; }
LLAMA_CPP_LIB_PATH="$VENV/lib-stock" MTMD_CPP_LIB="$VENV/lib-stock" LD_LIBRARY_PATH="$VENV/lib-stock" \
    "$VENV/bin/python" -c "import llama_cpp, llama_cpp.mtmd_cpp, gguf; print('llama-cpp-python', llama_cpp.__version__, 'gguf', gguf.__version__ if hasattr(gguf, '__version__') else '')"
