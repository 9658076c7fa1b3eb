#!/usr/bin/env bash
# The ALMA-R recipe at CPU scale (issue 15), German->English, SmolLM2-135M-Instruct + LoRA.
#
# Stage 1 (ALMA, Xu et al. 2023): LoRA SFT on human-written parallel data (train.de-en.{de,en},
#   14211 line pairs) with ALMA's prompt: experiments/mt/make_sft_data.py -> prompt/completion JSONL
#   -> preftune train --loss sft. A chrF curve on the first N_CURVE WMT'21 sentences at every
#   saved checkpoint (each checkpoint-N directory is translated as an adapter).
# Stage 2 (ALMA-R, Xu et al. 2024): candidates for the WMT'22 sources = the stage-1 model's own
#   NUM_CANDIDATES translations + the six WMT'22 systems, scored with sentence chrF against the
#   reference, reference excluded (preftune mt build-triplets); then, both continuing the stage-1
#   adapter (--peft_model_id) with equal data, order (seed) and steps:
#   (a) SFT on the chosen translations (--loss sft), (b) CPO (beta 0.1, cpo_alpha 1),
#   optionally (c) SimPO (SIMPO=1).
# Evaluation: first N_EVAL sentences of WMT'21 (valid.de-en.json; no overlap with the training data),
#   greedy, sacreBLEU BLEU + chrF (preftune mt evaluate) and paired bootstrap resampling (sacreBLEU's
#   --paired-bs; mt evaluate has none) of base / stage1 / stage2-sft / stage2-cpo (/ stage2-simpo).
#
# Every step is skipped when its output exists; a stopped stage-1 run resumes from its newest complete
# checkpoint; translation resumes mid-file. Sizes come from the environment, e.g. a smoke run:
#   STAGE1_STEPS=2 CURVE_EVERY=1 N_CURVE=8 N_TRIPLET_SOURCES=8 STAGE2_STEPS=2 N_EVAL=8 BS=2 \
#     MAX_NEW_TOKENS=16 OUT=experiments/out/almar-smoke nice -n 19 bash experiments/mt/run_almar.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
PT=${PT:-.venv/bin/preftune}
PY=${PY:-.venv/bin/python}
SACREBLEU=${SACREBLEU:-.venv/bin/sacrebleu}
DATA=${DATA:-../shared/data/wmt}
OUT=${OUT:-experiments/out/almar}
MODEL=${MODEL:-}                          # empty: preftune's default (SmolLM2-135M-Instruct, GGUF -> float32)
SEED=${SEED:-42}
BS=${BS:-8}                               # pairs per step, both stages
LR=${LR:-2e-4}
MAX_LENGTH=${MAX_LENGTH:-256}
MAX_PROMPT_LENGTH=${MAX_PROMPT_LENGTH:-160}
# stage 1
STAGE1_RECORDS=${STAGE1_RECORDS:-}         # empty: all line pairs of train.de-en
STAGE1_STEPS=${STAGE1_STEPS:-300}
STAGE1_LR=${STAGE1_LR:-$LR}
CURVE_EVERY=${CURVE_EVERY:-100}           # save_steps of stage 1 = the points of the chrF curve
N_CURVE=${N_CURVE:-200}
# stage 2
N_TRIPLET_SOURCES=${N_TRIPLET_SOURCES:-1984}
NUM_CANDIDATES=${NUM_CANDIDATES:-4}
GENERATION=${GENERATION:-beam}            # beam | sample (mt build-triplets --generation)
STAGE2_STEPS=${STAGE2_STEPS:-40}
STAGE2_LR=${STAGE2_LR:-$LR}
SIMPO=${SIMPO:-0}                         # 1: also stage 2 with --loss simpo (its default beta / gamma)
# evaluation
N_EVAL=${N_EVAL:-500}
MAX_NEW_TOKENS=${MAX_NEW_TOKENS:-128}
TR_BS=${TR_BS:-16}
PAIRED_BS_N=${PAIRED_BS_N:-1000}

MODEL_TRAIN=(); MODEL_MT=()
if [ -n "$MODEL" ]; then MODEL_TRAIN=(--model_name_or_path "$MODEL"); MODEL_MT=(--model "$MODEL"); fi
STAGE2_LOSSES="sft cpo"; [ "$SIMPO" = 1 ] && STAGE2_LOSSES="$STAGE2_LOSSES simpo"
TRANS=$OUT/translations
mkdir -p "$OUT/logs" "$OUT/refs"
log() { echo "[run_almar $(date +%H:%M:%S)] $*" >&2; }

