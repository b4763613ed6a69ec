"""`slmops finetune` as a library call. Reads top to bottom in dependency order:
validate everything cheap first (config, method, output folder, model structure, data),
then load the model, attach the method, train, and write the outputs."""

from __future__ import annotations

import logging
import random
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import yaml

from slmops.config import DataConfig, FinetuneConfig, to_yaml
from slmops.data.prepare import PreparedData, load_splits, prepare_data
from slmops.errors import ConfigError, ModelError, OutputError
from slmops.methods import Method, get_method, resolve_target_modules
from slmops.models import choose_precision, inspect_model, load_model, load_tokenizer, resolve_model
from slmops.models.load import ModelStructure, check_safetensors, check_weight_files
from slmops.models.precision import Precision
from slmops.models.resolve import ModelSource, source_description
from slmops.outputs import OutputLayout, RunFolder, check_output_folder, copy_model_folder, versions
from slmops.train import checkpoint as ckpt
from slmops.train import distributed
from slmops.train.distributed import World
from slmops.train.trainer import Trainer, TrainingData, TrainingHooks, TrainingSetup, TrainResult

log = logging.getLogger("slmops")


@dataclass
class FinetunePlan:
    """Everything decided before the model is loaded (what --dry_run prints)."""

    config: FinetuneConfig
    method: Method
    source: ModelSource
    target_modules: list[str] | str | None
    precision: Precision
    data: PreparedData
    layout: OutputLayout
    resume_from: Path | None
    learning_rate: float
    tokenizer: object
    data_config: DataConfig  # config.data with what the plan had to adjust (max_seq_len to the model's context)
    identity: dict  # what a checkpoint must share with this run to be resumed by it (run_identity)
    custom_loss: object | None = None  # train.custom_loss.CustomLoss for --loss
    world: World = field(default_factory=World)  # the processes of a torchrun launch (train/distributed.py)
    output_note: str | None = None  # (a dry run) why the output folder could not be used as it is
    fsdp: str | None = None  # full_shard / shard_grad_op: the model sharded over the processes (train/fsdp.py)
    gradient_checkpointing: tuple[bool, str] = (False, "--gradient_checkpointing false")  # (on, why)
    pass_tokens: int | None = None  # micro-batches with more tokens train in passes of whole examples (_choose_passes)

    def describe(self) -> dict:
        return {
            "task_name": self.config.task_name,
            "model": source_description(self.source),
            "method": self.method.name,
            "target_modules": self.target_modules,
            **({"deploy_precision": _deploy_settings(self.config.method.deploy_precision)}
               if self.config.method.deploy_precision != "none" else {}),
            "precision": {"name": self.precision.name, "device": str(self.precision.device), "reason": self.precision.reason},
            "learning_rate": self.learning_rate,
            "max_seq_len": self.data_config.max_seq_len,
            "gradient_checkpointing": {"on": self.gradient_checkpointing[0], "reason": self.gradient_checkpointing[1]},
            **({"pass_tokens": self.pass_tokens} if self.pass_tokens else {}),
            "data": self.data.describe(),
            "resume_from": str(self.resume_from) if self.resume_from else None,
            **({"output_path": f"not usable as it is: {self.output_note}"} if self.output_note else {}),
            **({"distributed": {"world_size": self.world.size, "backend": self.world.backend,
                                "global_batch": global_batch(self.config.training, self.world),
                                **({"fsdp": self.fsdp} if self.fsdp else {})}} if self.world.distributed else {}),
        }


def _deploy_settings(precision: str) -> dict:
    from slmops.deploy.quantized_base import export_settings

    return export_settings(precision)


def global_batch(training, world: World) -> int:
    return training.per_device_train_batch_size * world.size * training.gradient_accumulation_steps


@dataclass
class FinetuneResult:
    output_path: Path
    adapter_path: Path | None
    model_path: Path
    train: TrainResult
    plan: dict


def plan_finetune(config: FinetuneConfig, dry_run: bool = False) -> FinetunePlan:
    """Validate and resolve everything cheap; raise on the first class of problem found.
    Under torchrun every process plans, and all of them fail together if any one fails.
    `dry_run`: an output folder the run could not use is reported in the plan, not raised."""
    world = distributed.world()
    plan, error = None, None
    try:
        plan = _plan_finetune(config, world, dry_run)
    except Exception as exc:  # shared with the other processes, then raised on every one
        error = exc
    world.agree(error)
    return plan


