"""The study on Optuna: its storage (an SQLite file by default, any RDB URL to share it
between machines), sampler and pruner as the search file says, and the worker loop that any
number of `slmops tune` processes run on one study.

How a study stays exact with several workers, and across kills:
- A worker starts a trial only while fewer than N trials are finished (complete or pruned),
  running, or waiting; a trial that still finds N others ahead of it when it starts (two
  workers raced) steps aside as failed ("surplus") without training.
- A running trial records its worker (host, pid, process start). A trial whose process is
  gone from this host is failed at once and queued again with the same parameters; a trial
  of another machine that stops beating (Optuna's heartbeat) is failed after three missed
  beats and queued again. Ctrl-C queues the interrupted trial again too. So a trial killed
  in flight is retried, not lost, and never counted twice.
- Each trial's sampler is seeded with the study's seed plus the trial's number: the same
  study samples the same trials whichever worker runs them."""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from slmops.errors import ConfigError
from slmops.interrupts import raise_if_interrupted
from slmops.tune.load import SearchPlan

log = logging.getLogger("slmops")


def storage_url(plan: SearchPlan) -> str:
    return plan.config.storage or f"sqlite:///{plan.out / 'study.db'}"


def engine_url(url: str) -> str:
    """The URL SQLAlchemy opens: a bare postgresql:// goes through psycopg 3 (slmops[postgres]),
    whichever driver the installed SQLAlchemy would pick by default (2.0: psycopg2)."""
    for bare in ("postgresql://", "postgres://"):
        if url.startswith(bare):
            return "postgresql+psycopg://" + url[len(bare):]
    return url


