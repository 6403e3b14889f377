"""Text games for ArCHer with rule-based oracles: no model download, no GPU, microseconds a step.

  twentyq         Twenty Questions on the 157 objects of the original game (LMRL-Gym / ArCHer)
  twentyq_subset  the same game on 10 objects (the paper's sample-efficiency setting)
  guess_my_city   find a secret city among 91 by yes/no and open questions

The protocol of a game (a user's game for `archer.py --env module:factory` too). Required:
  reset() -> state                   a new game; the state is the text the agent reads
  step(utterance) -> (state, reward, done)   the built-in games: -1 per turn, 0 on the winning turn
Optional, each used when present:
  secrets, reset(secret=s)           the fixed evaluation set (every secret once); without
                                     it, evaluation plays --eval-games games, each reset with
                                     Python's `random` module seeded (draw from it to vary games)
  demonstrator(rng) -> utterance     a scripted player to clone before RL; without it, RL
                                     starts from the model as it is
  won                                true once the game is won (default: the last reward >= 0)
  corpus()                           the game's text, for the built-in tiny model's tokenizer
  reference(rng), questions          a strong player and the question bank (benchmark, tests)

The oracles are dictionaries: every question the game understands maps to its answer for each
secret, so answering is one lookup, and a question it does not understand gets
"Invalid question." rather than a guessed Yes/No (the original's flan-t5 oracle guessed).

    python envs.py twentyq                       # play: you ask, the oracle answers
    python envs.py twentyq --demo reference      # watch the information-gain player
"""
import argparse
import copy
import csv
import importlib
import inspect
import math
import os
import random
import re
import unicodedata

DATA = os.path.join(os.path.dirname(os.path.abspath(__file__)), "data")
ENV_NAMES = ("twentyq", "twentyq_subset", "guess_my_city")
HEADER = "Questions:\n"
YES, NO, INVALID = "Yes.", "No.", "Invalid question."
MAX_CHARS = 300  # a longer utterance is cut: the state must stay readable and bounded
SUBSET = ["football", "dog", "banana", "truck", "pants", "computer", "piano", "chair", "pen", "scissors"]


def normalize(text: str) -> str:
    """Lower case, accents folded, punctuation and the articles a/an/the dropped, single
    spaces: 'Is it a Pair of Scissors?' = 'is it pair of scissors', 'São Paulo' = 'Sao Paulo'."""
    ascii_text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    words = re.sub(r"[^a-z0-9']+", " ", ascii_text.lower()).split()
    return " ".join(w for w in words if w not in ("a", "an", "the"))


def clean(utterance: str) -> str:
    """The first line of an utterance, whitespace collapsed, cut to MAX_CHARS."""
    line = (utterance or "").split("\n")[0]
    return " ".join(line.split())[:MAX_CHARS]


