"""How a right-padded training batch packs padding-free on the CPU fast path: which batches pack
(PackingPolicy, measured per kind of CPU), which leading tokens every example shares and can be
computed once (shareable_prefix), and the packing itself (Packing: the rows kept, their positions,
each sequence's offsets, the masks a layer falling back to the model's own attention reads).

attention.py runs the attention of a packed batch; loss.py packs a batch and passes the Packing to
the model; last_layer.py reads its loss rows."""

from __future__ import annotations

import dataclasses
import itertools
from dataclasses import dataclass
from functools import cached_property

import torch

from slmops.data.batching import right_padded

# tokens: the fused short attention function (attention.AttentionFunction) keeps B*H*T*T
# probabilities for its backward, so it takes batches up to this long; longer ones always pack
SHORT_ATTENTION_MAX_LEN = 192


@dataclass(frozen=True)
class PackingPolicy:
    """When a short batch (up to SHORT_ATTENTION_MAX_LEN tokens) trains padding-free, and how.
    Long batches always pack; their attention always runs per sequence in the packed layout.

    row_multiple: packed rows are rounded up to this.
    pack_below: pack a short batch when its packed rows are fewer than this fraction of B * T.
    short_alone: a short packed batch's attention also runs per sequence in the packed layout
    (the packed attention kernel), instead of going back to the padded layout for the fused
    function around each layer's attention.
    share_prefix: a batch whose examples all begin with the same SHARED_PREFIX_MIN or more tokens
    that no loss reads (a chat template's system prompt, an instruction template) packs that
    prefix once (Packing.prefix), whatever its padding; its attention runs per sequence.
    trim_tails: each example's tokens after the last one whose output a loss reads are left out,
    as padding is (`loss_free_tail`): at least its last token, which predicts nothing."""

    row_multiple: int
    pack_below: float
    short_alone: bool
    share_prefix: bool = False
    trim_tails: bool = False

    def unshared(self) -> PackingPolicy:
        """This policy with every example packed whole."""
        return dataclasses.replace(self, share_prefix=False)

    def describe(self) -> str:
        shared = "; a prefix all of a batch's examples share (no loss on it) computed once" if self.share_prefix else ""
        shared += "; each example's tokens after its last loss left out" if self.trim_tails else ""
        if self.short_alone:
            return ("every batch with padding, and all batches over %d tokens, each sequence's attention alone" % SHORT_ATTENTION_MAX_LEN
                    + shared)
        return f"short ones where padding is over {100 * (1 - self.pack_below):.0f}%, all batches over {SHORT_ATTENTION_MAX_LEN} tokens" + shared


# Measured with bf16 products on AMX (SmolLM2-135M, tone data, batch 8 x ~49 tokens, 6% padding):
# oneDNN's AMX matmuls run 15-23% slower per row at 370 or 376 rows than at 384, so rows are
# rounded to 16; the scatter and gather around each layer's fused attention cost ~4% of a step,
# and packing measured 0.98x, so short batches with less than 10% padding stay padded.
PADDED_ATTENTION = PackingPolicy(row_multiple=16, pack_below=0.9, short_alone=False)
# fp32 products (CPUs without fast bf16), where the fp32 packed attention kernel is built: a row
# of the step costs ~6x what it does on AMX, MKL's fp32 products show no preference for any row
# count (368-400 rows, 2026-12-06, Zen 3), and a short batch's attention runs per sequence in the
# kernel, so no scatter or gather around it. Every batch with padding packs, to exactly its
# real tokens. On the tone data (6.7% padding), alternating steps in one process on the Zen 3
# EPYC: LoRA 1.04x, full fine-tuning 1.05x against PADDED_ATTENTION (which gave 1.015x there
# with every batch packed).
# Batches whose examples share a prefix compute it once (share_prefix): on the tone data, with the chat
# template's 24-token system prompt in 47-token examples, ~45% fewer rows for every projection.
# Each example's last token predicts nothing (trim_tails): on tone, one of ~26 rows an example after sharing.
FP32_ALONE = PackingPolicy(row_multiple=1, pack_below=1.0, short_alone=True, share_prefix=True, trim_tails=True)
# PADDED_ATTENTION with shared prefixes and trimmed tails: bf16 products on AVX512-BF16 without AMX
# (the packed attention kernel on AVX512-BF16 dot products). On the Zen 4 EPYC (2026-12-07),
# `python benchmarks/packing_policy.py --policies PADDED_ATTENTION_SHARED_PREFIX,PADDED_ATTENTION`,
# steps alternating: tone LoRA 1.45x, full fine-tuning 1.44x, QLoRA 1.19x; chat_qa LoRA 1.23x. Not yet
# measured on AMX, which keeps PADDED_ATTENTION.
PADDED_ATTENTION_SHARED_PREFIX = dataclasses.replace(PADDED_ATTENTION, share_prefix=True, trim_tails=True)
# Shared prefixes are computed once from this many tokens: below it the rows saved are few (a chat
# template's "<|im_start|>user" alone is 2-3 tokens).
SHARED_PREFIX_MIN = 4