def _plan_finetune(config: FinetuneConfig, world: World, dry_run: bool = False) -> FinetunePlan:
    method = get_method(config.method.method)
    tcfg = config.training
    if tcfg.fp16 and not torch.cuda.is_available():
        raise ConfigError("--fp16 needs a CUDA GPU; on a CPU leave it off (bf16 is chosen when the CPU is fast at it)")
    resuming = tcfg.resume_from_checkpoint is not None
    output_note = None
    try:
        layout = check_output_folder(Path(config.output_path), config.overwrite, resuming)
    except OutputError as exc:
        if not dry_run:
            raise
        layout, output_note = OutputLayout(Path(config.output_path).expanduser()), str(exc)  # (a plan to look at, not to run)
    resume_from = None
    if resuming:
        resume_from = ckpt.find_resume_checkpoint(tcfg.resume_from_checkpoint, layout.checkpoints)
        ckpt.read_manifest(resume_from)  # complete, and of a format this version reads
    if config.method.modules_to_save and not method.is_adapter:
        raise ConfigError(f"--modules_to_save applies to adapter methods; --method {method.name} trains every weight already")
    _check_deploy_precision(config.method.deploy_precision, method)

    _check_eval_metrics(config, None)
    from slmops.train.tracking import check_report_to

    check_report_to(tcfg.report_to)
    custom_loss = None
    if tcfg.loss:  # the user's file runs here (they named it): its class and constructor checked before any data or model
        from slmops.train.custom_loss import CustomLoss

        custom_loss = CustomLoss(tcfg.loss, tcfg.loss_kwargs)
    elif tcfg.loss_kwargs:
        raise ConfigError("--loss_kwargs is for a custom loss; give --loss FILE.py:ClassName too")
    splits = load_splits(config.data)  # data mistakes surface before any model is fetched
    source = resolve_model(config.model.model_name_or_path, fetch=True)
    check_weight_files(source.path)
    structure = inspect_model(source.path, config.model.trust_remote_code)
    data_config = _fit_context(config.data, structure.max_positions)
    targets = resolve_target_modules(config.method.target_modules, structure) if method.is_adapter else None
    if config.method.adapter_path:
        adapter = Path(config.method.adapter_path)
        if not (adapter / "adapter_config.json").is_file():
            raise ModelError(f"--adapter_path {config.method.adapter_path!r} holds no adapter_config.json (not a PEFT adapter)")
        if (adapter / "adapter_model.safetensors").is_file():
            check_safetensors(adapter / "adapter_model.safetensors", "adapter weights file")

    tokenizer = load_tokenizer(source.path, config.model.trust_remote_code)
    data = prepare_data(data_config, tokenizer, splits, need_eval_examples=bool(tcfg.eval_metrics), seed=tcfg.seed,
                        hold_out_for_labels="eval_split" not in config.data.model_fields_set)
    if data.eval is not None and not config.data.eval_split:  # a classification task's own held-out split
        config.data.eval_split = data_config.eval_split = "auto"
    if _classification_defaults(config, data, method) and method.is_adapter:
        targets = resolve_target_modules(config.method.target_modules, structure)
    _check_eval_metrics(config, data)
    if tcfg.class_weights == "auto":
        _weigh_classes(data, custom_loss is not None)
    if not data.formatter.lm_loss and custom_loss is None:
        raise ConfigError(f"the {data.formatter.name} format has no language-model loss: train it with a custom loss "
                          "(--loss FILE.py:ClassName; docs/finetune.md, 'Custom loss')")
    precision = choose_precision(tcfg.bf16, tcfg.fp16, config.model.torch_dtype, adapter_method=method.is_adapter)
    if method.quantize_base_4bit and structure.num_parameters < 1_000_000_000 and precision.device.type == "cpu":
        log.warning(
            "qlora on a %.0fM-parameter model: on a CPU, bf16 LoRA (--method lora) is faster and uses about as little "
            "memory below ~1B parameters; 4-bit pays on larger models", structure.num_parameters / 1e6,
        )
    learning_rate = tcfg.learning_rate or method.default_learning_rate
    fsdp_mode = _fsdp_mode(tcfg.fsdp, method, world)
    pass_tokens = _choose_passes(tcfg, method, structure, precision, fsdp_mode, custom_loss)
    checkpointing = _choose_checkpointing(tcfg.gradient_checkpointing, structure, data, tcfg.per_device_train_batch_size, precision,
                                          pass_tokens)
    identity = run_identity(config, method, source, targets, data, world)
    if custom_loss is not None:
        identity["loss"] = custom_loss.identity()
    if resume_from is not None:  # before anything is loaded or written
        ckpt.check_belongs(resume_from, identity, tcfg.ignore_mismatch, log)
    return FinetunePlan(config, method, source, targets, precision, data, layout, resume_from, learning_rate, tokenizer,
                        data_config, identity, custom_loss, world, output_note, fsdp_mode, checkpointing, pass_tokens)


# What a classification task trains with where the user chose nothing else (measured on TweetEval
# emotion with the built-in model: docs/finetune.md, "Classification"). Five evaluations a run, not
# ten: each scores every label of every held-out row (there, 50 s against 580 s for the epoch).
CLASSIFICATION_DEFAULTS = {"metric_for_best_model": "macro_f1", "eval_steps": 0.2, "target_modules": ["all-linear"],
                           "learning_rate": 5e-4, "lr_scheduler_type": "cosine", "warmup_ratio": 0.05}