class KnowledgeGame:
    """A guessing game over a table of secrets and the answers to every question it knows.

    oracle: normalized phrasing -> canonical question; answers: canonical question ->
    {secret: answer}; names: normalized name (synonyms included) -> secret. A guess is
    "Is it <name>?" or, with name_anywhere, any utterance that names exactly one secret.
    """

    max_turns = 20

    def __init__(self, name, secrets, names, questions, answers, oracle, guess_format, seed,
                 p_random, p_guess, least_informative, orders=0, name_anywhere=False):
        self.name, self.secrets, self.names = name, list(secrets), names
        self.name_anywhere = name_anywhere
        self.longest_name = max(len(n.split()) for n in names)  # in words
        self.answers, self.oracle = answers, oracle
        # A phrasing that is also a guess ("Is it orange?", "Is it in Singapore?") could never
        # be asked as a question: refuse such a knowledge base.
        clashes = [p for p in oracle if self.named(p)]
        if clashes:
            raise ValueError(f"{name}: questions that name a secret: {clashes}")
        self.guess_format = guess_format  # secret -> the canonical guess "Is it a dog?"
        # The bank: questions whose answer differs between some secrets (the oracle understands
        # the others too, but they can never help), then one guess per secret.
        informative = [q for q in questions if len(set(answers[q].values())) > 1]
        self.questions = informative + [guess_format(s) for s in self.secrets]
        self.rng = random.Random(seed)
        # The demonstrator's habits (see demonstrator()).
        self.p_random, self.p_guess, self.least_informative = p_random, p_guess, least_informative
        # With orders > 0 the demonstrator follows one of that many fixed shuffles of the bank
        # instead, recognized from the dialogue's first question (so each must start differently).
        shuffler, self.orders = random.Random(100), []
        for _ in range(orders):
            self.orders.append(informative[:])
            shuffler.shuffle(self.orders[-1])
        if len({o[0] for o in self.orders}) < orders:
            raise ValueError(f"{name}: two of the demonstrator's question orders start alike")
        self.split_memo = {}  # possible secrets -> _splits of them, shared by every copy (the players' bookkeeping)
        self.done, self.turn, self.state, self.secret, self.history, self.alive = True, 0, HEADER, None, [], []

    def __deepcopy__(self, memo):
        """Another game to play in parallel: its own state and random stream, the knowledge
        base (read-only tables of a few MB) shared rather than copied."""
        twin = copy.copy(self)
        twin.rng, twin.history, twin.alive = copy.deepcopy(self.rng, memo), list(self.history), list(self.alive)
        return twin

    # ---- the game ---------------------------------------------------------------------
    def reset(self, secret=None):
        if secret is not None and secret not in self.secrets:
            raise ValueError(f"unknown secret {secret!r} for {self.name}")
        self.secret = secret if secret is not None else self.rng.choice(self.secrets)
        self.done, self.turn, self.state, self.history, self.alive = False, 0, HEADER, [], list(self.secrets)
        return self.state

    def parse(self, utterance: str):
        """('question', canonical) | ('guess', secret) | ('invalid', None)."""
        key = normalize(utterance)
        if key in self.oracle:
            return "question", self.oracle[key]
        named = self.named(key)
        if len(named) == 1:
            return "guess", named.pop()
        return "invalid", None  # naming two secrets at once is no guess (else listing them wins)

    def named(self, key: str) -> set:
        """The secrets a normalized utterance names, as whole words: 'cat' is not named by
        'catapult', nor 'Lima' by 'climate' (the original matched substrings)."""
        if not self.name_anywhere:
            m = re.fullmatch(r"(?:is it|it is) (.+)", key)
            return {self.names[m.group(1)]} if m and m.group(1) in self.names else set()
        words = key.split()
        spans = (" ".join(words[i:j]) for i in range(len(words))
                 for j in range(i + 1, min(i + self.longest_name, len(words)) + 1))
        return {self.names[span] for span in spans if span in self.names}

    def step(self, utterance: str):
        if self.done:
            raise RuntimeError(f"this {self.name} game is over; call reset() to start a new one")
        question = clean(utterance)
        kind, what = self.parse(question)
        reward = -1.0
        if kind == "question":
            answer = self.answers[what][self.secret]
        elif kind == "guess":
            answer = YES if what == self.secret else NO
            if what == self.secret:
                reward, self.done = 0.0, True
        else:
            answer = INVALID
        self.history.append((kind, what, answer))
        # The secrets still consistent with the public dialogue, narrowed turn by turn (see consistent()).
        self.alive = [s for s in self.alive if (kind != "question" or self.answers[what][s] == answer)
                      and (kind != "guess" or s != what)]
        self.turn += 1
        self.done = self.done or self.turn >= self.max_turns
        self.state += f"{question} {answer}\n"
        return self.state, reward, self.done

    @property
    def won(self):
        return bool(self.history) and self.history[-1][0] == "guess" and self.history[-1][2] == YES

    # ---- players (they read only the public dialogue, never self.secret) --------------------
    def consistent(self):
        """The secrets that agree with every answer given so far, in the order of `secrets`
        (never empty: the true secret always does). Kept up to date by step()."""
        return list(self.alive)

    def _splits(self, alive):
        """(entropy of the answer partition over `alive`, question) for questions that split it.
        Memoized by the set of possible secrets: games revisit the same sets again and again."""
        key = tuple(alive)
        if key not in self.split_memo:
            out = []
            for q, ans in self.answers.items():
                counts = {}
                for s in alive:
                    counts[ans[s]] = counts.get(ans[s], 0) + 1
                if len(counts) > 1:
                    n = len(alive)
                    out.append((-sum(c / n * math.log2(c / n) for c in counts.values()), q))
            self.split_memo[key] = out
        return self.split_memo[key]

    def demonstrator(self, rng: random.Random) -> str:
        """A weak but state-dependent player, for behaviour cloning. It guesses a still-possible
        secret when one is left or, at random moments, too early; otherwise it asks a random
        question of the bank it has not asked yet (maybe useless) with probability p_random,
        else a question that splits the possible secrets: the least informative one (subset)
        or a random one. Never the same question twice.

        With fixed orders (full Twenty Questions, Guess My City) it picks an order at random at the first turn,
        then asks that order's next question that still splits the possible secrets and guesses
        when one is left. A tiny actor cannot clone the random player on 157 objects (that would
        mean memorizing which objects each answer rules out: its clone wins 0-1%); this one's
        choice follows from the dialogue alone, and its clone wins about as often as it does."""
        alive = self.consistent()
        asked = {what for kind, what, _ in self.history if kind == "question"}
        if self.orders:
            if len(alive) == 1:
                return self.guess_format(alive[0])
            started = [o for o in self.orders if self.history and self.history[0][1] == o[0]]
            order = started[0] if started else rng.choice(self.orders)
            splitting = {q for _, q in self._splits(alive)}
            ask = [q for q in order if q not in asked and q in splitting]
            return ask[0] if ask else self.guess_format(rng.choice(alive))
        fresh = [q for q in self.questions[: len(self.questions) - len(self.secrets)] if q not in asked]
        splits = self._splits(alive)
        if len(alive) == 1 or not fresh or not splits or rng.random() < self.p_guess:
            return self.guess_format(rng.choice(alive))
        if rng.random() < self.p_random:
            return rng.choice(fresh)
        if self.least_informative:
            low = min(e for e, _ in splits)
            return rng.choice([q for e, q in splits if e == low])
        return rng.choice(splits)[1]

    def demonstrator_probs(self) -> dict:
        """The demonstrator's choice in this state as {utterance: probability}, the distribution that
        demonstrator(rng) draws from (a test checks that they agree): a clone's distance to it, the
        cloning gap, can then be computed exactly."""
        alive, probs = self.consistent(), {}
        asked = {what for kind, what, _ in self.history if kind == "question"}

        def add(utterances, p):
            for u in utterances:
                probs[u] = probs.get(u, 0.0) + p / len(utterances)
        guesses = [self.guess_format(s) for s in alive]
        if self.orders:
            if len(alive) == 1:
                return {guesses[0]: 1.0}
            started = [o for o in self.orders if self.history and self.history[0][1] == o[0]]
            splitting = {q for _, q in self._splits(alive)}
            for order in started[:1] or self.orders:
                ask = [q for q in order if q not in asked and q in splitting]
                add(ask[:1] or guesses, 1.0 if started else 1 / len(self.orders))
            return probs
        fresh = [q for q in self.questions[: len(self.questions) - len(self.secrets)] if q not in asked]
        splits = self._splits(alive)
        if len(alive) == 1 or not fresh or not splits:
            add(guesses, 1.0)
            return probs
        low = min(e for e, _ in splits)
        add(guesses, self.p_guess)
        add(fresh, (1 - self.p_guess) * self.p_random)
        add([q for e, q in splits if e == low or not self.least_informative], (1 - self.p_guess) * (1 - self.p_random))
        return probs

    def reference(self, rng: random.Random = None) -> str:
        """Greedy information gain: the question whose answers split the possible secrets most
        evenly (first in bank order on ties); guess once two or fewer remain. Deterministic:
        `rng` is accepted only so that both players are called the same way."""
        alive = self.consistent()
        splits = self._splits(alive)
        if len(alive) <= 2 or not splits:
            return self.guess_format(alive[0])
        best = max(e for e, _ in splits)
        return next(q for e, q in splits if e == best)

    def corpus(self):
        """Every question of the bank with every answer it can get, and the header."""
        lines = [HEADER]
        for q in self.questions:
            for a in sorted(set(self.answers[q].values())) if q in self.answers else (YES, NO):
                lines.append(f"{q} {a}\n")
        lines.append(f"Is it something else? {INVALID}\n")
        return lines


