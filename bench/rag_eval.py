"""A varied RAG evaluation for CacheBlend (issue #18): samples generated from a fixed seed, and paired statistics.

    python bench/rag_eval.py [--samples 120] [--seed 18] [--min-tokens 1000] [--max-tokens 8000] \\
        [--out bench/results/rag_eval.jsonl]
    python bench/blend.py --jsonl bench/results/rag_eval.jsonl

Nothing here comes from the package or the stdlib's pydoc text (the built-in samples' filler): documents are
synthetic, from word lists and templates in six layouts (prose, records, tables, dialogues, code-like text,
lists), 2-10 per sample, about `--min-tokens`..`--max-tokens` tokens in all (estimated at 2.4 tokens a word; measured 1.8-3.1 by layout).
Question types (`type`): pass key; single fact; two-hop (a person's site, the site's city, in two documents);
"which document says X" (the answer is a report's code name); a fact placed in the first or in the last
document. Every sample plants distractors that share the answer's vocabulary: the same attribute or pass-key
sentence for other people, other sites in other cities, other reports stating the same kind of fact.

Each line: {"documents": [...], "question": "...", "answer": "...", "type": "...", "tokens_est": N}.

`paired(a, b)` compares two methods' per-sample correctness on the same samples: the accuracy difference with a
paired bootstrap 95% interval and the exact McNemar p-value (discordant pairs only).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
from pathlib import Path

TOKENS_PER_WORD = 2.4  # Gemma 3 tokens per word here, measured 1.8-3.1 (tables, dates and code split finely)
TYPES = ("passkey", "fact", "multihop", "which_doc", "first_doc", "last_doc")

FIRST = [
    "Ada",
    "Bram",
    "Cora",
    "Dov",
    "Elin",
    "Faro",
    "Gus",
    "Hale",
    "Iris",
    "Jory",
    "Kael",
    "Lume",
    "Mira",
    "Nils",
    "Orla",
    "Pell",
    "Quin",
    "Rhea",
    "Sune",
    "Tove",
    "Ulla",
    "Vik",
    "Wren",
    "Yusa",
    "Zev",
]
LAST = [
    "Ambry",
    "Brisk",
    "Colter",
    "Dunn",
    "Eskel",
    "Fairn",
    "Gorse",
    "Hollin",
    "Isard",
    "Jessop",
    "Kettle",
    "Lorne",
    "Marsh",
    "Norring",
    "Oakes",
    "Pryde",
    "Quarry",
    "Rusk",
    "Sallow",
    "Thorne",
    "Umber",
    "Vance",
    "Wick",
    "Yarrow",
]
CITIES = [
    "Brannock",
    "Cindral",
    "Dovemoor",
    "Elsket",
    "Farrowby",
    "Glenmire",
    "Harthorn",
    "Islow",
    "Jarnwick",
    "Kestrel",
    "Lowdun",
    "Morrow",
    "Netherby",
    "Ostwick",
    "Pellam",
    "Quarlton",
    "Rivenby",
    "Salcombe",
    "Tarnow",
    "Umberly",
    "Vantry",
    "Wexmoor",
]
SITES = [
    "Ashgate",
    "Beacon",
    "Copperline",
    "Driftwood",
    "Emberfield",
    "Flintrock",
    "Greyhaven",
    "Hollowmere",
    "Ironbridge",
    "Juniper",
    "Kingsreach",
    "Larkspur",
    "Millbrook",
    "Northfold",
    "Oakhurst",
    "Pinecrest",
    "Ravensworth",
    "Silverdale",
    "Thornbury",
    "Westerly",
]
CODES = [
    "Amber",
    "Basalt",
    "Cobalt",
    "Dahlia",
    "Ember",
    "Falcon",
    "Garnet",
    "Heron",
    "Indigo",
    "Jasper",
    "Kestrel",
    "Lotus",
    "Magpie",
    "Nimbus",
    "Onyx",
    "Pewter",
    "Quartz",
    "Raven",
    "Saffron",
    "Topaz",
    "Umbra",
    "Viola",
    "Willow",
    "Zephyr",
]
ATTRS = {
    "badge colour": ["crimson", "teal", "amber", "violet", "ochre", "slate", "jade", "ivory", "copper", "cobalt"],
    "locker number": [str(n) for n in range(112, 990, 37)],
    "favourite tool": ["chisel", "lathe", "wrench", "caliper", "trowel", "plane", "awl", "mallet", "spanner", "rasp"],
    "shift day": ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"],
    "parking bay": [f"{c}{n}" for c in "ABCDEFG" for n in (3, 7, 12)],
}
NOUNS = [
    "ledger",
    "harbour",
    "valve",
    "shipment",
    "survey",
    "budget",
    "orchard",
    "turbine",
    "archive",
    "schedule",
    "corridor",
    "sample",
    "filter",
    "quarry",
    "meadow",
    "engine",
    "contract",
    "lantern",
    "bridge",
    "pipeline",
]
VERBS = [
    "inspected",
    "delayed",
    "approved",
    "moved",
    "repaired",
    "counted",
    "reviewed",
    "stored",
    "measured",
    "replaced",
    "logged",
    "cleared",
    "sealed",
    "shipped",
    "checked",
]
ADJS = [
    "quiet",
    "northern",
    "damp",
    "routine",
    "minor",
    "careful",
    "late",
    "spare",
    "narrow",
    "heavy",
    "early",
    "steady",
    "faint",
    "broad",
    "local",
]
ITEMS = [
    "bolts",
    "crates",
    "cables",
    "lamps",
    "gauges",
    "ropes",
    "barrels",
    "panels",
    "hinges",
    "filters",
    "valves",
    "tiles",
    "sacks",
    "drums",
    "coils",
]
FUNCS = ["load", "parse", "merge", "sort", "flush", "render", "check", "scale", "route", "index", "fetch", "encode"]


# Filler mentions staff from other name lists than the people questions ask about: a question's person then
# appears only in planted sentences (answer or same-shaped distractor), not in hundreds of filler lines too.
STAFF_FIRST = ["Abe", "Bea", "Cal", "Dee", "Eli", "Fay", "Gil", "Hana", "Ivo", "Jun", "Kit", "Lou", "Max", "Noa"]
STAFF_LAST = ["Abbot", "Birch", "Crane", "Drake", "Ellery", "Frost", "Grove", "Hart", "Irwin", "Judd", "Keel", "Lyle"]


def person(rng: random.Random) -> str:
    return f"{rng.choice(STAFF_FIRST)} {rng.choice(STAFF_LAST)}"


# -- filler in six layouts: each returns about `words` words --------------------------------------------------
def _lines(words, line, per_word: int = 1) -> list[str]:
    """Lines from `line()` until they hold `words` words (`per_word`: words of a line that count as one)."""
    out, n = [], 0
    while n < words:
        s = line()
        out.append(s)
        n += len(s.split()) // per_word
    return out


def prose(rng, words):
    return " ".join(
        _lines(
            words,
            lambda: (
                f"The {rng.choice(ADJS)} {rng.choice(NOUNS)} near {rng.choice(CITIES)} was {rng.choice(VERBS)} by "
                f"{person(rng)} after the {rng.choice(NOUNS)} had been {rng.choice(VERBS)} twice."
            ),
        )
    )


def records(rng, words):
    return "\n".join(
        _lines(
            words,
            lambda: (
                f"Record {rng.randrange(1000, 9999)}: name={person(rng)}; site={rng.choice(SITES)}; "
                f"item={rng.choice(ITEMS)}; qty={rng.randrange(1, 500)}; status={rng.choice(VERBS)}."
            ),
        )
    )


def table(rng, words):
    header = ["| date | site | item | count | checked by |", "| --- | --- | --- | --- | --- |"]
    rows = _lines(
        words,
        lambda: (
            f"| 20{rng.randrange(10, 30)}-{rng.randrange(1, 13):02d}-{rng.randrange(1, 29):02d} | {rng.choice(SITES)} "
            f"| {rng.choice(ITEMS)} | {rng.randrange(1, 900)} | {person(rng)} |"
        ),
        per_word=2,
    )
    return "\n".join(header + rows)


def dialogue(rng, words):
    a, b = person(rng), person(rng)
    return "\n".join(
        _lines(
            words,
            lambda: rng.choice(
                [
                    f"{a}: Did anyone check the {rng.choice(ITEMS)} at {rng.choice(SITES)}?",
                    f"{b}: Yes, {rng.randrange(2, 60)} of them were {rng.choice(VERBS)} on the {rng.choice(ADJS)} shift.",
                    f"{a}: And the {rng.choice(NOUNS)}? It looked {rng.choice(ADJS)} yesterday.",
                    f"{b}: It was {rng.choice(VERBS)}; {person(rng)} signed for it in {rng.choice(CITIES)}.",
                ]
            ),
        )
    )


def code(rng, words):
    def function():
        f, item = rng.choice(FUNCS), rng.choice(ITEMS)
        return (
            f"def {f}_{item}(batch, limit={rng.randrange(4, 256)}):\n"
            f"    # {rng.choice(VERBS)} {item} from {rng.choice(SITES).lower()}\n"
            f"    return [x for x in batch if x.{rng.choice(NOUNS)} < limit]\n"
        )

    return "\n".join(_lines(words, function))


def listing(rng, words):
    return "\n".join(
        _lines(
            words,
            lambda: (
                f"- {rng.randrange(1, 90)} {rng.choice(ITEMS)} {rng.choice(VERBS)} at {rng.choice(SITES)} "
                f"({rng.choice(ADJS)})"
            ),
        )
    )


LAYOUTS = {"prose": prose, "records": records, "table": table, "dialogue": dialogue, "code": code, "list": listing}
WRAP = {  # a planted sentence as each layout would hold it
    "prose": lambda s: s,
    "records": lambda s: f"Note: {s}",
    "table": lambda s: f"| note | {s} |",
    "dialogue": lambda s: f"{person(random.Random(len(s)))}: For the record: {s}",
    "code": lambda s: f"# {s}",
    "list": lambda s: f"- {s}",
}


def document(rng: random.Random, words: int, planted: list[str], title: str | None = None) -> str:
    """A document of one random layout, `words` words, with `planted` sentences at random places."""
    layout = rng.choice(list(LAYOUTS))
    lines = LAYOUTS[layout](rng, words).split("\n")
    parts = lines if len(lines) > 1 else lines[0].split(". ")
    joiner = "\n" if len(lines) > 1 else ". "
    for s in planted:
        parts.insert(rng.randrange(len(parts) + 1), WRAP[layout](s))
    head = f"Report {title}.\n" if title else f"{layout.capitalize()} from {rng.choice(SITES)}.\n"
    return head + joiner.join(parts)


def sample(rng: random.Random, kind: str, min_tokens: int, max_tokens: int) -> dict:
    n_docs = rng.randint(2, 10)
    # Same-shaped distractors (the answer's sentence for other people / sites / reports): 1-2 per sample,
    # recorded. With one in every document (up to 9) and filler naming people from the same lists, the 270M
    # default model got the fact, two-hop and which-document questions wrong under full prefill (first run).
    distractors = rng.randint(1, min(2, n_docs - 1))
    total_words = int(math.exp(rng.uniform(math.log(min_tokens), math.log(max_tokens))) / TOKENS_PER_WORD)
    per_doc = max(40, total_words // n_docs)
    planted: list[list[str]] = [[] for _ in range(n_docs)]
    people = rng.sample([f"{f} {la}" for f in FIRST for la in LAST], 2 * n_docs + 2)
    titles = None
    t = {"first_doc": 0, "last_doc": n_docs - 1}.get(kind, rng.randrange(n_docs))
    others = rng.sample([d for d in range(n_docs) if d != t], distractors)  # the distractors' documents
    if kind == "passkey":
        keys = rng.sample(range(10000, 99999), n_docs)
        for d in [t, *others]:  # the same sentence for other people: one is asked for
            planted[d].append(f"The pass key of {people[d]} is {keys[d]}.")
        q, a = f"What is the pass key of {people[t]}?", str(keys[t])
        cue = f"The pass key of {people[t]} is"
    elif kind in ("fact", "first_doc", "last_doc"):
        attr = rng.choice(list(ATTRS))
        values = rng.sample(ATTRS[attr], distractors + 1)  # distinct: no distractor states the answer
        for d, value in zip([t, *others], values, strict=True):
            planted[d].append(f"The {attr} of {people[d]} is {value}.")
        q, a = f"What is the {attr} of {people[t]}?", values[0]
        cue = f"The {attr} of {people[t]} is"
    elif kind == "multihop":
        sites, cities = rng.sample(SITES, distractors + 1), rng.sample(CITIES, distractors + 1)
        for k, d in enumerate([t, *others]):  # the hop's second half in another document
            there = rng.choice([e for e in range(n_docs) if e != d])
            planted[d].append(f"{people[d]} works at the {sites[k]} depot.")
            planted[there].append(f"The {sites[k]} depot is in the city of {cities[k]}.")
        q, a = f"In which city is the depot where {people[t]} works?", cities[0]
        cue = f"The depot where {people[t]} works is in the city of"
    elif kind == "which_doc":
        titles = rng.sample(CODES, n_docs)
        attr = rng.choice(list(ATTRS))
        values = rng.sample(ATTRS[attr], distractors + 1)
        for d, value in zip([t, *others], values, strict=True):  # other reports state the same kind of fact
            planted[d].append(f"Report {titles[d]} states that the {attr} of {people[d]} is {value}.")
        q = f"Which report states that the {attr} of {people[t]} is {values[0]}? Give the report name."
        a, cue = titles[t], "The report name is"
    else:
        raise ValueError(f"unknown question type {kind!r}; known: {', '.join(TYPES)}")
    docs = [document(rng, per_doc, planted[d], titles[d] if titles else None) for d in range(n_docs)]
    words = sum(len(d.split()) for d in docs)
    return {
        "documents": docs,
        "question": q,
        "cue": cue,  # how the answer starts (the prompt ends with it): a small base model completes it
        "answer": a,
        "type": kind,
        "distractors": distractors,
        "answer_document": t,
        "tokens_est": int(words * TOKENS_PER_WORD),
    }


def correct(answer: str, output: str) -> bool:
    """The expected answer as a whole word in the first non-empty line of the output (case-insensitive): a
    one-word answer may be restated in a sentence ("The badge colour of X is teal."), but an output listing
    several candidates over lines, or the answer inside another word, does not count."""
    lines = [line for line in output.strip().splitlines() if line.strip()]
    return bool(lines) and re.search(rf"(?<!\w){re.escape(answer)}(?!\w)", lines[0], re.IGNORECASE) is not None


def generate(n: int, seed: int, min_tokens: int, max_tokens: int) -> list[dict]:
    if not 0 < min_tokens <= max_tokens:
        raise ValueError(f"need 0 < min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")
    rng = random.Random(seed)
    return [sample(rng, TYPES[i % len(TYPES)], min_tokens, max_tokens) for i in range(n)]


# -- paired statistics ------------------------------------------------------------------------------------------
def mcnemar_p(a: list[bool], b: list[bool]) -> float:
    """Exact two-sided McNemar test: only the samples where the two methods disagree count."""
    only_a = sum(x and not y for x, y in zip(a, b, strict=True))
    only_b = sum(y and not x for x, y in zip(a, b, strict=True))
    n = only_a + only_b
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, k) for k in range(min(only_a, only_b) + 1)) / 2**n
    return min(1.0, 2 * tail)


def paired(a: list[bool], b: list[bool], *, rounds: int = 2000, seed: int = 0) -> dict:
    """Accuracy of b minus a on the same samples, its paired bootstrap 95% interval, McNemar's p."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired statistics need two equal, non-empty lists, got {len(a)} and {len(b)}")
    n, rng = len(a), random.Random(seed)
    diffs = [int(y) - int(x) for x, y in zip(a, b, strict=True)]
    boot = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(rounds))
    return {
        "diff": sum(diffs) / n,
        "low": boot[int(0.025 * rounds)],
        "high": boot[int(0.975 * rounds) - 1],
        "p_mcnemar": mcnemar_p(a, b),
        "n": n,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--samples", type=int, default=120)
    ap.add_argument("--seed", type=int, default=18)
    ap.add_argument("--min-tokens", type=int, default=1000)
    ap.add_argument("--max-tokens", type=int, default=8000)
    ap.add_argument("--out", default="bench/results/rag_eval.jsonl")
    args = ap.parse_args()
    samples = generate(args.samples, args.seed, args.min_tokens, args.max_tokens)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(s) + "\n" for s in samples))
    print(f"{len(samples)} samples -> {out}")


if __name__ == "__main__":
    main()
