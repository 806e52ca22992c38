"""The DFlash recipe: train a block drafter on the target's own hidden states.

Data are the target's greedy answers (prompt + output token ids) and, for every position, the
target's hidden states from the drafter's chosen layers, computed once before training. Each
training row is one answer with several random anchors in its output: an anchor a opens the
block [x_a, MASK, ...] at positions a .. a + block_size - 1, which sees the target features of
positions < a (causal to the context) and the whole block (bidirectional inside), exactly what
the drafter sees when vLLM has just sampled x_a. Position j of the block is trained to predict
x_(a+j), with cross-entropy weighted by exp(-(j - 1) / gamma): early positions matter most,
since a draft is accepted only up to its first miss.

The target's embeddings and LM head are shared and frozen; with a draft vocabulary only its rows
of the head are scored (targets outside it are left out of the loss: the drafter cannot propose
them anyway).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F

from dlmspec_vllm.drafters.dflash import DFlashConfig, DFlashNetwork

if TYPE_CHECKING:
    from transformers import PreTrainedModel


@dataclass
class FeatureSequence:
    """One training answer: its token ids, where the output starts, the target's hidden states
    at every position ([len(tokens), len(layers) * hidden], any float dtype) and, optionally,
    the target's top-k next-token distribution at every output position (soft labels:
    ``top_ids`` [output length, k] and their ``top_logprobs``)."""

    tokens: list[int]
    prompt_length: int
    features: torch.Tensor
    top_ids: torch.Tensor | None = None
    top_logprobs: torch.Tensor | None = None


# Rows are run together up to this many (padded) tokens per forward pass.
FEATURE_BATCH_TOKENS = 4096


@torch.no_grad()
def target_features(
    target: PreTrainedModel,
    token_rows: Sequence[Sequence[int]],
    layer_ids: Sequence[int],
    *,
    storage_dtype: torch.dtype = torch.bfloat16,
) -> list[torch.Tensor]:
    """The target's hidden states after each of ``layer_ids`` (0 = first decoder layer; the
    last layer's id is its output after the final norm, as Hugging Face reports it),
    concatenated per position, for every row.

    Rows of similar length run together, padded on the right: attention is causal, so a row's
    positions never see the padding after them.
    """
    device = next(target.parameters()).device
    # The decoder alone: the LM head's logits at every position would cost a fifth more.
    decoder = target.get_decoder()
    out: list[torch.Tensor | None] = [None] * len(token_rows)
    order = sorted(range(len(token_rows)), key=lambda i: len(token_rows[i]))
    start = 0
    while start < len(order):
        stop = start + 1
        while stop < len(order) and (stop + 1 - start) * len(token_rows[order[stop]]) <= max(
            FEATURE_BATCH_TOKENS, len(token_rows[order[start]])
        ):
            stop += 1
        group = order[start:stop]
        width = len(token_rows[group[-1]])
        ids = torch.zeros(len(group), width, dtype=torch.long)
        for b, i in enumerate(group):
            ids[b, : len(token_rows[i])] = torch.tensor(list(token_rows[i]))
        states = decoder(input_ids=ids.to(device), output_hidden_states=True).hidden_states
        joined = torch.cat([states[i + 1] for i in layer_ids], -1)
        for b, i in enumerate(group):
            out[i] = joined[b, : len(token_rows[i])].to("cpu", storage_dtype)
        start = stop
    return out  # type: ignore[return-value]


def draft_vocabulary(sequences: Sequence[FeatureSequence], size: int) -> torch.Tensor:
    """The ``size`` target token ids most frequent in the answers' outputs, ascending."""
    counts: dict[int, int] = {}
    for sequence in sequences:
        for token in sequence.tokens[sequence.prompt_length :]:
            counts[token] = counts.get(token, 0) + 1
    ranked = sorted(counts, key=lambda t: (-counts[t], t))[:size]
    return torch.tensor(sorted(ranked), dtype=torch.long)


class AnchorSampler:
    """Batches of answers with random anchors in their outputs; its state can be saved."""

    def __init__(
        self,
        sequences: Sequence[FeatureSequence],
        *,
        batch_size: int,
        anchors: int,
        seed: int,
    ) -> None:
        usable = [s for s in sequences if len(s.tokens) - 1 > s.prompt_length]
        if not usable:
            raise ValueError("no training answer has an output of two tokens or more")
        self.sequences = usable
        self.batch_size = batch_size
        self.anchors = anchors
        self.generator = torch.Generator().manual_seed(seed)

    def next_batch(self) -> tuple[list[FeatureSequence], list[list[int]]]:
        picks = torch.randint(len(self.sequences), (self.batch_size,), generator=self.generator)
        rows, anchors = [], []
        for pick in picks.tolist():
            sequence = self.sequences[pick]
            low, high = sequence.prompt_length, len(sequence.tokens) - 2
            chosen = torch.randint(low, high + 1, (self.anchors,), generator=self.generator)
            rows.append(sequence)
            anchors.append(sorted(chosen.tolist()))
        return rows, anchors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        self.generator.set_state(state["generator"])