# ---- Twenty Questions ---------------------------------------------------------------------
# One question (with paraphrases) per category of twentyq_objects.txt: category -> (phrasings,
# extra members, excluded members). The original lumps some objects oddly into categories (a
# toothbrush is an "office supply"); a category question answers by common sense, so the
# last two adjust the category's list.
CATEGORY_QUESTIONS = {
    "Sports": (["Is it sports equipment?", "Is it used for sports?", "Is it used in sports?"], [], []),
    "Animals": (["Is it an animal?", "Is it a creature?"], [], []),
    "Fruits": (["Is it a fruit?"], [], []),
    "Vehicles": (["Is it a vehicle?", "Is it a means of transport?", "Is it a form of transportation?"], [], []),
    "Clothes": ([], [], []),  # "Is it clothing?" is an attribute of the knowledge base (gloves too)
    "Electronics": (["Is it electronic?", "Is it an electronic device?", "Is it electronics?"], ["printer", "calculator"], []),
    "Musical Instruments": (["Is it a musical instrument?", "Is it an instrument?", "Can you play music with it?"], [], []),
    "Furniture": (["Is it furniture?", "Is it a piece of furniture?"], [], ["pillow"]),
    "Office Supplies": (["Is it an office supply?", "Is it office supplies?"], [], ["toothbrush", "toothpaste", "key", "battery"]),
    "Vegetables": (["Is it a vegetable?"], [], []),
    "Art": (["Is it related to art?", "Does it have to do with art?"], [], []),  # supplies and works: attributes
    "Kitchen Tools": (["Is it a kitchen utensil?", "Is it kitchenware?"], [], []),
    "Nature": (["Is it a natural feature?", "Is it part of the landscape?"], [], ["meteorite", "cactus"]),
    "Toys": ([], [], []),  # "Is it a toy?" is an attribute
    "Jewelry": (["Is it jewelry?", "Is it jewellery?", "Is it a piece of jewelry?"], [], []),
    "Garden Supplies": (["Is it a garden tool?", "Is it used in the garden?", "Is it used for gardening?"], [], []),
    "Tools": (["Is it a tool?"], ["shovel", "rake"], []),
}


