"""Draft for a target whose tokenizer is not the drafter's, through text (LLaDA for Qwen/Llama).

The proposer speaks target token ids only. A bridged drafter turns each context into text with
the target's tokenizer, into drafter ids with the drafter's own tokenizer, drafts in the
drafter's vocabulary, turns the draft into text and that text into target ids:

    target ids --target.decode--> text --drafter.encode--> drafter ids --draft-->
    drafter ids --drafter.decode--> text --target.encode--> target ids

Choices, each a trade-off:

- Logits. Drafts stays the interface, so the bridge returns logits over the *target*
  vocabulary. It has no target distribution, only the mapped token and how sure the drafter
  was, so each row puts probability c on the mapped token and spreads 1 - c evenly over all
  others: ``confidences()`` then reports c, which is what length controllers read, and argmax
  is the mapped token. c is the product of the drafter confidences of the drafter tokens whose
  text the target token covers (the chance that all of them are right). A lattice over these
  rows has one real candidate per position; leave CPS off with a bridged drafter.
- Length. The drafter drafts a few more tokens than asked (tokenizers cut text differently) and
  at most the requested number of target tokens is returned, possibly fewer: the target token
  that touches the end of the drafted text is dropped, since it may be the front of a word the
  drafter had not finished, and the draft stops before the drafter's first special token (its
  end-of-text is not mapped to the target's).
- Context. Target special tokens (chat markers) are decoded as their text, which the drafter
  reads as ordinary characters; the drafter's BOS, if it has one, starts its context.

A pairing is usable only if text survives both tokenizers (``check_bridge_pairing``); a drafter
whose tokenizer gives every regular target token the target's id (``shares_vocabulary``) needs
no bridge. Whether a drafter is bridged is decided once, by ``loading.plan_pairing``, for the
start-up check and the worker alike; this module holds the tests it applies and the bridge.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from dlmspec_vllm.drafters.base import Drafts
from dlmspec_vllm.drafters.checkpoint import DrafterLoadError
from dlmspec_vllm.drafters.diffusion import DiffusionDrafter

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Texts every usable pairing must carry unchanged: prose, code layout, digits, punctuation,
# runs of spaces and newlines, accents, CJK, emoji.
PROBE_TEXTS = (
    "The quick brown fox jumps over the lazy dog. It's 3.14, isn't it?",
    "def add(a, b):\n    return a + b\n\n\nclass Point:\n\tx: int = 0  # two  spaces\n",
    "for (int i = 0; i < n; ++i) { total += values[i] * 2; }",
    "Numbers: 0123456789, 1e-5, -42, $9.99, 100%, 3/4, x^2 <= y",
    "Quotes \"double\" 'single' `back` [brackets] {braces} <angle> | \\ / ~ @ # & *",
    "  leading spaces, trailing spaces  \n\n\nthree newlines\r\nwindows line",
    "Café naïve résumé façade Ærø Straße déjà vu",
    "中文文本测试，日本語のテキスト、한국어 텍스트",
    "Emoji 🙂🚀 and symbols → ≤ ≥ ∑ π ∞ ©",
)
# Extra drafter tokens per requested target token: tokenizers split text differently.
DRAFT_SLACK = 0.25


class BridgePairingError(DrafterLoadError):
    """A target/drafter pair whose tokenizers cannot carry text between them."""


def load_tokenizer(
    source: str | Path | PreTrainedTokenizerBase, *, trust_remote_code: bool = False
) -> PreTrainedTokenizerBase:
    """A tokenizer object, loaded from a directory or Hugging Face id unless given as one;
    transformers' OSError or ValueError when it does not load."""
    if not isinstance(source, str | Path):
        return source
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(source), trust_remote_code=trust_remote_code)


def shares_vocabulary(
    target_tokenizer: PreTrainedTokenizerBase, drafter_tokenizer: PreTrainedTokenizerBase
) -> bool:
    """True when every regular (not added) target token has the same id in the drafter's
    tokenizer: then target ids can be fed to the drafter as they are (Dream, Fast-dLLM v2)."""
    drafter_vocab = drafter_tokenizer.get_vocab()
    added = set(target_tokenizer.get_added_vocab())
    return all(
        drafter_vocab.get(token) == token_id
        for token, token_id in target_tokenizer.get_vocab().items()
        if token not in added
    )


