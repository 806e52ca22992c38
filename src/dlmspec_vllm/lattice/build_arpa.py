"""Write an ARPA n-gram model over target token ids, for ``ArpaNgramScorer``.

    python -m dlmspec_vllm.lattice.build_arpa --order 3 --input corpus.txt --output lm.arpa

Input: one sentence (document, reply) per line, either whitespace-separated decimal target
token ids (``--format ids``, the default) or raw text encoded with a Hugging Face
``tokenizer.json`` (``--format text --tokenizer PATH``; no special tokens added). Words in the
ARPA file are those token ids as decimal strings, plus ``<s>`` and ``</s>`` around every line
and ``<unk>`` for ids the corpus never shows.

Smoothing: interpolated Kneser-Ney with one absolute discount per order,
D_k = n1 / (n1 + 2 n2) from that order's count-of-counts (0.5 when undefined), or ``--discount``.
The highest order uses raw counts; lower orders use continuation counts (number of distinct
left neighbours), except n-grams starting with ``<s>``, which have no left neighbour and keep
raw counts (as KenLM does). The base distribution is uniform over the vocabulary (``<s>``
excluded), so ``<unk>`` gets a small non-zero probability. Interpolated estimates are written in
back-off form: listed n-grams carry their interpolated probability and contexts carry
bow(h) = D * (distinct followers of h) / (total count after h), so the standard ARPA back-off
recursion reproduces the interpolated model exactly and every context's distribution sums to 1.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from functools import cache
from pathlib import Path

from dlmspec_vllm.lattice.scorers import BOS, EOS, UNK

_NO_PROB_LOG10 = -99.0  # ARPA convention for "never predicted" (<s>)


def _discount(counts: Iterable[int]) -> float:
    tally = Counter(counts)
    n1, n2 = tally[1], tally[2]
    return n1 / (n1 + 2 * n2) if n1 and n2 else 0.5


def build_arpa(
    sentences: Iterable[Sequence[int]], order: int, *, discount: float | None = None
) -> str:
    """ARPA text of an interpolated Kneser-Ney model of ``order`` over the given id sentences."""
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}")
    if discount is not None and not 0.0 < discount < 1.0:
        raise ValueError(f"discount must lie in (0, 1), got {discount}")
    raw: list[Counter[tuple[str, ...]]] = [Counter() for _ in range(order)]
    for sentence in sentences:
        words = [BOS, *(str(int(t)) for t in sentence), EOS]
        for k in range(1, order + 1):
            for start in range(len(words) - k + 1):
                raw[k - 1][tuple(words[start : start + k])] += 1
    if not raw[0]:
        raise ValueError("the corpus is empty")

    # Adjusted counts: raw at the top order, continuation counts below (raw after <s>).
    adjusted: list[dict[tuple[str, ...], int]] = [dict() for _ in range(order)]
    adjusted[order - 1] = dict(raw[order - 1])
    for k in range(order - 1, 0, -1):
        left = Counter(gram[1:] for gram in raw[k])
        adjusted[k - 1] = {g: (c if g[0] == BOS else left[g]) for g, c in raw[k - 1].items()}
    adjusted[0].pop((BOS,), None)
    adjusted[0].setdefault((UNK,), 0)
    vocab_size = len(adjusted[0])

    discounts = [
        discount if discount is not None else _discount(c for c in table.values() if c > 0)
        for table in adjusted
    ]
    # Per order: context -> (total adjusted count after it, number of distinct followers).
    context_stats: list[dict[tuple[str, ...], tuple[int, int]]] = []
    for table in adjusted:
        stats: dict[tuple[str, ...], list[int]] = {}
        for gram, count in table.items():
            if count > 0:
                entry = stats.setdefault(gram[:-1], [0, 0])
                entry[0] += count
                entry[1] += 1
        context_stats.append({h: (total, kinds) for h, (total, kinds) in stats.items()})

    @cache
    def prob(gram: tuple[str, ...]) -> float:
        k = len(gram)
        lower = prob(gram[1:]) if k > 1 else 1.0 / vocab_size
        total, kinds = context_stats[k - 1].get(gram[:-1], (0, 0))
        if total == 0:
            return lower
        d = discounts[k - 1]
        return max(adjusted[k - 1].get(gram, 0) - d, 0.0) / total + d * kinds / total * lower

    def backoff(gram: tuple[str, ...]) -> float | None:
        if len(gram) >= order or gram not in context_stats[len(gram)]:
            return None
        total, kinds = context_stats[len(gram)][gram]
        return math.log10(discounts[len(gram)] * kinds / total)

    sections: list[list[str]] = []
    for k in range(1, order + 1):
        grams = sorted(adjusted[k - 1]) + ([(BOS,)] if k == 1 else [])
        lines = []
        for gram in grams:
            log10_p = _NO_PROB_LOG10 if gram == (BOS,) else math.log10(prob(gram))
            bow = backoff(gram)
            fields = [f"{log10_p:.7f}", " ".join(gram)]
            if bow is not None:
                fields.append(f"{bow:.7f}")
            lines.append("\t".join(fields))
        sections.append(lines)
    out = ["", "\\data\\"]
    out += [f"ngram {k}={len(lines)}" for k, lines in enumerate(sections, start=1)]
    for k, lines in enumerate(sections, start=1):
        out += ["", f"\\{k}-grams:", *lines]
    out += ["", "\\end\\", ""]
    return "\n".join(out)


def _id_sentences(path: Path) -> Iterator[list[int]]:
    with open(path, encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            try:
                yield [int(f) for f in fields]
            except ValueError:
                raise ValueError(
                    f"{path}:{line_no}: expected whitespace-separated token ids "
                    f"(use --format text --tokenizer for raw text)"
                ) from None


def _text_sentences(path: Path, tokenizer_path: Path) -> Iterator[list[int]]:
    from tokenizers import Tokenizer  # only the text path needs it

    if tokenizer_path.is_dir():
        tokenizer_path = tokenizer_path / "tokenizer.json"
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield tokenizer.encode(line.rstrip("\n"), add_special_tokens=False).ids


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m dlmspec_vllm.lattice.build_arpa", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--order", type=int, default=3, help="n-gram order (default 3)")
    parser.add_argument("--input", type=Path, required=True, help="corpus, one sentence a line")
    parser.add_argument("--output", type=Path, required=True, help="ARPA file to write")
    parser.add_argument(
        "--format",
        choices=("ids", "text"),
        default="ids",
        help="ids: decimal token ids per line; text: raw text (needs --tokenizer)",
    )
    parser.add_argument(
        "--tokenizer",
        type=Path,
        help="tokenizer.json (or its directory) of the target, for --format text",
    )
    parser.add_argument(
        "--discount",
        type=float,
        help="fixed absolute discount in (0, 1) instead of the count-of-counts one",
    )
    args = parser.parse_args(argv)
    if args.format == "text" and args.tokenizer is None:
        parser.error("--format text needs --tokenizer")
    sentences = (
        _text_sentences(args.input, args.tokenizer)
        if args.format == "text"
        else _id_sentences(args.input)
    )
    args.output.write_text(
        build_arpa(sentences, args.order, discount=args.discount), encoding="utf-8"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
