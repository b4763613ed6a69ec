"""Human-readable run report: loss curves as a picture, and a short markdown summary."""

from __future__ import annotations

from pathlib import Path

from slmops.outputs import OutputLayout
from slmops.train.monitor import read_metrics


def plot_loss(records: list[dict], out_png: Path, title: str = "loss") -> Path | None:
    train = [(r["step"], r["loss"]) for r in records if r.get("split") == "train" and "loss" in r]
    evals = [(r["step"], r["loss"]) for r in records if r.get("split") == "eval" and "loss" in r]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display needed; must precede pyplot
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss", marker="." if len(train) < 30 else None)
    if evals:
        ax.plot(*zip(*evals), label="eval loss", marker="o")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


def write_training_report(layout: OutputLayout, log_dir: Path, plan: dict, result: dict) -> Path:
    records = read_metrics(Path(log_dir) / "metrics.jsonl")
    png = plot_loss(records, layout.root / "loss.png", title=f"{plan['method']} on {plan['model']['given']}")
    lines = [
        "# slmops finetune report",
        "",
        f"- model: `{plan['model']['given']}` ({plan['model']['kind']})",
        f"- method: {plan['method']}, target modules: {plan['target_modules']}",
        f"- data: {plan['data']['format_description']}",
        f"- train: {plan['data']['train']['tokenized']}",
        f"- precision: {plan['precision']['name']} on {plan['precision']['device']} ({plan['precision']['reason']})",
        f"- steps: {result['steps']}{' (stopped early)' if result['stopped_early'] else ''}",
        f"- final train loss: {result['final_train_loss']:.4f}" if result.get("final_train_loss") is not None else "- final train loss: n/a",
        f"- tokens: {result['input_tokens_seen']:,} through the model ({result['tokens_seen']:,} with loss) in "
        f"{result['train_seconds']:.1f} s ({result['tokens_per_second']:.0f} tokens/s)",
    ]
    if result.get("best_eval_loss") is not None:
        lines.append(f"- best eval loss: {result['best_eval_loss']:.4f} at step {result['best_step']}")
    if png:
        lines += ["", "![loss curves](loss.png)"]
    path = layout.root / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