def shown_url(url: str) -> str:
    """The URL without its password (for messages and reports)."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # not a URL sqlalchemy parses: shown as given, it holds no parsed password
        return url


def study_name(plan: SearchPlan) -> str:
    return plan.config.study_name or plan.out.name


# What the database says when another worker created Optuna's tables (or stamped their version)
# a moment before: PostgreSQL's 'duplicate key ... pg_type' / 'already exists', SQLite's
# 'UNIQUE constraint failed: alembic_version.version_num'.
CREATION_RACE = ("duplicate key", "already exists", "UNIQUE constraint failed")


def open_storage(plan: SearchPlan):
    """Optuna's RDB storage with heartbeats and retries of dead trials; a clear error for a
    URL that does not open (no driver, no server, bad credentials)."""
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback

    url = storage_url(plan)
    if not plan.config.storage:
        plan.out.mkdir(parents=True, exist_ok=True)
    if url.startswith("sqlite:///"):
        # several local workers write one file: wait for the lock instead of failing at once
        engine_kwargs: dict[str, Any] = {"connect_args": {"timeout": 120}}
    else:
        engine_kwargs = {"pool_pre_ping": True}
    interval = plan.config.heartbeat_interval
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for attempt in range(6):
            try:
                return RDBStorage(engine_url(url), engine_kwargs=engine_kwargs, heartbeat_interval=interval, grace_period=3 * interval,
                                  heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=plan.config.max_retries))
            except ModuleNotFoundError as exc:
                raise ConfigError(f"--storage {shown_url(url)}: its database driver is not installed ({exc.name}); for PostgreSQL: "
                                  "pip install 'slmops[postgres]' (psycopg 3)") from None
            except Exception as exc:  # sqlalchemy's ArgumentError / OperationalError: the message says which
                reason = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0]
                if attempt < 5 and any(words in reason for words in CREATION_RACE):
                    # workers starting at once on a new database: each creates Optuna's tables and stamps
                    # their version, and the database refuses the second while the first commits; again, once it has
                    time.sleep(0.5 * (attempt + 1))
                    continue
                raise ConfigError(f"--storage {shown_url(url)}: cannot open the study's database: {reason}") from None


# ---- sampling ----------------------------------------------------------------------------------------
def grid_values(plan: SearchPlan) -> dict[str, list]:
    grid = {}
    for name, dim in plan.config.search_space.items():
        if dim.type in ("choice", "categorical"):
            grid[name] = list(dim.values)
        elif dim.type == "int":
            grid[name] = list(range(int(dim.low), int(dim.high) + 1, int(dim.step or 1)))
        else:
            count = int(round((dim.high - dim.low) / dim.step)) + 1
            grid[name] = [min(dim.low + i * dim.step, dim.high) for i in range(count)]
    return grid


def grid_size(plan: SearchPlan) -> int:
    size = 1
    for values in grid_values(plan).values():
        size *= len(values)
    return size


def make_sampler(plan: SearchPlan):
    import optuna

    strategy = plan.config.search_strategy

    def build(seed: int | None):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            if strategy.type == "random":
                return optuna.samplers.RandomSampler(seed=seed)
            if strategy.type == "grid":
                return optuna.samplers.GridSampler(grid_values(plan), seed=seed)
            startup = max(1, min(10, strategy.num_trials // 3))  # random trials before TPE models the results
            return optuna.samplers.TPESampler(seed=seed, multivariate=strategy.joint and len(plan.config.search_space) > 1,
                                              n_startup_trials=startup)

    return PerTrialSeed(build, strategy.seed)


def _per_trial_seed_class():
    import optuna

    class _PerTrialSeed(optuna.samplers.BaseSampler):
        """A sampler re-made for each trial with seed + trial number: one worker or ten, the
        same study proposes the same trials (with one shared seed, two workers starting at
        once would sample the same values)."""

        def __init__(self, build: Callable[[int | None], Any], seed: int | None):
            self._build, self._seed = build, seed
            self._inner = build(seed)

        def before_trial(self, study, trial):
            self._inner = self._build(None if self._seed is None else self._seed + trial.number)
            self._inner.before_trial(study, trial)

        def infer_relative_search_space(self, study, trial):
            return self._inner.infer_relative_search_space(study, trial)

        def sample_relative(self, study, trial, search_space):
            return self._inner.sample_relative(study, trial, search_space)

        def sample_independent(self, study, trial, param_name, param_distribution):
            return self._inner.sample_independent(study, trial, param_name, param_distribution)

        def after_trial(self, study, trial, state, values):
            self._inner.after_trial(study, trial, state, values)

        def reseed_rng(self):
            self._inner.reseed_rng()

    return _PerTrialSeed


def PerTrialSeed(build, seed):  # noqa: N802 (a class made on first use: optuna is imported only by `slmops tune`)
    return _per_trial_seed_class()(build, seed)


def make_pruner(plan: SearchPlan):
    import optuna

    pruner = plan.config.pruner
    evaluations = plan.target.evaluations()
    if pruner.type == "none":
        return optuna.pruners.NopPruner(), "off (pruner: none)"
    if evaluations is not None and evaluations <= 1:
        return optuna.pruners.NopPruner(), "off: each trial evaluates once (set eval_steps below max_steps to prune)"
    if pruner.type == "hyperband":
        return (optuna.pruners.HyperbandPruner(min_resource=pruner.min_resource, reduction_factor=pruner.reduction_factor),
                f"hyperband (min {pruner.min_resource} steps, reduction factor {pruner.reduction_factor})")
    return (optuna.pruners.MedianPruner(n_startup_trials=pruner.n_startup_trials, n_warmup_steps=pruner.n_warmup_steps),
            f"median (after {pruner.n_startup_trials} trials, from step {pruner.n_warmup_steps})")


def suggest(trial, name: str, dim) -> Any:
    if dim.type in ("choice", "categorical"):
        return trial.suggest_categorical(name, dim.values)
    if dim.type == "int":
        return trial.suggest_int(name, int(dim.low), int(dim.high), step=int(dim.step or 1), log=dim.log)
    return trial.suggest_float(name, dim.low, dim.high, step=dim.step, log=dim.log)


# ---- who runs a trial ------------------------------------------------------------------------------
def _process_start(pid: int) -> str | None:
    """A process's start time (clock ticks since boot, /proc on Linux): with the pid, it names
    one process even after the pid is reused."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def worker_identity(number: int) -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid(), "start": _process_start(os.getpid()), "trial": number}


def _alive(worker: dict) -> bool:
    pid = worker.get("pid")
    if not isinstance(pid, int):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        pass
    start = _process_start(pid)
    return worker.get("start") is None or start is None or start == worker["start"]


