"""Deployment: ONNX Runtime GenAI bundles whose LoRA weights are graph inputs, so one base
graph serves no adapter or any number of `.onnx_adapter` files switched per request.

- `adapters`: the one naming scheme for LoRA slots, and PEFT adapter -> `.onnx_adapter`;
- `export`: `slmops auto-opt` / `generate-adapter` (model builder + template + manifest);
- `runtime`: loading a bundle, generating with a chosen adapter, full-sequence logits;
- `parity`: greedy agreement between PyTorch (+adapter) and the bundle (+adapter).
"""
