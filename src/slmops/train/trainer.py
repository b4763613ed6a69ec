"""The training loop, explicit from top to bottom: batches in a deterministic order,
gradient accumulation normalised by labelled tokens, clipping, schedule, periodic logging,
evaluation, early stopping and atomic checkpoints."""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from slmops.config import TrainingConfig
from slmops.config.finetune import interval
from slmops.data.batching import collate, epoch_batches, last_tokens, split_rows
from slmops.data.tokenize import IGNORE, TokenizedData
from slmops.interrupts import raise_if_interrupted
from slmops.logs import progress_bar, say
from slmops.models.precision import Precision
from slmops.train import checkpoint as ckpt
from slmops.train import fsdp
from slmops.train.cpu.packing import SHORT_ATTENTION_MAX_LEN  # also the limit of Trainer._attention_kernel
from slmops.train.distributed import World, sum_gradients
from slmops.train.loss import check_fast_path, check_packing, packed_loss, plain_loss, selective_loss, shares_a_prefix
from slmops.train.monitor import MetricsLog, ResourceMeter, TrainingClock
from slmops.train.optimizer import build_optimizer, clipped_step

log = logging.getLogger("slmops")

# The start-up checks run forwards and backwards of two examples (the fast path, the model's own
# forward); on two whole tiny-codes documents (1,850 tokens) they took SmolLM2-135M's process to
# 6.9 GB before the first step. Cut to their last 512 tokens, long examples still take the
# long-sequence path (over SHORT_ATTENTION_MAX_LEN) the checks must see.
PROBE_MAX_LEN = 512


@dataclass
class TrainResult:
    steps: int
    stopped_early: bool
    best_step: int | None
    best_eval_loss: float | None  # the best value of --metric_for_best_model (loss by default)
    final_train_loss: float | None
    tokens_seen: int  # labelled tokens (the ones with loss)
    input_tokens_seen: int  # non-pad tokens through the model
    train_seconds: float
    tokens_per_second: float  # non-pad tokens per second
    fast_loss: bool
    stop_reason: str | None = None  # why it ended before its last step: early_stopping, or what a hook said (pruned, time_limit)


def total_steps(cfg: TrainingConfig, n_examples: int, world_size: int = 1) -> int:
    if cfg.max_steps > 0:
        return cfg.max_steps
    micro_per_epoch = math.ceil(n_examples / (cfg.per_device_train_batch_size * world_size))
    return max(1, math.ceil(cfg.num_train_epochs * micro_per_epoch / cfg.gradient_accumulation_steps))


@dataclass
class TrainingData:
    """What a run trains and evaluates on, tokenized."""

    train: TokenizedData
    eval: TokenizedData | None
    pad_id: int


@dataclass
class TrainingSetup:
    """How and where a run trains, decided by the recipe before the model is built."""

    precision: Precision
    learning_rate: float
    checkpoint_dir: Path
    log_dir: Path
    save_adapter: bool  # a PEFT copy of the adapter in each checkpoint (adapter methods)
    identity: dict = field(default_factory=dict)  # the run's fingerprints, in each checkpoint's manifest
    lower_is_better: bool = True  # of cfg.metric_for_best_model
    best_possible: float | None = None  # of cfg.metric_for_best_model, where it has one (accuracy 1.0): reached, nothing beats it
    custom_loss: object | None = None  # train.custom_loss.CustomLoss (--loss), else cross-entropy on the labelled tokens
    world: World = field(default_factory=World)  # the processes training together (train/distributed.py)
    tracking: object | None = None  # train.tracking.Tracking (--report_to), opened and finished by the recipe
    pass_tokens: int | None = None  # micro-batches with more tokens train as passes of whole examples (_passes_of)


@dataclass
class TrainingHooks:
    """What a caller may hear from, and say to, a running loop (the recipe, a tuning trial).
    A hook that wants the run to end returns a reason (a short word: 'pruned', 'time_limit');
    the loop then evaluates (if it has not at this step), checkpoints and stops, as early
    stopping does. Hooks run in the training process, between steps."""

    on_checkpoint: Callable[[], None] | None = None  # after each step checkpoint is in place
    on_evaluate: Callable[[int, dict[str, float]], str | None] | None = None  # (step, eval result) -> stop reason
    after_step: Callable[[int], str | None] | None = None  # (step) -> stop reason

    def merged(self, other: "TrainingHooks | None") -> "TrainingHooks":
        """These hooks and `other`'s, each pair called in turn (the first stop reason wins)."""
        if other is None:
            return self

        def both(first, second):
            if first is None or second is None:
                return first or second

            def call(*args):
                reason = first(*args)
                again = second(*args)
                return reason or again

            return call

        return TrainingHooks(both(self.on_checkpoint, other.on_checkpoint), both(self.on_evaluate, other.on_evaluate),
                             both(self.after_step, other.after_step))