def load_twentyq():
    """(objects in file order, {object: category}, {normalized synonym: object}, attributes)."""
    objects, category, names = [], {}, {}
    for line in open(os.path.join(DATA, "twentyq_objects.txt"), encoding="utf-8"):
        if line.startswith("#") or not line.strip():
            continue
        cat, rest = line.split(":", 1)
        syns = [s.strip() for s in rest.split(";")]
        obj = syns[0].lower()
        objects.append(obj)
        category[obj] = cat.strip()
        for s in syns:
            names[normalize(s)] = obj
    attributes = []  # (phrasings, set of objects answering yes)
    for line in open(os.path.join(DATA, "twentyq_attributes.txt"), encoding="utf-8"):
        if line.startswith("#") or not line.strip():
            continue
        qs, objs = line.split("|")
        yes = {o.strip() for o in objs.split(",") if o.strip()}
        unknown = yes - set(objects)
        if unknown:
            raise ValueError(f"twentyq_attributes.txt: unknown objects {sorted(unknown)}")
        attributes.append(([q.strip() for q in qs.split(";")], yes))
    for cat, (phrasings, extra, exclude) in CATEGORY_QUESTIONS.items():
        if phrasings:
            yes = {o for o in objects if category[o] == cat and o not in exclude} | set(extra)
            attributes.append((phrasings, yes))
    return objects, category, names, attributes