def _classification_defaults(config: FinetuneConfig, data: PreparedData, method: Method) -> dict:
    """For a classification task, CLASSIFICATION_DEFAULTS in place of the options left unset
    (the choice said in the log); {} for any other task."""
    if data.labels is None:
        return {}
    sections = {name: config.method if name == "target_modules" else config.training for name in CLASSIFICATION_DEFAULTS}
    chosen = {}
    for name, value in CLASSIFICATION_DEFAULTS.items():
        section = sections[name]
        if name in section.model_fields_set or (name in ("metric_for_best_model", "eval_steps") and data.eval is None) or \
                (name == "target_modules" and not method.is_adapter) or (name == "learning_rate" and method.name != "lora") or \
                (name == "warmup_ratio" and "warmup_steps" in config.training.model_fields_set):
            continue
        setattr(section, name, value)
        chosen[name] = value
    if chosen:
        log.info("classification defaults: %s (any of them given as a flag is used instead)",
                 ", ".join(f"--{name} {','.join(v) if isinstance(v, list) else v}" for name, v in chosen.items()))
    return chosen


def _check_deploy_precision(precision: str, method: Method) -> None:
    if precision == "none":
        return
    if not method.is_adapter:
        raise ConfigError(f"--deploy_precision {precision} trains an adapter over the quantized base; --method {method.name} changes "
                          "the base weights themselves (quantize the result with `slmops optimize --precision` instead)")
    if method.quantize_base_4bit:
        raise ConfigError(f"--deploy_precision {precision} with --method qlora: QLoRA trains over bitsandbytes' 4-bit base, not the "
                          "ONNX export's; use --method lora --deploy_precision int4 to train over the weights the bundle will hold")


ACTIVATION_SHARE = 0.5  # of the memory available, past which activations are recomputed instead of kept

# On the CPU fast path a micro-batch's forward keeps ~layers x (2 x MLP + 10 x hidden) values a
# token until its backward (SmolLM2-135M in fp32: ~1.1 MB a token, measured on 16 tiny-codes
# documents, 13k tokens: 16.5 GB peak without checkpointing). A CPU's matmuls run as fast on a
# few thousand rows as on tens of thousands, so a longer micro-batch runs as consecutive passes
# of whole examples (the trainer sums their gradients, which are the micro-batch's): memory
# bounded by ACTIVATION_BUDGET, not by batch x length, and no recomputation needed for it.
ACTIVATION_BUDGET = 2 << 30  # bytes of activations one pass keeps, estimated as above
MIN_PASS_TOKENS = 1024  # passes are never cut shorter: shorter products lose speed


