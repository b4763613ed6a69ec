"""Does what is deployed behave like what was trained? Greedy tokens of PyTorch (+adapter)
against the bundle (+the same adapter, switched on one loaded base), per adapter."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

log = logging.getLogger("slmops")

GENERIC_PROMPTS = [
    "The capital of France is",
    "Write one sentence about the sea.",
    "Question: What is 12 plus 7?\nAnswer:",
]


def _run_config(adapter_path: Path | None):
    """The finetune config of an slmops adapter (its run.yaml sits beside it), else None."""
    run_yaml = adapter_path.parent / "run.yaml" if adapter_path is not None else None
    if run_yaml is None or not run_yaml.is_file():
        return None
    from slmops.config import from_dict, load_yaml
    from slmops.errors import SlmopsError

    try:
        return from_dict(load_yaml(run_yaml)["config"], source=str(run_yaml))
    except (SlmopsError, KeyError) as exc:
        log.info("parity: %s is not a readable slmops run (%s)", run_yaml, exc)
        return None


def _trained_as_classification(adapter_path: Path) -> bool:
    """Whether the run that wrote this adapter found (or was told) its task is classification."""
    from slmops.config import load_yaml
    from slmops.errors import SlmopsError

    try:
        return load_yaml(adapter_path.parent / "run.yaml")["resolved"]["data"]["task"]["kind"] == "classification"
    except (SlmopsError, KeyError, TypeError):  # an older run.yaml without the task: decided from the answers instead
        return False


def prompts_for_adapter(adapter_path: Path | None, tokenizer, limit: int = 3) -> list[tuple[str, bool]]:
    """(prompt, add_special_tokens) pairs: an slmops adapter's own eval/train rows in its
    own format when its run.yaml is beside it, generic prompts otherwise."""
    cfg = _run_config(adapter_path)
    if cfg is not None:
        try:
            from slmops.data.format import build_formatter
            from slmops.data.load import load_split
            from slmops.data.prepare import format_rows, rows_split

            # (a run's --eval_split auto was held out of its train split: its train rows are prompts in the same format)
            split = load_split(cfg.data.data_name, rows_split(cfg.data), cfg.data.data_files,
                               cfg.data.eval_subset or cfg.data.train_subset)
            dataset = split.dataset.select(range(min(limit, len(split.dataset))))
            formatter = build_formatter(cfg.data, list(dataset.column_names), tokenizer)
            return [(ex.prompt, formatter.add_special_tokens) for ex in format_rows(dataset, formatter)]
        except Exception as exc:  # the data moved or changed: generic prompts still check the export
            log.info("parity: using generic prompts (%s)", exc)
    prompts = [(p, True) for p in GENERIC_PROMPTS[:limit]]
    if getattr(tokenizer, "chat_template", None):
        chat = tokenizer.apply_chat_template([{"role": "user", "content": GENERIC_PROMPTS[1]}], tokenize=False, add_generation_prompt=True)
        prompts[-1] = (chat, False)
    return prompts


def metric_change(bundle_dir: Path, adapter_name: str, adapter_path: Path, rows: int = 50) -> dict | None:
    """For a quantized bundle: the adapter's own task metric on its eval rows, PyTorch +
    adapter against the bundle + adapter (accuracy for label tasks, ROUGE-L otherwise).
    None when the adapter has no run.yaml beside it (trained elsewhere)."""
    run = _run_config(adapter_path)
    if run is None:
        return None
    from slmops.config import EvaluateConfig
    from slmops.errors import SlmopsError
    from slmops.evaluate.run import evaluate

    try:
        data = run.data.model_dump()
        data.update(eval_split=run.data.eval_split or run.data.train_split, max_samples=rows)
        probe = EvaluateConfig.model_validate({"model": {"model_name_or_path": str(bundle_dir)}, "adapter": adapter_name,
                                               "compare_to": [str(adapter_path.parent)], "data": data,
                                               "seed": run.training.seed,  # --eval_split auto: the rows the run held out
                                               "metrics": ["accuracy", "f1", "rouge"], "max_new_tokens": 32})
        if _trained_as_classification(adapter_path):  # each label's likelihood: no generation
            report, metric = evaluate(probe.model_copy(update={"metrics": ["accuracy", "f1"]})), "accuracy"
        else:
            try:
                report = evaluate(probe)
            except SlmopsError:  # multi-line answers: no labels, compare the text
                report = evaluate(probe.model_copy(update={"metrics": ["rouge"]}))
            classes = report["models"][0]["metrics"].get("per_class") or {}
            # a label task has few distinct answers; free text (Q&A) is compared with ROUGE-L
            metric = "accuracy" if classes and len(classes) <= max(2, report["data"]["rows"] // 2) else "rougeL"
    except (SlmopsError, OSError) as exc:  # the data moved or changed since training
        log.info("parity: no metric comparison for %s (%s)", adapter_name, exc)
        return None
    onnx_value, torch_value = (m["metrics"][metric] for m in report["models"])
    return {"metric": metric, "rows": report["data"]["rows"], "pytorch": round(torch_value, 4), "onnx": round(onnx_value, 4),
            "change": round(onnx_value - torch_value, 4)}


def agreement(reference, candidate, prompts: list[list[int]], new_tokens: int, adapter: str | None = None,
              continuation_logits: bool = False) -> dict:
    """Two back ends (the inference layer) on the same prompts: prompts whose greedy tokens agree
    exactly, the share of tokens agreeing before the first difference, and the largest logit
    difference (on the prompt, or with `continuation_logits` also on the reference's answer)."""
    exact, agreed, total, max_diff = 0, 0, 0, 0.0
    for ids in prompts:
        expected = reference.generate_ids(ids, adapter, new_tokens)
        got = candidate.generate_ids(ids, adapter, new_tokens)
        scored = ids + expected if continuation_logits else ids
        max_diff = max(max_diff, float(np.abs(candidate.logits(scored, adapter) - reference.logits(scored, adapter)).max()))
        exact += expected == got
        agreed += next((i for i, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
        total += max(len(expected), len(got))
    return {"prompts": len(prompts), "exact": exact, "token_agreement": round(agreed / total, 4) if total else 1.0,
            "max_logit_diff": round(max_diff, 5)}


def check_parity(bundle_dir: Path, plan, max_new_tokens: int | None = None) -> dict:
    """Per adapter (and the base): prompts whose greedy tokens agree exactly, the share of
    tokens agreeing before the first difference, and the largest logit difference. Both
    sides run on the inference layer: PyTorch + PEFT (each adapter attached to one loaded
    base, as the bundle switches them) and the bundle."""
    import torch

    from slmops.inference.onnx_backend import OnnxBackend
    from slmops.inference.torch_backend import TorchBackend

    bundle = OnnxBackend(bundle_dir)
    reference = TorchBackend.load(str(plan.model_path), [f"{name}={path}" for name, path in plan.adapters], dtype=torch.float32,
                                  own_adapter=False)
    tokens_wanted = max_new_tokens or plan.parity_tokens
    results = {}
    for name, adapter_path in [(None, None), *plan.adapters]:
        adapter = name or "base"
        prompts = [(p, True) for p in plan.parity_prompts] or prompts_for_adapter(adapter_path, bundle.tokenizer)
        label = name or "(no adapter)"
        results[label] = agreement(reference, bundle, [bundle.encode(p, special) for p, special in prompts], tokens_wanted, adapter)
        if adapter_path is not None and plan.precision != "fp32":  # quantized: what does it cost on the task?
            change = metric_change(bundle_dir, name, adapter_path)
            if change is not None:
                results[label]["task_metric"] = change
        result = results[label]
        log.debug("parity %-16s %d/%d prompts identical, %.1f%% tokens agree, max |logit diff| %.2g",
                  label, result["exact"], result["prompts"], 100 * result["token_agreement"], result["max_logit_diff"])
    return results
