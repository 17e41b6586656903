"""A controlled preference task with a known reward: the DPO paper's sentiment experiment (§6.1,
Figure 2 left), scaled down to a synthetic review language a tiny model learns in a minute.

The language. A review is a prompt and a continuation of clauses:

    prompt:        "review : the plot was dull ."
    continuation:  " the plot was not very clever but the music was superb ."

A clause is `the <noun> was [not] [very] <adjective>`; clauses are joined by `and` (same
sentiment as the clause before) or `but` (the opposite), and a review ends with ` .` and eos.
Each document draws a latent polarity q ~ U(0, 1); every clause expresses positive sentiment with
probability q (negative otherwise), some adjectives are neutral, `not` flips an adjective (so
"not dull" expresses a positive view), and a clause returns to the prompt's noun with probability
0.4. A model must learn the grammar, that `but` switches sentiment, that `not` flips it, and that
the prompt's first clause predicts the rest: not a lookup table.

The ground-truth reward r(x, y) (the analogue of the paper's sentiment classifier) parses the
continuation y into clauses and averages their sentiment s ∈ {−1, 0, +1}, with `not` flipping s
and `very` doubling it; clauses about the prompt's noun weigh 2 (the review stays on topic), other
clauses 1, and text that does not parse as a clause counts as a clause of sentiment 0 (weight 1).
So r ∈ [−2, 2], r depends on the prompt (its noun), and a degenerate continuation scores 0.

Preferences: for two continuations y1, y2 of x, y1 is preferred with probability
σ((r(x, y1) − r(x, y2)) / τ) (Bradley–Terry with temperature τ = `task.bt_temperature`).
"""

from __future__ import annotations

import itertools
import math
import random
import re
from dataclasses import dataclass

NOUNS = ["film", "plot", "acting", "music", "ending", "cast", "script", "scenery"]
POSITIVE = ["great", "superb", "moving", "clever", "charming", "brilliant", "fresh", "gripping"]
NEGATIVE = ["dull", "awful", "clumsy", "boring", "bland", "messy", "weak", "tedious"]
NEUTRAL = ["long", "loud", "short", "quiet"]
SENTIMENT = {**{a: 1 for a in POSITIVE}, **{a: -1 for a in NEGATIVE}, **{a: 0 for a in NEUTRAL}}

CLAUSE = re.compile(r"^the (\w+) was (not )?(very )?(\w+)$")


@dataclass(frozen=True)
class Review:
    prompt: str  # "review : the plot was dull ."
    continuation: str  # " the plot was ... ." (starts with a space, no eos)
    noun: str  # the prompt's noun


def _clause(rng: random.Random, noun: str, positive: bool) -> tuple[str, int]:
    """One clause expressing the wanted sentiment (or a neutral one); returns (text, sentiment)."""
    if rng.random() < 0.15:
        adj, negate, effective = rng.choice(NEUTRAL), False, 0
    else:
        negate = rng.random() < 0.2
        # "not <negative>" expresses a positive view and vice versa.
        pool = NEGATIVE if positive == negate else POSITIVE
        adj, effective = rng.choice(pool), 1 if positive else -1
    very = "very " if rng.random() < 0.2 else ""
    return f"the {noun} was {'not ' if negate else ''}{very}{adj}", effective


def generate_review(rng: random.Random) -> Review:
    """One review from the generative process described in the module docstring."""
    q = rng.random()
    noun = rng.choice(NOUNS)
    first, prev = _clause(rng, noun, rng.random() < q)
    parts = []
    for _ in range(rng.choice([2, 3, 4])):
        positive = rng.random() < q
        n = noun if rng.random() < 0.4 else rng.choice(NOUNS)
        text, s = _clause(rng, n, positive)
        if parts:
            joiner = "but" if (s != 0 and prev != 0 and s != prev) else "and"
            text = f"{joiner} {text}"
        parts.append(text)
        prev = s if s != 0 else prev
    return Review(prompt=f"review : {first} .", continuation=" " + " ".join(parts) + " .", noun=noun)


def generate_reviews(n: int, seed: int | str) -> list[Review]:
    rng = random.Random(seed)
    return [generate_review(rng) for _ in range(n)]