def pass_tokens_for(structure: ModelStructure, element_size: int) -> int | None:
    """The most tokens one forward/backward pass on the CPU fast path should hold (see
    ACTIVATION_BUDGET); None where the model's size is not known."""
    if not (structure.hidden_size and structure.num_layers and structure.mlp_size):
        return None
    per_token = structure.num_layers * (2 * structure.mlp_size + 10 * structure.hidden_size) * element_size
    return max(MIN_PASS_TOKENS, ACTIVATION_BUDGET // per_token)


def _choose_passes(tcfg, method: Method, structure: ModelStructure, precision: Precision, fsdp_mode: str | None,
                   custom_loss) -> int | None:
    """The pass size of this run's micro-batches (pass_tokens_for) where it trains on the CPU fast
    path with the built-in loss, unsharded; else None (each micro-batch in one pass)."""
    from slmops.train.cpu import decide

    if fsdp_mode or custom_loss is not None or decide(tcfg.cpu_fast_path, method.cpu_fast_path, method.name, precision.device):
        return None
    return pass_tokens_for(structure, (precision.autocast or precision.weights).itemsize)


def _choose_checkpointing(asked: bool | None, structure: ModelStructure, data: PreparedData, batch_size: int,
                          precision: Precision, pass_tokens: int | None = None) -> tuple[bool, str]:
    """Gradient checkpointing, as asked, else on when the activations one pass keeps for the
    backward (a micro-batch, or on the fast path at most `pass_tokens` tokens of it: whole
    examples) would pass ACTIVATION_SHARE of the memory available. The estimate: per token and
    decoder layer, 10 hidden-sized and 5 MLP-sized fp32 vectors (measured on SmolLM2-135M through
    the model's own forward, 16 x 1024 tokens: 19.7 GB peak, ~40 KB a token a layer; the estimate
    gives 54 KB; the fast path keeps about a third of that)."""
    if asked is not None:
        return asked, f"--gradient_checkpointing {str(asked).lower()}"
    if not (structure.hidden_size and structure.num_layers and structure.mlp_size):
        return False, "default (the model's size is not known)"
    longest = max(data.train.lengths, default=0)  # (tokenized rows are cut to --max_seq_len already)
    tokens = batch_size * longest if pass_tokens is None else min(batch_size * longest, max(pass_tokens, longest))
    needed = tokens * structure.num_layers * (10 * structure.hidden_size + 5 * structure.mlp_size) * 4
    if precision.device.type == "cuda":
        available = torch.cuda.mem_get_info(precision.device)[0]
    else:
        from slmops.machine import available_memory

        available = available_memory()
    if available is None:
        return False, "default (available memory unknown)"
    whole = tokens == batch_size * longest
    what = f"a micro-batch of {batch_size} x {longest} tokens" if whole else f"a pass of {tokens:,} tokens ({batch_size} x {longest} a micro-batch)"
    unit = "a micro-batch" if whole else "a pass"
    if needed > ACTIVATION_SHARE * available:
        log.info("gradient checkpointing: on: %s keeps ~%.1f GB of activations, %.1f GB are available "
                 "(--gradient_checkpointing false keeps them)", what, needed / 2**30, available / 2**30)
        return True, f"on: ~{needed / 2**30:.1f} GB of activations {unit}, {available / 2**30:.1f} GB available"
    return False, f"off: ~{needed / 2**30:.1f} GB of activations {unit}, {available / 2**30:.1f} GB available"


def _fsdp_mode(asked: str, method: Method, world: World) -> str | None:
    """The sharding this run uses: --fsdp, else accelerate's FSDP setting; None for none."""
    from slmops.train import fsdp

    mode = asked if asked != "off" else fsdp.from_accelerate_env()
    if mode is None or mode == "off":
        return None
    if method.quantize_base_4bit:
        raise ConfigError(f"--fsdp {mode} with --method qlora: bitsandbytes' 4-bit weights cannot be sharded; train QLoRA "
                          "data-parallel instead (leave --fsdp off: each process holds the 4-bit base, a quarter of its bf16 size)")
    if not world.distributed:
        log.info("fsdp: one process, nothing to shard: training as without --fsdp (launch with torchrun or --nproc_per_node N)")
        return None
    return mode


def _fit_context(data: DataConfig, max_positions: int | None) -> DataConfig:
    """--max_seq_len no longer than the model's position embeddings reach (longer examples
    would fail or train on garbage positions): clamped, and said so."""
    if max_positions is None or data.max_seq_len <= max_positions:
        return data
    log.warning("--max_seq_len %d is longer than the model's context (%d positions): using %d", data.max_seq_len, max_positions, max_positions)
    return data.model_copy(update={"max_seq_len": max_positions})


def run_identity(config: FinetuneConfig, method: Method, source: ModelSource, targets, data: PreparedData,
                 world: World | None = None) -> dict:
    """What a checkpoint must share with this run for a resume to continue the same run:
    the base model (its config), the method and its adapter shape, the exact tokenized
    training examples, and what fixes their order. Learning rate, step count, evaluation and
    logging may change on resume."""
    import hashlib

    config_file = source.path / "config.json"
    model = {"config": hashlib.sha256(config_file.read_bytes()).hexdigest()[:16] if config_file.is_file() else None,
             "weights_bytes": sum(f.stat().st_size for f in source.path.glob("*.safetensors"))}
    m = config.method
    method_id: dict = {"method": method.name}
    if method.is_adapter:
        method_id.update(deploy_precision=m.deploy_precision)
        method_id.update(lora_r=m.lora_r, lora_alpha=m.lora_alpha, lora_dropout=m.lora_dropout, target_modules=targets,
                         modules_to_save=m.modules_to_save, adapter_path=str(Path(m.adapter_path).resolve()) if m.adapter_path else None)
    t = config.training
    return {
        "model": model,
        "method": method_id,
        "data": {"train_examples": data.train.fingerprint()},
        # the global batch, not its split: a run resumes at another world size on the same curve
        "batches": {"global_batch": global_batch(t, world or World()), "seed": t.seed, "group_by_length": t.group_by_length},
    }


def _check_eval_metrics(config: FinetuneConfig, data: PreparedData | None) -> None:
    """--eval_metrics and --metric_for_best_model must make sense for this data."""
    from slmops.evaluate.metrics import METRICS, check_labels, get_metrics

    tcfg = config.training
    metrics = get_metrics(tcfg.eval_metrics or [])
    if any(m.needs == "timing" for m in metrics):
        raise ConfigError("--eval_metrics: latency is measured by `slmops evaluate`, not during training")
    if metrics and not config.data.eval_split:
        raise ConfigError("--eval_metrics needs --eval_split")
    available = {"loss", "perplexity"} | {key for m in metrics for key in m.produces}
    producer = next((m for m in METRICS.values() if tcfg.metric_for_best_model in m.produces and m.needs == "generation"), None)
    if tcfg.metric_for_best_model not in available and producer is not None and not config.data.eval_split:
        raise ConfigError(f"--metric_for_best_model {tcfg.metric_for_best_model} is measured on held-out data: give --eval_split "
                          "(a split, or auto: 10% of train held out)")
    if tcfg.metric_for_best_model not in available and producer is not None:
        # --metric_for_best_model macro_f1 alone: its metric is computed at each evaluation, no second flag needed
        tcfg.eval_metrics = [*(tcfg.eval_metrics or []), producer.name]
        metrics, available = [*metrics, producer], available | set(producer.produces)
    if tcfg.metric_for_best_model not in available:
        raise ConfigError(
            f"--metric_for_best_model {tcfg.metric_for_best_model!r} is not computed; available: {', '.join(sorted(available))} "
            "(add its metric to --eval_metrics)"
        )
    if data is not None and any(m.needs == "generation" for m in metrics):
        if not data.formatter.has_completion:
            raise ConfigError(f"--eval_metrics need a completion to compare with, and the {data.formatter.name} format has none")
        if any(m.name in ("accuracy", "f1") for m in metrics):
            check_labels([ex.completion for ex in data.eval_examples or []])


def _weigh_classes(data: PreparedData, custom_loss: bool) -> None:
    """--class_weights auto: the training examples carry their label's weight into the loss
    (and into the data fingerprint a resume checks)."""
    from collections import Counter

    from slmops.data.labels import balanced_class_weights, normalize_label

    if data.labels is None:
        raise ConfigError("--class_weights auto weighs the labels of a classification task, and this data is not one "
                          "(free-text completions); give --task classification if the completions are labels")
    if custom_loss:
        raise ConfigError("--class_weights applies to the built-in loss; a custom loss (--loss) weighs examples itself")
    names = [normalize_label(c or "") for c in data.train_completions]
    by_label, counts = balanced_class_weights(data.train_completions), Counter(names)
    data.train.extra["loss_weight"] = [by_label[name] for name in names]
    log.info("class weights (balanced): %s", ", ".join(f"{name} {by_label[name]:.2f} ({counts[name]})" for name in sorted(by_label)))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(plan: FinetunePlan, for_outputs: bool = False):
    """Load the base with the dtype policy, merge a source adapter, attach the method.
    `for_outputs`: again on rank 0 alone, after a sharded run (the merged base is written already)."""
    cfg = plan.config
    precision = plan.precision
    _seed_everything(cfg.training.seed)
    if plan.source.adapter_path is not None:
        # Continuing from an earlier slmops adapter run: its tuned model is base + adapter.
        from peft import PeftModel

        base = load_model(plan.source.path, torch.float32, precision.device, cfg.model.trust_remote_code)
        base = PeftModel.from_pretrained(base, plan.source.adapter_path).merge_and_unload()
        if not for_outputs:
            if plan.world.is_main:  # one writer; the others read it below (QLoRA) once it is there
                base.save_pretrained(plan.layout.model)
                plan.tokenizer.save_pretrained(plan.layout.model)
            plan.world.barrier()
        if precision.weights != torch.float32 and not plan.method.quantize_base_4bit:
            base.to(precision.weights)
        model = base
        if plan.method.quantize_base_4bit:
            model = load_model(plan.layout.model, precision.weights, precision.device, cfg.model.trust_remote_code, quantize_4bit=True,
                               compute_dtype=torch.bfloat16 if precision.weights == torch.bfloat16 else torch.float32)
    else:
        compute = torch.bfloat16 if precision.weights == torch.bfloat16 else torch.float32
        model = load_model(plan.source.path, precision.weights, precision.device, cfg.model.trust_remote_code,
                           quantize_4bit=plan.method.quantize_base_4bit, compute_dtype=compute)
    if cfg.method.deploy_precision != "none":
        _train_over_quantized_base(plan, model)
    model.config.use_cache = False
    if plan.method.quantize_base_4bit:
        from slmops.train.cpu.compat import keep_4bit_layers_differentiable

        keep_4bit_layers_differentiable(model)
    if plan.gradient_checkpointing[0]:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if not plan.method.is_adapter:
        model.requires_grad_(True)
        return model

    from peft import PeftModel, get_peft_model

    # No peft.prepare_model_for_kbit_training for 4-bit bases: it upcasts every
    # non-quantized weight (embeddings included) to fp32, which on a 1B model costs more
    # memory than 4-bit saves; get_peft_model freezes the base and non-reentrant
    # gradient checkpointing needs no input gradients.
    if cfg.method.adapter_path:
        model = PeftModel.from_pretrained(model, cfg.method.adapter_path, is_trainable=True)
    else:
        peft_config = plan.method.peft_config(cfg.method, plan.target_modules)
        # Adapters are kept in fp32 even on a bf16 base: small, and precise for AdamW.
        model = get_peft_model(model, peft_config, autocast_adapter_dtype=True)
    return model


def _train_over_quantized_base(plan: FinetunePlan, model) -> None:
    """--deploy_precision: the base's weights replaced by those its int4/int8 export holds
    (deploy/quantized_base.py), so the adapter learns to work with them."""
    from slmops.deploy import quantized_base

    precision = plan.config.method.deploy_precision
    # the base the export will read: a continued adapter run's merged base was written to model/
    source = plan.layout.model if plan.source.adapter_path is not None else plan.source.path
    settings = quantized_base.export_settings(precision)
    log.info("quantization-aware: training over the %s export's weights (%s); exporting the base once to read them",
             precision, ", ".join(f"{k} {v}" for k, v in settings.items() if k != "precision"))
    weights = quantized_base.torch_names(quantized_base.quantized_weights(source, precision, plan.target_modules,
                                                                                  plan.config.model.trust_remote_code), model)
    quantized_base.load_quantized_weights(model, weights)


def finetune(config: FinetuneConfig, hooks: TrainingHooks | None = None) -> FinetuneResult:
    """Fine-tune `config.model` on `config.data` and write the outputs (see README).
    `hooks`: a caller's say in the loop (a tuning trial reports evaluations and may stop it)."""
    return run_plan(plan_finetune(config), hooks)


def run_plan(plan: FinetunePlan, hooks: TrainingHooks | None = None) -> FinetuneResult:
    config, layout = plan.config, plan.layout
    data = plan.data
    if config.task_name:
        log.info("task: %s", config.task_name)
    log.info("model: %s (%s)", plan.source.given, plan.source.kind)
    log.info("data: %s", data.formatter.description)
    skipped = data.train_split.skipped_rows
    log.info("train: %s%s; eval: %s", data.train.summary(), f" ({skipped} rows without a needed field left out)" if skipped else "",
             data.eval.summary() if data.eval else "none")
    log.info("precision: %s on %s (%s)", plan.precision.name, plan.precision.device, plan.precision.reason)
    tcfg = config.training
    # The folder is locked from here to the end; with --overwrite the old run is kept aside
    # until the new one has written its first checkpoint (RunFolder).
    world = plan.world
    if world.distributed:
        log.info("distributed: %s; global batch %d (%d per process x %d processes x %d accumulation)", world.describe(),
                 global_batch(tcfg, world), tcfg.per_device_train_batch_size, world.size, tcfg.gradient_accumulation_steps)
    # only rank 0 writes: it holds the folder; the others train alongside and write nothing
    owner = RunFolder(layout, config.overwrite and plan.resume_from is None, lambda: bool(ckpt.step_checkpoints(layout.checkpoints)),
                      log) if world.is_main else _NotTheWriter()
    with owner as folder:
        if world.is_main:
            for stale in ckpt.clean_staging(layout.checkpoints):
                log.info("removed %s, left by a run killed while writing a checkpoint", stale)
        model = build_model(plan)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in model.parameters())
        log.info("method: %s; trainable parameters %s of %s (%.2f%%)", plan.method.name, f"{trainable:,}", f"{total:,}", 100 * trainable / max(total, 1))
        if plan.fsdp:
            from slmops.train import fsdp

            sharded = fsdp.shard(model, plan.fsdp)
            log.info("fsdp %s: %d units (one per decoder layer, and the rest); each process holds %s of the %s parameters",
                     plan.fsdp, sharded["units"], f"{sharded['parameters_held']:,}", f"{sharded['parameters']:,}")

        from slmops.train.cpu import FastPath, decide

        off = "the model is sharded (--fsdp): it trains through its own forward" if plan.fsdp else \
            decide(tcfg.cpu_fast_path, plan.method.cpu_fast_path, plan.method.name, plan.precision.device)
        typical_tokens = tcfg.per_device_train_batch_size * statistics.median_low(data.train.lengths) if data.train.lengths else None
        if typical_tokens is not None and plan.pass_tokens is not None:
            typical_tokens = min(typical_tokens, plan.pass_tokens)
        with (FastPath.disabled(off) if off else FastPath.install(model, typical_tokens)) as fast_path:
            log.info("fast CPU path: %s", fast_path.describe())
            from slmops.evaluate.metrics import BEST_POSSIBLE, LOWER_IS_BETTER

            setup = TrainingSetup(plan.precision, plan.learning_rate, layout.checkpoints,
                                  Path(tcfg.logging_dir) if tcfg.logging_dir else layout.logs, plan.method.is_adapter, plan.identity,
                                  tcfg.metric_for_best_model in LOWER_IS_BETTER, BEST_POSSIBLE.get(tcfg.metric_for_best_model),
                                  plan.custom_loss, world, pass_tokens=plan.pass_tokens)
            if setup.pass_tokens:
                log.info("passes: micro-batches over %s tokens train as passes of whole examples (activations kept under ~%d GB)",
                         f"{setup.pass_tokens:,}", ACTIVATION_BUDGET >> 30)
            trainer = Trainer(model, TrainingData(data.train, data.eval, plan.tokenizer.pad_token_id), tcfg, setup, fast_path,
                              _generation_eval(plan), TrainingHooks(on_checkpoint=folder.commit).merged(hooks))
            if plan.resume_from is not None:
                trainer.resume(plan.resume_from)
            failed = None
            try:  # the start-up checks (fast path, a custom loss's first call) before run.yaml is written
                trainer.prepare()
            except Exception as exc:  # every process checked the same: one message for the run
                failed = exc
            world.agree(failed)
            if world.is_main:
                _write_run_yaml(plan, status="running")
                setup.tracking = _open_tracking(plan, setup.log_dir, trainer.resumed_step)
            try:
                result = trainer.train()
            except BaseException:
                if setup.tracking is not None:
                    setup.tracking.finish({}, {}, failed=True)
                raise
            if plan.fsdp:  # every process: the trained weights gathered whole (rank 0 keeps them)
                trained = ckpt.trainable_state(model, keep=world.is_main)
            if not world.is_main:  # the outputs are rank 0's to write
                return FinetuneResult(layout.root, layout.adapter if plan.method.is_adapter else None, layout.model, result,
                                      plan.describe())
            if plan.fsdp:  # the outputs come from a whole copy: the base again, with the trained weights
                model = build_model(plan, for_outputs=True)
                ckpt.load_trainable_state(model, trained)
                trainer.model = model
            if data.eval is not None and tcfg.load_best_model_at_end and result.best_step is not None:
                trainer.restore_best()
                log.info("kept the best weights: step %d, eval %s %.4f", result.best_step, tcfg.metric_for_best_model, result.best_eval_loss)
        try:
            adapter_path = _save_outputs(plan, model)
            _write_run_yaml(plan, status="finished", result=result)
            from slmops.report import write_training_report

            report = write_training_report(layout, setup.log_dir, plan.describe(), asdict(result), replayable_config(plan.config),
                                           versions(), _sample_answers(plan, model))
        except BaseException:
            setup.tracking.finish({}, {}, failed=True)
            raise
        setup.tracking.finish(asdict(result), {"adapter": adapter_path, "report": report, "report_html": report.with_suffix(".html"),
                                               "loss_plot": layout.root / "loss.png", "run_config": layout.run_yaml})
    return FinetuneResult(layout.root, adapter_path, layout.model, result, plan.describe())