def make_twentyq(name, seed, objects=None):
    all_objects, _, names, attributes = load_twentyq()
    secrets = objects or all_objects
    answers, oracle, bank = {}, {}, []
    for phrasings, yes in attributes:
        q = phrasings[0]
        answers[q] = {s: YES if s in yes else NO for s in secrets}
        bank.append(q)
        for p in phrasings:
            oracle.setdefault(normalize(p), q)
    names = {n: o for n, o in names.items() if o in secrets}

    # A plural name has its singular or "pair of" among its synonyms (pants: pant, scissors:
    # pair of scissors) and takes no article; "bus" or "cactus" do not.
    plural = {s for s in secrets if s.endswith("s") and (s[:-1] in names or f"pair of {s}" in names)}

    def guess(s):
        article = "" if s in plural else ("an " if s[0] in "aeiou" else "a ")
        return f"Is it {article}{s}?"

    subset = objects is not None
    # The subset's demonstrator asks at random, the least informative of the splitting questions
    # 30% of the time; on all 157 objects the tiny actor cannot clone a random player, so the full
    # game's demonstrator follows fixed question orders (see demonstrator()).
    return KnowledgeGame(name, secrets, names, bank, answers, oracle, guess, seed,
                         p_random=0.7, p_guess=0.1, least_informative=True, orders=0 if subset else 4)


# ---- Guess My City ------------------------------------------------------------------------
def load_cities():
    with open(os.path.join(DATA, "cities.tsv"), encoding="utf-8") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def with_the(country):
    return f"the {country}" if country.startswith(("United", "Democratic")) else country


def make_guess_my_city(name, seed):
    rows = load_cities()
    secrets = [r["city"] for r in rows]
    names = {}
    for r in rows:
        for n in [r["city"]] + [a for a in r["aliases"].split(";") if a.strip()]:
            names[normalize(n)] = r["city"]
    answers, oracle, bank = {}, {}, []

    def add(phrasings, answer_of):
        q = phrasings[0]
        answers[q] = {r["city"]: answer_of(r) for r in rows}
        bank.append(q)
        for p in phrasings:
            oracle.setdefault(normalize(p), q)

    yn = lambda b: YES if b else NO
    for cont in sorted({r["continent"] for r in rows}):
        add([f"Is it in {cont}?", f"Is the city in {cont}?", f"Is it located in {cont}?"], lambda r, c=cont: yn(r["continent"] == c))
    # "Is it in Singapore?" names the city: it is a guess, not a question about the country.
    for country in sorted({r["country"] for r in rows} - set(secrets)):
        add([f"Is it in {with_the(country)}?", f"Is the city in {with_the(country)}?", f"Is it a city in {with_the(country)}?"],
            lambda r, c=country: yn(r["country"] == c))
    for h in ("northern", "southern"):
        add([f"Is it in the {h} hemisphere?"], lambda r, h=h: yn(r["hemisphere"] == h))
    add(["Is it on the coast?", "Is it coastal?", "Is it by the sea?", "Is it near the ocean?", "Is it a port city?"],
        lambda r: yn(r["coastal"] == "yes"))
    add(["Is it a capital city?", "Is it the capital?", "Is it a capital?", "Is it the capital of its country?"],
        lambda r: yn(r["capital"] == "yes"))
    for lang in sorted({r["language"] for r in rows}):
        add([f"Do people speak {lang} there?", f"Is {lang} spoken there?", f"Is the main language {lang}?"],
            lambda r, l=lang: yn(r["language"] == l))
    add(["Does it have more than 10 million people?", "Is its population over 10 million?",
         "Does it have over 10 million people?"], lambda r: yn(r["population"] == "over 10 million"))
    add(["Does it have more than 5 million people?", "Is its population over 5 million?"], lambda r: yn(r["population"] != "under 5 million"))
    for clim in sorted({r["climate"] for r in rows}):
        add([f"Does it have a {clim} climate?", f"Is the climate {clim}?", f"Is it {clim}?"], lambda r, c=clim: yn(r["climate"] == c))
    add(["Does a river run through it?", "Is there a river?", "Is it on a river?"], lambda r: yn(r["river"] != "none"))
    for river in sorted({r["river"] for r in rows} - {"none"}):
        add([f"Is it on the {river}?", f"Does the {river} run through it?", f"Is it on the {river} river?",
             f"Does the {river} flow through it?"],
            lambda r, v=river: yn(r["river"] == v))
    # Open questions, answered in words that never name the city.
    add(["What continent is it on?", "What continent is it in?", "Which continent is it in?", "Which continent is it on?"],
        lambda r: f"It is in {r['continent']}.")
    add(["What country is it in?", "Which country is it in?", "What country is it?"],
        lambda r: "It is a city-state." if r["country"] == r["city"] else f"It is in {with_the(r['country'])}.")
    add(["Which hemisphere is it in?", "What hemisphere is it in?"], lambda r: f"It is in the {r['hemisphere']} hemisphere.")
    add(["What language do people speak there?", "What language is spoken there?", "What is the main language?",
         "What language do people mainly speak there?", "What language do they speak there?"],
        lambda r: f"Most people speak {r['language']}.")
    add(["How many people live there?", "What is the population?", "How big is it?"],
        lambda r: f"Its metropolitan area has {r['population']} people.")
    add(["What is the climate like?", "What is the weather like?", "What climate does it have?"],
        lambda r: f"It has a {r['climate']} climate.")
    add(["What river runs through it?", "Which river is it on?", "What river is it on?"],
        lambda r: "No major river runs through it." if r["river"] == "none" else f"The {r['river']} runs through it.")
    # No landmark question: each hint is unique, so it would settle every game in one turn.
    # The demonstrator follows fixed question orders, as on full Twenty Questions: the tiny actor
    # cloned the random one (65% / -14.1 as a player) to 0% greedy, 2% sampled.
    return KnowledgeGame(name, secrets, names, bank, answers, oracle, lambda s: f"Is it {s}?", seed,
                         p_random=0.5, p_guess=0.1, least_informative=False, orders=4, name_anywhere=True)


