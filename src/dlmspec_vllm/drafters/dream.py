"""Dream: a Qwen2-layout diffusion LM with bidirectional attention, and the drafter built on it.

Dream-7B (HKUNLP, Dream-org/Dream-v0-*-7B) is Qwen2.5-7B trained further as a masked diffusion
model. The network is Qwen2's (q/k/v projections with bias, o_proj without, SwiGLU MLP, RMSNorm,
RoPE, grouped-query attention); only two things differ from the AR model it came from:

- attention is bidirectional, so every position, masked or not, sees the whole sequence;
- logits stay *shifted* as in the AR model: the output at index i predicts token i + 1. A drafted
  block therefore reads its first position from the last context token's output.

The file reads top to bottom like a transformers model file (config, norm, rotary, attention,
MLP, layer, model, head) and the module names are the checkpoint's tensor names, so loading is a
plain state-dict load from ``model.safetensors`` or a sharded ``model.safetensors.index.json``.
No ``trust_remote_code``: the released ``modeling_dream.py`` is never imported.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from dlmspec_vllm.drafters.base import DraftBlock
from dlmspec_vllm.drafters.loading import DrafterLoadError, read_config, safetensors_files

DREAM_MODEL_TYPE = "Dream"
DREAM_ARCHITECTURE = "DreamModel"
# What the released checkpoints put in config.json, so our checkpoints load in their code too.
DREAM_AUTO_MAP = {
    "AutoConfig": "configuration_dream.DreamConfig",
    "AutoModel": "modeling_dream.DreamModel",
}


@dataclass(frozen=True)
class DreamConfig:
    """The config.json fields the network needs, named as in the released DreamConfig."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    max_position_embeddings: int
    mask_token_id: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> DreamConfig:
        """Read a Dream config.json; refuse settings this implementation would silently ignore."""
        if raw.get("hidden_act", "silu") != "silu":
            raise DrafterLoadError(
                f"Dream hidden_act {raw['hidden_act']!r} is not supported (silu)"
            )
        rope_parameters = raw.get("rope_parameters") or {}
        if raw.get("rope_scaling") or rope_parameters.get("rope_type", "default") != "default":
            scaling = raw.get("rope_scaling") or rope_parameters
            raise DrafterLoadError(f"Dream RoPE scaling {scaling!r} is not supported (default)")
        missing = [name for name in _REQUIRED_FIELDS if raw.get(name) is None]
        if missing:
            raise DrafterLoadError(f"Dream config.json lacks {', '.join(missing)}")
        heads, hidden = int(raw["num_attention_heads"]), int(raw["hidden_size"])
        if raw.get("head_dim") not in (None, hidden // heads):
            raise DrafterLoadError(
                f"head_dim {raw['head_dim']} != hidden_size / heads is not supported"
            )
        # transformers 5 writes rope_theta inside rope_parameters; the released file has it flat.
        rope_theta = raw.get("rope_theta") or rope_parameters.get("rope_theta")
        return cls(
            vocab_size=int(raw["vocab_size"]),
            hidden_size=int(raw["hidden_size"]),
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]),
            num_attention_heads=int(raw["num_attention_heads"]),
            num_key_value_heads=int(raw.get("num_key_value_heads") or raw["num_attention_heads"]),
            max_position_embeddings=int(raw["max_position_embeddings"]),
            mask_token_id=int(raw["mask_token_id"]),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope_theta or 10000.0),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_id=raw.get("eos_token_id"),
            pad_token_id=raw.get("pad_token_id"),
        )

    def to_json_dict(self) -> dict[str, Any]:
        """config.json contents laid out like a released Dream checkpoint's."""
        return {
            "architectures": [DREAM_ARCHITECTURE],
            "auto_map": dict(DREAM_AUTO_MAP),
            "model_type": DREAM_MODEL_TYPE,
            "hidden_act": "silu",
            "attention_dropout": 0.0,
            "rope_scaling": None,
            "use_cache": False,
            "use_sliding_window": False,
            "sliding_window": None,
            "torch_dtype": "float32",
            **asdict(self),
        }


_REQUIRED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "max_position_embeddings",
    "mask_token_id",
)


