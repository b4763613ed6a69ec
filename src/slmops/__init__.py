"""slmops: fine-tune small language models and make them ready to deploy.

Python API (the CLI calls the same functions):

    from slmops import FinetuneConfig, finetune
    result = finetune(FinetuneConfig.model_validate({...}))

Progress and messages go to the "slmops" logger (and its progress bars show when that
logger shows INFO): `logging.basicConfig(level=logging.INFO)` to see them.
"""

from slmops.about import __version__
from slmops.config import EvaluateConfig, ExportConfig, FinetuneConfig, from_dict, from_flat  # noqa: E402


def finetune(config: FinetuneConfig):
    """Fine-tune as `slmops finetune` does; see slmops.finetune_recipe.finetune. A Ctrl-C stops it by
    the end of the step it lands in, as on the command line (slmops.interrupts)."""
    from slmops.finetune_recipe import finetune as _finetune
    from slmops.interrupts import remembering_ctrl_c

    with remembering_ctrl_c():
        return _finetune(config)


def evaluate(config: EvaluateConfig) -> dict:
    """Evaluate as `slmops evaluate` does; see slmops.evaluate.run.evaluate."""
    from slmops.evaluate.run import evaluate as _evaluate

    return _evaluate(config)


def optimize(config: ExportConfig) -> dict:
    """Export as `slmops optimize` does (an ONNX Runtime GenAI bundle); returns its manifest."""
    from slmops.deploy.export import export_bundle, plan_export

    return export_bundle(plan_export(config))


__all__ = ["EvaluateConfig", "ExportConfig", "FinetuneConfig", "__version__", "evaluate", "finetune", "from_dict", "from_flat",
           "optimize"]
