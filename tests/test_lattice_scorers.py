"""Causal scorers: ARPA back-off scoring by the format's definition, the ARPA builder, and
the online n-gram over a request's own tokens."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from dlmspec_vllm.lattice import ArpaNgramScorer, OnlineNgramScorer, parse_arpa
from dlmspec_vllm.lattice.build_arpa import build_arpa, main

LN10 = math.log(10.0)

HAND_ARPA = """
\\data\\
ngram 1=6
ngram 2=4
ngram 3=2

\\1-grams:
-1.0\t<unk>
-99\t<s>\t-0.5
-0.7\t</s>
-0.6\t10\t-0.3
-0.8\t11\t-0.2
-0.9\t12

\\2-grams:
-0.4\t<s> 10\t-0.1
-0.3\t10 11\t-0.25
-0.5\t11 12
-0.2\t11 </s>

\\3-grams:
-0.05\t<s> 10 11
-0.15\t10 11 12

\\end\\
"""


@pytest.fixture()
def hand_lm(tmp_path: Path) -> ArpaNgramScorer:
    path = tmp_path / "hand.arpa"
    path.write_text(HAND_ARPA)
    return ArpaNgramScorer.from_file(path, eos_id=5)


@pytest.mark.parametrize(
    ("context", "token", "log10_expected"),
    [
        ([-1, 10], 11, -0.05),  # trigram "<s> 10 11": padding before the history is <s>
        ([10, 11], 12, -0.15),  # listed trigram
        ([1, 2, 10, 11], 12, -0.15),  # only the last order-1 tokens count
        ([12, 11], 12, -0.5),  # unlisted context "12 11": bow 0, bigram "11 12"
        ([10, 11], 10, -0.25 - 0.2 - 0.6),  # bow(10 11) + bow(11) + p(10)
        ([10, 11], 99, -0.25 - 0.2 - 1.0),  # unknown id scores as <unk>
        ([77, 10], 11, -0.3),  # unknown context word -> <unk>, "<unk> 10" unlisted
        ([-1, -1], 11, -0.5 - 0.8),  # empty history: context <s>, bow(<s>) + p(11)
        ([10, 11], 5, -0.25 - 0.2),  # eos_id reads as </s>: bow(10 11) + p(</s> | 11)
        ([], 10, -0.6),  # no context: unigram
    ],
)
def test_hand_written_arpa_scores_by_definition(
    hand_lm: ArpaNgramScorer, context: list[int], token: int, log10_expected: float
) -> None:
    assert hand_lm.order == 3
    assert hand_lm.log_prob(context, token) == pytest.approx(log10_expected * LN10, abs=1e-5)


def test_batched_queries_match_single_ones(hand_lm: ArpaNgramScorer) -> None:
    contexts = torch.tensor([[-1, 10], [10, 11], [12, 11], [77, 10]])
    tokens = torch.tensor([11, 12, 12, 11])
    batched = hand_lm.log_probs(contexts, tokens)
    assert batched.dtype == torch.float32
    single = [hand_lm.log_prob(c.tolist(), int(t)) for c, t in zip(contexts, tokens)]
    assert batched.tolist() == pytest.approx(single)


def test_unknown_word_without_unk_gets_the_floor() -> None:
    text = HAND_ARPA.replace("ngram 1=6", "ngram 1=5").replace("-1.0\t<unk>\n", "")
    lm = ArpaNgramScorer(parse_arpa(text.splitlines()), floor_log10=-7.0)
    assert lm.log_prob([10, 11], 99) == pytest.approx(-7.0 * LN10)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda t: t.replace("ngram 2=4", "ngram 2=5"), "declares 5 2-grams"),
        (lambda t: t.replace("\\end\\", ""), "end"),
        (lambda t: t.replace("-0.5\t11 12", "-0.5\t11"), "2-gram entry"),
    ],
)
def test_malformed_arpa_fails_loudly(edit, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_arpa(edit(HAND_ARPA).splitlines())


def test_builder_unigram_matches_the_documented_formula() -> None:
    # <s> 1 1 2 </s>: counts 1:2, 2:1, </s>:1; n1=2, n2=1 -> D=0.5; N=4, 3 kinds, |V|=4.
    lm = ArpaNgramScorer(parse_arpa(build_arpa([[1, 1, 2]], order=1).splitlines()))
    uniform = 0.5 * 3 / 4 / 4
    assert math.exp(lm.log_prob([], 1)) == pytest.approx(1.5 / 4 + uniform, rel=1e-6)
    assert math.exp(lm.log_prob([], 2)) == pytest.approx(0.5 / 4 + uniform, rel=1e-6)
    assert math.exp(lm.log_prob([], 7)) == pytest.approx(uniform, rel=1e-6)  # <unk>


@pytest.mark.parametrize("order", [2, 3])
def test_built_model_distributions_sum_to_one(order: int) -> None:
    corpus = [[1, 2, 3], [1, 2, 4], [2, 3, 1, 2], [5], [4, 4, 4, 2]]
    lm = ArpaNgramScorer(parse_arpa(build_arpa(corpus, order).splitlines()), eos_id=0)
    words = [1, 2, 3, 4, 5, 0, 99]  # the corpus ids, </s> (as eos_id 0) and <unk> (as 99)
    contexts = [[-1, -1], [-1, 1], [1, 2], [2, 3], [4, 4], [3, 9], [9, 9], [0, 5]]
    for context in contexts:
        ctx = torch.tensor([context] * len(words))[:, -(order - 1) :]
        total = lm.log_probs(ctx, torch.tensor(words)).double().exp().sum()
        assert float(total) == pytest.approx(1.0, abs=1e-5), context
    # Seen continuations beat unseen ones.
    assert lm.log_prob([1, 2], 3) > lm.log_prob([1, 2], 5)


def test_build_arpa_cli_ids_and_text(tmp_path: Path) -> None:
    corpus = tmp_path / "ids.txt"
    corpus.write_text("1 2 3\n\n1 2 4\n2 3 1 2\n")
    out = tmp_path / "lm.arpa"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "dlmspec_vllm.lattice.build_arpa",
            "--order",
            "3",
            "--input",
            str(corpus),
            "--output",
            str(out),
        ],
        check=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)),
    )
    lm = ArpaNgramScorer.from_file(out)
    assert lm.order == 3 and lm.log_prob([1, 2], 3) > lm.log_prob([1, 2], 1)

    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "a": 1, "b": 2, "c": 3}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "text.txt").write_text("a b c\na b\n")
    assert (
        main(
            [
                "--format",
                "text",
                "--tokenizer",
                str(tmp_path),
                "--order",
                "2",
                "--input",
                str(tmp_path / "text.txt"),
                "--output",
                str(out),
            ]
        )
        == 0
    )
    assert ArpaNgramScorer.from_file(out).log_prob([1], 2) > math.log(0.5)
    with pytest.raises(ValueError, match="token ids"):
        main(["--input", str(tmp_path / "text.txt"), "--output", str(out)])


def test_online_scorer_matches_hand_computation() -> None:
    # Stream 1 2 1 2 3, vocab 10, D = 0.5. Unigrams: T=5, 3 kinds; bigrams after 2: (2,1), (2,3).
    lm = OnlineNgramScorer(10, order=2, tokens=[1, 2, 1, 2, 3])
    p1 = {w: (max(c - 0.5, 0) + 0.5 * 3 * 0.1) / 5 for w, c in {1: 2, 3: 1, 4: 0}.items()}
    assert math.exp(lm.log_prob([], 1)) == pytest.approx(p1[1])
    assert math.exp(lm.log_prob([2], 1)) == pytest.approx((0.5 + 0.5 * 2 * p1[1]) / 2)
    assert math.exp(lm.log_prob([2], 4)) == pytest.approx(0.5 * 2 * p1[4] / 2)
    assert math.exp(lm.log_prob([3], 4)) == pytest.approx(p1[4])  # 3 never followed
    assert math.exp(lm.log_prob([-1], 3)) == pytest.approx(p1[3])  # padding: no context
    empty = OnlineNgramScorer(10)
    assert math.exp(empty.log_prob([4, 5], 6)) == pytest.approx(0.1)


def test_online_scorer_incremental_and_normalised() -> None:
    stream = torch.randint(0, 12, (60,), generator=torch.Generator().manual_seed(0)).tolist()
    whole = OnlineNgramScorer(12, order=3, tokens=stream)
    grown = OnlineNgramScorer(12, order=3, tokens=stream[:7])
    first = grown.log_prob(stream[5:7], 3)  # tables built, then invalidated by extend
    for start in range(7, 60, 13):
        grown.extend(stream[start : start + 13])
    assert len(grown) == len(whole) == 60
    assert first != grown.log_prob(stream[5:7], 3)
    vocab = torch.arange(12)
    for context in ([stream[10], stream[11]], [-1, stream[0]], [5, 5]):
        a = whole.log_probs(torch.tensor([context] * 12), vocab)
        assert torch.equal(a, grown.log_probs(torch.tensor([context] * 12), vocab))
        assert float(a.double().exp().sum()) == pytest.approx(1.0, abs=1e-6)


def test_online_scorer_rejects_bad_ids() -> None:
    lm = OnlineNgramScorer(10)
    with pytest.raises(ValueError, match="token ids"):
        lm.extend([10])
    with pytest.raises(ValueError, match="token ids"):
        lm.log_probs(torch.tensor([[1, 2]]), torch.tensor([10]))
    with pytest.raises(ValueError, match="64-bit"):
        OnlineNgramScorer(152064, order=4)