SAMPLE_PROMPTS = 3  # eval examples the report shows answered by the tuned model and by its base


def _sample_answers(plan: FinetunePlan, model) -> list[dict]:
    """A few eval prompts with the expected answer and the answers of the saved (best) weights
    and, for adapter methods, of the base (the adapter switched off): the report's 'what
    changed' at a glance. Empty without an eval split with answers. A classifier's answer is
    its most likely label, as evaluation scores it (one pass; generating up to
    --eval_max_new_tokens from an untuned base took longer than a short run's training);
    other tasks answer greedily."""
    examples = [ex for ex in (plan.data.eval_examples or []) if ex.completion is not None][:SAMPLE_PROMPTS]
    if not examples:
        return []
    from slmops.evaluate.choices import predict_labels, score_labels
    from slmops.inference import GenerationParams
    from slmops.inference.torch_backend import TorchBackend

    backend = TorchBackend.from_model(model, plan.tokenizer, "tuned")
    params = GenerationParams(max_new_tokens=plan.config.training.eval_max_new_tokens)
    prompts = [ex.prompt for ex in examples]
    special = plan.data.formatter.add_special_tokens
    labels = plan.data.labels

    def answers(adapter: str | None) -> list[str]:
        if labels is not None:
            return predict_labels(score_labels(backend, examples, labels, adapter, special), labels)
        return backend.generate_batch(prompts, adapter, params, special)

    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            tuned = answers(None)
            base = answers("base") if plan.method.is_adapter else [None] * len(prompts)
    finally:
        model.train(was_training)
    return [{"prompt": ex.prompt, "expected": ex.completion, "tuned": t, "base": b} for ex, t, b in zip(examples, tuned, base)]


