"""User settings of the `dlm` speculative method, validated before any engine starts.

Users write them in vLLM's one `--speculative-config` JSON, next to vLLM's own keys:

    {"method": "dlm", "draft_model": "/models/dream-7b", "num_speculative_tokens": 16}

Every error names the offending field and says how to fix it, because a bad value here would
otherwise surface as a crash deep inside a worker process.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any, Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from dlmspec_vllm.control import CONTROLLERS, LengthController, make_controller

METHOD_NAME: Final = "dlm"
PROPOSER_CLASS_PATH = "dlmspec_vllm.proposer.DlmProposer"
SETTINGS_ENV_VAR = "DLMSPEC_CONFIG"

# vLLM's rejection sampler verifies at most this many draft tokens per request and step.
MAX_SPEC_LEN = 128


class DlmConfigError(ValueError):
    """A `dlm` setting is wrong; the message names the field and the fix."""


class ControllerSettings(BaseModel):
    """Which draft-length controller runs, and its options (see control/)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Literal["fixed", "adl", "failfast", "cost_aware"] = Field(
        default="fixed",
        description="fixed: always num_speculative_tokens (or `k`; k 0 never drafts, the "
        "method's floor); adl: DiffuSpec's adaptive draft length; failfast: FailFast's "
        "extend-while-confident rule; cost_aware: ours, from costs measured per batch size.",
    )
    options: dict[str, int | float | bool] = Field(
        default_factory=dict,
        description='The chosen controller\'s keyword settings, e.g. {"k_min": 8} for adl.',
    )

    @model_validator(mode="before")
    @classmethod
    def _accept_shorthand(cls, value: Any) -> Any:
        # Users write "controller": "adl" or {"name": "adl", "k_min": 8}; both mean the same.
        if isinstance(value, str):
            return {"name": value}
        if isinstance(value, dict) and "options" not in value:
            options = {k: v for k, v in value.items() if k != "name"}
            return {"name": value.get("name", "fixed"), "options": options}
        return value

    def build(self, max_length: int) -> LengthController:
        return make_controller(self.name, max_length, **self.options)


class _SwitchSettings(BaseModel):
    """Settings of an optional feature: a bare true or false stands for {"enabled": ...}, the
    feature with its defaults."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @model_validator(mode="before")
    @classmethod
    def _accept_shorthand(cls, value: Any) -> Any:
        return {"enabled": value} if isinstance(value, bool) else value


class LatticeSettings(_SwitchSettings):
    """Causal-consistency Path Search (DiffuSpec) over the drafter's per-position candidates."""

    enabled: bool = Field(default=False, description="Off: send the per-position argmax.")
    tau: float = Field(default=0.8, gt=0.0, le=1.0, description="Nucleus mass kept per position.")
    m_max: int = Field(default=15, ge=1, le=64, description="Most candidates per position.")
    lam: float = Field(
        default=0.5, ge=0.0, le=1.0, description="Weight of the drafter's log-prob vs the scorer's."
    )
    scorer: Literal["online", "arpa", "none"] = Field(
        default="online",
        description="online: n-gram of the request's own prompt and output; arpa: an ARPA file; "
        "none: drafter scores only.",
    )
    arpa_path: str | None = Field(default=None, description="ARPA file, for scorer 'arpa'.")
    ngram_order: int = Field(default=3, ge=2, le=3, description="Order of the online n-gram.")
    search: Literal["dp", "beam"] = Field(
        default="dp", description="dp: exact dynamic programming; beam: beam search."
    )
    beam_width: int = Field(default=3, ge=1, le=64)

    @model_validator(mode="after")
    def _arpa_file_given(self) -> LatticeSettings:
        if self.scorer == "arpa":
            if self.arpa_path is None:
                raise ValueError("lattice.scorer 'arpa' needs lattice.arpa_path (an ARPA file)")
            if not Path(self.arpa_path).is_file():
                raise ValueError(f"lattice.arpa_path {self.arpa_path!r} is not a file")
        return self


class ContextLookupSettings(_SwitchSettings):
    """Drafts copied from the request's own context where its last tokens occurred before
    (drafters/context_lookup.py); the diffusion drafter drafts for the other requests."""

    enabled: bool = Field(default=False, description="Off: every draft is the drafter's.")
    min_ngram: int = Field(default=2, ge=1, le=16, description="Shortest suffix looked up.")
    max_ngram: int = Field(default=4, ge=1, le=16, description="Longest suffix looked up.")

    @model_validator(mode="after")
    def _ngram_range(self) -> ContextLookupSettings:
        if self.min_ngram > self.max_ngram:
            raise ValueError(
                f"context_lookup.min_ngram ({self.min_ngram}) is above context_lookup.max_ngram "
                f"({self.max_ngram}): make min_ngram <= max_ngram"
            )
        return self


