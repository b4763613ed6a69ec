"""Where a run's numbers go besides metrics.jsonl: TensorBoard, Weights & Biases, MLflow
(`--report_to tensorboard,wandb,mlflow | all | none`), each through its own library.

One `Tracking` per run, opened by the recipe on the writing process once the start-up
checks have passed, fed by the trainer's MetricsLog, and finished by the recipe after the
outputs and the report are written (so they go up as artifacts). W&B and MLflow are
optional extras (`pip install 'slmops[wandb]'`, `'slmops[mlflow]'`); asking for one that is
not installed is refused before any work starts (`check_report_to`)."""

from __future__ import annotations

import importlib.util
import logging
import os
import time
from pathlib import Path

from slmops.errors import ConfigError

log = logging.getLogger("slmops")
_PACKAGE = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow"}


def _installed(target: str) -> bool:
    return importlib.util.find_spec(_PACKAGE[target]) is not None


def check_report_to(targets: list[str]) -> None:
    """Refuse, before any work, a target whose library is missing, naming the install command."""
    for target in targets:
        if target != "tensorboard" and not _installed(target):
            raise ConfigError(f"--report_to {target} needs the {_PACKAGE[target]} package, which is not installed: "
                              f"pip install 'slmops[{target}]' (or leave {target} out of --report_to)")