def shareable_prefix(input_ids: torch.Tensor, labels: torch.Tensor, valid: torch.Tensor) -> int:
    """How many leading tokens every example of a right-padded (B, T) batch has in common and no
    loss reads: position t predicts labels[:, t + 1], so positions 0 .. P-1 need labels 1 .. P
    ignored; each example keeps at least one token of its own. 0 for a single example."""
    from slmops.data.tokenize import IGNORE

    if input_ids.shape[0] < 2:
        return 0
    agree = ((input_ids == input_ids[:1]) & valid).all(0)  # columns where every example has the same real token
    common = int(agree.int().cumprod(0).sum())
    labelled = (labels[:, 1:] != IGNORE).any(0)  # column t: does any example's position t carry a loss
    first_loss = int(labelled.int().argmax()) if bool(labelled.any()) else labels.shape[1]
    return max(0, min(common, first_loss, int(valid.sum(1).min()) - 1))


def loss_free_tail(valid: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The (B, T) bool mask of a right-padded batch's tokens up to each example's last loss row (the
    last position t whose next label counts): the tokens after it feed no loss, and in a causal model
    no earlier token attends to them, so leaving them out changes neither the loss nor a gradient.
    That is at least each example's last token. An example without a loss keeps its first token."""
    from slmops.data.tokenize import IGNORE

    reads = torch.cat([labels[:, 1:] != IGNORE, labels.new_zeros(labels.shape[0], 1, dtype=torch.bool)], 1) & valid
    positions = torch.arange(labels.shape[1], device=labels.device)
    last = torch.where(reads, positions, -1).amax(1).clamp_(min=0)  # (B,) the last loss row, 0 for none
    return valid & (positions[None] <= last[:, None])


def _rounded_rows(tokens: int, multiple: int) -> int:
    return -(-tokens // multiple) * multiple


class Packing:
    """A right-padded (B, T) batch packed to its N real tokens, (1, rows), for padding-free
    training: every token-wise op (projections, MLP, norms) runs on `rows` rows instead of
    B * T, and only attention, inside the fused function, sees the padded layout again (so no
    example attends to another). Passed to the attention modules as the `slmops_packing`
    keyword, which transformers hands down to every decoder layer.

    `rows` is N rounded up to the policy's row_multiple. The extra rows repeat the first token; they carry
    no loss and no attention reads them, so they get exactly zero gradient and change nothing.

    With a shared `prefix` (P > 0: every example begins with the same P tokens, none of which a loss
    reads), those tokens are packed once: the first example whole, then each other example from
    its token P on (its own positions, P and up). Each of those attends to the first example's first
    P rows as to its own prefix (SharedPrefixAttentionFunction), and the prefix's keys and values
    gather the gradients of every example: the same loss and gradients as B separate copies, with
    (B - 1) * P rows fewer through every layer. Such a batch's attention always runs per sequence
    (`alone`). With dropout, the prefix's rows draw one mask for all the examples."""

    def __init__(self, attention_mask: torch.Tensor, policy: PackingPolicy = PADDED_ATTENTION, prefix: int = 0):
        valid = attention_mask.bool()
        self.batch, self.length = valid.shape
        self.policy = policy
        self.prefix = prefix
        kept = valid.clone()
        kept[1:, :prefix] = False  # the other examples' copies of the shared prefix
        self.index = kept.reshape(-1).nonzero().squeeze(1)  # (N,) flat positions in the (B * T) padded layout
        self.tokens = len(self.index)
        self.rows = _rounded_rows(self.tokens, policy.row_multiple)
        self.rows_index = torch.cat([self.index, self.index[:1].expand(self.rows - self.tokens)])
        self.lengths = kept.sum(1).tolist()  # each example's packed tokens, in packed order
        self._valid = valid
        # the rows the loss reads, where the last layer's MLP need not run on the rest (last_layer.py;
        # set by loss._packed), else None
        self.loss_rows: torch.Tensor | None = None
        self._rope_key: torch.Tensor | None = None
        self._rope: tuple[torch.Tensor, torch.Tensor] | None = None

    @cached_property
    def mask(self) -> torch.Tensor:
        """(B, 1, T, T) bool, causal over each example's real keys: the fused function's mask
        (short batches; long ones need none)."""
        causal = torch.ones(self.length, self.length, dtype=torch.bool, device=self._valid.device).tril_()
        return causal[None, None] & self._valid[:, None, None, :]

    @cached_property
    def skip_mask(self) -> torch.Tensor:
        """The stand-in for transformers' mask of a batch whose sequences attend alone, passed as the
        decoder's attention_mask (loss._packed): transformers returns a 4D mask as it is given, so it skips building the
        (1, 1, rows, rows) one that only a layer falling back to the model's own attention would
        read (1.8% of a codes step, ~150 MB at 12k tokens); such a layer reads `block_mask`
        instead (_module_forward). Expanded from one element: no memory."""
        return torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.index.device).expand(1, 1, self.rows, self.rows)

    @cached_property
    def block_mask(self) -> torch.Tensor:
        """(1, 1, rows, rows) bool, as transformers builds it from the packed position ids: each
        token sees its own example's tokens up to itself (and the shared prefix's rows, which come
        first), each extra row only itself."""
        device = self.index.device
        sequence = torch.cat([torch.arange(self.batch, device=device).repeat_interleave(torch.tensor(self.lengths, device=device)),
                              torch.arange(self.batch, self.batch + self.rows - self.tokens, device=device)])
        causal = torch.ones(self.rows, self.rows, dtype=torch.bool, device=device).tril_()
        seen = sequence[:, None] == sequence[None, :]
        if self.prefix:
            seen |= (sequence < self.batch)[:, None] & (torch.arange(self.rows, device=device) < self.prefix)[None, :]
        return (causal & seen)[None, None]

    @cached_property
    def offsets(self) -> torch.Tensor:
        """(B + 1,) int64: example i's tokens are packed rows offsets[i] .. offsets[i + 1]."""
        return torch.tensor([0, *itertools.accumulate(self.lengths)], dtype=torch.int64)

    @property
    def long(self) -> bool:
        """Longer than the fused function takes."""
        return self.length > SHORT_ATTENTION_MAX_LEN

    @property
    def alone(self) -> bool:
        """Each sequence's attention runs alone in the packed layout (_alone_packed): a long batch,
        a batch with a shared prefix, or any batch under a policy with short_alone."""
        return self.long or self.policy.short_alone or self.prefix > 0

    @staticmethod
    def of(attention_mask: torch.Tensor, only_if_it_pays: bool = True, policy: PackingPolicy = PADDED_ATTENTION,
           input_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> Packing | None:
        """The packing of a right-padded batch (with only_if_it_pays, a long one, one with
        enough padding to remove: the policy's pack_below, or one with a prefix to share), else
        None. Given input_ids and labels, a policy with share_prefix packs a shareable prefix
        (shareable_prefix) of SHARED_PREFIX_MIN tokens or more once, and one with trim_tails leaves
        each example's loss-free tail out (loss_free_tail)."""
        if attention_mask.dim() != 2:
            return None
        valid = attention_mask.bool()
        lengths = valid.sum(1, keepdim=True)
        if not right_padded(valid) or int(lengths.min()) == 0:
            return None  # left padding or holes: positions would differ from the padded forward's
        if policy.trim_tails and labels is not None:
            valid = loss_free_tail(valid, labels)  # (still right-padded: a prefix of each row)
            attention_mask, lengths = valid, valid.sum(1, keepdim=True)
        prefix = shareable_prefix(input_ids, labels, valid) if policy.share_prefix and input_ids is not None else 0
        if prefix >= SHARED_PREFIX_MIN:
            return Packing(attention_mask, policy, prefix)
        if (only_if_it_pays and valid.shape[1] <= SHORT_ATTENTION_MAX_LEN
                and _rounded_rows(int(lengths.sum()), policy.row_multiple) >= policy.pack_below * valid.numel()):
            return None  # short, and little padding to remove
        return Packing(attention_mask, policy)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, ...) -> (1, rows, ...): the real tokens in order, then the extra rows."""
        return x.reshape(self.batch * self.length, *x.shape[2:]).index_select(0, self.rows_index)[None]

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(1, rows, F) -> (B, T, F): the real tokens in place, zeros at the padding (differentiable)."""
        if self.prefix:
            raise ValueError("a batch packed with a shared prefix has no padded layout (its attention runs per sequence)")
        flat = x.new_zeros(self.batch * self.length, x.shape[-1]).index_copy(0, self.index, x[0, : self.tokens])
        return flat.view(self.batch, self.length, -1)

    def position_ids(self) -> torch.Tensor:
        positions = torch.arange(self.length, device=self.index.device).expand(self.batch, -1)
        return self.pack(positions)

    def padded_rope(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed batch's position embeddings (1, rows, D) in the padded layout; the same
        tensors for every layer of one forward (so the fp32 conversion is shared too)."""
        if cos is not self._rope_key:
            with torch.no_grad():
                self._rope_key, self._rope = cos, (self.pad(cos), self.pad(sin))
        return self._rope
