"""Fine-tuning methods: one registry, one `register` call per method. Each adapter method
is a peft config plus the glue around it; `full` trains every weight."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from slmops.config import MethodConfig
from slmops.errors import ConfigError, ModelError, suggest
from slmops.models.load import ModelStructure


@dataclass(frozen=True)
class Method:
    name: str
    summary: str
    # (method config, resolved target modules) -> peft config; None for full fine-tuning
    peft_config: Callable[[MethodConfig, list[str] | str], object] | None
    default_learning_rate: float
    quantize_base_4bit: bool = False
    # trains on the CPU fast path (train/cpu): its layers are ones the path knows (plain LoRA
    # on nn.Linear or 4-bit layers, or every weight); others keep PEFT's own forward
    cpu_fast_path: bool = False

    @property
    def is_adapter(self) -> bool:
        return self.peft_config is not None


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} is registered twice")
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise ConfigError(f"--method: unknown method {name!r}.{suggest(name, METHODS)} Choose one of: {', '.join(METHODS)}")
    return METHODS[name]


def _lora(cfg: MethodConfig, targets, *, use_dora: bool = False):
    from peft import LoraConfig

    return LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=targets,
        modules_to_save=cfg.modules_to_save,
        use_dora=use_dora,
        bias="none",
        task_type="CAUSAL_LM",
    )


def _loha(cfg: MethodConfig, targets):
    from peft import LoHaConfig

    return LoHaConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, module_dropout=cfg.lora_dropout, target_modules=targets, modules_to_save=cfg.modules_to_save, task_type="CAUSAL_LM")


def _lokr(cfg: MethodConfig, targets):
    from peft import LoKrConfig

    return LoKrConfig(r=cfg.lora_r, alpha=cfg.lora_alpha, module_dropout=cfg.lora_dropout, target_modules=targets, modules_to_save=cfg.modules_to_save, task_type="CAUSAL_LM")


register(Method("lora", "Low-rank adapters on frozen base weights (PEFT LoRA).", _lora, 2e-4, cpu_fast_path=True))
register(Method("qlora", "LoRA on a 4-bit NF4 base (bitsandbytes); saves memory on models of ~1B+ parameters.", _lora, 2e-4,
                quantize_base_4bit=True, cpu_fast_path=True))
register(Method("dora", "Weight-decomposed LoRA: magnitude and direction trained apart.", lambda c, t: _lora(c, t, use_dora=True), 2e-4))
register(Method("loha", "Low-rank Hadamard-product adapters (PEFT LoHa).", _loha, 2e-4))
register(Method("lokr", "Low-rank Kronecker-product adapters (PEFT LoKr).", _lokr, 2e-4))
register(Method("full", "Every weight trained; the output is a whole model.", None, 2e-5, cpu_fast_path=True))


def resolve_target_modules(requested: list[str] | None, structure: ModelStructure) -> list[str] | str:
    """The modules an adapter wraps: the user's list (checked against the model), 'all-linear',
    or by default the linear layers inside the model's attention blocks."""
    if not requested:
        if not structure.attention_projections:
            raise ModelError(
                f"found no linear layers inside attention blocks of this {structure.model_type} model; "
                f"pass --target_modules (candidates: {', '.join(structure.leaf_names())})"
            )
        return list(structure.attention_projections)
    if [name.lower() for name in requested] == ["all-linear"]:
        return "all-linear"
    missing = [name for name in requested if not any(full == name or full.endswith("." + name) for full in structure.linear_layers)]
    if missing:
        hints = "".join(suggest(name, structure.leaf_names()) for name in missing)
        raise ModelError(
            f"--target_modules: {', '.join(repr(m) for m in missing)} not found in this {structure.model_type} model."
            f"{hints} Linear layers it has: {', '.join(structure.leaf_names())} (or 'all-linear')"
        )
    return list(requested)
