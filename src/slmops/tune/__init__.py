"""`slmops tune`: hyper-parameter search on Optuna over a finetune config or a workflow.

load.py reads and checks the search file, targets.py knows the two kinds of run it tunes,
study.py is Optuna (storage, sampler, pruner) and the worker loop several processes can share,
report.py writes trials.csv, best.yaml and the report."""

from __future__ import annotations

import logging

from slmops.tune.load import SearchPlan, is_search, load_search, parse_search

log = logging.getLogger("slmops")

__all__ = ["SearchPlan", "describe", "is_search", "load_search", "parse_search", "tune"]


def first_values(plan: SearchPlan) -> dict:
    """One point of the space (each dimension's low end or first choice): the preflight's trial."""
    values = {}
    for name, dim in plan.config.search_space.items():
        low = dim.values[0] if dim.values else (int(dim.low) if dim.type == "int" else dim.low)
        values[plan.dimensions[name]] = low
    return values


def describe(plan: SearchPlan) -> dict:
    from slmops.tune.study import make_pruner, shown_url, storage_url, study_name, target_trials

    cfg = plan.config
    return {
        "run": {"kind": plan.target.kind, "command": plan.target.command, "source": plan.source},
        "search": {"strategy": cfg.search_strategy.type, "trials": target_trials(plan), "seed": cfg.search_strategy.seed,
                   "timeout_s": cfg.search_strategy.timeout, "trial_timeout_s": cfg.trial_timeout},
        "space": {name: {"flag": plan.dimensions[name], **dim.model_dump(exclude_none=True, exclude_defaults=True)}
                  for name, dim in cfg.search_space.items()},
        "objective": {"metric": cfg.objective.metric, "direction": plan.direction},
        "pruning": make_pruner(plan)[1],
        "study": {"name": study_name(plan), "storage": shown_url(storage_url(plan))},
        "output": str(plan.out),
    }


def tune(plan: SearchPlan):
    """Run this worker's share of the study, then write the outputs (also when interrupted)."""
    from slmops.logs import progress_bar
    from slmops.tune.report import TrialTable, write_outputs
    from slmops.tune.study import open_study, result_of, run_worker, shown_url, storage_url

    info = describe(plan)
    log.info("tune: %s %s over %s; %d trials, %s, objective: %s %s", info["search"]["strategy"], plan.target.kind,
             ", ".join(f"{k} ({v['flag']})" if v["flag"] != k else k for k, v in info["space"].items()), info["search"]["trials"],
             f"pruning {info['pruning']}", plan.direction, plan.config.objective.metric)
    log.info("tune: study %r in %s", info["study"]["name"], info["study"]["storage"])
    plan.target.preflight(first_values(plan), plan.out / "trials" / ".preflight")  # a mistake every trial would make, named now
    study, storage = open_study(plan)
    bar = progress_bar(total=info["search"]["trials"], desc="tune", unit="trial")
    table = TrialTable(plan, bar)

    def progress(now, target) -> None:
        bar.total = target
        bar.n = min(now.finished, target)
        bar.set_postfix(running=now.running, failed=now.failed, refresh=False)
        bar.refresh()

    stopped_by = "interrupted"
    try:
        result = run_worker(plan, study, storage, on_trial=table, progress=progress)
        stopped_by = result.stopped_by
    finally:
        bar.close()
        result = result_of(plan, study, stopped_by)
        paths = write_outputs(plan, study, result)
        log.info("tune: %d complete, %d pruned, %d failed; trials in %s, table %s, report %s", result.counts.complete,
                 result.counts.pruned, result.counts.failed, plan.out / "trials", paths["trials"], paths["report"])
        if stopped_by == "interrupted":
            log.warning("tune: interrupted; run the same command again to resume the study (%s)", shown_url(storage_url(plan)))
    return result, paths
