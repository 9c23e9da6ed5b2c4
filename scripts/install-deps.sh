#!/usr/bin/env bash
# Installs what kvcache needs to build and test, from Debian's packages, and nothing else:
# CMake and a C++20 compiler, Eigen, GoogleTest, Google Benchmark, nlohmann_json, PCRE2,
# libsentencepiece (tokenizer.model files) and Doxygen (the docs target: the API reference), and
# pip for scripts/setup-model.sh; with --sanitizers, clang 14 and its runtimes
# (scripts/sanitizer-stage.sh).
# The CUDA toolkit (nvcc, cuBLAS) is used when present and is not installed here. Safe to run again:
# packages already present are left alone, and apt-get is skipped when nothing is missing.
set -euo pipefail

packages=(cmake g++ make pkg-config libeigen3-dev libgtest-dev libbenchmark-dev nlohmann-json3-dev libpcre2-dev libsentencepiece-dev doxygen)
# --sanitizers (scripts/sanitizer-stage.sh): clang with its sanitizer and libFuzzer runtimes and
# its OpenMP runtime.
if [[ ${1:-} == --sanitizers ]]; then packages+=(clang-14 libclang-rt-14-dev libomp-14-dev); fi
# scripts/setup-model.sh fetches the default model with pip; bring pip when python3 lacks it.
if ! python3 -m pip --version >/dev/null 2>&1; then packages+=(python3-pip); fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done

if ((${#missing[@]} == 0)); then
  echo "install-deps: all packages present"
  exit 0
fi

echo "install-deps: installing ${missing[*]}"
sudo=""
if [[ $(id -u) -ne 0 ]]; then sudo="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get update -qq
$sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
