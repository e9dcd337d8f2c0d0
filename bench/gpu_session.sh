#!/usr/bin/env bash
# One GPU session of the bench: install the carried wheels (.whl/) next to the machine's torch, apply our overlays,
# then run the parts named on the command line. Results go to $OUT (default bench/results/gpu-session).
#
#   bash bench/gpu_session.sh setup parity levers recipes-stage1
#
# Parts: setup (always first), parity (bench/liger_parity.py), levers (bench_train_gpu.py, recipe settings),
# long (4B shapes at cutoff_len 8192, with and without Liger), var (a variable-length batch: padded, packed with
# flex attention, packed with varlen flash attention), compile (regionally compiled layers),
# recipes-stage1 / recipes-stage3 (random Qwen-Merge-4B through our merger, llamafactory-cli train).
set -uo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OUT="${OUT:-$REPO/bench/results/gpu-session}"
WORK="${WORK:-/tmp/qm}"
mkdir -p "$OUT" "$WORK"
cd "$REPO"
export PYTHONUNBUFFERED=1 DISABLE_VERSION_CHECK=1 TOKENIZERS_PARALLELISM=false
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="/tmp/site:$REPO" PATH="/tmp/site/bin:$PATH"
step() { echo "=== $* ($(date -u +%T))"; }

for part in "$@"; do
  case "$part" in
    setup)
      step setup
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        .whl/*.whl || exit 1
      python3 overlays/apply.py apply transformers llamafactory || exit 1
      python3 overlays/apply.py check transformers llamafactory
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
      python3 - <<'EOF' | tee "$OUT/env.txt"
import importlib.metadata as md, sys
import torch
print("python", sys.version.split()[0], "torch", md.version("torch"), "cuda", torch.version.cuda,
      "device", torch.cuda.get_device_name())
for name in ("transformers", "tokenizers", "llamafactory", "deepspeed", "liger-kernel", "accelerate", "peft", "trl",
             "datasets", "triton", "numpy", "huggingface-hub", "flash-attn", "vllm", "xformers"):
    try:
        print(name, md.version(name))
    except md.PackageNotFoundError:
        print(name, "-")
import deepspeed, liger_kernel.transformers, llamafactory.qwen_merge.liger  # noqa: F401
try:
    from torch.nn.attention.varlen import varlen_attn
    import inspect
    print("varlen_attn", inspect.signature(varlen_attn))
except ImportError as e:
    print("varlen_attn: -", e)
EOF
      ;;
    parity)
      step parity
      timeout 240 python3 bench/liger_parity.py --json "$OUT/liger_parity.json"
      echo "parity rc=$?"
      ;;
    levers)
      step levers
      timeout 300 python3 bench/bench_train_gpu.py --warmup 2 --repeats 5 --json "$OUT/levers.json" --cases \
        stock-ckpt,merge-matched-ckpt-liger,merge-4b-ckpt,merge-4b-ckpt-liger,merge-4b-ckpt-liger-half,var-pad,var-packed-flex,var-packed-varlen
      echo "levers rc=$?"
      ;;
    long)
      step long
      timeout 200 python3 bench/bench_train_gpu.py --warmup 1 --repeats 3 --samples 4 --text-tokens 7934 \
        --json "$OUT/long8192.json" --cases merge-4b-ckpt,merge-4b-ckpt-liger
      echo "long rc=$?"
      ;;
    var)
      step var
      timeout 170 python3 bench/bench_train_gpu.py --warmup 1 --repeats 3 --json "$OUT/var.json" \
        --cases var-packed-varlen,var-packed-flex,var-pad
      echo "var rc=$?"
      ;;
    compile)
      step compile
      timeout 300 python3 bench/bench_train_gpu.py --warmup 3 --repeats 5 --json "$OUT/compile.json" \
        --cases merge-4b-ckpt-liger-compile
      echo "compile rc=$?"
      ;;
    recipes-*)
      stage="${part#recipes-}"
      step "recipe $stage"
      if [ ! -f "$WORK/Qwen-Merge-VL-4B-base/config.json" ]; then
        python3 bench/gpu_recipes.py sources --work "$WORK" && python3 bench/gpu_recipes.py merge --work "$WORK" ||
          exit 1
        du -sh "$WORK"/* | tee -a "$OUT/merge.txt"
      fi
      [ -f "$WORK/data/dataset_info.json" ] || python3 bench/gpu_recipes.py data --work "$WORK" \
        $([ -n "${NO_TOKEN_COUNTS:-}" ] || echo --model "$WORK/Qwen-Merge-VL-4B-base") || exit 1
      timeout "${RECIPE_TIMEOUT:-330}" python3 bench/gpu_recipes.py train --work "$WORK" \
        --model "$WORK/Qwen-Merge-VL-4B-base" --recipe "examples/qwen_merge_4b/$stage.yaml" \
        --steps "$([ "$stage" = stage1 ] && echo "${STEPS1:-3}" || echo "${STEPS:-4}")" --json "$OUT/recipe_4b_$stage.json" ${EXTRA:-} 2>&1 |
        grep -v -E "it/s\]|s/it\]" | tail -n 150
      echo "recipe $stage rc=$?"
      ;;
    *) echo "unknown part $part" >&2 ;;
  esac
done
step done