def _open_tracking(plan: FinetunePlan, log_dir: Path, resumed_step: int | None):
    """The run's trackers (--report_to), given the configuration as run.yaml records it and
    what was chosen for it (method, precision, learning rate, task) as hyper-parameters."""
    from slmops.train.tracking import Tracking, flat_params

    resolved = plan.describe()
    params = flat_params(replayable_config(plan.config))
    params.update(flat_params({"method": resolved["method"], "precision": resolved["precision"]["name"],
                               "learning_rate": resolved["learning_rate"], "max_seq_len": resolved["max_seq_len"],
                               "task": (resolved["data"].get("task") or {}).get("kind", "generation"),
                               "world_size": plan.world.size}, "resolved."))
    return Tracking.open(plan.config.training.report_to, plan.config.task_name or plan.layout.root.name, log_dir, params, resumed_step)


class _NotTheWriter:
    """Rank > 0 of a distributed run: in the place of the output folder's RunFolder, it holds nothing."""

    def __enter__(self) -> "_NotTheWriter":
        return self

    def __exit__(self, *exc) -> None:
        return None

    def commit(self) -> None:
        pass


def _generation_eval(plan: FinetunePlan):
    """The evaluation's metrics beyond the loss (--eval_metrics accuracy,f1,...), from the
    model as it trains, on the inference layer: for a classification task accuracy/f1 pick
    the most likely label (one pass per example, no generation); other metrics compare
    greedy answers. Scoring the labels scores the gold one too, and its log-likelihood is
    minus the eval loss: where its tokens are the eval rows' very tokens, the evaluation gives
    the loss as well and the trainer skips its own pass over the eval split (a third of an
    evaluation on TweetEval)."""
    from slmops.evaluate.metrics import CLASSIFICATION_METRICS, get_metrics

    metrics = [m for m in get_metrics(plan.config.training.eval_metrics or []) if m.needs == "generation"]
    examples = plan.data.eval_examples
    if not metrics or not examples:
        return None
    tcfg = plan.config.training
    prompts = [ex.prompt for ex in examples]
    references = [ex.completion for ex in examples]
    special = plan.data.formatter.add_special_tokens
    labels = plan.data.labels
    by_label = [m for m in metrics if labels is not None and m.name in CLASSIFICATION_METRICS]
    by_generation = [m for m in metrics if m not in by_label]
    gold = _gold_label_tokens(plan, examples, labels) if by_label else None

    def evaluate(model) -> dict[str, float]:
        from slmops.evaluate.choices import predict_labels, score_labels
        from slmops.inference import GenerationParams
        from slmops.inference.torch_backend import TorchBackend

        backend = TorchBackend.from_model(model, plan.tokenizer)
        scores = score_labels(backend, examples, labels, None, special, batch_size=tcfg.per_device_eval_batch_size) if by_label else None
        chosen = predict_labels(scores, labels) if by_label else None
        generated = backend.generate_batch(prompts, None, GenerationParams(max_new_tokens=tcfg.eval_max_new_tokens), special,
                                           tcfg.per_device_eval_batch_size) if by_generation else None
        values: dict[str, float] = {}
        if gold is not None:
            values["loss"] = -float(sum(scores[row, label] for row, (label, _) in enumerate(gold))) / sum(n for _, n in gold)
        for metric in metrics:
            computed = metric.compute(predictions=chosen, references=references, labels=list(labels.labels)) if metric in by_label \
                else metric.compute(predictions=generated, references=references)
            values.update({k: v for k, v in computed.items() if isinstance(v, (int, float))})
        return values

    return evaluate