def prompt_splits(seed: int, n_train: int, n_val: int, n_eval: int) -> dict[str, list[str]]:
    """Train, validation and eval prompts, each from its own random stream: a split's prompts do
    not depend on the other splits' sizes, and n training prompts are the first n of any larger
    set (a data-scaling axis compares nested training sets on the same held-out prompts)."""
    return {name: [r.prompt for r in generate_reviews(n, f"{seed}/{name}-prompts")]
            for name, n in (("train", n_train), ("validation", n_val), ("eval", n_eval))}


def prompt_noun(prompt: str) -> str | None:
    m = re.match(r"^review : the (\w+) was", prompt)
    return m.group(1) if m else None


def _pieces(continuation: str, keep_empty: bool = False) -> list[str]:
    """The clause-sized pieces of a continuation: split at `and` / `but`, final ` .` removed."""
    text = continuation.strip()
    if text.endswith("."):
        text = text[:-1]
    return [p for p in (p.strip() for p in re.split(r"\b(?:and|but)\b", text)) if p or keep_empty]


def _clause_match(piece: str) -> re.Match | None:
    m = CLAUSE.match(piece)
    return m if m is not None and m.group(4) in SENTIMENT and m.group(1) in NOUNS else None


def reward(prompt: str, continuation: str) -> float:
    """Ground-truth reward r(x, y) ∈ [−2, 2] (module docstring). Deterministic and exact."""
    noun = prompt_noun(prompt)
    pieces = _pieces(continuation)
    if not pieces:
        return 0.0
    total = weight = 0.0
    for piece in pieces:
        m = _clause_match(piece)
        if m is None:
            weight += 1.0  # unparseable text: a clause of sentiment 0
            continue
        s = SENTIMENT[m.group(4)] * (-1 if m.group(2) else 1) * (2 if m.group(3) else 1)
        w = 2.0 if m.group(1) == noun else 1.0
        total += w * s
        weight += w
    return total / weight


def parses(prompt: str, continuation: str) -> bool:
    """Whether a continuation is a well-formed review ending: at least one clause, every piece a
    clause of the language, and the closing ` .`. A policy whose samples stop parsing has left
    the language (degenerated) even where its reward, which scores such text 0, hides it."""
    pieces = _pieces(continuation, keep_empty=True)
    return (continuation.strip().endswith(".") and any(pieces)
            and all(_clause_match(p) is not None for p in pieces))


def bradley_terry_pairs(
    prompt: str, continuations: list[str], temperature: float, rng: random.Random
) -> list[tuple[str, str, float, float]]:
    """All pairs of distinct continuations (4 samples → 6 pairs, as the paper), each labelled by a
    Bradley–Terry draw: y_i preferred with probability σ((r_i − r_j)/τ).
    Returns (chosen, rejected, r_chosen, r_rejected)."""
    rewards = [reward(prompt, c) for c in continuations]
    out = []
    for i, j in itertools.combinations(range(len(continuations)), 2):
        if continuations[i] == continuations[j]:
            continue
        p_i = 1.0 / (1.0 + math.exp(-(rewards[i] - rewards[j]) / temperature))
        if rng.random() < p_i:
            out.append((continuations[i], continuations[j], rewards[i], rewards[j]))
        else:
            out.append((continuations[j], continuations[i], rewards[j], rewards[i]))
    return out


def build_pairs(model, tokenizer, prompts: list[str], samples_per_prompt: int, temperature: float,
                max_new_tokens: int, seed: int, device) -> list[dict]:
    """Preference pairs from the model's own samples, labelled under Bradley–Terry by the true
    reward: dicts with prompt, chosen, rejected, r_chosen, r_rejected."""
    from harness.generate import sample

    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    repeated = [x for x in ids for _ in range(samples_per_prompt)]
    outs = []
    for s in range(0, len(repeated), 256):
        outs += sample(model, repeated[s:s + 256], max_new_tokens, eos, pad, seed + s, device)
    texts = [tokenizer.decode([t for t in o if t != eos]) for o in outs]
    rng = random.Random(seed)
    pairs = []
    for k, prompt in enumerate(prompts):
        conts = texts[k * samples_per_prompt:(k + 1) * samples_per_prompt]
        for c, r, rc, rr in bradley_terry_pairs(prompt, conts, temperature, rng):
            pairs.append({"prompt": prompt, "chosen": c, "rejected": r, "r_chosen": rc, "r_rejected": rr})
    return pairs
