"""The demo adapters' data and metrics: user questions from templates x topics, the base answers cut to a
sentence or two and turned into each adapter's format, and the format metrics the eval reports
(used by `adapters.demo.train`)."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from typing import Any

# ----------------------------------------------------------------------------------------------------------
# Questions

COUNTRIES = ["France", "Japan", "Italy", "Canada", "Egypt", "Brazil", "Germany", "Spain", "Australia", "India",
             "Kenya", "Mexico", "Norway", "Peru", "China", "Greece", "Argentina", "Sweden", "Turkey", "Vietnam",
             "Portugal", "Chile", "Ireland", "Morocco"]
CONCEPTS = ["photosynthesis", "gravity", "a volcano", "democracy", "an atom", "inflation", "a noun",
            "a prime number", "the internet", "a rainbow", "evaporation", "a galaxy", "DNA", "an ecosystem",
            "a computer program", "a metaphor", "friction", "a battery", "climate change", "an algorithm",
            "a verb", "electricity", "a planet", "a cloud", "a vaccine", "an earthquake", "a budget",
            "a fraction", "magnetism", "a glacier", "recycling", "a tide", "an election", "a poem", "a molecule",
            "a password", "a museum", "a habit", "the moon", "an island"]
TASKS = ["boil an egg", "make a cup of tea", "tie a shoelace", "plant a tree", "save money",
         "learn a new language", "fall asleep faster", "write a good email", "stay focused while studying",
         "make new friends", "clean a window", "start running", "cook rice", "reduce stress", "bake bread",
         "prepare for an interview", "take care of a houseplant", "drink more water", "organize my desk",
         "learn to swim", "remember names", "wake up early"]
ANIMALS = ["cats", "dogs", "elephants", "dolphins", "owls", "bees", "penguins", "octopuses", "horses", "frogs",
           "lions", "whales", "ants", "eagles", "rabbits", "turtles"]
GREETINGS = ["Hi!", "Hello!", "Good morning!", "Hey there, how are you?", "Hello, who are you?",
             "Thanks for your help!", "Good night!", "Nice to meet you.", "What's up?", "How is your day going?",
             "Can you help me?", "Goodbye!", "Good evening!", "Thank you so much!", "Hey!", "See you later!"]
MISC = ["Why is the sky blue?", "What is your favorite color?", "Can you recommend a good book?",
        "Tell me a joke.", "What day comes after Monday?", "How many days are in a week?",
        "What is the opposite of hot?", "How do you say hello in Spanish?", "What is the largest ocean?",
        "How many legs does a spider have?", "What is the boiling point of water?", "Who painted the Mona Lisa?",
        "What is the tallest mountain in the world?", "How many continents are there?",
        "Why do leaves change color in autumn?", "What is the speed of light?", "What is the largest planet?",
        "Why do we dream?", "What is the color of grass?", "How many hours are in a day?",
        "Who wrote Romeo and Juliet?", "What is the freezing point of water?", "Why do birds migrate?",
        "What is the smallest prime number?"]


def make_questions(n: int, rng: random.Random) -> list[str]:
    """~n distinct user questions from templates x topics, in a seeded random order."""
    qs: list[str] = []
    for c in COUNTRIES:
        qs += [f"What is the capital of {c}?", f"What language is spoken in {c}?", f"Tell me one fact about {c}."]
    for x in CONCEPTS:
        qs += [f"What is {x}?", f"Define {x}.", f"Explain {x} in simple terms.", f"Why is {x} important?"]
    for t in TASKS:
        qs += [f"How do I {t}?", f"What is a quick tip to {t}?", f"What should I avoid when I {t}?"]
    for a in ANIMALS:
        qs += [f"Tell me a fun fact about {a}.", f"What do {a} eat?", f"Where do {a} live?"]
    for _ in range(40):
        a, b = rng.randint(2, 60), rng.randint(2, 40)
        qs.append(rng.choice([f"What is {a} plus {b}?", f"What is {a} times {b}?",
                              f"What is {max(a, b)} minus {min(a, b)}?",
                              f"If I have {max(a, b)} apples and eat {min(a, b)}, how many are left?"]))
    qs += GREETINGS + MISC
    qs = list(dict.fromkeys(qs))  # the arithmetic draws may repeat
    rng.shuffle(qs)
    return qs[:n]


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def shorten(answer: str, finished: bool, max_chars: int = 120) -> str | None:
    """The first sentence or two of a base answer, or None when nothing complete and usable is left.

    Short targets keep training sequences (and so step time) small, and the format is what is learned.
    """
    text = answer.strip().split("\n\n")[0].strip()
    if not finished and text == answer.strip():
        # Cut by the token budget: the last sentence is incomplete, keep only whole ones.
        parts = _SENTENCE_END.split(text)
        text = " ".join(parts[:-1]) if len(parts) > 1 else ""
    sentences = _SENTENCE_END.split(text)
    kept = sentences[0]
    for s in sentences[1:]:
        if len(kept) + 1 + len(s) > max_chars:
            break
        kept += " " + s
    kept = kept.strip()
    if not kept or len(kept) > 2 * max_chars or kept.endswith(":"):
        return None  # empty, one endless sentence, or a list header with its list cut off
    return kept


def transform(name: str, answer: str) -> str:
    if name == "allcaps":
        return answer.upper()
    if name == "json":
        # ensure_ascii=False: non-ASCII stays as the model's ordinary tokens instead of \uXXXX escapes.
        return json.dumps({"answer": answer}, ensure_ascii=False)
    raise ValueError(name)


# ----------------------------------------------------------------------------------------------------------
# Metrics

def upper_fraction(text: str) -> float:
    """Upper-case letters among cased letters; 1.0 when there are none (e.g. "42")."""
    cased = [c for c in text if c.isupper() or c.islower()]
    return sum(c.isupper() for c in cased) / len(cased) if cased else 1.0


def is_answer_json(text: str) -> bool:
    try:
        obj = json.loads(text)
    except ValueError:
        return False
    return isinstance(obj, dict) and list(obj) == ["answer"] and isinstance(obj["answer"], str)


def word_f1(text: str, reference: str) -> float:
    """Bag-of-words F1, case-insensitive: how much of the base answer's content survived the format change."""
    a, b = Counter(_WORD.findall(text.lower())), Counter(_WORD.findall(reference.lower()))
    common = sum((a & b).values())
    if not common:
        return 0.0
    p, r = common / sum(a.values()), common / sum(b.values())
    return 2 * p * r / (p + r)


