#!/usr/bin/env bash
# Build a virtual environment holding the LOWEST versions pyproject.toml declares for terdit's direct
# dependencies (each `name>=X` installed as `name==X`), install terdit into it without letting pip move any
# pin, check the environment is consistent, and run scripts/smoke_test.py there.
#
#   scripts/lowest_versions.sh [VENV_DIR]          (default: /tmp/terdit-lowest)
#   RUN_TESTS=1 scripts/lowest_versions.sh         (then also the diffusers-facing test files)
#
# torch is installed as $TORCH_SPEC, by default its lower bound (torch==2.6.0 from PyPI: ~3 GB with the CUDA
# libraries it loads even on a CPU-only machine; measured here: smoke test and RUN_TESTS pass with it).
# TORCH_SPEC=torch==2.13.0 checks the other bounds against the local CPU wheel without that download.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${1:-/tmp/terdit-lowest}"
TORCH_SPEC="${TORCH_SPEC:-torch==2.6.0}"

# name>=X -> name==X for every direct dependency except torch (python3.11+: tomllib)
PINS="$(python3 - "$ROOT/pyproject.toml" <<'PY'
import re, sys, tomllib
deps = tomllib.load(open(sys.argv[1], "rb"))["project"]["dependencies"]
pins = []
for dep in deps:
    m = re.fullmatch(r"\s*([A-Za-z0-9_.-]+)\s*>=\s*([^,;\s]+)\s*", dep)
    if not m:
        sys.exit(f"lowest_versions: cannot read a lower bound from {dep!r}")
    if m.group(1).lower() != "torch":
        pins.append(f"{m.group(1)}=={m.group(2)}")
print(" ".join(pins))
PY
)"
echo "lowest pins: $PINS"
echo "torch: $TORCH_SPEC"

python3 -m venv --clear "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade "pip>=23" setuptools wheel
# shellcheck disable=SC2086  # word splitting of the pin lists is intended
"$VENV/bin/python" -m pip install --quiet $TORCH_SPEC $PINS
"$VENV/bin/python" -m pip install --quiet --no-deps --no-build-isolation -e "$ROOT"
"$VENV/bin/python" -m pip check
cd "$VENV"  # away from the source tree: the installed terdit is the one imported
OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" "$VENV/bin/python" "$ROOT/scripts/smoke_test.py"

# RUN_TESTS=1: also run the diffusers-facing test files against these versions (pytest is not a dependency)
if [ "${RUN_TESTS:-0}" = 1 ]; then
    "$VENV/bin/python" -m pip install --quiet "pytest>=7"
    cd "$ROOT"
    OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" "$VENV/bin/python" -m pytest -p no:cacheprovider \
        tests/test_diffusers_native.py tests/test_pipeline.py tests/test_hub.py tests/test_model.py
fi
