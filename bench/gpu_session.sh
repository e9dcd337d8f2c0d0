#!/usr/bin/env bash
# One GPU session of the bench: install the carried wheels (.whl/) next to the machine's torch, apply our overlays,
# then run the parts named on the command line. Results go to $OUT (default bench/results/gpu-session).
#
#   bash bench/gpu_session.sh setup parity levers recipes-stage1
#
# Parts: setup (always first), parity (bench/liger_parity.py), levers (bench_train_gpu.py, recipe settings),
# long (4B shapes at cutoff_len 8192, with and without Liger), var (a variable-length batch: padded, packed with
# SDPA and the block mask as LLaMA-Factory does, packed with our attention per document), compile (regionally
# compiled layers, padded and packed), frozen (the recipes' freeze set: ViT frozen, projector + LLM trained),
# recipes-stage1 / recipes-stage3 (random Qwen-Merge-4B through our merger, llamafactory-cli train), recipe8b-stage1
# (random Qwen-Merge-8B, stage 1 at micro-batch 8 x 4 and 4 x 8).
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
        stock-ckpt,merge-matched-ckpt-liger,merge-4b-ckpt,merge-4b-ckpt-liger,merge-4b-ckpt-liger-half,var-pad,var-packed-mask,var-packed-docs
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
        --cases var-packed-docs,var-packed-mask,var-pad
      echo "var rc=$?"
      ;;
    compile)
      step compile
      timeout 300 python3 bench/bench_train_gpu.py --warmup 3 --repeats 5 --json "$OUT/compile.json" \
        --cases merge-4b-ckpt-liger-compile,var-packed-docs-compile
      echo "compile rc=$?"
      ;;
    frozen)
      step frozen
      timeout 240 python3 bench/bench_train_gpu.py --warmup 2 --repeats 5 --json "$OUT/frozen_vit.json" --cases \
        merge-4b-ckpt-liger-frozenvit,var-packed-docs-frozenvit,var-packed-docs-frozenvit-half
      echo "frozen rc=$?"
      ;;
    recipe8b-stage1)  # 8B stage 1 at half the 4B micro-batch, then at the 4B one (same global batch)
      step "recipe 8b stage1"
      W8="$WORK-8b"
      for sub in sources merge data; do python3 bench/gpu_recipes.py $sub --work "$W8" --size 8b || exit 1; done
      for micro in "4 8" "8 4"; do
        read -r bs accum <<< "$micro"
        rm -rf "$W8"/out-*  # the final 17.8 GB save of each run; two would fill the 64 GB disk with the sources
        timeout 170 python3 bench/gpu_recipes.py train per_device_train_batch_size=$bs gradient_accumulation_steps=$accum \
          --work "$W8" --size 8b --model "$W8/Qwen-Merge-VL-8B-base" --recipe examples/qwen_merge_8b/stage1.yaml \
          --steps 3 --tag="-bs$bs" --json "$OUT/recipe_8b_stage1_bs$bs.json" > "$WORK-8b-bs$bs.log" 2>&1
        tail -n 60 "$WORK-8b-bs$bs.log" > "$OUT/recipe_8b_stage1_bs$bs.log"
      done
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