restart_flags() {  # DIR: a stopped run resumes from its newest complete checkpoint; one without any restarts
  if compgen -G "$1/checkpoint-*" >/dev/null; then echo "--resume_from_checkpoint latest"
  elif [ -d "$1" ] && [ -n "$(ls -A "$1")" ]; then echo "--overwrite_output_dir"; fi
}

hyp() { echo "$TRANS/$1/deen/test.de-en.en"; }  # NAME -> translation file (ALMA's layout)

translate() {  # NAME N [--adapter DIR]: greedy translation of the first N WMT'21 sentences (resumable)
  local name=$1 n=$2; shift 2
  if [ -f "$(hyp "$name")" ] && [ "$(wc -l < "$(hyp "$name")")" -ge "$n" ]; then return; fi
  log "translate $name ($n sentences)"
  $PT mt translate --pair de-en --input "$DATA/valid.de-en.json" --limit "$n" --out_dir "$TRANS" --name "$name" \
      "${MODEL_MT[@]}" "$@" --batch_size "$TR_BS" --max_new_tokens "$MAX_NEW_TOKENS" --no_progress \
      2>&1 | tee -a "$OUT/logs/translate-$name.log"
}

common_train=(--use_peft --per_device_train_batch_size "$BS" --max_length "$MAX_LENGTH"
              --max_prompt_length "$MAX_PROMPT_LENGTH" --gradient_checkpointing false --logging_steps 5
              --report_to none --seed "$SEED" --dataloader_num_workers 0)

# 1. stage-1 data: human translations, ALMA prompt; WMT'21 / WMT'22 sources left out (there are none today)
SFT_DATA=$OUT/sft.de-en.jsonl
if [ ! -f "$SFT_DATA" ]; then
  log "stage-1 data"
  $PY experiments/mt/make_sft_data.py --pair de-en --src "$DATA/train.de-en.de" --tgt "$DATA/train.de-en.en" \
      --exclude "$DATA/valid.de-en.json" "$DATA/test.de-en.json" ${STAGE1_RECORDS:+--limit "$STAGE1_RECORDS"} \
      --output "$SFT_DATA" | tee "$OUT/logs/sft-data.log"
fi

# 2. stage 1: LoRA SFT (prompt/completion records: --loss sft), a checkpoint every CURVE_EVERY steps
S1=$OUT/stage1
if [ ! -f "$S1/adapter_config.json" ]; then
  log "stage 1: $STAGE1_STEPS steps"
  # shellcheck disable=SC2046
  $PT train --dataset "$SFT_DATA" --loss sft "${MODEL_TRAIN[@]}" "${common_train[@]}" \
      --max_steps "$STAGE1_STEPS" --learning_rate "$STAGE1_LR" \
      --save_strategy steps --save_steps "$CURVE_EVERY" --output_dir "$S1" $(restart_flags "$S1") \
      2>&1 | tee -a "$OUT/logs/train-stage1.log"
fi