def make_env(name: str, seed: int = 0) -> KnowledgeGame:
    """A new game by name; `seed` fixes its own draws of secrets."""
    if name == "twentyq":
        return make_twentyq(name, seed)
    if name == "twentyq_subset":
        return make_twentyq(name, seed, objects=SUBSET)
    if name == "guess_my_city":
        return make_guess_my_city(name, seed)
    raise ValueError(f"unknown game {name!r}; choose one of: {', '.join(ENV_NAMES)}")


class Episode(list):
    """One game's transitions (state, utterance, reward, next_state, done), and `won`."""

    won = False


def finish(game, episode: Episode) -> Episode:
    """Record whether the game that played `episode` was won (its `won`, else last reward >= 0)."""
    episode.won = bool(getattr(game, "won", episode[-1][2] >= 0))
    return episode


def play(env, policy, secret=None):
    """One game with `policy(env) -> utterance`, as an Episode."""
    state, out, done = env.reset() if secret is None else env.reset(secret=secret), Episode(), False
    while not done:
        utterance = policy(env)
        nxt, reward, done = env.step(utterance)
        out.append((state, clean(utterance), reward, nxt, done))
        state = nxt
    return finish(env, out)


def reset_all(games, draws):
    """Start every game: draws are secrets for a game with a `secrets` list; for one without,
    each is a seed for Python's `random` module during that reset (restored afterwards)."""
    if not games or hasattr(games[0], "secrets"):
        return [g.reset(secret=d) for g, d in zip(games, draws)]
    state, states = random.getstate(), []
    for g, d in zip(games, draws):
        random.seed(d)
        states.append(g.reset())
    random.setstate(state)
    return states


def demonstrations(game, n: int, seed: int):
    """n dialogues of the game's scripted demonstrator (none if it has no demonstrator)."""
    rng = random.Random(seed)
    if not hasattr(game, "demonstrator"):
        return []
    return [play(game, lambda g: g.demonstrator(rng)) for _ in range(n)]