def flat_params(config: dict, prefix: str = "") -> dict[str, str | int | float | bool]:
    """A nested config as 'section.key' -> scalar (lists joined by commas, None left out):
    the hyper-parameters every tracker takes."""
    flat: dict = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flat_params(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = ",".join(str(v) for v in value)
        elif value is not None:
            flat[name] = value if isinstance(value, (str, int, float, bool)) else str(value)
    return flat


class Tracking:
    """The trackers of one run; `log` goes to each, `finish` uploads artifacts and closes them.
    A tracker that fails mid-run is reported once and dropped: a dashboard's trouble does not
    stop the training."""

    def __init__(self, trackers: list):
        self.trackers = trackers

    @classmethod
    def open(cls, targets: list[str], run_name: str, log_dir: Path, params: dict, resume_step: int | None = None) -> "Tracking":
        openers = {"tensorboard": TensorBoardTracker, "wandb": WandbTracker, "mlflow": MlflowTracker}
        trackers = [openers[t](run_name, Path(log_dir), params, resume_step) for t in targets]
        if trackers:
            log.info("metrics to: metrics.jsonl, %s", ", ".join(t.where for t in trackers))
        return cls(trackers)

    def log(self, step: int, split: str, values: dict) -> None:
        scalars = {f"{split}/{k}": float(v) for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in list(self.trackers):
            self._guarded(tracker, "log", step, scalars)

    def finish(self, summary: dict, artifacts: dict[str, Path], failed: bool = False) -> None:
        """Close every tracker; `artifacts` (name -> file or folder) are uploaded unless the run failed."""
        present = {name: Path(p) for name, p in artifacts.items() if p is not None and Path(p).exists()}
        summary = {k: v for k, v in summary.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        for tracker in list(self.trackers):
            self._guarded(tracker, "finish", summary, {} if failed else present, failed)
        self.trackers = []

    def _guarded(self, tracker, method: str, *args) -> None:
        try:
            getattr(tracker, method)(*args)
        except Exception as error:  # noqa: BLE001 - a tracker's own failure (network, disk) must not end training
            log.warning("%s: %s failed (%s: %s); no more metrics go there in this run", tracker.name, method, type(error).__name__, error)
            self.trackers.remove(tracker)


class TensorBoardTracker:
    name = "tensorboard"

    def __init__(self, run_name: str, log_dir: Path, params: dict, resume_step: int | None):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams

        self.where = f"TensorBoard ({log_dir})"
        self.writer = SummaryWriter(str(log_dir), purge_step=resume_step + 1 if resume_step else None)
        # The hyper-parameters in the run itself (the HPARAMS tab), linked to the scalars the
        # run writes: torch's add_hparams would write them to a separate sub-run instead.
        experiment, start, _ = hparams(params, {"train/loss": 0.0, "eval/loss": 0.0})
        for summary in (experiment, start):
            self.writer.file_writer.add_summary(summary)

    def log(self, step: int, scalars: dict) -> None:
        for key, value in scalars.items():
            self.writer.add_scalar(key, value, step)

    def finish(self, summary: dict, artifacts: dict, failed: bool) -> None:
        from torch.utils.tensorboard.summary import hparams

        _, _, end = hparams({}, {}, None)  # the session's end, with its status
        if failed:
            end.value[0].metadata.plugin_data.content = _hparams_end(failed=True)
        self.writer.file_writer.add_summary(end)
        self.writer.flush()
        self.writer.close()


def _hparams_end(failed: bool) -> bytes:
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    status = api_pb2.STATUS_FAILURE if failed else api_pb2.STATUS_SUCCESS
    end = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time())
    return plugin_data_pb2.HParamsPluginData(session_end_info=end, version=0).SerializeToString()


class WandbTracker:
    """Weights & Biases, online when the machine has an API key (or WANDB_MODE says so),
    otherwise offline under the run's logs folder (`wandb sync` uploads it later).
    WANDB_PROJECT / WANDB_ENTITY choose where it goes (default project: slmops)."""

    name = "wandb"

    def __init__(self, run_name: str, log_dir: Path, params: dict, resume_step: int | None):
        import wandb

        mode = os.environ.get("WANDB_MODE") or ("online" if _wandb_key() else "offline")
        project = os.environ.get("WANDB_PROJECT", "slmops")
        self.run = wandb.init(project=project, entity=os.environ.get("WANDB_ENTITY"), name=run_name, dir=str(log_dir),
                              config=params, mode=mode, reinit="create_new", settings=wandb.Settings(console="off", silent=True))
        self.where = f"W&B {mode} (project {project}" + (f", {self.run.dir}" if mode == "offline" else f", {self.run.url}") + ")"
        if mode == "offline" and "WANDB_MODE" not in os.environ:
            log.info("wandb: no API key on this machine, so the run is kept offline; upload it with `wandb sync %s`",
                     Path(self.run.dir).parent)
        self.run_name = run_name

    def log(self, step: int, scalars: dict) -> None:
        self.run.log(scalars, step=step)

    def finish(self, summary: dict, artifacts: dict, failed: bool) -> None:
        import wandb

        for key, value in summary.items():
            self.run.summary[key] = value
        for name, path in artifacts.items():
            artifact = wandb.Artifact(_artifact_name(f"{self.run_name}-{name}"), type="model" if name == "adapter" else "report")
            (artifact.add_dir if path.is_dir() else artifact.add_file)(str(path))
            self.run.log_artifact(artifact)
        self.run.finish(exit_code=1 if failed else 0)


def _wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def _artifact_name(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name)


class MlflowTracker:
    """MLflow through its client (no global active run, so several runs in one process, as
    tuning trials are, stay apart). MLFLOW_TRACKING_URI says where (a server, a database);
    without it a SQLite store in the run's logs folder (`mlflow ui --backend-store-uri
    sqlite:///OUTPUT/logs/mlflow.db`). MLFLOW_EXPERIMENT_NAME: the experiment (default slmops)."""

    name = "mlflow"

    def __init__(self, run_name: str, log_dir: Path, params: dict, resume_step: int | None):
        from mlflow import MlflowClient
        from mlflow.entities import Param

        uri = os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{(log_dir / 'mlflow.db').resolve()}"
        self.client = MlflowClient(tracking_uri=uri)
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "slmops")
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        elif "MLFLOW_TRACKING_URI" in os.environ:
            experiment_id = self.client.create_experiment(name)
        else:  # artifacts beside the local store, not in the current folder (MLflow's default)
            experiment_id = self.client.create_experiment(name, artifact_location=(log_dir / "mlartifacts").resolve().as_uri())
        self.run_id = self.client.create_run(experiment_id, run_name=run_name, tags={"slmops.resumed_from_step": str(resume_step or 0)}).info.run_id
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for start in range(0, len(items), 100):  # MLflow takes at most 100 params per call
            self.client.log_batch(self.run_id, params=items[start : start + 100])
        self.where = f"MLflow ({uri}, experiment {name}, run {self.run_id})"

    def log(self, step: int, scalars: dict) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in scalars.items()])

    def finish(self, summary: dict, artifacts: dict, failed: bool) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        if summary:
            self.client.log_batch(self.run_id, metrics=[Metric(f"result/{k}", float(v), now, 0) for k, v in summary.items()])
        for name, path in artifacts.items():
            if path.is_dir():
                self.client.log_artifacts(self.run_id, str(path), name)
            else:
                self.client.log_artifact(self.run_id, str(path))
        self.client.set_terminated(self.run_id, "FAILED" if failed else "FINISHED")