def fail_dead_trials(study, storage) -> list[int]:
    """Fail (and queue again) the running trials whose worker process is gone: this host's at
    once, other hosts' when their heartbeat stops (Optuna). Returns the numbers failed here."""
    import optuna
    from optuna.trial import TrialState

    failed = []
    host = socket.gethostname()
    retry = storage.get_heartbeat_stale_trial_callback()
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        worker = trial.user_attrs.get("worker") or {}
        if worker.get("host") != host or worker.get("trial") != trial.number or _alive(worker):
            continue
        try:
            storage.set_trial_user_attr(trial._trial_id, "fail_reason", "its worker died (killed) in flight")
            if storage.set_trial_state_values(trial._trial_id, state=TrialState.FAIL):
                failed.append(trial.number)
                if retry is not None:
                    retry(study, storage.get_trial(trial._trial_id))
        except optuna.exceptions.UpdateFinishedTrialError:  # another worker got there first
            continue
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    return failed


# ---- the loop -------------------------------------------------------------------------------------
class Surplus(Exception):
    """A trial started when the study already had its number of trials (two workers raced)."""


@dataclass
class Counts:
    finished: int  # complete + pruned
    complete: int
    pruned: int
    running: int
    waiting: int
    failed: int


def counts(study) -> Counts:
    from optuna.trial import TrialState

    states = [t.state for t in study.get_trials(deepcopy=False)]
    complete, pruned = states.count(TrialState.COMPLETE), states.count(TrialState.PRUNED)
    return Counts(complete + pruned, complete, pruned, states.count(TrialState.RUNNING), states.count(TrialState.WAITING),
                  states.count(TrialState.FAIL))


def _is_surplus(study, number: int, target: int) -> bool:
    from optuna.trial import TrialState

    ahead = [t for t in study.get_trials(deepcopy=False) if t.number < number
             and t.state in (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING)]
    return len(ahead) >= target


@contextlib.contextmanager
def trial_logging(level: int):
    """A trial's own lines (model, data, each evaluation) show at --log_level 0; above it the
    study's table and progress speak for the trials."""
    from transformers.utils import logging as hf_logging

    slmops_log = logging.getLogger("slmops")
    before, bars = slmops_log.level, hf_logging.is_progress_bar_enabled()
    if level >= 1:
        slmops_log.setLevel(logging.WARNING)
        hf_logging.disable_progress_bar()  # (transformers' weight-loading bar, once per trial)
    try:
        yield
    finally:
        slmops_log.setLevel(before)
        if bars:
            hf_logging.enable_progress_bar()


def one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def make_objective(plan: SearchPlan, storage, target_count: Callable[[], int]):
    import optuna

    from slmops.train.trainer import TrainingHooks

    cfg = plan.config

    def objective(trial) -> float:
        if _is_surplus(trial.study, trial.number, target_count()):
            trial.set_user_attr("surplus", True)
            raise Surplus(f"the study already had {target_count()} trials")
        trial.set_user_attr("worker", worker_identity(trial.number))
        params = {plan.dimensions[name]: suggest(trial, name, dim) for name, dim in cfg.search_space.items()}
        folder = plan.out / "trials" / str(trial.number)
        trial.set_user_attr("folder", str(folder))
        started = time.monotonic()
        metric = plan.target.metric
        reported: list[int] = []

        def on_evaluate(step: int, result: dict[str, float]) -> str | None:
            value = result.get(metric)
            if value is None or step in reported:  # (a second fine-tuning pass of a workflow restarts its steps)
                return None
            reported.append(step)
            trial.report(float(value), step)
            return "pruned" if trial.should_prune() else None

        def after_step(step: int) -> str | None:
            return "time_limit" if cfg.trial_timeout and time.monotonic() - started > cfg.trial_timeout else None

        try:
            with trial_logging(cfg.log_level):
                run = plan.target.run(params, folder, TrainingHooks(on_evaluate=on_evaluate, after_step=after_step))
        except KeyboardInterrupt:
            trial.set_user_attr("fail_reason", "interrupted (Ctrl-C); queued again")
            retry = storage.get_heartbeat_stale_trial_callback()
            if retry is not None:  # the same parameters run first when the study resumes
                retry(trial.study, storage.get_trial(trial._trial_id))
            raise
        except Exception as exc:
            trial.set_user_attr("fail_reason", one_line(exc))
            raise
        trial.set_user_attr("config", run.config)
        if run.stop_reason:
            trial.set_user_attr("stop_reason", run.stop_reason)
        if run.stop_reason == "pruned":
            raise optuna.TrialPruned(f"pruned at step {reported[-1] if reported else 0}")
        if run.value is None:
            raise RuntimeError("the trial stopped before its first evaluation (raise trial_timeout or lower eval_steps)")
        return float(run.value)

    return objective


