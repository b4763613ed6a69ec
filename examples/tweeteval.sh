#!/usr/bin/env bash
# Fine-tune the built-in SmolLM2-135M-Instruct on TweetEval emotion (4 labels) and report
# macro-F1 on its validation set. The data is research data from ../shared/data (not
# shipped in this repository): pass its folder as the first argument.
#   bash examples/tweeteval.sh ../shared/data/tweeteval-emotion [OUT]
set -euo pipefail
DATA="${1:?usage: tweeteval.sh DATA_DIR [OUT]}"
OUT="${2:-models/tweeteval}"
TEMPLATE='Classify the emotion of the tweet as anger, joy, optimism or sadness.\nTweet: {text}\nEmotion: {label}'

# 3,057 tweets to train on, the last 200 of train to validate (best adapter); val is held out
time slmops finetune --model_name_or_path smollm2-135m-instruct --data_name "$DATA" \
  --train_split "train[:3057]" --eval_split "train[3057:]" --text_template "$TEMPLATE" \
  --method lora --lora_r 16 --num_train_epochs 1 --learning_rate 3e-4 --warmup_ratio 0.05 \
  --output_path "$OUT/ft" --overwrite

# accuracy/F1 by each label's likelihood (the task is found to be classification)
slmops evaluate --model_name_or_path "$OUT/ft" --compare_to base --data_name "$DATA" --eval_split val \
  --text_template "$TEMPLATE" --metrics accuracy,f1 --output_path "$OUT/eval" --log_level 2

# the int4 ONNX bundle with the adapter, scored the same way on val
rm -rf "$OUT/onnx-int4"
slmops optimize --model_name_or_path "$OUT/ft" --adapter_names emotion --precision int4 --output_path "$OUT/onnx-int4"
slmops evaluate --model_name_or_path "$OUT/onnx-int4" --adapter_path emotion --data_name "$DATA" --eval_split val \
  --text_template "$TEMPLATE" --metrics accuracy,f1 --output_path "$OUT/eval-int4" --log_level 2
