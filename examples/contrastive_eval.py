"""Held-out pairs of tone_pairs.jsonl through the base model and the contrastive adapter:
are same-tone phrases closer than different-tone ones? Prints, for each, the mean distance of
similar and of dissimilar pairs and the ROC AUC of "distance says dissimilar".

    python examples/contrastive_eval.py models/tone-embed [examples/data/tone_pairs.jsonl] [1000]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from custom_loss import mean_pool  # noqa: E402  (the pooling the loss trained)


def distances(model, tokenizer, pairs: list[dict]) -> list[float]:
    out = []
    with torch.no_grad():
        for start in range(0, len(pairs), 32):
            chunk = pairs[start : start + 32]
            embedded = []
            for key in ("text1", "text2"):
                enc = tokenizer([p[key] for p in chunk], return_tensors="pt", padding=True)
                hidden = model(**enc, output_hidden_states=True).hidden_states[-1]
                embedded.append(mean_pool(hidden, enc["attention_mask"]))
            out += (embedded[0] - embedded[1]).norm(dim=-1).tolist()
    return out


def auc(scores: list[float], positive: list[bool]) -> float:
    """P(score of a random positive > score of a random negative)."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    return sum((a > b) + 0.5 * (a == b) for a in pos for b in neg) / (len(pos) * len(neg))


def main() -> int:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = Path(sys.argv[1])
    data = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).parent / "data" / "tone_pairs.jsonl"
    first = int(sys.argv[3]) if len(sys.argv) > 3 else 1000
    pairs = [json.loads(line) for line in data.read_text().splitlines()][first:]
    tokenizer = AutoTokenizer.from_pretrained(run / "model")
    tokenizer.pad_token = tokenizer.pad_token or tokenizer.eos_token
    base = AutoModelForCausalLM.from_pretrained(run / "model").eval()
    print(f"{len(pairs)} held-out pairs ({sum(p['label'] for p in pairs)} same tone)")
    print(f"{'model':8s} {'same-tone distance':>20s} {'different-tone distance':>24s} {'AUC':>6s}")
    for name in ("base", "tuned"):
        # the adapter is injected into the base's modules: load it only after the base is measured
        model = base if name == "base" else PeftModel.from_pretrained(base, run / "adapter").eval()
        d = distances(model, tokenizer, pairs)
        same = [x for x, p in zip(d, pairs) if p["label"] == 1]
        diff = [x for x, p in zip(d, pairs) if p["label"] == 0]
        score = auc(d, [p["label"] == 0 for p in pairs])
        print(f"{name:8s} {sum(same) / len(same):20.4f} {sum(diff) / len(diff):24.4f} {score:6.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