@dataclass
class TuneResult:
    out: Path
    study_name: str
    storage: str
    counts: Counts
    best: Any | None  # optuna FrozenTrial
    stopped_by: str  # "done", "timeout"
    study: Any = None


def open_study(plan: SearchPlan):
    """(study, storage): the plan's study, made or joined, checked to be this search's."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.ERROR)  # the study's table reports trials (and failures, with reasons)
    storage = open_storage(plan)
    pruner, _ = make_pruner(plan)
    study = optuna.create_study(storage=storage, study_name=study_name(plan), direction=plan.direction,
                                sampler=make_sampler(plan), pruner=pruner, load_if_exists=True)
    check_fingerprint(study, plan)
    return study, storage


def target_trials(plan: SearchPlan) -> int:
    strategy = plan.config.search_strategy
    return min(strategy.num_trials, grid_size(plan)) if strategy.type == "grid" else strategy.num_trials


def run_worker(plan: SearchPlan, study, storage, on_trial: Callable[[Any, Any], None] | None = None, progress=None) -> TuneResult:
    """Run trials of the study until it has its number of finished trials (or the study's
    timeout passes), alongside any other workers of the same study."""
    strategy = plan.config.search_strategy
    target = target_trials(plan)
    objective = make_objective(plan, storage, lambda: target)
    started = time.monotonic()
    stopped_by = "done"
    waiting_said = False
    callbacks = [on_trial] if on_trial else []
    while True:
        raise_if_interrupted()  # (a Ctrl-C swallowed in a storage finalizer between trials)
        fail_dead_trials(study, storage)
        now = counts(study)
        if progress is not None:
            progress(now, target)
        if now.finished >= target:
            break
        if strategy.timeout and time.monotonic() - started > strategy.timeout:
            stopped_by = "timeout"
            log.info("tune: the study's timeout (%g s) has passed; no new trial starts", strategy.timeout)
            break
        if now.finished + now.running >= target and now.waiting == 0:
            if not waiting_said:  # the rest run on other workers: wait, and take over any that dies
                log.info("tune: %d trial(s) running on other workers; waiting for them", now.running)
                waiting_said = True
            time.sleep(min(2.0, plan.config.heartbeat_interval))
            continue
        waiting_said = False
        study.optimize(objective, n_trials=1, catch=(Exception,), callbacks=callbacks, gc_after_trial=True)
    return result_of(plan, study, stopped_by)


def result_of(plan: SearchPlan, study, stopped_by: str) -> TuneResult:
    return TuneResult(plan.out, study.study_name, storage_url(plan), counts(study), best_trial(study), stopped_by, study)


def best_trial(study):
    from optuna.trial import TrialState

    complete = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    if not complete:
        return None
    return study.best_trial


def check_fingerprint(study, plan: SearchPlan) -> None:
    """A study's trials are comparable only under one search: refuse another file's search on it."""
    mine = plan.fingerprint()
    theirs = study.user_attrs.get("slmops_search")
    if theirs is None:
        if study.get_trials(deepcopy=False):
            raise ConfigError(f"study {study.study_name!r} in {shown_url(storage_url(plan))} was not made by slmops tune; "
                              "choose another --study_name")
        study.set_user_attr("slmops_search", mine)
        return
    different = [key for key in mine if theirs.get(key) != mine[key]]
    if different:
        raise ConfigError(f"study {study.study_name!r} in {shown_url(storage_url(plan))} searches another "
                          f"{' and '.join(k.replace('_', ' ') for k in different)} than {plan.source}: its trials would not compare. "
                          "Use another --study_name (or --output_path), or the file the study was made with")