def _gold_label_tokens(plan: FinetunePlan, examples, labels) -> list[tuple[int, int]] | None:
    """Each eval example's (gold label's index, number of loss tokens) when scoring the gold
    label covers exactly the tokens the eval loss is taken over (the same ids, the loss on
    the same positions, every example kept by tokenization, the built-in loss, one process);
    else None, and the trainer computes the loss itself."""
    from slmops.data.labels import normalize_label
    from slmops.data.tokenize import IGNORE
    from slmops.evaluate.choices import candidate

    rows = plan.data.eval
    if plan.custom_loss is not None or plan.world.distributed or rows is None or len(rows) != len(examples):
        return None
    index = {name: i for i, name in enumerate(labels.names)}
    gold = []
    for ex, ids, targets in zip(examples, rows.input_ids, rows.labels):
        label = index.get(normalize_label(ex.completion or ""))
        if label is None:
            return None
        candidate_ids, start = candidate(ex, labels.labels[label], plan.tokenizer, plan.data.formatter.add_special_tokens)
        scored = [i for i in range(1, len(targets)) if targets[i] != IGNORE]
        if candidate_ids != list(ids) or scored != list(range(start, len(ids))):
            return None
        gold.append((label, len(scored)))
    return gold


def _save_outputs(plan: FinetunePlan, model) -> Path | None:
    layout = plan.layout
    if plan.method.is_adapter:
        if plan.source.adapter_path is None:  # else build_model already wrote the merged base
            copy_model_folder(plan.source.path, layout.model)
            plan.tokenizer.save_pretrained(layout.model)
        model.save_pretrained(layout.adapter)
        _point_adapter_at_base(layout.adapter, plan.source.hub_id or plan.source.given)
        return layout.adapter
    # Full fine-tuning: master weights are fp32; save them as the tuned model.
    model.config.use_cache = True
    model.save_pretrained(layout.model)
    plan.tokenizer.save_pretrained(layout.model)
    return None