def demonstrator_turns(game, n: int, seed: int):
    """(state, the demonstrator's choice distribution there) for every turn of n demonstrator dialogues."""
    rng, out = random.Random(seed), []
    if hasattr(game, "demonstrator_probs"):
        for _ in range(n):
            play(game, lambda g: out.append((g.state, g.demonstrator_probs())) or g.demonstrator(rng))
    return out


def evaluate_player(env, policy):
    """Play every secret once: success rate, mean return, mean turns."""
    runs = [play(env, policy, s) for s in env.secrets]
    n = len(runs)
    return {"success": sum(r.won for r in runs) / n, "return": sum(sum(t[2] for t in r) for r in runs) / n,
            "turns": sum(len(r) for r in runs) / n}


class GameError(ValueError):
    """A game that cannot be loaded or does not follow the protocol; the message is one line."""


def check_game(game, where: str = "the game"):
    """Raise GameError unless `game` has the required reset() and step(utterance)."""
    for method in ("reset", "step"):
        if not callable(getattr(game, method, None)):
            raise GameError(f"{where} is a {type(game).__name__}, which has no {method}() method; "
                            "a game needs reset() -> state and step(utterance) -> (state, reward, done)")
    if hasattr(game, "secrets") and not list(game.secrets):
        raise GameError(f"{where} has an empty `secrets` list; give it secrets or no `secrets` attribute")
    return game


def load_game(spec: str, seed: int = 0):
    """A built-in game by name, or a user's: 'package.module:factory' imports the module and
    calls factory() (or factory(seed=seed) if it takes a seed), as uvicorn loads an app."""
    if spec in ENV_NAMES:
        return make_env(spec, seed)
    if ":" not in spec:
        raise GameError(f"unknown game {spec!r}; choose one of {', '.join(ENV_NAMES)}, or give module.path:factory")
    module, _, name = spec.partition(":")
    try:
        factory = getattr(importlib.import_module(module), name)
    except ImportError as e:
        raise GameError(f"--env {spec}: cannot import module {module!r} ({e}); is it on PYTHONPATH?") from None
    except AttributeError:
        raise GameError(f"--env {spec}: module {module!r} has no {name!r}") from None
    try:
        takes_seed = "seed" in inspect.signature(factory).parameters
        game = factory(seed=seed) if takes_seed else factory()
    except Exception as e:
        raise GameError(f"--env {spec}: the factory raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None
    return check_game(game, f"--env {spec}")


def main():
    p = argparse.ArgumentParser(description="Play a game as the questioner, or watch a scripted player.")
    p.add_argument("game", choices=ENV_NAMES)
    p.add_argument("--secret", help="fix the secret (default: drawn at random)")
    p.add_argument("--demo", choices=["demonstrator", "reference"], help="watch a scripted player instead of playing")
    p.add_argument("--seed", type=int, default=None)
    a = p.parse_args()
    env = make_env(a.game, seed=a.seed if a.seed is not None else random.randrange(10**9))
    if a.secret is not None:
        key = normalize(a.secret)
        if key not in env.names:
            p.error(f"{a.secret!r} is not a secret of {a.game}; e.g. {', '.join(env.secrets[:5])}")  # exit 2
        a.secret = env.names[key]
    env.reset(a.secret)
    rng = random.Random(a.seed)
    print(f"{a.game}: {len(env.secrets)} secrets, {len(env.questions)} questions in the bank "
          f"(e.g. {env.questions[0]!r}). Ask yes/no questions; name the secret to win. Ctrl-D quits.")
    total = 0.0
    while not env.done:
        try:
            u = getattr(env, a.demo)(rng) if a.demo else input(f"[{env.turn + 1}] > ")
        except EOFError:
            break
        _, reward, _ = env.step(u)
        total += reward
        # A watcher sees question and answer; a player has just typed the question.
        print(env.state.splitlines()[-1] if a.demo else "   " + env.history[-1][2])
    print(f"{'won' if env.won else 'lost'} in {env.turn} turns (return {total:g}); the secret was {env.secret}.")


if __name__ == "__main__":
    main()