_WORD = re.compile(r"[a-z0-9']+")


def score(name: str, outputs: list[str], references: list[str]) -> dict[str, Any]:
    """The format metric (the pass/fail target) and, for information, content overlap with the base answers."""
    if name == "allcaps":
        fr = [upper_fraction(o) for o in outputs]
        res: dict[str, Any] = {
            "metric": "upper-case letters / letters, per answer (target >= 0.9 on each)",
            "min_upper_fraction": round(min(fr), 4), "mean_upper_fraction": round(sum(fr) / len(fr), 4),
            "answers_at_least_0.9": round(sum(f >= 0.9 for f in fr) / len(fr), 4),
            "passed": all(f >= 0.9 for f in fr)}
        texts = outputs
    else:
        ok = [is_answer_json(o) for o in outputs]
        rate = sum(ok) / len(ok)
        res = {"metric": 'answers that json.loads to a dict with exactly the key "answer" (target >= 0.9)',
               "valid_json_fraction": round(rate, 4), "passed": rate >= 0.9}
        texts = [json.loads(o)["answer"] if v else o for o, v in zip(outputs, ok, strict=True)]
    f1 = [word_f1(t, r) for t, r in zip(texts, references, strict=True)]
    res["mean_word_f1_vs_base_answer"] = round(sum(f1) / len(f1), 4)
    return res
