#!/usr/bin/env bash
# ALMA-R recipe at small scale: SmolLM2-135M-Instruct + LoRA, German->English, on CPU.
# Triplets: WMT'22 de-en test set (1984 sources) x 6 system outputs, scored with sentence chrF
# against the reference, reference excluded from the candidates (see docs/mt-cpo.md).
# Evaluation: first 500 sentences of WMT'21 de-en (valid.de-en.json), greedy, sacreBLEU.
# Equal data and steps for every trained model. Every step is skipped when its output exists,
# so the script can be re-run after an interruption (translation also resumes mid-file).
# `experiments/mt/run.sh two-stage` runs the paper's two-stage recipe instead (SFT first, then CPO vs
# more SFT with the model's own candidates: experiments/mt/run_almar.sh, issue 15).
set -euo pipefail
if [ "${1:-}" = two-stage ]; then exec bash "$(dirname "$0")/run_almar.sh"; fi
cd "$(dirname "$0")/../.."
PT=${PT:-.venv/bin/preftune}
DATA=../shared/data/wmt
OUT=experiments/out/mt
STEPS=${STEPS:-40}
BS=${BS:-8}
LR=${LR:-2e-4}
N_EVAL_STAGES=${N_EVAL_STAGES:-"200 500"}
LOSSES=${LOSSES:-"sft cpo"}
mkdir -p "$OUT/logs"

# 1. triplets (scores for chrf and mbr-chrf are both written; training picks chrf)
[ -f "$OUT/triplets.de-en.json" ] || $PT mt build-triplets --pair de-en --input $DATA/test.de-en.json \
    --systems $DATA/wmt22-outputs-de-en/*.en --scorer chrf mbr-chrf --exclude_reference \
    --output "$OUT/triplets.de-en.json" | tee "$OUT/logs/triplets.log"

# 2. training: same triplets, same order (seed), same steps and batch size
for LOSS in $LOSSES; do
  [ -f "$OUT/$LOSS/adapter_config.json" ] || $PT train --dataset "$OUT/triplets.de-en.json" \
      --language_pairs de-en --cpo_scorer chrf --loss "$LOSS" --use_peft \
      --max_steps "$STEPS" --per_device_train_batch_size "$BS" --learning_rate "$LR" \
      --max_length 256 --max_prompt_length 160 --gradient_checkpointing false \
      --logging_steps 5 --save_strategy no --report_to none --seed 42 \
      --output_dir "$OUT/$LOSS" 2>&1 | tee "$OUT/logs/train-$LOSS.log"
done

# 3. translation (greedy, plain ALMA prompt) of the first N WMT'21 sentences, in stages: every
#    system is translated and scored on the first 200 sentences, then extended (resumed) to 500.
for N in $N_EVAL_STAGES; do
  TR="$PT mt translate --pair de-en --input $DATA/valid.de-en.json --limit $N --out_dir $OUT/translations \
      --batch_size 16 --max_new_tokens 128 --no_progress"
  $TR --name base 2>&1 | tee -a "$OUT/logs/translate-base.log"
  for LOSS in $LOSSES; do
    $TR --adapter "$OUT/$LOSS" --name "$LOSS" 2>&1 | tee -a "$OUT/logs/translate-$LOSS.log"
  done
  # 4. scores
  HYPS=$OUT/translations/base/deen/test.de-en.en
  for LOSS in $LOSSES; do HYPS="$HYPS $OUT/translations/$LOSS/deen/test.de-en.en"; done
  $PT mt evaluate --pair de-en --refs $DATA/valid.de-en.json --limit "$N" --hyps $HYPS \
      --json "experiments/mt/results-$N.json" | tee "experiments/mt/results-$N.md"
done
