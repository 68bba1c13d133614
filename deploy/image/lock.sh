#!/usr/bin/env bash
# Regenerate the image's hash-pinned lock files from pyproject.toml:
#
#   deploy/image/requirements.lock             [project].dependencies: the default image
#                                              (agent, controller, sidecar without torch)
#   deploy/image/requirements-collective.lock  the same + the `collective` extra (torch and
#                                              its CUDA wheels): the sidecar variant
#   deploy/image/requirements-build.lock       [build-system].requires: the backend the build
#                                              stage builds our own wheel with
#
#   bash deploy/image/lock.sh                  # keep existing pins; add/drop what pyproject changed
#   bash deploy/image/lock.sh --upgrade        # re-resolve everything to the newest allowed
#   bash deploy/image/lock.sh --upgrade-package aiohttp
#
# Arguments go to every pip-compile call, so the locks move together and shared packages keep
# one version across images. Each lock's header records the exact pip-compile command.
#
# Run it on the image's platform, CPython 3.11 on linux x86_64 (checked below): pip-compile
# evaluates environment markers for the interpreter it runs on, and torch's nvidia-*/triton
# requirements only apply on Linux x86_64. pip-tools goes into a throwaway venv, never the
# project's. The collective lock takes minutes (torch's CUDA wheels are large).
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON="${PYTHON:-python3.11}"
PIP_TOOLS_VERSION="7.6.2"
OUT="deploy/image"

"$PYTHON" - <<'EOF'
import platform
import sys

want = ("CPython", (3, 11), "Linux", "x86_64")
got = (platform.python_implementation(), sys.version_info[:2], platform.system(),
       platform.machine())
if got != want:
    sys.exit(f"lock.sh: run on the image's platform {want}, not {got} (set PYTHON=...)")
EOF

venv="$(mktemp -d)"
trap 'rm -rf "$venv"' EXIT
"$PYTHON" -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check "pip-tools==$PIP_TOOLS_VERSION"

# Resolve against the package index only: a machine-local wheel directory (PIP_FIND_LINKS)
# would put hashes of locally built wheels into the lock, which PyPI cannot serve.
unset PIP_FIND_LINKS PIP_NO_INDEX

compile() {  # compile <output> <comment line> <pip-compile args...>
    local output="$1" comment="$2"
    shift 2
    "$venv/bin/pip-compile" --quiet --generate-hashes --strip-extras --allow-unsafe \
        --no-emit-find-links --no-emit-index-url --output-file="$output" "$@"
    # pip-compile rewrites the file, so the note above its own header is re-added every time.
    {
        printf '# %s\n' "$comment" \
            "Regenerate all image locks with: bash deploy/image/lock.sh" \
            "(pip-tools $PIP_TOOLS_VERSION on CPython 3.11, linux x86_64: the image's platform)."
        cat "$output"
    } >"$output.tmp"
    mv "$output.tmp" "$output"
}

compile "$OUT/requirements.lock" \
    "Default image (agent, controller, sidecar): pyproject.toml [project].dependencies." \
    pyproject.toml "$@"
compile "$OUT/requirements-collective.lock" \
    "Sidecar variant (EXTRAS=collective): [project].dependencies + the collective extra." \
    --extra=collective pyproject.toml "$@"
compile "$OUT/requirements-build.lock" \
    "Build stage only: pyproject.toml [build-system].requires, to build our own wheel." \
    --all-build-deps --only-build-deps pyproject.toml "$@"