@dataclass
class BlockLoss:
    loss: torch.Tensor
    first_accuracy: float  # share of anchors whose first drafted token is right
    mean_run: float  # mean count of leading right tokens per block (accepted-length proxy)
    runs: torch.Tensor  # that count for every anchor with a label


def dflash_loss(
    network: DFlashNetwork,
    rows: Sequence[FeatureSequence],
    anchors: Sequence[Sequence[int]],
    *,
    embed_weight: torch.Tensor,
    head_weight: torch.Tensor,
    target_to_draft: torch.Tensor | None,
    gamma: float,
    soft_weight: float = 0.0,
) -> BlockLoss:
    """Weighted block cross-entropy of a batch (see the module docstring).

    head_weight: the rows of the target's LM head the drafter scores (all, or the draft
    vocabulary's); target_to_draft: [target vocab] index of each target id in those rows, -1
    for ids outside the draft vocabulary (None: all ids, index = id). soft_weight: the share of
    the loss that is cross-entropy to the target's top-k distribution (renormalized over the
    ids the drafter can propose) instead of to its greedy token; rows need their top-k then.
    """
    config = network.config
    device = embed_weight.device
    block = config.block_size
    batch = len(rows)
    length = max(len(r.tokens) for r in rows)
    per_row = max(len(a) for a in anchors)
    queries = per_row * block
    tokens = torch.zeros(batch, length, dtype=torch.long)
    features = torch.zeros(batch, length, network.fc.in_features)
    valid = torch.zeros(batch, length, dtype=torch.bool)
    for b, row in enumerate(rows):
        n = len(row.tokens)
        tokens[b, :n] = torch.tensor(row.tokens)
        features[b, :n] = row.features.float()
        valid[b, :n] = True

    offsets = torch.arange(block)
    anchor_pos = torch.zeros(batch, per_row, dtype=torch.long)
    anchor_ok = torch.zeros(batch, per_row, dtype=torch.bool)
    for b, row_anchors in enumerate(anchors):
        anchor_pos[b, : len(row_anchors)] = torch.tensor(row_anchors)
        anchor_ok[b, : len(row_anchors)] = True
    positions = (anchor_pos[:, :, None] + offsets).reshape(batch, queries)
    ids = torch.full((batch, per_row, block), config.mask_token_id, dtype=torch.long)
    ids[:, :, 0] = tokens.gather(1, anchor_pos)
    label_pos = positions.clamp_max(length - 1)
    labels = tokens.gather(1, label_pos).view(batch, per_row, block)
    label_pos = label_pos.view(batch, per_row, block)
    has_label = (positions < length).view(batch, per_row, block)
    has_label &= valid.gather(1, label_pos.view(batch, queries)).view(batch, per_row, block)
    has_label &= anchor_ok[:, :, None]
    has_label[:, :, 0] = False

    # Queries of anchor k see context positions < a_k and their own block only.
    context_mask = torch.arange(length)[None, None, :] < anchor_pos[:, :, None]
    context_mask &= valid[:, None, :]
    block_of = torch.arange(queries) // block
    own_block = block_of[:, None] == block_of[None, :]
    mask = torch.cat(
        (
            context_mask.repeat_interleave(block, dim=1),
            own_block[None].expand(batch, queries, queries),
        ),
        dim=2,
    )

    context = network.context_keys_values(
        features.to(device), torch.arange(length, device=device).expand(batch, length)
    )
    embeds = F.embedding(ids.view(batch, queries).to(device), embed_weight)
    hidden = network.block_hidden(embeds, positions.to(device), context, mask.to(device))
    hidden = hidden.view(batch, per_row, block, -1)[:, :, 1:]
    labels, has_label = labels[:, :, 1:].to(device), has_label[:, :, 1:].to(device)
    # A label the draft vocabulary lacks is left out of the loss but counts as a miss below.
    in_answer = has_label.clone()
    if target_to_draft is not None:
        labels = target_to_draft.to(device)[labels]
        has_label &= labels >= 0
    logits = hidden[has_label] @ head_weight.T
    ce = F.cross_entropy(logits.float(), labels[has_label], reduction="none")
    if soft_weight > 0:
        soft = _soft_cross_entropy(
            logits, rows, label_pos[:, :, 1:], has_label, target_to_draft, device
        )
        ce = (1 - soft_weight) * ce + soft_weight * soft
    weights = torch.exp(-torch.arange(block - 1, device=device, dtype=torch.float32) / gamma)
    weights = weights.expand_as(has_label)[has_label]
    loss = (ce * weights).sum() / weights.sum().clamp_min(1e-6)

    with torch.no_grad():
        right = torch.zeros_like(has_label)
        right[has_label] = logits.argmax(-1) == labels[has_label]
        run = torch.cumprod(right.long(), dim=-1).sum(-1)  # leading right tokens per block
        counted = anchor_ok.to(device) & in_answer[:, :, 0]
        first = right[:, :, 0][counted].float().mean().item() if counted.any() else math.nan
        mean_run = run[counted].float().mean().item() if counted.any() else math.nan
    return BlockLoss(loss=loss, first_accuracy=first, mean_run=mean_run, runs=run[counted])


