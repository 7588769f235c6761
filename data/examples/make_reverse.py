"""Write ``reverse_words.jsonl``: a small synthetic instruction set, "reverse these words".

Each example asks for a list of 2-6 common words in reverse order; the answer is the same words,
last first. Three in four lines are ``{"prompt", "response"}``, the rest ``{"messages": [...]}``
(some with a system turn), so both instruct formats are exercised. Seeded: the output is the same
on every run. ``python data/examples/make_reverse.py [OUT] [N]``.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

WORDS = (
    "apple river stone cloud green music paper light house water tiger table window orange sugar "
    "silver garden yellow pencil bridge candle forest winter summer rabbit dragon castle rocket "
    "planet ocean mirror coffee bottle flower monkey guitar basket lemon purple wagon island"
).split()
PROMPTS = ("Reverse these words: {}", "Reverse the order of these words: {}", "Write these words backwards: {}")
SYSTEM = "You reverse lists of words. Answer with the words only."


def example(rng: random.Random) -> dict:
    words = rng.sample(WORDS, rng.randint(2, 6))
    prompt = rng.choice(PROMPTS).format(" ".join(words))
    response = " ".join(reversed(words))
    if rng.random() < 0.75:
        return {"prompt": prompt, "response": response}
    turns = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.5 else []
    return {"messages": [*turns, {"role": "user", "content": prompt}, {"role": "assistant", "content": response}]}


def main(out: Path, n: int = 400, seed: int = 0) -> Path:
    rng = random.Random(seed)
    out.write_text("".join(json.dumps(example(rng)) + "\n" for _ in range(n)), encoding="utf-8")
    return out


if __name__ == "__main__":
    target = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).with_name("reverse_words.jsonl")
    print(main(target, int(sys.argv[2]) if len(sys.argv) > 2 else 400))