class DraftingSettings(BaseModel):
    """How the drafter denoises a block and caches each request's context (drafters/)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    denoising_steps: int = Field(
        default=1,
        ge=1,
        le=64,
        description="Drafter passes per draft; 1 takes every argmax at once.",
    )
    unmask_threshold: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description="With several passes, fix every position at least this confident per pass "
        "(FailFast: 0.05); null: an equal share per pass, most confident first.",
    )
    cache_refresh_interval: int = Field(
        default=8,
        ge=0,
        description="Rebuild an approximate (Dream, LLaDA) prefix cache after this many draft "
        "calls; 0 turns the per-request cache off.",
    )
    cache_max_tokens: int = Field(
        default=65536, ge=0, description="Most context tokens cached over all requests (LRU)."
    )
    shared_prefix_max_tokens: int = Field(
        default=16384,
        ge=0,
        le=1 << 24,
        description="DFlash drafters: context kept per full KV-cache block of a token prefix, "
        "shared by the requests that have it, so a prefix vLLM serves from its prefix cache "
        "still reaches the drafter (least recently used unheld blocks out first); 0 keeps none.",
    )


class DlmSpeculativeConfig(BaseModel):
    """Settings of the `dlm` method, in the JSON users pass as `--speculative-config`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    method: Literal["dlm"] = METHOD_NAME
    draft_model: str = Field(
        description="Local directory (or Hugging Face id, resolved offline from the HF cache) of "
        "a diffusion-LM checkpoint in its Hugging Face layout."
    )
    num_speculative_tokens: int = Field(
        ge=1,
        le=MAX_SPEC_LEN,
        description="Most draft tokens proposed per request and step (vLLM verifies at most "
        f"{MAX_SPEC_LEN}).",
    )
    draft_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto",
        description="Drafter weight dtype; 'auto' follows the target model's dtype.",
    )
    max_draft_context: int | None = Field(
        default=None,
        ge=1,
        description="Keep only this many most recent context tokens in the drafter's input; "
        "default: the drafter's own context window. DFlash drafters read the target's hidden "
        "states instead of tokens and ignore it (drafting.cache_max_tokens bounds their memory).",
    )

    drafting: DraftingSettings = Field(
        default_factory=DraftingSettings,
        description="Denoising passes and prefix cache of the drafter.",
    )
    controller: ControllerSettings = Field(
        default_factory=ControllerSettings,
        description='Per-request draft-length controller: a name or {"name": ..., options}.',
    )

    lattice: LatticeSettings = Field(
        default_factory=LatticeSettings,
        description="CPS over the drafter's candidates: true, or an object of lattice settings.",
    )
    context_lookup: ContextLookupSettings = Field(
        default_factory=ContextLookupSettings,
        description="Copy drafts from the request's own context where its last tokens recur: "
        "true, or an object of context_lookup settings.",
    )
    draft_digest: bool = Field(
        default=False,
        description="Keep a running sha256 of every draft sent, reported as drafts_digest (to "
        "check that tensor-parallel ranks propose alike); it costs a hash per step.",
    )

    @model_validator(mode="after")
    def _controller_options_fit(self) -> DlmSpeculativeConfig:
        parameters = inspect.signature(CONTROLLERS[self.controller.name]).parameters
        allowed = sorted(set(parameters) - {"max_length"})
        unknown = sorted(set(self.controller.options) - set(allowed))
        if unknown:
            raise ValueError(
                f"controller {self.controller.name!r} has no option {', '.join(unknown)}; "
                f"its options: {', '.join(allowed) or 'none'}"
            )
        try:
            self.controller.build(self.num_speculative_tokens)
        except (TypeError, ValueError) as err:
            raise ValueError(f"controller {self.controller.name!r}: {err}") from None
        return self

    @classmethod
    def from_user_dict(cls, raw: dict[str, Any]) -> DlmSpeculativeConfig:
        """Validate a user's dict, turning pydantic's report into one readable error."""
        try:
            return cls.model_validate(raw)
        except ValidationError as err:
            raise DlmConfigError(_describe_validation_error(err)) from None

    @classmethod
    def from_environment(cls, num_speculative_tokens: int) -> DlmSpeculativeConfig:
        """Settings for vLLM's `custom_class` route, whose JSON has no room for ours.

        DLMSPEC_CONFIG holds a JSON object, or the path of a file with one, with the same keys
        as the `dlm` method (num_speculative_tokens comes from vLLM's own config).
        """
        text = os.environ.get(SETTINGS_ENV_VAR)
        if not text:
            raise DlmConfigError(
                f"method 'custom_class' with {PROPOSER_CLASS_PATH} reads its settings from the "
                f"environment variable {SETTINGS_ENV_VAR}, which is not set: set it to a JSON "
                'object such as {"draft_model": "/path/to/drafter"}, or use '
                '--speculative-config \'{"method": "dlm", "draft_model": ..., '
                '"num_speculative_tokens": ...}\' instead.'
            )
        if not text.lstrip().startswith("{"):
            path = Path(text)
            if not path.is_file():
                raise DlmConfigError(
                    f"{SETTINGS_ENV_VAR}={text!r} is neither a JSON object nor an existing file."
                )
            text = path.read_text()
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as err:
            raise DlmConfigError(f"{SETTINGS_ENV_VAR} is not valid JSON: {err}") from None
        if not isinstance(raw, dict):
            raise DlmConfigError(f"{SETTINGS_ENV_VAR} must hold a JSON object.")
        given = raw.get("num_speculative_tokens", num_speculative_tokens)
        if given != num_speculative_tokens:
            raise DlmConfigError(
                f"num_speculative_tokens is {given} in {SETTINGS_ENV_VAR} but "
                f"{num_speculative_tokens} in vLLM's speculative config: give it in one place."
            )
        raw = {**raw, "num_speculative_tokens": num_speculative_tokens}
        return cls.from_user_dict(raw)


def _describe_validation_error(err: ValidationError) -> str:
    allowed = ", ".join(DlmSpeculativeConfig.model_fields)
    lines = []
    for problem in err.errors():
        field = ".".join(str(part) for part in problem["loc"])
        if not field:
            lines.append(problem["msg"].removeprefix("Value error, "))
        elif problem["type"] == "extra_forbidden":
            lines.append(f"unknown field '{field}' for method 'dlm'; allowed fields: {allowed}")
        elif problem["type"] == "missing":
            lines.append(f"field '{field}' is required for method 'dlm'")
        else:
            lines.append(f"field '{field}': {problem['msg']} (got {problem.get('input')!r})")
    return "invalid --speculative-config for method 'dlm': " + "; ".join(lines)
