#!/usr/bin/env bash
# Fine-tune the built-in SmolLM2-135M-Instruct on TweetEval emotion (4 labels) with the
# classification defaults (no tuning flags) and report macro-F1 on its validation set, on
# PyTorch and on the int4 ONNX bundle. The data is research data from ../shared/data (not
# shipped in this repository): pass its folder as the first argument.
#   bash examples/tweeteval.sh ../shared/data/tweeteval-emotion [OUT]
set -euo pipefail
DATA="${1:?usage: tweeteval.sh DATA_DIR [OUT]}"
OUT="${2:-models/tweeteval}"
TEMPLATE='Tweet: {text}\nEmotion: {label}'

# the task is found to be classification: a stratified 10% of train is held out to pick the
# best adapter by macro-F1 (early stopping too); val stays untouched for the final score
time slmops finetune --data_name "$DATA" --text_template "$TEMPLATE" --output_path "$OUT/ft" --overwrite

# accuracy/F1 by each label's likelihood, against the base model
slmops evaluate --model_name_or_path "$OUT/ft" --compare_to base --data_name "$DATA" --eval_split val \
  --text_template "$TEMPLATE" --metrics accuracy,f1 --output_path "$OUT/eval" --log_level 2

# the int4 ONNX bundle with the adapter (sensitive layers at int8), scored the same way on val
rm -rf "$OUT/onnx-int4"
slmops optimize --model_name_or_path "$OUT/ft" --adapter_names emotion --precision int4 --output_path "$OUT/onnx-int4"
slmops evaluate --model_name_or_path "$OUT/onnx-int4" --adapter_path emotion --data_name "$DATA" --eval_split val \
  --text_template "$TEMPLATE" --metrics accuracy,f1 --output_path "$OUT/eval-int4" --log_level 2
