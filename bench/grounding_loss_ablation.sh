#!/usr/bin/env bash
# Grounding-loss ablation (issue "Faithful attention"): which design choice makes the maps faithful, and what
# does it cost in generation quality? Every variant fine-tunes the SAME plain model (trained without any
# grounding loss) for the same number of steps with the same data stream and seed; only the loss differs.
#
#   bash bench/grounding_loss_ablation.sh PLAIN_EXPORT STEPS OUT_ROOT VARIANT...
#   e.g. bash bench/grounding_loss_ablation.sh /root/train_out/shapes-v1-plain 150 /root/abl plain tok0.1 tok0.3
#
# Variants: plain (w=0), tok0.03, tok0.1, tok0.3 (token loss weight), tok0.1-midup (token loss on the mid and
# up layers only), tok0.1-pix (token loss + TokenCompose's pixel BCE term, weight 0.05).
# Writes OUT_ROOT/<variant>/{model, grounding.json, generation.json}. Needs the plain run's work dir (data,
# latents, VAE) at $PLAIN_WORK (default ~/.cache/discolens/train-shapes-v1-plain). One thread per variant:
# run two at a time on 2 cores.
set -euo pipefail
plain=$1; steps=$2; root=$3; shift 3
work_src=${PLAIN_WORK:-$HOME/.cache/discolens/train-shapes-v1-plain}
start=$(python -c "import json,sys; print(json.load(open(sys.argv[1]))['unet_step'])" "$plain/training_state.json")
target=$((start + steps))
cd "$(dirname "$0")/.."
for v in "$@"; do
  case $v in
    plain) args=(--token-loss-weight 0) ;;
    tok0.03) args=(--token-loss-weight 0.03) ;;
    tok0.1) args=(--token-loss-weight 0.1) ;;
    tok0.3) args=(--token-loss-weight 0.3) ;;
    tok0.1-midup) args=(--token-loss-weight 0.1 --token-loss-layers mid,up) ;;
    tok0.1-pix) args=(--token-loss-weight 0.1 --pixel-loss-weight 0.05) ;;
    *) echo "unknown variant $v" >&2; exit 2 ;;
  esac
  d=$root/$v
  mkdir -p "$d/work"
  for f in data.npz latents.pt vae tokenizer; do ln -sfn "$work_src/$f" "$d/work/$f"; done
  if [ ! -f "$d/model/training_state.json" ]; then cp -r "$plain" "$d/model"; fi
  python cli.py train-bundled --threads 1 --work-dir "$d/work" --out-dir "$d/model" --unet-steps $target \
    --warmup 20 --export-every 100000 --checkpoint-every 50 --text-aux-weight 0 "${args[@]}" > "$d/train.log" 2>&1
  OMP_NUM_THREADS=1 python cli.py eval-grounding --model "$d/model" --n-scenes 60 --timesteps 300 --json > "$d/grounding.json"
  OMP_NUM_THREADS=1 python cli.py eval-generation --model "$d/model" --n-per-kind 50 --json > "$d/generation.json"
done
