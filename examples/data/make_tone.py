"""Generate examples/data/tone.jsonl: short phrases labelled with their tone.

Written for slmops (public domain, like the rest of examples/). Each tone has its own
sentence patterns; the patterns are filled with everyday subjects, so the classifier has
to read the wording, not the subject. Run: python examples/data/make_tone.py
"""

import json
import random
from pathlib import Path

SUBJECTS = [
    "the new office", "my sister's wedding", "the morning bus", "the team meeting", "our garden",
    "the concert last night", "the exam results", "the rent increase", "my old laptop", "the weekend trip",
    "the job interview", "the neighbour's dog", "the hospital visit", "the project deadline", "the school play",
    "the delayed flight", "the birthday party", "the phone bill", "the football match", "the new manager",
    "the storm warning", "the family dinner", "the software update", "the train strike", "the first day at school",
    "the test drive", "the holiday photos", "the broken heater", "the charity run", "the landlord's email",
    "the doctor's call", "the cooking class", "the car repair", "the museum tour", "the tax form",
]

PATTERNS = {
    "joyful": [
        "I am so happy about {s}, it made my whole week!",
        "What a wonderful surprise {s} turned out to be!",
        "Honestly, {s} was the best thing that happened to me this year.",
        "Can't stop smiling about {s}!",
        "{S} went even better than I hoped, I'm thrilled.",
        "Yay, {s} is finally here and it's perfect!",
        "Such a lovely feeling after {s}, everything feels bright.",
        "I'm beaming, {s} was pure delight.",
    ],
    "angry": [
        "I am furious about {s}, this is completely unacceptable.",
        "Who on earth approved {s}? It's outrageous!",
        "{S} is a total disgrace and I'm sick of it.",
        "I've had it with {s}, nobody ever takes responsibility!",
        "Absolutely livid that {s} was handled this badly.",
        "Don't even talk to me about {s}, it makes my blood boil.",
        "How dare they mess up {s} again!",
        "Enough is enough: {s} was a scandalous mess.",
    ],
    "sad": [
        "I feel so down since {s}, nothing seems to matter.",
        "It breaks my heart to think about {s}.",
        "{S} left me feeling empty and alone.",
        "I cried all evening after {s}.",
        "Thinking of {s} just makes me want to stay in bed.",
        "I miss how things were before {s}.",
        "Such a gloomy day, and {s} only made it heavier.",
        "There's a lump in my throat whenever {s} comes up.",
    ],
    "fearful": [
        "I'm terrified that {s} will go horribly wrong.",
        "My hands are shaking when I think about {s}.",
        "What if {s} ends in disaster? I can't sleep.",
        "{S} scares me more than I can say.",
        "I have an awful feeling of dread about {s}.",
        "I'm so nervous about {s} that I feel sick.",
        "Please let {s} be safe, I'm really frightened.",
        "Every time I think of {s} my heart starts racing in panic.",
    ],
    "neutral": [
        "{S} is scheduled for Tuesday at ten.",
        "Here is a short summary of {s}.",
        "{S} took about two hours in total.",
        "The details of {s} are in the shared folder.",
        "I will send the notes on {s} tomorrow.",
        "{S} has been moved to the second floor.",
        "Please find the form for {s} attached.",
        "According to the list, {s} is item number four.",
    ],
}


def main() -> None:
    rng = random.Random(2026)
    rows = []
    for tone, patterns in PATTERNS.items():
        pairs = [(p, s) for p in patterns for s in SUBJECTS]
        for pattern, subject in rng.sample(pairs, 130):
            text = pattern.format(s=subject, S=subject[0].upper() + subject[1:])
            rows.append({"phrase": text, "tone": tone})
    rng.shuffle(rows)
    out = Path(__file__).with_name("tone.jsonl")
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(f"wrote {len(rows)} rows to {out}")


if __name__ == "__main__":
    main()
