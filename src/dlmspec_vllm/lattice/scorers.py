"""Causal scorers: log p(token | previous tokens) for the lattice path search.

Every scorer answers batched queries: ``log_probs(contexts, tokens)`` with ``contexts``
[N, c] int64 (oldest token first, left-padded with -1 where the history is shorter than the
context) and ``tokens`` [N] int64, returning [N] float32 natural logs. Batched queries are what
the search needs: it asks for every (state, candidate) pair of a lattice at once, so the lookups
are vectorised torch (sorted int64 keys + ``searchsorted``), not a Python loop per n-gram.

Two scorers are provided; "no scorer" is simply ``None`` in the search (lam = 1, argmax path):

* ``ArpaNgramScorer``: a back-off n-gram model read from an ARPA file (the KenLM/SRILM text
  format). Its words are target token ids written as decimal strings, plus ``<s>``, ``</s>``,
  ``<unk>`` (``python -m dlmspec_vllm.lattice.build_arpa`` writes such files).
* ``OnlineNgramScorer``: counts over the request's own prompt and output, updated as tokens are
  appended; useful without any corpus because generated text repeats its prompt (code, names,
  numbers), which is where an n-gram is a good causal judge.

Tables live on the CPU; the search moves its queries there and the answers back.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

_LN10 = math.log(10.0)
_KEY_LIMIT = 2**63 - 1


def _check_key_space(base: int, order: int, what: str) -> None:
    """Keys pack n-grams as mixed-radix int64 numbers; refuse orders that would overflow."""
    if base**order > _KEY_LIMIT:
        raise ValueError(
            f"{what}: order {order} over {base} symbols does not fit 64-bit n-gram keys; "
            f"use a lower order"
        )


def _pack(columns: torch.Tensor, base: int) -> torch.Tensor:
    """Mixed-radix int64 key of each row of ``columns`` [N, k] (entries in [0, base))."""
    key = torch.zeros(columns.shape[0], dtype=torch.int64)
    for j in range(columns.shape[1]):
        key = key * base + columns[:, j]
    return key


def _find(sorted_keys: torch.Tensor, keys: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Membership and position of ``keys`` in an ascending, duplicate-free key table."""
    if sorted_keys.numel() == 0:
        return torch.zeros_like(keys, dtype=torch.bool), torch.zeros_like(keys)
    pos = torch.searchsorted(sorted_keys, keys).clamp(max=sorted_keys.numel() - 1)
    return sorted_keys[pos] == keys, pos