class DreamRMSNorm(nn.Module):
    """RMSNorm computed in fp32 whatever the weights' dtype, as Qwen2 does."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class DreamRotaryEmbedding(nn.Module):
    """Default RoPE; inv_freq is not persistent, so it is absent from checkpoints."""

    inv_freq: torch.Tensor

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.register_buffer(
            "inv_freq", rope_inverse_frequencies(head_dim, theta), persistent=False
        )

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape [batch, seq, head_dim] for integer positions [batch, seq]."""
        freqs = positions.float()[..., None] * self.inv_freq.float()
        angles = torch.cat((freqs, freqs), dim=-1)
        return angles.cos().to(dtype), angles.sin().to(dtype)


def rope_inverse_frequencies(head_dim: int, theta: float) -> torch.Tensor:
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim]; cos, sin: [batch, seq, head_dim]."""
    return x * cos[:, None] + _rotate_half(x) * sin[:, None]


class DreamAttention(nn.Module):
    """Bidirectional grouped-query attention through torch SDPA."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        kv_width = self.num_kv_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, self.num_heads * self.head_dim, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, kv_width, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, kv_width, bias=True)
        self.o_proj = nn.Linear(self.num_heads * self.head_dim, config.hidden_size, bias=False)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        key_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        batch, seq, _ = x.shape
        q = self.q_proj(x).view(batch, seq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(batch, seq, self.num_kv_heads, self.head_dim).transpose(1, 2)
        cos, sin = rope
        q, k = _apply_rope(q, cos, sin), _apply_rope(k, cos, sin)
        attn_mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, is_causal=False, enable_gqa=True
        )
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, -1))


class DreamMLP(nn.Module):
    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DreamDecoderLayer(nn.Module):
    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.self_attn = DreamAttention(config)
        self.mlp = DreamMLP(config)
        self.input_layernorm = DreamRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = DreamRMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        key_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, key_mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class DreamBaseModel(nn.Module):
    """Embeddings, decoder layers and the final norm: the checkpoint's ``model.*`` tensors."""

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(
            DreamDecoderLayer(config) for _ in range(config.num_hidden_layers)
        )
        self.norm = DreamRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = DreamRotaryEmbedding(config.head_dim, config.rope_theta)

    def forward(self, input_ids: torch.Tensor, key_mask: torch.Tensor | None) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        positions = torch.arange(input_ids.shape[1], device=input_ids.device).expand_as(input_ids)
        rope = self.rotary_emb(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, rope, key_mask)
        return self.norm(x)


class DreamModel(nn.Module):
    """The whole network; ``forward`` gives shifted logits (index i predicts token i + 1).

    Sequences are right-padded: positions run 0..seq-1 in every row and ``key_mask`` ([batch,
    seq], True = real token) keeps padded keys out of every query's attention.
    """

    def __init__(self, config: DreamConfig) -> None:
        super().__init__()
        self.config = config
        self.model = DreamBaseModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def hidden_states(
        self, input_ids: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Final normed hidden states [batch, seq, hidden], for callers that need few logits."""
        return self.model(input_ids, key_mask)

    def forward(
        self, input_ids: torch.Tensor, key_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.lm_head(self.hidden_states(input_ids, key_mask))


def load_dream_model(
    path: str | Path, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> DreamModel:
    """Build the network from config.json and load its safetensors weights (sharded or not).

    The modules are created on the meta device and the loaded tensors assigned in place, so a
    7B checkpoint is read once, straight into ``device`` and ``dtype``.
    """
    path = Path(path)
    config = DreamConfig.from_dict(read_config(path))
    state: dict[str, torch.Tensor] = {}
    for shard in safetensors_files(path):
        state.update(load_file(shard, device=str(device)))
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    state = {name: tensor.to(dtype) for name, tensor in state.items()}
    with torch.device("meta"):
        model = DreamModel(config)
    expected = set(model.state_dict())
    if config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise DrafterLoadError(
            f"Dream weights in {path} do not match its config.json: "
            f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
        )
    try:
        model.load_state_dict(state, strict=False, assign=True)
    except RuntimeError as err:  # shape mismatches
        raise DrafterLoadError(
            f"Dream weights in {path} do not match its config.json: {err}"
        ) from err
    if config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # The RoPE buffer is not in the checkpoint: compute it where the weights now live.
    model.model.rotary_emb.inv_freq = rope_inverse_frequencies(
        config.head_dim, config.rope_theta
    ).to(device)
    return model.eval()


def save_dream_model(model: DreamModel, path: str | Path) -> None:
    """Write config.json + model.safetensors the way a released Dream checkpoint is laid out."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(model.config.to_json_dict(), indent=2) + "\n")
    state = {name: t.detach().contiguous() for name, t in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})