def mismatched_added_tokens(
    target_tokenizer: PreTrainedTokenizerBase, drafter_tokenizer: PreTrainedTokenizerBase
) -> list[str]:
    """The target's added tokens (chat markers) that the drafter's tokenizer lacks or numbers
    otherwise, sorted."""
    drafter_vocab = drafter_tokenizer.get_vocab()
    added = set(target_tokenizer.get_added_vocab())
    return sorted(
        token
        for token, token_id in target_tokenizer.get_vocab().items()
        if token in added and drafter_vocab.get(token) != token_id
    )


def _decode(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    text = tokenizer.decode(
        list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    assert isinstance(text, str), "decoding one sequence gives one string"
    return text


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]


def check_bridge_pairing(
    target_tokenizer: PreTrainedTokenizerBase,
    drafter_tokenizer: PreTrainedTokenizerBase,
    *,
    vocabulary_sample: int = 2000,
) -> None:
    """Raise BridgePairingError unless text goes target -> drafter -> target unchanged.

    Checked on PROBE_TEXTS and on the text of up to ``vocabulary_sample`` regular target tokens
    spread over its vocabulary: the drafter's tokenizer must reproduce each text (no unknown
    token, no normalization such as lower-casing or accent stripping) and the target's must
    reproduce what the drafter's gives back.
    """
    texts = [_decode(target_tokenizer, _encode(target_tokenizer, t)) for t in PROBE_TEXTS]
    texts += _vocabulary_texts(target_tokenizer, vocabulary_sample)
    failures = []
    for text in texts:
        through = _decode(drafter_tokenizer, _encode(drafter_tokenizer, text))
        back = _decode(target_tokenizer, _encode(target_tokenizer, through))
        if through != text or back != text:
            failures.append(f"{text!r} -> {through!r}")
    if failures:
        examples = "; ".join(failures[:5])
        raise BridgePairingError(
            f"the draft_model's tokenizer cannot reproduce the target's text ({len(failures)} "
            f"of {len(texts)} probes changed, e.g. {examples}), so no vocabulary bridge can "
            "carry contexts and drafts between them. Use a draft_model whose tokenizer "
            "round-trips arbitrary text (byte-level BPE) or one that shares the target's "
            "tokenizer."
        )


def _vocabulary_texts(tokenizer: PreTrainedTokenizerBase, count: int) -> list[str]:
    """Texts of ``count`` regular tokens spread evenly over the vocabulary; byte fragments
    that are not whole characters on their own are skipped."""
    added = set(tokenizer.get_added_vocab().values())
    ids = [i for i in sorted(tokenizer.get_vocab().values()) if i not in added]
    stride = max(1, len(ids) // max(count, 1))
    texts = (_decode(tokenizer, [i]) for i in ids[::stride][:count])
    return [text for text in texts if text and "\ufffd" not in text]


class BridgedDrafter:
    """A drafter in its own vocabulary, seen by the proposer as a drafter in the target's."""

    def __init__(
        self,
        inner: DiffusionDrafter,
        *,
        target_tokenizer: PreTrainedTokenizerBase,
        drafter_tokenizer: PreTrainedTokenizerBase,
        target_vocab_size: int,
    ) -> None:
        self.inner = inner
        self.target_tokenizer = target_tokenizer
        self.drafter_tokenizer = drafter_tokenizer
        self.target_vocab_size = target_vocab_size
        # In drafter tokens: the bridge cannot know in advance how many target tokens fit.
        self.max_context_length = inner.max_context_length
        self._drafter_specials = set(drafter_tokenizer.all_special_ids)
        self._drafter_bos = drafter_tokenizer.bos_token_id

    def forget(self, req_id: str) -> None:
        self.inner.forget(req_id)

    @property
    def num_cached_requests(self) -> int:
        return self.inner.num_cached_requests

    @property
    def cached_tokens(self) -> int:
        return self.inner.cached_tokens

    @property
    def cache_bytes(self) -> int:
        return self.inner.cache_bytes

    def draft(
        self,
        contexts: Sequence[Sequence[int]],
        lengths: Sequence[int],
        *,
        req_ids: Sequence[str] | None = None,
    ) -> Drafts:
        """Draft at most lengths[b] target tokens after contexts[b] (target ids) per request."""
        if len(contexts) != len(lengths):
            raise ValueError(f"{len(contexts)} contexts but {len(lengths)} lengths")
        lengths = [int(n) for n in lengths]
        drafter_contexts = [
            self.to_drafter_ids(c) if n > 0 else [] for c, n in zip(contexts, lengths)
        ]
        budgets = [
            min(n + math.ceil(n * DRAFT_SLACK), self.inner.max_context_length - 1) if n > 0 else 0
            for n in lengths
        ]
        inner = self.inner.draft(drafter_contexts, budgets, req_ids=req_ids)
        mapped = [
            self.to_target_ids(tokens, confidences, limit=n)
            for tokens, confidences, n in zip(
                inner.argmax_tokens(), inner.confidences(), lengths, strict=True
            )
        ]
        logits = torch.full(
            (len(lengths), max(lengths, default=0), self.target_vocab_size), float("-inf")
        )
        for b, pairs in enumerate(mapped):
            if pairs:
                logits[b, : len(pairs)] = _one_hot_ish(pairs, self.target_vocab_size)
        return Drafts(logits=logits.to(inner.logits.device), lengths=[len(p) for p in mapped])

    def to_drafter_ids(self, target_ids: Sequence[int]) -> list[int]:
        """A target-id context as the drafter's tokenizer reads its text."""
        ids = _encode(self.drafter_tokenizer, _decode(self.target_tokenizer, target_ids))
        return ids if self._drafter_bos is None else [self._drafter_bos, *ids]

    def to_target_ids(
        self, drafter_ids: Sequence[int], confidences: Sequence[float], *, limit: int
    ) -> list[tuple[int, float]]:
        """(target id, confidence) of at most ``limit`` target tokens of a drafted text."""
        cut = next((i for i, t in enumerate(drafter_ids) if t in self._drafter_specials), None)
        finished = cut is not None
        pieces = list(drafter_ids[:cut])
        text = _decode(self.drafter_tokenizer, pieces)
        # Character offset where each drafter token's text ends (decoding prefixes handles
        # tokens that are parts of one character).
        ends: list[int] = []
        for i in range(len(pieces)):
            decoded = len(_decode(self.drafter_tokenizer, pieces[: i + 1]))
            ends.append(max(ends[-1] if ends else 0, decoded))
        encoded = self.target_tokenizer(
            text, add_special_tokens=False, return_offsets_mapping=True, verbose=False
        )
        mapped: list[tuple[int, float]] = []
        for token, (start, end) in zip(encoded["input_ids"], encoded["offset_mapping"]):
            if len(mapped) == limit or token >= self.target_vocab_size:
                break
            if end >= len(text) and not finished:
                break
            covering = [
                confidences[i]
                for i, stop in enumerate(ends)
                if stop > start and (ends[i - 1] if i else 0) < end
            ]
            mapped.append((token, math.prod(covering)))
        return mapped


def _one_hot_ish(pairs: list[tuple[int, float]], vocab_size: int) -> torch.Tensor:
    """Logit rows whose softmax gives each (token, confidence) pair's token its confidence and
    the rest evenly to the other ids.

    A confidence is raised to 2 / vocab_size at least, so its token stays the argmax.
    """
    tokens = torch.tensor([token for token, _ in pairs])
    confidence = torch.tensor([c for _, c in pairs], dtype=torch.float64)
    confidence = confidence.clamp(min=2.0 / vocab_size, max=1.0)
    rest = torch.log1p(-confidence) - math.log(vocab_size - 1)  # -inf where confidence is 1
    rows = rest[:, None].expand(-1, vocab_size).float().clone()
    rows[torch.arange(len(pairs)), tokens] = confidence.log().float()
    return rows
