"""A game of your own for archer.py: find a number from 1 to 32; the game answers higher or lower.

    python archer.py --env examples.number_game:NumberGame --out runs/number
"""
import random


class NumberGame:
    def __init__(self, seed=0, high=32, max_turns=8):
        self.rng, self.high, self.max_turns = random.Random(seed), high, max_turns
        self.secrets = list(range(1, high + 1))  # optional: the fixed evaluation set, every number once

    def reset(self, secret=None):
        self.secret = secret if secret is not None else self.rng.choice(self.secrets)
        self.lo, self.hi, self.turn, self.won = 1, self.high, 0, False
        self.state = f"Find my number from 1 to {self.high}.\n"
        return self.state

    def step(self, utterance):
        guess = int(utterance) if utterance.strip().isdigit() else None
        if guess is None:
            answer = "not a number"
        elif guess == self.secret:
            answer, self.won = "correct", True
        elif guess < self.secret:
            answer, self.lo = "higher", max(self.lo, guess + 1)
        else:
            answer, self.hi = "lower", min(self.hi, guess - 1)
        self.turn += 1
        self.state += f"{utterance.strip()} {answer}\n"
        return self.state, 0.0 if self.won else -1.0, self.won or self.turn >= self.max_turns

    def demonstrator(self, rng):  # optional: a sloppy bisection, cloned before RL starts
        return str(rng.randint(self.lo, self.hi) if rng.random() < 0.8 else (self.lo + self.hi) // 2)

    def corpus(self):  # optional: the game's text, so the built-in tiny model reads "17 higher" as one token
        lines = [f"{n}" for n in self.secrets] + [f"{n} {a}" for n in self.secrets for a in ("higher", "lower", "correct")]
        return [self.reset()] + [line + "\n" for line in lines]
