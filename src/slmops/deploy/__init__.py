"""Deployment: ONNX Runtime GenAI bundles whose LoRA weights are graph inputs, so one base
graph serves no adapter or any number of `.onnx_adapter` files switched per request.

- `adapters`: the one naming scheme for LoRA slots, PEFT adapter -> `.onnx_adapter`, and the
  graph helpers (LoRA weights as graph inputs, reading them back);
- `bundle`: a bundle on disk (genai_config.json, the slmops manifest);
- `export`: `slmops optimize` / `auto-opt` / `generate-adapter` (model builder + template + manifest);
- `parity`: greedy agreement between PyTorch (+adapter) and the bundle (+adapter), on the
  inference layer (which runs bundles: slmops.inference.onnx_backend).
"""