# Anchors scored together per answer in teacher_forced_acceptance (bounds the attention mask).
ACCEPTANCE_ANCHORS_PER_PASS = 48


@torch.no_grad()
def teacher_forced_acceptance(
    network: DFlashNetwork,
    sequences: Sequence[FeatureSequence],
    *,
    embed_weight: torch.Tensor,
    head_weight: torch.Tensor,
    target_to_draft: torch.Tensor | None,
    draft_lengths: Sequence[int] = (4, 8),
) -> dict[str, Any]:
    """How far the drafter's block matches the target's own continuation, from every output
    position of every answer (the anchor the target has just sampled), with the target's
    features of the positions before it: what verification would accept at that point.

    Returns the share of anchors whose first j drafted tokens are all right (j = 1 .. block - 1)
    and the mean accepted length per step (1 + matched drafts) for each draft length. Counting
    every anchor counts a run of right drafts once per token of it; a speculative decoder drafts
    only from the anchors its steps reach (after m accepted drafts, the next anchor is m + 1
    tokens on). ``walked`` gives, per draft length, those steps alone: mean accepted length and
    per-position acceptance as vLLM counts them on the same answers.
    """
    runs = []
    for sequence in sequences:
        anchors = list(range(sequence.prompt_length, len(sequence.tokens) - 1))
        pieces = []
        for start in range(0, len(anchors), ACCEPTANCE_ANCHORS_PER_PASS):
            chunk = anchors[start : start + ACCEPTANCE_ANCHORS_PER_PASS]
            out = dflash_loss(
                network,
                [sequence],
                [chunk],
                embed_weight=embed_weight,
                head_weight=head_weight,
                target_to_draft=target_to_draft,
                gamma=1.0,
            )
            pieces.append(out.runs.cpu())
        if pieces:
            runs.append(torch.cat(pieces))
    run = torch.cat(runs).float() if runs else torch.zeros(0)
    block = network.config.block_size
    return {
        "answers": len(sequences),
        "anchors": int(run.numel()),
        "position_acceptance": [
            round(float((run >= j).float().mean()), 4) for j in range(1, block)
        ],
        "mean_accepted_length": {
            str(k): round(1 + float(run.clamp_max(k).mean()), 4) for k in draft_lengths
        },
        "walked": {str(k): _walked(runs, k) for k in draft_lengths},
    }


def _walked(runs: Sequence[torch.Tensor], k: int) -> dict[str, Any]:
    """The steps a decoder drafting k tokens reaches in each answer (``runs``: right drafts from
    every anchor, in order), and what they accept."""
    reached = []
    for answer in runs:
        matched = answer.clamp_max(k).tolist()
        anchor = 0
        while anchor < len(matched):
            reached.append(matched[anchor])
            anchor += matched[anchor] + 1
    steps = torch.tensor(reached, dtype=torch.float32)
    if not len(steps):
        return {"steps": 0, "mean_accepted_length": None, "position_acceptance": []}
    return {
        "steps": len(steps),
        "mean_accepted_length": round(1 + float(steps.mean()), 4),
        "position_acceptance": [
            round(float((steps >= j).float().mean()), 4) for j in range(1, k + 1)
        ],
    }