# 3. stage-1 chrF curve: base, every checkpoint, the final adapter, on the first N_CURVE sentences
translate base "$N_CURVE"
CURVE_HYPS=("$(hyp base)")
for ckpt in $(ls -d "$S1"/checkpoint-* 2>/dev/null | sort -V); do
  step=${ckpt##*-}
  [ "$step" = "$STAGE1_STEPS" ] && continue  # the final adapter, translated below
  translate "stage1-step$step" "$N_CURVE" --adapter "$ckpt"
  CURVE_HYPS+=("$(hyp "stage1-step$step")")
done
translate stage1 "$N_CURVE" --adapter "$S1"
CURVE_HYPS+=("$(hyp stage1)")
$PT mt evaluate --pair de-en --refs "$DATA/valid.de-en.json" --limit "$N_CURVE" --hyps "${CURVE_HYPS[@]}" \
    --json "$OUT/curve-stage1-$N_CURVE.json" | tee "$OUT/curve-stage1-$N_CURVE.md"

# 4. stage-2 triplets: own candidates (stage-1 adapter) + the six WMT'22 systems, chrF vs reference
TRIPLETS=$OUT/triplets.de-en.json
if [ ! -f "$TRIPLETS" ]; then
  log "stage-2 triplets: $N_TRIPLET_SOURCES sources, $NUM_CANDIDATES own candidates ($GENERATION)"
  $PT mt build-triplets --pair de-en --input "$DATA/test.de-en.json" --limit "$N_TRIPLET_SOURCES" \
      --systems "$DATA"/wmt22-outputs-de-en/*.en "${MODEL_MT[@]}" --adapter "$S1" \
      --num_candidates "$NUM_CANDIDATES" --generation "$GENERATION" --batch_size "$TR_BS" \
      --max_new_tokens "$MAX_NEW_TOKENS" --no_progress --scorer chrf --exclude_reference \
      --output "$TRIPLETS.tmp.json" 2>&1 | tee "$OUT/logs/triplets.log"
  mv "$TRIPLETS.tmp.json" "$TRIPLETS"  # only a complete file counts as done
fi

# 5. stage 2: SFT on the chosen side vs CPO (vs SimPO), each continuing the stage-1 adapter
for LOSS in $STAGE2_LOSSES; do
  S2=$OUT/stage2-$LOSS
  [ -f "$S2/adapter_config.json" ] && continue
  extra=()
  [ "$LOSS" = cpo ] && extra=(--beta 0.1 --cpo_alpha 1)
  log "stage 2 ($LOSS): $STAGE2_STEPS steps"
  # shellcheck disable=SC2046
  $PT train --dataset "$TRIPLETS" --language_pairs de-en --cpo_scorer chrf --loss "$LOSS" "${extra[@]}" \
      --peft_model_id "$S1" "${MODEL_TRAIN[@]}" "${common_train[@]}" --max_steps "$STAGE2_STEPS" \
      --learning_rate "$STAGE2_LR" --save_strategy no --output_dir "$S2" $(restart_flags "$S2") \
      2>&1 | tee "$OUT/logs/train-stage2-$LOSS.log"
done

# 6. evaluation on the first N_EVAL WMT'21 sentences
translate base "$N_EVAL"
translate stage1 "$N_EVAL" --adapter "$S1"
SYSTEMS=(base stage1)
for LOSS in $STAGE2_LOSSES; do
  translate "stage2-$LOSS" "$N_EVAL" --adapter "$OUT/stage2-$LOSS"
  SYSTEMS+=("stage2-$LOSS")
done
HYPS=(); for s in "${SYSTEMS[@]}"; do HYPS+=("$(hyp "$s")"); done
$PT mt evaluate --pair de-en --refs "$DATA/valid.de-en.json" --limit "$N_EVAL" --hyps "${HYPS[@]}" \
    --json "$OUT/results-$N_EVAL.json" | tee "$OUT/results-$N_EVAL.md"

# 7. paired bootstrap (sacreBLEU CLI; the first system is the baseline): vs stage 1, and CPO (SimPO) vs SFT
REF=$OUT/refs/valid.de-en.en.$N_EVAL
$PY -c 'import json, sys; refs = [r["translation"]["en"] for r in json.load(open(sys.argv[1], encoding="utf-8"))]
print("\n".join(refs[:int(sys.argv[2])]))' "$DATA/valid.de-en.json" "$N_EVAL" > "$REF"
cut_hyp() { mkdir -p "$OUT/refs/hyps-$N_EVAL"; head -n "$N_EVAL" "$(hyp "$1")" > "$OUT/refs/hyps-$N_EVAL/$1"
            echo "$OUT/refs/hyps-$N_EVAL/$1"; }
BOOT=$OUT/paired-bootstrap-$N_EVAL.txt
: > "$BOOT"
for baseline in stage1 stage2-sft; do
  others=(); for s in "${SYSTEMS[@]}"; do [ "$s" = "$baseline" ] || others+=("$(cut_hyp "$s")"); done
  echo "## baseline: $baseline" >> "$BOOT"
  $SACREBLEU "$REF" -i "$(cut_hyp "$baseline")" "${others[@]}" -m bleu chrf --paired-bs \
      --paired-bs-n "$PAIRED_BS_N" --format text 2>>"$OUT/logs/paired-bootstrap.log" | tee -a "$BOOT"
done
log "done: $OUT/results-$N_EVAL.md, $OUT/curve-stage1-$N_CURVE.md, $BOOT"
