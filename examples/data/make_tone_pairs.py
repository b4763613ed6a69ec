"""Make tone_pairs.jsonl from tone.jsonl: pairs of phrases with label 1 when they share a tone,
0 when they do not (half each), for the contrastive-loss example (examples/custom_loss.py).

Rows 0-999 pair phrases 0-549 of tone.jsonl (the phrases the tone adapter trains on);
rows 1000-1199 pair phrases 550-649 only (held out: `train[1000:]`).

    python examples/data/make_tone_pairs.py      # deterministic (seed 0)
"""

import json
import random
from pathlib import Path

HERE = Path(__file__).parent


def pairs(rows: list[dict], count: int, rng: random.Random) -> list[dict]:
    by_tone: dict[str, list[str]] = {}
    for row in rows:
        by_tone.setdefault(row["tone"], []).append(row["phrase"])
    out = []
    for index in range(count):
        first = rng.choice(rows)
        if index % 2 == 0:
            second = rng.choice([p for p in by_tone[first["tone"]] if p != first["phrase"]])
            label = 1
        else:
            other = rng.choice([t for t in by_tone if t != first["tone"]])
            second = rng.choice(by_tone[other])
            label = 0
        out.append({"text1": first["phrase"], "text2": second, "label": label})
    return out


def main() -> None:
    rows = [json.loads(line) for line in (HERE / "tone.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    data = pairs(rows[:550], 1000, rng) + pairs(rows[550:], 200, rng)
    (HERE / "tone_pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))


if __name__ == "__main__":
    main()
