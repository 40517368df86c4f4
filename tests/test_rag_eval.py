"""The RAG evaluation's generator and paired statistics (bench/rag_eval.py, issue #18)."""

import importlib.util
import math
from pathlib import Path

import pytest

spec = importlib.util.spec_from_file_location("rag_eval", Path(__file__).parent.parent / "bench" / "rag_eval.py")
rag_eval = importlib.util.module_from_spec(spec)
spec.loader.exec_module(rag_eval)


def test_samples_are_reproducible_varied_and_answerable():
    samples = rag_eval.generate(36, seed=7, min_tokens=1000, max_tokens=8000)
    assert samples == rag_eval.generate(36, seed=7, min_tokens=1000, max_tokens=8000)
    assert samples != rag_eval.generate(36, seed=8, min_tokens=1000, max_tokens=8000)
    assert {s["type"] for s in samples} == set(rag_eval.TYPES)
    assert all(2 <= len(s["documents"]) <= 10 for s in samples)
    assert all(700 <= s["tokens_est"] <= 8000 * 1.4 for s in samples)  # about the range: filler ends on a whole line
    layouts = {d.split("\n")[0].split()[0] for s in samples for d in s["documents"]}
    assert {"Prose", "Records", "Table", "Dialogue", "Code", "List"} <= layouts
    for s in samples:
        assert any(s["answer"] in d for d in s["documents"]), s["question"]  # the answer is in the documents
        if s["type"] in ("fact", "first_doc", "last_doc"):  # where the planted sentence answering it is
            subject = s["question"].split(" of ", 1)[1].rstrip("?")
            holding = [i for i, d in enumerate(s["documents"]) if f"{subject} is {s['answer']}." in d]
            assert len(holding) == 1
        if s["type"] == "first_doc":
            assert holding == [0]
        if s["type"] == "last_doc":
            assert holding == [len(s["documents"]) - 1]
        # 1-2 same-shaped distractors, recorded: the answer's kind of sentence for other people, each in
        # another document than the answer's.
        assert 1 <= s["distractors"] <= min(2, len(s["documents"]) - 1)
        shape = {"passkey": "The pass key of ", "multihop": " depot is in the city of ", "which_doc": " states that "}
        marker = shape.get(s["type"], "The " + s["question"].split("the ", 1)[1].split(" of ")[0] + " of ")
        assert sum(d.lower().count(marker.lower()) for d in s["documents"]) == s["distractors"] + 1, s["question"]
        # The person asked about is named only where the facts were planted, not in the filler.
        subject = next(p for p in (f"{f} {la}" for f in rag_eval.FIRST for la in rag_eval.LAST) if p in s["question"])
        assert sum(d.count(subject) for d in s["documents"]) == 1
        assert s["cue"] and s["answer"] not in s["cue"] and s["answer"] not in s["question"]
    with pytest.raises(ValueError, match="min_tokens"):
        rag_eval.generate(2, seed=0, min_tokens=500, max_tokens=100)


def test_paired_statistics():
    a = [True] * 10 + [False] * 10
    assert rag_eval.mcnemar_p(a, a) == 1.0
    b = [False] * 10 + [False] * 10  # b loses 10 samples a got right, wins none
    assert rag_eval.mcnemar_p(a, b) == pytest.approx(2 / 2**10)
    c = [True] * 8 + [False] * 2 + [True] * 2 + [False] * 8  # 2 lost, 2 won: no evidence
    assert rag_eval.mcnemar_p(a, c) == 1.0
    vs = rag_eval.paired(a, b)
    assert vs["diff"] == -0.5 and vs["low"] <= -0.5 <= vs["high"] <= 0 and vs["n"] == 20
    same = rag_eval.paired(a, c)
    assert same["diff"] == 0 and same["low"] < 0 < same["high"]
    assert math.isclose(rag_eval.mcnemar_p([True], [False]), 1.0)
    with pytest.raises(ValueError, match="equal"):
        rag_eval.paired([True], [True, False])


def test_an_answer_counts_only_as_a_word_on_the_first_line():
    assert rag_eval.correct("teal", " teal.\nQuestion: what else?")
    assert rag_eval.correct("Islow", "\n  The city of ISLOW, near the sea")
    assert not rag_eval.correct("teal", " amber.\nAnswer: teal")  # a second guess on a later line
    assert not rag_eval.correct("A3", " A37.")  # inside another token
    assert not rag_eval.correct("awl", " crawler")
    assert not rag_eval.correct("awl", "   \n")
