"""Reading a search file: the search keys (slmops.config.tune.TUNE_KEYS) and the run they tune
(the rest of the file, or `config: path`), every dimension checked against the run with the
values it may take, before anything trains. One line per problem, naming the key."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from slmops.config import load_yaml
from slmops.config.tune import TUNE_KEYS, TuneConfig
from slmops.errors import ConfigError, suggest
from slmops.tune.targets import FinetuneTarget, WorkflowTarget, dimension_values, make_target


@dataclass
class SearchPlan:
    config: TuneConfig
    target: FinetuneTarget | WorkflowTarget
    dimensions: dict[str, str]  # search-space key -> the target's name for it (alias resolved, PASS.option)
    direction: str  # minimize | maximize
    source: str
    run: dict[str, Any]  # the run as the file gave it (the study's fingerprint covers it)

    @property
    def out(self) -> Path:
        return Path(self.config.output_path).expanduser().resolve()

    def fingerprint(self) -> dict[str, str]:
        """What a study's trials depend on: a study run again (or joined by another worker)
        must search the same space, for the same objective, over the same run."""
        def digest(value) -> str:
            return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]

        cfg = self.config
        return {"search_space": digest(cfg.model_dump(mode="json")["search_space"]),
                "objective": digest([cfg.objective.metric, self.direction]),
                "sampler": digest([cfg.search_strategy.type, cfg.search_strategy.seed, cfg.search_strategy.joint]),
                "run": digest(self.run)}


def is_search(data: dict) -> bool:
    """A file with a search strategy (top level, or Olive's engine.search_strategy)."""
    engine = data.get("engine")
    return bool(data.get("search_strategy")) or (isinstance(engine, dict) and bool(engine.get("search_strategy")))


def load_search(path: str | Path, overrides: dict[str, Any] | None = None) -> SearchPlan:
    """The search file at `path` with command-line `overrides` (output_path, storage,
    study_name, n_trials, log_level) as a checked plan."""
    source = str(path)
    data = load_yaml(path)
    return parse_search(data, source, overrides, base_dir=Path(path).parent)


def parse_search(data: dict, source: str, overrides: dict[str, Any] | None = None, base_dir: Path | None = None) -> SearchPlan:
    data = dict(data)
    engine = data.get("engine")
    if isinstance(engine, dict) and "search_strategy" in engine:  # Olive puts it under engine
        engine = dict(engine)
        data.setdefault("search_strategy", engine.pop("search_strategy"))
        if engine:
            data["engine"] = engine
        else:  # nothing else there: the run is not an Olive workflow because of it
            data.pop("engine")
    search = {k: data.pop(k) for k in TUNE_KEYS if k in data}
    if "search_space" not in search:
        raise ConfigError(f"{source}: search_space: name the flags to search, e.g. "
                          "learning_rate: {type: float, low: 1.0e-5, high: 1.0e-3, log: true}")
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    if "n_trials" in overrides:
        strategy = search.get("search_strategy") or {}
        if not isinstance(strategy, dict):
            raise ConfigError(f"{source}: search_strategy must be a mapping (type, num_trials...)")
        strategy = dict(strategy)
        strategy.pop("max_iter", None)
        search["search_strategy"] = {**strategy, "num_trials": overrides.pop("n_trials")}
    search.update(overrides)
    try:
        config = TuneConfig.model_validate(search)
    except ValidationError as exc:
        raise ConfigError("\n".join(_search_error(err, source) for err in exc.errors())) from None

    run = _run_of(data, source, base_dir)
    target = make_target(run, source)
    problems: list[str] = []
    if config.nproc_per_node > 1:
        if target.kind != "finetune":
            problems.append(f"{source}: nproc_per_node: distributed trials are for searches over a finetune; a workflow's "
                            "trials run in one process each")
        target.processes = config.nproc_per_node
    dimensions: dict[str, str] = {}
    for name, dim in config.search_space.items():
        try:
            flag = target.dimension(name)
            if flag in dimensions.values():
                raise ConfigError(f"search_space.{name}: the same flag as search_space."
                                  f"{next(k for k, v in dimensions.items() if v == flag)}")
            for value in dimension_values(dim):
                try:
                    target.check_value(flag, value)
                except ConfigError as exc:
                    first = str(exc).splitlines()[0]
                    raise ConfigError(f"search_space.{name}: {value!r} is not accepted: {first}") from None
            dimensions[name] = flag
        except ConfigError as exc:
            problems.append(f"{source}: {exc}")
    try:
        target.objective_settings(config.objective.metric)
    except ConfigError as exc:
        problems.append(f"{source}: {exc}")
    if config.search_strategy.type == "grid":
        problems += [f"{source}: search_space.{name}: a grid needs a finite set of values: give a float dimension a 'step' "
                     "(or use type: choice)" for name, dim in config.search_space.items() if dim.type == "float" and dim.step is None]
    if problems:
        raise ConfigError("\n".join(problems))
    return SearchPlan(config, target, dimensions, direction(config), source, run)


def direction(config: TuneConfig) -> str:
    from slmops.evaluate.metrics import LOWER_IS_BETTER

    if config.objective.direction:
        return config.objective.direction
    return "minimize" if config.objective.metric.rsplit(".", 1)[-1] in LOWER_IS_BETTER else "maximize"


def _run_of(data: dict, source: str, base_dir: Path | None) -> dict:
    """The run the search tunes: the file's other keys, or the file `config:` points at."""
    pointer = data.pop("config", None)
    if pointer is None:
        if not data:
            raise ConfigError(f"{source}: no run to tune: add the finetune config (model/data/method/training, or flags) or a "
                              "workflow (passes) to the file, or point at one with 'config: FILE'")
        return data
    if data:
        raise ConfigError(f"{source}: 'config: {pointer}' names the run to tune; the keys {', '.join(sorted(data))} would be "
                          "ignored: put them in that file, or drop 'config'")
    path = Path(str(pointer)).expanduser()
    if not path.is_absolute() and not path.is_file() and base_dir is not None and (base_dir / path).is_file():
        path = base_dir / path  # relative to the search file when it is not relative to here
    run = load_yaml(path)
    if {"config", "resolved"} <= set(run):  # an OUT/run.yaml of slmops finetune
        run = dict(run["config"])
    return run


def _search_error(err: dict, source: str) -> str:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc)
    if err["type"] == "extra_forbidden":
        from slmops.config.tune import Dimension, Objective, Pruner, SearchStrategy

        schema = {"search_strategy": SearchStrategy, "objective": Objective, "pruner": Pruner}.get(loc[0])
        if loc[0] == "search_space":
            schema = Dimension
        known = list(schema.model_fields) if schema else []
        return f"{source}: unknown key '{key}'.{suggest(loc[-1], known)}"
    message = err["msg"].removeprefix("Value error, ")
    got = err.get("input")
    shown = f" (got {got!r})" if got is not None and not isinstance(got, (dict, list)) and err["type"] != "missing" else ""
    if err["type"] == "missing":
        message = "required"
    return f"{source}: {key}: {message}{shown}" if key else f"{source}: {message}{shown}"