def _soft_cross_entropy(
    logits: torch.Tensor,
    rows: Sequence[FeatureSequence],
    label_pos: torch.Tensor,
    has_label: torch.Tensor,
    target_to_draft: torch.Tensor | None,
    device: torch.device,
) -> torch.Tensor:
    """Per scored label: cross-entropy of the drafter's logits to the target's top-k at that
    position, renormalized over the top-k ids the drafter can propose."""
    labels = [_soft_labels(row) for row in rows]
    k = labels[0][0].shape[1]
    batch, length = len(rows), int(label_pos.max()) + 1
    top_ids = torch.zeros(batch, length, k, dtype=torch.long)
    top_logprobs = torch.full((batch, length, k), -math.inf)
    for b, (row, (row_ids, row_logprobs)) in enumerate(zip(rows, labels)):
        outputs = max(0, min(len(row_ids), length - row.prompt_length))
        span = slice(row.prompt_length, row.prompt_length + outputs)
        top_ids[b, span] = row_ids[:outputs].long()
        top_logprobs[b, span] = row_logprobs[:outputs].float()
    flat = label_pos.reshape(batch, -1).cpu()
    ids = top_ids.gather(1, flat[..., None].expand(-1, -1, k)).view(*label_pos.shape, k)
    logprobs = top_logprobs.gather(1, flat[..., None].expand(-1, -1, k)).view(*label_pos.shape, k)
    ids, logprobs = ids.to(device)[has_label], logprobs.to(device)[has_label]
    if target_to_draft is not None:
        ids = target_to_draft.to(device)[ids]
    proposable = ids >= 0
    logprobs = logprobs.masked_fill(~proposable, -math.inf)
    weights = torch.softmax(logprobs, -1).nan_to_num(0.0)  # a row with none proposable: 0
    drafted = torch.log_softmax(logits.float(), -1).gather(1, ids.clamp_min(0))
    return -(weights * drafted).sum(-1)


def _soft_labels(row: FeatureSequence) -> tuple[torch.Tensor, torch.Tensor]:
    if row.top_ids is None or row.top_logprobs is None:
        raise ValueError("soft labels need every training answer's top-k distribution")
    return row.top_ids, row.top_logprobs


def dflash_from_target(
    target: PreTrainedModel,
    *,
    layers: int,
    block_size: int,
    mask_token_id: int,
    target_layer_ids: Sequence[int],
) -> DFlashNetwork:
    """A DFlash network for a transformers Llama/Qwen2/Qwen3 target, started from its weights.

    The drafter's layers start as copies of the target's last ``layers`` decoder layers (q/k
    norms at one), ``fc`` reads the deepest chosen residual-stream layer alone (not the
    final-norm state) and ``hidden_norm`` is the input norm of the layer after it: at step 0 the
    first drafter layer sees the context much as the target's next layer does. Random starts
    learned far slower on a CPU budget.
    """
    source = target.config
    config = DFlashConfig(
        hidden_size=source.hidden_size,
        intermediate_size=source.intermediate_size,
        num_hidden_layers=layers,
        num_attention_heads=source.num_attention_heads,
        num_key_value_heads=source.num_key_value_heads,
        head_dim=getattr(source, "head_dim", None)
        or source.hidden_size // source.num_attention_heads,
        rms_norm_eps=source.rms_norm_eps,
        rope_theta=_rope_theta(source),
        block_size=block_size,
        mask_token_id=mask_token_id,
        target_layer_ids=tuple(target_layer_ids),
        num_target_layers=source.num_hidden_layers,
        target_hidden_size=source.hidden_size,
        vocab_size=source.vocab_size,
        max_position_embeddings=source.max_position_embeddings,
        attention_bias=bool(getattr(source, "attention_bias", False)),
    )
    network = DFlashNetwork(config)
    # Where Llama, Qwen2 and Qwen3 keep their decoder stack; PreTrainedModel declares none.
    backbone: Any = target.model
    decoder = backbone.layers
    copied = decoder[len(decoder) - layers :]
    with torch.no_grad():
        for mine, theirs in zip(network.layers, copied):
            own = mine.state_dict()
            theirs_state = theirs.state_dict()
            own.update({k: v.clone().float() for k, v in theirs_state.items() if k in own})
            mine.load_state_dict(own)
        width = config.target_hidden_size
        network.fc.weight.zero_()
        # The final-norm state (the last id) starts unread: the identity goes to the deepest
        # residual-stream layer, which the next layer's input norm below expects.
        final = len(decoder) - 1
        residual = [i for i in target_layer_ids if i != final] or list(target_layer_ids)
        deepest = list(target_layer_ids).index(max(residual))
        network.fc.weight[:, deepest * width : (deepest + 1) * width] = torch.eye(width)
        after = min(max(residual) + 1, final)
        network.hidden_norm.weight.copy_(decoder[after].input_layernorm.weight.float())
        network.norm.weight.copy_(backbone.norm.weight.float())
    return network


def _rope_theta(config: object) -> float:
    theta = getattr(config, "rope_theta", None)
    if theta is None:
        theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta", 10000.0)
    return float(theta)