class DreamDrafter:
    """Drafts a block per request with one bidirectional forward pass of a Dream model.

    Each request's input is its context followed by ``lengths[b]`` mask tokens; all requests go
    through one forward pass, right-padded, with padded keys masked out, so a request's logits do
    not depend on what else is in the batch. Because Dream's logits are shifted, drafted
    position j of request b is read from the output at index ``len(context) + j - 1``.

    Returned logits cover ids ``< target_vocab_size``; the mask token and ids past the drafter's
    own vocabulary are -inf so they are never drafted.
    """

    def __init__(self, model: DreamModel, *, target_vocab_size: int) -> None:
        self.model = model
        self.target_vocab_size = target_vocab_size
        self.mask_token_id = model.config.mask_token_id
        # Context and drafted block share the drafter's position range; longer contexts keep
        # only their last tokens (see draft).
        self.max_context_length = model.config.max_position_embeddings
        self._device = model.lm_head.weight.device

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        target_vocab_size: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> DreamDrafter:
        return cls(
            load_dream_model(path, device=device, dtype=dtype), target_vocab_size=target_vocab_size
        )

    @torch.inference_mode()
    def draft(self, contexts: Sequence[Sequence[int]], lengths: Sequence[int]) -> DraftBlock:
        """Draft lengths[b] tokens after contexts[b] for every request b in one forward pass.

        Requests with length 0 are left out of the forward pass. A context longer than
        ``max_context_length - lengths[b]`` keeps only its last tokens: the drafter was trained
        on bounded positions, and the most recent tokens are what predict the next ones.
        Rows past lengths[b] are -inf.
        """
        if len(contexts) != len(lengths):
            raise ValueError(f"{len(contexts)} contexts but {len(lengths)} lengths")
        lengths = [int(n) for n in lengths]
        max_len = max(lengths, default=0)
        out = torch.full(
            (len(lengths), max_len, self.target_vocab_size), float("-inf"), device=self._device
        )
        active = [b for b, n in enumerate(lengths) if n > 0]
        if not active:
            return DraftBlock(logits=out, lengths=lengths)

        rows = [self._input_row(contexts[b], lengths[b]) for b in active]
        seq = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), seq), self.mask_token_id, dtype=torch.long)
        key_mask = torch.zeros((len(rows), seq), dtype=torch.bool)
        read_at = torch.zeros((len(rows), max_len), dtype=torch.long)
        drafted = torch.zeros((len(rows), max_len), dtype=torch.bool)
        for a, ((ids, context_len), b) in enumerate(zip(rows, active, strict=True)):
            input_ids[a, : len(ids)] = torch.tensor(ids)
            key_mask[a, : len(ids)] = True
            read_at[a, : lengths[b]] = torch.arange(context_len - 1, context_len - 1 + lengths[b])
            drafted[a, : lengths[b]] = True

        # Without padding, no mask at all lets SDPA pick its fastest (flash) kernel.
        keys = None if bool(key_mask.all()) else key_mask.to(self._device)
        hidden = self.model.hidden_states(input_ids.to(self._device), keys)
        read_at, drafted = read_at.to(self._device), drafted.to(self._device)
        picked = hidden.gather(1, read_at[..., None].expand(-1, -1, hidden.shape[-1]))
        logits = self.model.lm_head(picked).float()
        keep = min(logits.shape[-1], self.target_vocab_size)
        logits = logits[..., :keep].masked_fill(~drafted[..., None], float("-inf"))
        out[torch.tensor(active, device=self._device), :, :keep] = logits
        if self.mask_token_id < self.target_vocab_size:
            out[..., self.mask_token_id] = float("-inf")
        return DraftBlock(logits=out, lengths=lengths)

    def _input_row(self, context: Sequence[int], length: int) -> tuple[list[int], int]:
        """Context (trimmed to fit) + mask tokens, and the trimmed context length."""
        room = self.max_context_length - length
        if room < 1:
            raise ValueError(
                f"draft length {length} leaves no room for context in the drafter's "
                f"{self.max_context_length} positions"
            )
        kept = list(context)[-room:]
        if not kept:
            raise ValueError(
                "cannot draft after an empty context: Dream reads its first drafted "
                "token from the last context position"
            )
        return kept + [self.mask_token_id] * length, len(kept)
