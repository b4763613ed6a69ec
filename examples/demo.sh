#!/usr/bin/env bash
# The demo: fetch the built-in SmolLM2-135M-Instruct, fine-tune a LoRA adapter on the
# shipped tone data, compare base vs tuned accuracy on 100 held-out phrases, then export an
# int4 ONNX Runtime GenAI bundle with the adapter and measure it the same way.
# Run it with `make demo` (sets up .venv first). Takes a few minutes on 2 CPU cores.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${DEMO_OUT:-demo_out}"
DATA=examples/data/tone.jsonl
TEMPLATE='Classify the tone of the phrase as joyful, angry, sad, fearful or neutral.\nPhrase: {phrase}\nTone: {tone}'

slmops models fetch smollm2-135m-instruct

# rows 0-499 train, 500-549 validate (early stopping, best adapter), 550-649 held out for the test
slmops finetune --model_name_or_path smollm2-135m-instruct --data_name "$DATA" \
  --train_split "train[:500]" --eval_split "train[500:550]" --text_template "$TEMPLATE" \
  --method lora --max_steps 80 --learning_rate 5e-4 --output_path "$OUT/ft" --overwrite

slmops evaluate --model_name_or_path "$OUT/ft" --compare_to base --data_name "$DATA" \
  --eval_split "train[550:]" --text_template "$TEMPLATE" --metrics accuracy,f1 --max_new_tokens 8 \
  --output_path "$OUT/eval" --log_level 2

# Deploy: an int4 ONNX Runtime GenAI bundle, the adapter as a switchable .onnx_adapter
# (checked against PyTorch on the way), then the same held-out test on the bundle.
rm -rf "$OUT/onnx-int4"
slmops optimize --model_name_or_path "$OUT/ft" --adapter_names tone --precision int4 --output_path "$OUT/onnx-int4"
slmops evaluate --model_name_or_path "$OUT/onnx-int4" --adapter_path tone --data_name "$DATA" \
  --eval_split "train[550:]" --text_template "$TEMPLATE" --metrics accuracy,f1 --max_new_tokens 8 --log_level 2

echo
echo "Outputs: $OUT/ft (adapter/, model/, report.md, loss.png, logs/), $OUT/eval (results.json, predictions),"
echo "         $OUT/onnx-int4 (ONNX Runtime GenAI bundle + adapters/tone.onnx_adapter; try: slmops chat -m $OUT/onnx-int4 --adapter tone)"
