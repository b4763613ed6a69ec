"""slmops: fine-tune small language models and make them ready to deploy.

Python API (the CLI calls the same functions):

    from slmops import FinetuneConfig, finetune
    result = finetune(FinetuneConfig.model_validate({...}))
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("slmops")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0.0.0"

from slmops.config import FinetuneConfig, from_dict, from_flat  # noqa: E402


def finetune(config, quiet: bool = False):
    """Fine-tune as `slmops finetune` does; see slmops.finetune_recipe.finetune."""
    from slmops.finetune_recipe import finetune as _finetune

    return _finetune(config, quiet=quiet)


__all__ = ["FinetuneConfig", "__version__", "finetune", "from_dict", "from_flat"]