class Trainer:
    """The loop. `fast_path`: the CPU fast path installed on the model (train/cpu), verified
    here against the model's own forward before the first step. `extra_eval(model)` adds
    metrics to each evaluation (generation metrics, from the recipe); when they include the
    eval loss (its pass covered the loss's tokens), the loss pass is skipped. `hooks`: see TrainingHooks."""

    def __init__(self, model, data: TrainingData, cfg: TrainingConfig, setup: TrainingSetup, fast_path=None,
                 extra_eval: Callable[[object], dict[str, float]] | None = None, hooks: TrainingHooks | None = None):
        self.model = model
        self.data = data
        self.cfg = cfg
        self.setup = setup
        self.precision = setup.precision
        self.checkpoint_dir = Path(setup.checkpoint_dir)
        self.fast_path = fast_path if fast_path is not None and fast_path.active else None
        self.extra_eval = extra_eval
        self.hooks = hooks or TrainingHooks()
        self.resumed_step: int | None = None
        self.best_key = cfg.metric_for_best_model
        self.world = setup.world
        self.sharded = fsdp.is_sharded(model)  # --fsdp: every process runs the same forwards (train/fsdp.py)
        # one micro-batch over every process (rank r trains on its r-th slice); an optimizer step
        # takes gradient_accumulation_steps of them
        self.batch_over_ranks = cfg.per_device_train_batch_size * self.world.size
        self.steps = total_steps(cfg, len(data.train), self.world.size)
        self.eval_every = interval(cfg.eval_steps, self.steps)
        self.save_every = interval(cfg.save_steps, self.steps) if cfg.save_steps else self.eval_every
        self.optimizer = build_optimizer(model, cfg, setup.learning_rate)
        # what the optimizer updates, listed once: walking a PEFT model's parameters for it
        # took 4 ms a step (SmolLM2-135M)
        self.trainable = [p for group in self.optimizer.param_groups for p in group["params"]]
        from transformers import get_scheduler

        warmup = cfg.warmup_steps or math.ceil(cfg.warmup_ratio * self.steps)
        self.scheduler = get_scheduler(cfg.lr_scheduler_type, self.optimizer, num_warmup_steps=warmup, num_training_steps=self.steps)
        self.scaler = torch.amp.GradScaler("cuda") if self.precision.autocast == torch.float16 else None
        self.state = ckpt.TrainState()
        self.loss_fn = plain_loss
        self._prepared = False

    # -- pieces -------------------------------------------------------------------------

    def _autocast(self):
        if self.precision.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.precision.device.type, dtype=self.precision.autocast)

    def _attention_kernel(self, batch: dict[str, torch.Tensor]):
        """On a CPU, short batches train faster with SDPA's plain (math) attention than with
        its flash kernel: 2.6 vs 6.6 ms per layer forward+backward at 48 tokens (batch 8,
        9 heads). The math kernel keeps the whole attention matrix, so long batches keep flash
        attention (it wins above ~200 tokens). LoRA runs on the CPU fast path use their own
        short-batch attention function instead (cpu/attention.py); this is for the rest."""
        if self.precision.device.type != "cpu" or batch["input_ids"].shape[1] > SHORT_ATTENTION_MAX_LEN:
            return contextlib.nullcontext()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        return sdpa_kernel([SDPBackend.MATH])

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {k: v.to(self.precision.device, non_blocking=True) for k, v in batch.items()}

    def _rest_of_epoch(self) -> list[list[int]]:
        """The global batches left in the current epoch. The position is kept in examples of
        the epoch's seeded order (not in batches), so a run resumed with another global batch
        (another world size) continues with exactly the examples it had not seen."""
        cfg, state = self.cfg, self.state
        size = state.epoch_batch_size or self.batch_over_ranks
        batches = epoch_batches(self.data.train.lengths, size, cfg.seed, state.epoch, cfg.group_by_length)
        if size == self.batch_over_ranks:  # the epoch's own batches (a short one may sit anywhere with length grouping)
            done, k = 0, 0
            while k < len(batches) and done + len(batches[k]) <= state.examples_in_epoch:
                done += len(batches[k])
                k += 1
            return batches[k:]
        rest = [i for batch in batches for i in batch][state.examples_in_epoch:]
        return [rest[i : i + self.batch_over_ranks] for i in range(0, len(rest), self.batch_over_ranks)]

    def _micro_batches(self, batches: list[list[int]]):
        """This process's collated slice of each global batch (None where the slice is empty: a
        short last batch); with --dataloader_num_workers, collated ahead in worker processes."""
        per_rank = self.cfg.per_device_train_batch_size
        rank = self.world.rank
        mine = [batch[rank * per_rank : (rank + 1) * per_rank] for batch in batches]
        collate_fn = functools.partial(_collate_or_none, self.data.train, pad_id=self.data.pad_id)
        rest = mine
        if self.cfg.dataloader_num_workers > 0:
            from torch.utils.data import DataLoader

            return iter(DataLoader(rest, batch_size=None, shuffle=False, collate_fn=collate_fn, num_workers=self.cfg.dataloader_num_workers))
        return map(collate_fn, rest)

    def _passes_of(self, batch: dict[str, torch.Tensor]) -> list[dict[str, torch.Tensor]]:
        """A micro-batch as the forward/backward passes it runs in: one holding more tokens than
        setup.pass_tokens (the recipe's bound on the activations a pass keeps, on the CPU fast
        path) as consecutive pieces of whole examples, whose summed gradients are the
        micro-batch's (the loss is a sum over tokens, normalised by the step's); with a custom
        loss (a mean per micro-batch) or sharded it stays whole."""
        if not self.setup.pass_tokens or self.setup.custom_loss is not None or self.sharded:
            return [batch]
        return split_rows(batch, self.setup.pass_tokens)

    def _probe_batch(self) -> dict[str, torch.Tensor]:
        """The first two training examples, each cut to its last PROBE_MAX_LEN tokens: the batch
        the start-up checks run on."""
        probe = collate(self.data.train, list(range(min(2, len(self.data.train)))), self.data.pad_id)
        return self._to_device(last_tokens(probe, PROBE_MAX_LEN))

    def prepare(self) -> None:
        """The start-up checks, on the first two training examples, before anything is written:
        which loss computation reproduces the model's own, whether the CPU fast path agrees
        with the model's own forward (it removes itself if not), and a custom loss's first call."""
        if self._prepared:
            return
        self.model.train()
        probe = self._probe_batch()
        self._choose_loss(probe)
        if self.setup.custom_loss is not None:  # first: the fast path's check calls the loss too
            self.model.eval()  # no dropout: the check draws nothing from the RNG a resumed run restored
            try:
                with self._attention_kernel(probe), self._autocast():
                    self.setup.custom_loss.check(self.model, probe)
            finally:
                self.model.train()
                self.model.zero_grad(set_to_none=True)
        if self.fast_path is not None:
            self._verify_fast_path(probe)
        self._prepared = True

    def _choose_loss(self, probe: dict[str, torch.Tensor]) -> None:
        if self.setup.custom_loss is not None:
            self.loss_fn = self.setup.custom_loss
            log.info("loss: custom, %s", self.setup.custom_loss.name)
            return
        if self.sharded:  # the root unit gathers its weights on the model's forward: the head cannot run alone
            self.loss_fn = plain_loss
            log.info("loss: full logits (model's own forward: the model is sharded)")
            return
        with self._autocast():
            fast = check_fast_path(self.model, probe)
        self.loss_fn = selective_loss if fast else plain_loss
        policy = self.fast_path.packing_policy(self.precision.autocast or self.precision.weights) \
            if self.fast_path is not None and self.fast_path.packs_sequences else None
        # (the packing alone: a shared prefix has its own check, with gradients, in _check_shared_prefixes)
        packed = fast and policy is not None and \
            check_packing(self.model, probe, lambda: self.fast_path.fp32_loss(self.model, selective_loss, probe), policy.unshared())
        if packed:
            self.loss_fn = functools.partial(packed_loss, policy=policy)
        log.info("loss: %s%s", "output head on labelled positions only" if fast else "full logits (model's own forward)",
                 f"; padding-free batches (real tokens only): {policy.describe()}" if packed else "")

    @property
    def packing_policy(self):
        """The cpu/packing.PackingPolicy the loss trains padding-free batches with, or None."""
        fn = self.loss_fn
        return fn.keywords["policy"] if isinstance(fn, functools.partial) and fn.func is packed_loss else None

    def _verify_fast_path(self, probe: dict[str, torch.Tensor]) -> None:
        with self._attention_kernel(probe), self._autocast():
            self._check_shared_prefixes(probe)  # (first: a wrong sharing costs the sharing only, not the path)
            if not self.fast_path.verify(self.model, self.loss_fn, probe):
                self.fast_path = None
                if self.packing_policy is not None:  # packing relies on the fast path's attention
                    self.loss_fn = selective_loss

    def _check_shared_prefixes(self, probe: dict[str, torch.Tensor]) -> None:
        """A packing policy that computes a batch's shared prefix once keeps doing so only where
        that trains as every example whole on the first examples (on the probe where its two
        examples share a prefix, else on the first example twice); otherwise, or where there is
        no loss-free prefix to check it on, every example is packed whole."""
        policy = self.packing_policy
        if policy is None or not policy.share_prefix:
            return
        whole = functools.partial(packed_loss, policy=policy.unshared())
        batch = probe if shares_a_prefix(probe) else {key: value[[0, 0]] for key, value in probe.items()}
        if not shares_a_prefix(batch):
            self.loss_fn = whole
            log.info("shared prefixes: off (the first example has no loss-free prefix to check them on)")
            return
        agreed, detail = self.fast_path.agrees(self.model, self.loss_fn, whole, batch, self.precision.autocast or self.precision.weights)
        if agreed:
            log.info("shared prefixes: a prefix all of a batch's examples share is computed once (checked: %s)", detail)
        else:
            self.loss_fn = whole
            log.warning("shared prefixes off: computing a batch's shared prefix once trains differently from every example whole "
                        "(%s); every example is packed whole", detail)

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        eval_data = self.data.eval
        assert eval_data is not None
        self.model.eval()
        extra = self.extra_eval(self.model) if self.extra_eval is not None else {}
        loss = extra.pop("loss", None)  # the extra evaluation's own pass gave it (classification scoring)
        if loss is None:
            loss = self._eval_loss(eval_data)
        result = {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), **extra}
        self.model.train()
        return result

    @torch.no_grad()
    def _eval_loss(self, eval_data) -> float:
        order = sorted(range(len(eval_data)), key=lambda i: eval_data.lengths[i])
        size = self.cfg.per_device_eval_batch_size
        batches = [order[start : start + size] for start in range(0, len(order), size)]
        total, count = 0.0, 0
        mine = batches[self.world.rank :: self.world.size]  # each process its share, summed below
        # sharded: as many forwards on every process (each gathers with all); a share one short
        # runs the first batch again and counts nothing from it
        rounds = math.ceil(len(batches) / self.world.size) if self.sharded else len(mine)
        for k in range(rounds):
            batch = self._to_device(collate(eval_data, mine[k] if k < len(mine) else batches[0], self.data.pad_id))
            with self._autocast():
                loss_sum, n = self.loss_fn(self.model, batch)
            if k < len(mine):
                total += float(loss_sum)
                count += n
        if self.world.distributed:
            total, count = self.world.sum_(torch.tensor([total, float(count)], dtype=torch.float64)).tolist()
        return total / max(count, 1)

    def _improved(self, value: float) -> bool:
        best, threshold = self.state.best_metric, self.cfg.early_stopping_threshold
        if best is None:
            return True
        return value < best - threshold if self.setup.lower_is_better else value > best + threshold

    def _early_stopping_reason(self) -> str | None:
        """Why to stop after this evaluation, if early stopping is on: its patience ran out, or
        not even the metric's best possible value would count as an improvement now (the kept
        weights being the best's, the rest of the run would change nothing that is kept)."""
        patience, state = self.cfg.early_stopping_patience, self.state
        if not patience:
            return None
        if state.evals_without_improvement >= patience:
            return f"no improvement in {patience} evaluations"
        ceiling = self.setup.best_possible
        if self.cfg.load_best_model_at_end and ceiling is not None and state.best_metric is not None and not self._improved(ceiling):
            return f"eval {self.best_key} {state.best_metric:.4f} at step {state.best_step} is the best it can be"
        return None

    def _save(self, name: str, weights_only: bool = False) -> None:
        """Rank 0 writes; a sharded model's tensors are gathered by every process first."""
        if not (self.world.is_main or self.sharded):
            return
        # 'best' only needs weights; step checkpoints carry everything needed to resume.
        optimizer, scheduler = (None, None) if weights_only else (self.optimizer, self.scheduler)
        ckpt.save_checkpoint(self.checkpoint_dir / name, self.model, optimizer, scheduler, self.state, self.setup.save_adapter,
                             self.setup.identity, writer=self.world.is_main)

    # -- the loop -----------------------------------------------------------------------

    def resume(self, checkpoint: Path) -> None:
        """Restore weights, optimizer, scheduler, RNG and data position from a checkpoint
        (checked to belong to this run by the recipe before the model was built)."""
        self.state = ckpt.load_checkpoint(checkpoint, self.model, self.optimizer, self.scheduler)
        if not self.state.epoch_batch_size:  # a checkpoint of an earlier slmops: its position in batches of one process
            cfg, state = self.cfg, self.state
            state.epoch_batch_size = cfg.per_device_train_batch_size
            old = epoch_batches(self.data.train.lengths, state.epoch_batch_size, cfg.seed, state.epoch, cfg.group_by_length)
            state.examples_in_epoch = sum(len(b) for b in old[: state.batch_in_epoch])
        self.resumed_step = self.state.step
        log.info("resumed from %s at step %d", checkpoint, self.state.step)

    def train(self) -> TrainResult:
        cfg = self.cfg
        resume_step = self.resumed_step
        self.prepare()
        self.model.train()
        world = self.world
        if world.rank > 0:  # dropout: each process its own stream, defined by the seed, its rank and the step
            torch.manual_seed(cfg.seed + 1_000_003 * world.rank + self.state.step)
        metrics = MetricsLog(self.setup.log_dir, self.setup.tracking, resume_step) if world.is_main else _NoMetrics()
        meter = ResourceMeter()
        # the time left from the clock (training steps and evaluations timed apart), not from tqdm's rate
        bar = progress_bar(total=self.steps, initial=self.state.step, desc="finetune", unit="step", enabled=world.is_main,
                           bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}{postfix}]")
        clock = TrainingClock(self.steps, self.eval_every if self.data.eval is not None else self.save_every, self.state.step)
        bar_note = ""  # the last logged loss and throughput, beside the time left
        window_loss, window_tokens, window_norm, window_inputs, window_start = 0.0, 0, 0, 0, time.perf_counter()
        window_grad_norm = 0.0  # the largest gradient norm (before clipping) since the last log line
        last_train_loss = None
        run_start = time.perf_counter() - self.state.elapsed_s
        paused_total = self.state.paused_s  # seconds spent in eval and checkpoints, not training
        stop_reason: str | None = None
        n_examples = len(self.data.train)
        batches = self._rest_of_epoch()
        self.state.epoch_batch_size = self.state.epoch_batch_size or self.batch_over_ranks
        micro_batches = self._micro_batches(batches)
        position = 0  # in `batches`
        try:
            while self.state.step < self.steps:
                raise_if_interrupted()  # a Ctrl-C some finalizer swallowed stops here (slmops/interrupts.py)
                step_started = time.perf_counter()
                if position >= len(batches):  # next epoch: a new, seeded order
                    self.state.epoch += 1
                    self.state.batch_in_epoch = self.state.examples_in_epoch = 0
                    self.state.epoch_batch_size = self.batch_over_ranks
                    batches = self._rest_of_epoch()
                    micro_batches = self._micro_batches(batches)
                    position = 0
                n_micro = min(cfg.gradient_accumulation_steps, len(batches) - position)
                step_examples = sum(len(b) for b in batches[position : position + n_micro])
                pulled = [next(micro_batches) for _ in range(n_micro)]
                collated = [b for b in pulled if b is not None]
                # sharded: every process runs n_micro forwards; an empty slice (a short last batch) runs
                # a stand-in whose loss counts zero
                fillers = n_micro - len(collated) if self.sharded else 0
                # Normalise by the labelled tokens of the whole optimizer step (every process's), so
                # gradient accumulation and N processes give the same update as one big batch.
                counts = [sum(int((b["labels"][:, 1:] != IGNORE).sum()) for b in collated),
                          sum(int(b["attention_mask"].sum()) for b in collated), len(collated)]  # labelled, non-pad, micro-batches
                if world.distributed:
                    counts = [int(c) for c in world.sum_(torch.tensor(counts, dtype=torch.float64)).tolist()]
                step_tokens, step_inputs, step_micro = counts
                # the loss is a sum over labelled tokens (normalised by them), or a custom loss's mean per micro-batch
                step_norm = step_micro if self.setup.custom_loss is not None else step_tokens
                step_loss = 0.0
                passes = [(piece, 1.0) for b in collated for piece in self._passes_of(b)] + [(self._probe_batch(), 0.0)] * fillers
                for k, (batch, weight) in enumerate(passes):
                    batch = self._to_device(batch)
                    if self.sharded:  # reduce-scatter the gradients after the step's last backward only
                        fsdp.sync_gradients(self.model, k == len(passes) - 1)
                    # backward inside the kernel choice too: gradient checkpointing recomputes
                    # attention there and must pick the same kernel as the forward did
                    with self._attention_kernel(batch):
                        with self._autocast():
                            loss_sum, _ = self.loss_fn(self.model, batch)
                        loss = loss_sum * weight / step_norm
                        (self.scaler.scale(loss) if self.scaler else loss).backward()
                    step_loss += weight * float(loss_sum.detach())
                if self.sharded:  # the gradients are summed by the backward already (reduce-scatter)
                    step_loss = float(world.sum_(torch.tensor([step_loss], dtype=torch.float64))[0])
                elif world.distributed:  # the gradients (and loss) of the whole global step, on every process
                    step_loss = float(sum_gradients(self.trainable, world, torch.tensor([step_loss], dtype=torch.float64))[0])
                # (grad_norm: the norm before clipping, for the log)
                if cfg.max_grad_norm > 0 and not self.scaler and not self.sharded:
                    # clipping inside the optimizer's pass (a GradScaler owns that pass; FSDP's norms are sharded)
                    grad_norm = clipped_step(self.optimizer, self.trainable, cfg.max_grad_norm)
                else:
                    if self.scaler:
                        self.scaler.unscale_(self.optimizer)
                    grad_norm = (torch.nn.utils.clip_grad_norm_(self.trainable, cfg.max_grad_norm) if cfg.max_grad_norm > 0 else
                                 torch.nn.utils.get_total_norm([p.grad for p in self.trainable if p.grad is not None]))
                    if self.scaler:
                        self.scaler.step(self.optimizer)
                        self.scaler.update()
                    else:
                        self.optimizer.step()
                window_grad_norm = max(window_grad_norm, float(fsdp.full(grad_norm)))
                self.scheduler.step()
                self.optimizer.zero_grad(set_to_none=True)

                self.state.step += 1
                self.state.batch_in_epoch += n_micro
                self.state.examples_in_epoch += step_examples
                position += n_micro
                self.state.tokens_seen += step_tokens
                self.state.input_tokens_seen += step_inputs
                window_loss += step_loss
                window_tokens += step_tokens
                window_norm += step_norm
                window_inputs += step_inputs
                last_train_loss = step_loss / step_norm
                step = self.state.step
                clock.stepped(time.perf_counter() - step_started)
                bar.set_postfix_str(f"{clock.describe()}{bar_note}", refresh=False)
                bar.update(1)

                if step % cfg.logging_steps == 0 or step == self.steps:
                    seconds = time.perf_counter() - window_start
                    train_loss = window_loss / max(window_norm, 1)
                    lr = self.scheduler.get_last_lr()[0]
                    tps = window_inputs / max(seconds, 1e-9)
                    metrics.log(step, "train", loss=train_loss, learning_rate=lr, tokens_per_second=tps,
                                trained_tokens_per_second=window_tokens / max(seconds, 1e-9), step_seconds=seconds / cfg.logging_steps,
                                epoch=self.state.epoch + self.state.examples_in_epoch / max(n_examples, 1),
                                grad_norm=window_grad_norm, **meter.read())
                    bar_note = f", loss {train_loss:.4f}, {tps:,.0f} tok/s"
                    bar.set_postfix_str(f"{clock.describe()}{bar_note}")
                    window_loss, window_tokens, window_norm, window_inputs, window_start = 0.0, 0, 0, 0, time.perf_counter()
                    window_grad_norm = 0.0

                paused = time.perf_counter()  # eval and checkpoint time is not training throughput
                paused_here = False
                if self.hooks.after_step is not None or cfg.stop_file:  # (the same on every process: _agreed is collective)
                    reason = self.hooks.after_step(step) if self.hooks.after_step is not None else None
                    stop_reason = self._agreed(reason or self._stop_file_reason())
                if self.data.eval is not None and (step % self.eval_every == 0 or step == self.steps or stop_reason):
                    result = self.evaluate()
                    paused_here = True
                    metrics.log(step, "eval", **result)
                    watched = result[self.best_key]
                    if self._improved(watched):
                        self.state.best_metric, self.state.best_step = watched, step
                        self.state.evals_without_improvement = 0
                        self.state.elapsed_s = time.perf_counter() - run_start
                        self._save("best", weights_only=True)
                    else:
                        self.state.evals_without_improvement += 1
                    shown = ", ".join(f"{k} {v:.4f}" for k, v in result.items() if k not in ("perplexity", "n"))
                    say(bar, f"step {step}: eval {shown} (best {self.best_key} {self.state.best_metric:.4f} at step {self.state.best_step})")
                    why = self._early_stopping_reason()
                    if why:
                        say(bar, f"early stopping: {why}")
                        stop_reason = stop_reason or "early_stopping"
                    if self.hooks.on_evaluate is not None:
                        stop_reason = self._agreed(self.hooks.on_evaluate(step, result)) or stop_reason
                if stop_reason and stop_reason != "early_stopping":
                    say(bar, f"stopped at step {step}: {stop_reason.replace('_', ' ')}")

                if step % self.save_every == 0 or step == self.steps or stop_reason:
                    self.state.elapsed_s = time.perf_counter() - run_start
                    self.state.paused_s = paused_total
                    self._save(f"step-{step:06d}")  # (one writer: rank 0)
                    paused_here = True
                    if world.is_main:
                        ckpt.prune_checkpoints(self.checkpoint_dir, cfg.save_total_limit)
                        if self.hooks.on_checkpoint is not None:
                            self.hooks.on_checkpoint()
                window_start += time.perf_counter() - paused
                paused_total += time.perf_counter() - paused
                if paused_here:
                    clock.paused(time.perf_counter() - paused)
                if stop_reason:
                    break
        finally:
            bar.close()
        seconds = time.perf_counter() - run_start
        return TrainResult(
            steps=self.state.step,
            stopped_early=stop_reason is not None,
            best_step=self.state.best_step,
            best_eval_loss=self.state.best_metric,
            final_train_loss=last_train_loss,
            tokens_seen=self.state.tokens_seen,
            input_tokens_seen=self.state.input_tokens_seen,
            train_seconds=seconds,
            tokens_per_second=self.state.input_tokens_seen / max(seconds - paused_total, 1e-9),
            fast_loss=self.loss_fn is not plain_loss,
            stop_reason=stop_reason,
        )

    def _stop_file_reason(self) -> str | None:
        """--stop_file: once it exists, the reason written in it (or 'stop_file')."""
        path = Path(self.cfg.stop_file) if self.cfg.stop_file else None
        if path is None or not path.exists():
            return None
        try:
            first = path.read_text(errors="replace").strip().splitlines()
        except OSError:
            first = []
        reason = first[0].strip() if first else ""
        return "".join(c if c.isalnum() or c == "_" else "_" for c in reason)[:40] or "stop_file"

    def _agreed(self, reason: str | None) -> str | None:
        """A hook's stop reason, the same on every process (time limits differ between them):
        any process's reason stops them all."""
        if not self.world.distributed:
            return reason
        stop = self.world.sum_(torch.tensor([1.0 if reason else 0.0]))
        return reason or ("stopped_by_another_process" if float(stop[0]) > 0 else None)

    def restore_best(self) -> None:
        """Load the best checkpoint's weights (for --load_best_model_at_end)."""
        from safetensors.torch import load_file

        best = self.checkpoint_dir / "best" / "trainable.safetensors"
        if best.is_file():
            ckpt.load_trainable_state(self.model, load_file(best))


def _collate_or_none(data: TokenizedData, indices: list[int], pad_id: int):
    return collate(data, indices, pad_id) if indices else None


class _NoMetrics:
    """The metrics log of a process that is not rank 0 (one writer)."""

    def log(self, *args, **kwargs) -> None:
        pass