def _point_adapter_at_base(adapter_dir: Path, base_name: str) -> None:
    """Record the public base name (not a cache path) in adapter_config.json."""
    import json

    path = adapter_dir / "adapter_config.json"
    data = json.loads(path.read_text())
    data["base_model_name_or_path"] = base_name
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def replayable_config(config: FinetuneConfig) -> dict:
    """The config as run.yaml stores it: local paths made absolute (so `slmops finetune
    --config OUT/run.yaml` replays it from any folder) and nothing that would act on this
    run's folder when replayed elsewhere (no --overwrite, no resume)."""
    data = yaml.safe_load(to_yaml(config))

    def absolute(value: str | None) -> str | None:
        return str(Path(value).expanduser().resolve()) if value and Path(value).expanduser().exists() else value

    data["model"]["model_name_or_path"] = absolute(data["model"]["model_name_or_path"])
    data_section = data["data"]
    if data_section.get("data_files") and not (data_section.get("data_name") and Path(data_section["data_name"]).is_dir()):
        data_section["data_files"] = [absolute(f) for f in data_section["data_files"]]
    data_section["data_name"] = absolute(data_section.get("data_name"))
    data["method"]["adapter_path"] = absolute(data["method"].get("adapter_path"))
    if data["training"].get("logging_dir"):
        data["training"]["logging_dir"] = str(Path(data["training"]["logging_dir"]).expanduser().resolve())
    data["training"]["resume_from_checkpoint"] = None
    data["training"]["ignore_mismatch"] = False
    data["output_path"] = str(Path(data["output_path"]).expanduser().resolve())
    data["overwrite"] = False
    return data


def _write_run_yaml(plan: FinetunePlan, status: str, result: TrainResult | None = None) -> None:
    doc = {
        "status": status,
        "config": replayable_config(plan.config),
        "resolved": plan.describe(),
        "versions": versions(),
    }
    if result is not None:
        doc["result"] = asdict(result)
    text = yaml.safe_dump(doc, sort_keys=False)
    tmp = plan.layout.run_yaml.with_suffix(".yaml.tmp")
    tmp.write_text(text)
    tmp.replace(plan.layout.run_yaml)
