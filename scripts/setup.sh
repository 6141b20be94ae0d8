#!/usr/bin/env bash
# Creates .venv with the pinned torch pair and ucgm-ray installed (editable).
#   bash scripts/setup.sh          runtime dependencies
#   bash scripts/setup.sh --test   plus the test extras (pytest, scipy, moto server)
# Re-running is cheap: nothing is reinstalled while pyproject.toml and this script are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."

# torch 2.14.1 + torchvision 0.29.1: timm needs torchvision, and this pair is the newest one whose
# torchvision imports (README, "Why this torch"). It is a CUDA build that also runs on CPU.
TORCH_PACKAGES=${UCGM_TORCH_PACKAGES:-"torch==2.14.1 torchvision==0.29.1"}
PYTHON=${PYTHON:-python3}
VENV=${UCGM_VENV:-.venv}

extras=""
[[ "${1:-}" == "--test" ]] && extras="[test]"

stamp="$VENV/.ucgm-setup-$(cat pyproject.toml "$0" | sha256sum | cut -c1-16)${extras:+-test}"
if [[ -f "$stamp" ]]; then
    echo "setup: $VENV is up to date"
    exit 0
fi

start=$(date +%s)
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
pip_quiet=(-q --disable-pip-version-check)
"$VENV/bin/python" -m pip install "${pip_quiet[@]}" --upgrade pip
# shellcheck disable=SC2086
"$VENV/bin/python" -m pip install "${pip_quiet[@]}" $TORCH_PACKAGES
"$VENV/bin/python" -m pip install "${pip_quiet[@]}" -e ".${extras}"

# Fashion-MNIST ships as a Debian package; install it when we can, the default job does not need it.
if [[ ! -d /usr/share/datasets/fashion-mnist && -n "$extras" ]] && command -v apt-get >/dev/null && [[ $(id -u) == 0 ]]; then
    (apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1 \
        || (apt-get update -qq >/dev/null 2>&1 && apt-get install -y -qq dataset-fashion-mnist >/dev/null 2>&1)) \
        || echo "setup: could not install Debian's dataset-fashion-mnist; Fashion-MNIST tests will be skipped"
fi

rm -f "$VENV"/.ucgm-setup-*
touch "$stamp"
echo "setup: done in $(( $(date +%s) - start )) s"