def _count_range(sorted_keys: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Number of entries of an ascending key table in [low, high)."""
    return torch.searchsorted(sorted_keys, high) - torch.searchsorted(sorted_keys, low)


class CausalScorer(abc.ABC):
    """Interface of the causal judges used by the path search.

    ``order`` is the n-gram order n: only the last n - 1 context tokens matter, and the exact
    search keeps that many tokens of state.
    """

    order: int

    @abc.abstractmethod
    def log_probs(self, contexts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Natural-log probabilities [N] float32 of ``tokens`` [N] after ``contexts`` [N, c].

        contexts hold target token ids, oldest first, -1 for "no token" (left padding before
        the start of the history); a scorer uses at most its last ``order - 1`` columns.
        """

    def log_prob(self, context: Sequence[int], token: int) -> float:
        """Convenience single query: natural log p(token | context)."""
        ctx = torch.tensor([list(context)], dtype=torch.int64).reshape(1, len(context))
        return float(self.log_probs(ctx, torch.tensor([token], dtype=torch.int64))[0])

    def _last_columns(self, contexts: torch.Tensor) -> torch.Tensor:
        if contexts.dim() != 2:
            raise ValueError(f"contexts must be [N, c], got shape {tuple(contexts.shape)}")
        keep = min(contexts.shape[1], self.order - 1)
        return contexts[:, contexts.shape[1] - keep :].to("cpu", torch.int64)


# --------------------------------------------------------------------------------------------
# ARPA back-off model
# --------------------------------------------------------------------------------------------

BOS, EOS, UNK = "<s>", "</s>", "<unk>"


@dataclass
class ArpaEntry:
    """One n-gram line of an ARPA file: log10 probability and log10 back-off weight."""

    log10_prob: float
    log10_backoff: float


def parse_arpa(lines: Iterable[str]) -> list[dict[tuple[str, ...], ArpaEntry]]:
    """Parse ARPA text into one dict per order (index 0 holds unigrams).

    Format: a ``\\data\\`` header of ``ngram N=count`` lines, then for each order N a
    ``\\N-grams:`` section of ``log10prob w1 ... wN [log10backoff]`` lines (tab or space
    separated), then ``\\end\\``. A missing back-off weight means 0 (log10 of 1). Counts must
    match the header, so a truncated file fails loudly instead of scoring silently wrong.
    """
    declared: dict[int, int] = {}
    tables: list[dict[tuple[str, ...], ArpaEntry]] = []
    section = None  # None: before \data\, 0: in \data\, N: in \N-grams:
    ended = False
    for line_no, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or ended:
            continue
        if line == "\\data\\":
            section = 0
            continue
        if section is None:
            continue
        if line == "\\end\\":
            ended = True
            continue
        if line.startswith("\\") and line.endswith("-grams:"):
            order = int(line[1 : -len("-grams:")])
            if order != len(tables) + 1 or order not in declared:
                raise ValueError(f"ARPA line {line_no}: unexpected section {line!r}")
            tables.append({})
            section = order
            continue
        if section == 0:
            if not line.startswith("ngram "):
                raise ValueError(f"ARPA line {line_no}: expected 'ngram N=count', got {line!r}")
            n_str, count_str = line[len("ngram ") :].split("=")
            declared[int(n_str)] = int(count_str)
            continue
        fields = line.split()
        if len(fields) not in (section + 1, section + 2):
            raise ValueError(f"ARPA line {line_no}: expected a {section}-gram entry, got {line!r}")
        backoff = float(fields[section + 1]) if len(fields) == section + 2 else 0.0
        tables[section - 1][tuple(fields[1 : section + 1])] = ArpaEntry(float(fields[0]), backoff)
    if not ended:
        raise ValueError("ARPA text has no \\end\\ marker (truncated file?)")
    if sorted(declared) != list(range(1, len(tables) + 1)):
        raise ValueError(
            f"ARPA header declares orders {sorted(declared)}, sections found: 1..{len(tables)}"
        )
    for order, table in enumerate(tables, start=1):
        if len(table) != declared[order]:
            raise ValueError(
                f"ARPA header declares {declared[order]} {order}-grams, file has {len(table)}"
            )
    return tables


class ArpaNgramScorer(CausalScorer):
    """Back-off n-gram model from an ARPA file, scoring target token ids.

    Words are decimal token ids plus ``<s>``, ``</s>``, ``<unk>``; other words load but no token
    id reaches them. Query mapping: a token id maps to its decimal word; ``eos_id`` (if given
    and not itself a word) maps to ``</s>``; unknown ids map to ``<unk>`` if the model has it.
    The -1 padding just before the first history token maps to ``<s>`` (start of a request is
    start of a sentence); earlier padding means "no word", which shortens the context.

    Scoring is the standard back-off recursion: p(w | h) = p(h w) if the n-gram h w is listed,
    else bow(h) * p(w | h minus its oldest word), with bow = 1 for unlisted contexts. A word
    with no unigram (and no ``<unk>``) gets ``floor_log10`` (default -10, i.e. p = 1e-10).
    """

    def __init__(
        self,
        tables: list[dict[tuple[str, ...], ArpaEntry]],
        *,
        eos_id: int | None = None,
        floor_log10: float = -10.0,
    ) -> None:
        if not tables or not tables[0]:
            raise ValueError("an ARPA model needs at least one unigram")
        self.order = len(tables)
        self.floor_log10 = floor_log10
        words = [gram[0] for gram in tables[0]]
        index = {word: i for i, word in enumerate(words)}
        self._num_words = len(words)
        _check_key_space(self._num_words, self.order, "ArpaNgramScorer")
        self._unk = index.get(UNK, -1)
        self._bos = index.get(BOS, -1)
        ids = {int(w): i for w, i in index.items() if w.isdigit()}
        if eos_id is not None and eos_id not in ids and EOS in index:
            ids[eos_id] = index[EOS]
        self._word_of_id = torch.full((max(ids, default=-1) + 1,), self._unk, dtype=torch.int64)
        for token_id, word in ids.items():
            self._word_of_id[token_id] = word
        self._keys: list[torch.Tensor] = []
        self._prob: list[torch.Tensor] = []
        self._bow: list[torch.Tensor] = []
        for order, table in enumerate(tables, start=1):
            grams = sorted(table.items(), key=lambda item: [index[w] for w in item[0]])
            cols = torch.tensor([[index[w] for w in g] for g, _ in grams], dtype=torch.int64)
            self._keys.append(_pack(cols.reshape(len(grams), order), self._num_words))
            self._prob.append(torch.tensor([e.log10_prob for _, e in grams], dtype=torch.float64))
            self._bow.append(torch.tensor([e.log10_backoff for _, e in grams], dtype=torch.float64))

    @classmethod
    def from_file(
        cls, path: str | Path, *, eos_id: int | None = None, floor_log10: float = -10.0
    ) -> ArpaNgramScorer:
        """Load an ARPA text file (see ``parse_arpa``)."""
        with open(path, encoding="utf-8") as handle:
            return cls(parse_arpa(handle), eos_id=eos_id, floor_log10=floor_log10)

    def _words(self, token_ids: torch.Tensor) -> torch.Tensor:
        """Word index of each token id: known word, else <unk>, else -1 (no word)."""
        inside = (token_ids >= 0) & (token_ids < self._word_of_id.numel())
        safe = torch.where(inside, token_ids, 0)
        mapped = self._word_of_id[safe] if self._word_of_id.numel() else torch.full_like(safe, -1)
        return torch.where(inside, mapped, torch.where(token_ids >= 0, self._unk, -1))

    def _lookup(self, grams: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(found, position) of word-index n-grams [N, k] in the order-k table."""
        complete = (grams >= 0).all(-1)
        keys = _pack(grams.clamp(min=0), self._num_words)
        found, pos = _find(self._keys[grams.shape[1] - 1], keys)
        return found & complete, pos

    def log_probs(self, contexts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        ctx_ids = self._last_columns(contexts)
        ctx = self._words(ctx_ids)
        if ctx.shape[1] and self._bos >= 0:
            # The padding slot right before the first real token is the sentence start.
            pad = ctx_ids == -1
            next_real = torch.cat([~pad[:, 1:], torch.ones_like(pad[:, :1])], dim=1)
            ctx = torch.where(pad & next_real, self._bos, ctx)
        word = self._words(tokens.to("cpu", torch.int64)).unsqueeze(1)
        n, c = ctx.shape
        result = torch.full((n,), self.floor_log10, dtype=torch.float64)
        done = torch.zeros(n, dtype=torch.bool)
        backoff = torch.zeros(n, dtype=torch.float64)
        for k in range(c, -1, -1):  # longest context first
            found, pos = self._lookup(torch.cat([ctx[:, c - k :], word], dim=1))
            take = found & ~done
            result = torch.where(take, self._prob[k][pos] + backoff, result)
            done |= found
            if k > 0:
                ctx_found, ctx_pos = self._lookup(ctx[:, c - k :])
                backoff = backoff + torch.where(ctx_found, self._bow[k - 1][ctx_pos], 0.0)
        return (result * _LN10).float()


# --------------------------------------------------------------------------------------------
# Online n-gram over the request's own tokens
# --------------------------------------------------------------------------------------------


class OnlineNgramScorer(CausalScorer):
    """Interpolated absolute-discount n-gram over one request's prompt + output, no file.

    p_0(w) = 1 / vocab_size (uniform floor, so no token is impossible);
    p_k(w | h) = (max(c(h w) - D, 0) + D * N1+(h .) * p_{k-1}(w | h')) / c(h .)
    for k = 1..order, where h is the last k - 1 tokens, h' drops its oldest token, c counts
    occurrences in the stream, N1+(h .) counts distinct followers of h; contexts never seen
    (c(h .) = 0, or containing -1 padding) fall back to p_{k-1} unchanged. Interpolation rather
    than pure back-off because streams are short and most n-grams are unseen.

    ``extend`` appends tokens in O(1); count tables (sorted int64 keys, one multiset and one
    distinct set per order) are rebuilt from the stream on the next query, O(T log T).
    """

    def __init__(
        self,
        vocab_size: int,
        *,
        order: int = 3,
        discount: float = 0.5,
        tokens: Sequence[int] = (),
    ) -> None:
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}")
        if not 0.0 < discount < 1.0:
            raise ValueError(f"discount must lie in (0, 1), got {discount}")
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
        _check_key_space(vocab_size, order, "OnlineNgramScorer")
        self.order = order
        self.vocab_size = vocab_size
        self.discount = discount
        self._stream: list[int] = []
        self._tables: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self.extend(tokens)

    def extend(self, tokens: Sequence[int]) -> None:
        """Append tokens to the request's stream (prompt first, then each accepted output)."""
        tokens = list(tokens)
        if any(not 0 <= t < self.vocab_size for t in tokens):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
        if tokens:
            self._stream.extend(tokens)
            self._tables = None

    def __len__(self) -> int:
        return len(self._stream)

    def _count_tables(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(all occurrence keys, distinct keys), both ascending, for each order 1..n."""
        if self._tables is None:
            stream = torch.tensor(self._stream, dtype=torch.int64)
            self._tables = []
            for k in range(1, self.order + 1):
                if stream.numel() >= k:
                    keys = _pack(stream.unfold(0, k, 1), self.vocab_size).sort().values
                else:
                    keys = torch.zeros(0, dtype=torch.int64)
                self._tables.append((keys, torch.unique_consecutive(keys)))
        return self._tables

    def log_probs(self, contexts: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        ctx = self._last_columns(contexts)
        word = tokens.to("cpu", torch.int64)
        if bool(((word < 0) | (word >= self.vocab_size)).any()) or bool(
            (ctx >= self.vocab_size).any()
        ):
            raise ValueError(f"token ids must lie in [0, {self.vocab_size})")
        n, c = ctx.shape
        d = self.discount
        prob = torch.full((n,), 1.0 / self.vocab_size, dtype=torch.float64)
        for k, (occurrences, distinct) in enumerate(self._count_tables(), start=1):
            if k - 1 > c:
                break
            hist = ctx[:, c - (k - 1) :]
            usable = (hist >= 0).all(-1)
            low = _pack(hist.clamp(min=0), self.vocab_size) * self.vocab_size
            high = low + self.vocab_size
            ctx_count = _count_range(occurrences, low, high)
            followers = _count_range(distinct, low, high)
            gram_count = _count_range(occurrences, low + word, low + word + 1)
            mixed = (torch.clamp(gram_count - d, min=0.0) + d * followers * prob) / ctx_count.clamp(
                min=1
            )
            prob = torch.where(usable & (ctx_count > 0), mixed, prob)
        return prob.log().float()
