"""Tests: the learning test, the games (envs.py), then the trainer (archer.py). Run: python -m pytest -q -n 2 test_archer.py"""
import collections
import copy
import csv
import importlib.util
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import archer
import baselines
import envs
import models

HERE = os.path.dirname(os.path.abspath(__file__))
if os.environ.get("PYTEST_XDIST_WORKER"):  # pytest -n 2: one core per worker (and its subprocesses)
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)


# ---- learning: the longest test, first, so that one worker starts it while the other runs the rest ----
def test_archer_learns_on_the_subset_without_collapsing(tmp_path):
    """Seeded, the quick start's defaults for 50 of its 60 iterations (the suite's time budget): no
    collapse (at most 5% invalid utterances in every iteration, issue 17's bar, where the collapse this
    guards against reached 91%; and the sampled utterance's log-prob stays near the warm start's instead
    of running away), and after the critic's warm-up the policy's games get clearly better. The warm-up
    iterations (critic only, actor frozen) play the warm-started policy on 320 training games; the last
    ten iterations play the trained one on as many. Measured (one thread, 1200 cloning steps): invalid at
    most 2.2%, training return -14.51 in the warm-up, -9.43 over the last ten. Greedy success on the
    fixed evaluation set is not asserted: it moves little (docs/results.md)."""
    args = archer.Args(env="twentyq_subset", seed=1, out=str(tmp_path), device="cpu", iterations=50)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the figures above are one thread's, with or without -n 2
    try:
        log = archer.train(args)[2]
    finally:
        torch.set_num_threads(threads)
    its = [m for m in log if m["iteration"] >= 0]
    assert max(m["invalid"] for m in its) <= 0.05, [round(m["invalid"], 3) for m in its]
    assert min(m["logp"] for m in its) >= 2 * its[0]["logp"], [round(m["logp"], 2) for m in its]
    warm = [m["train_return"] for m in its[: archer.PRESETS["tiny", "*"]["warmup_iters"]]]
    last = [m["train_return"] for m in its[-10:]]
    assert len(warm) == len(last) == 10
    assert sum(last) / 10 >= sum(warm) / 10 + 2.5, (warm, last)


# ---- games (envs.py) ----
@pytest.fixture(scope="module")
def tq():
    return envs.make_env("twentyq", seed=0)


@pytest.fixture(scope="module")
def city():
    return envs.make_env("guess_my_city", seed=0)


def ask(env, secret, question):
    env.reset(secret)
    return env.step(question)[0].splitlines()[-1][len(envs.clean(question)) + 1 :]


def test_every_two_objects_differ_in_some_answer(tq):
    signatures = {}
    for s in tq.secrets:
        signatures.setdefault(tuple(tq.answers[q][s] for q in tq.answers), []).append(s)
    assert len(tq.secrets) == 157 and all(len(v) == 1 for v in signatures.values()), \
        [v for v in signatures.values() if len(v) > 1]
    assert len(tq.answers) >= 40 + 15  # >= 40 attributes plus the category questions


COMMON_SENSE = [  # (object, question, answer)
    ("dog", "Is it an animal?", "Yes."), ("dog", "Is it a pet?", "Yes."), ("dog", "Is it a mammal?", "Yes."),
    ("lion", "Is it a pet?", "No."), ("lion", "Is it wild?", "Yes."), ("cow", "Is it a farm animal?", "Yes."),
    ("knife", "Is it sharp?", "Yes."), ("knife", "Is it used in the kitchen?", "Yes."), ("pillow", "Is it sharp?", "No."),
    ("banana", "Is it made of metal?", "No."), ("banana", "Is it a fruit?", "Yes."), ("banana", "Can you eat it?", "Yes."),
    ("carrot", "Is it a vegetable?", "Yes."), ("carrot", "Is it a fruit?", "No."), ("potato", "Does it grow underground?", "Yes."),
    ("airplane", "Can it fly?", "Yes."), ("truck", "Can it fly?", "No."), ("truck", "Does it have wheels?", "Yes."),
    ("boat", "Does it go on water?", "Yes."), ("car", "Is it a vehicle?", "Yes."), ("car", "Is it bigger than a person?", "Yes."),
    ("pen", "Is it used for writing?", "Yes."), ("pen", "Does it fit in one hand?", "Yes."), ("piano", "Is it a musical instrument?", "Yes."),
    ("piano", "Does it fit in one hand?", "No."), ("guitar", "Does it have strings?", "Yes."), ("trumpet", "Is it a wind instrument?", "Yes."),
    ("computer", "Is it electronic?", "Yes."), ("computer", "Does it use electricity?", "Yes."), ("chair", "Is it furniture?", "Yes."),
    ("chair", "Is it made of wood?", "Yes."), ("shirt", "Is it clothing?", "Yes."), ("shirt", "Is it made of fabric?", "Yes."),
    ("ring", "Is it jewelry?", "Yes."), ("necklace", "Is it worn on the body?", "Yes."), ("hammer", "Is it a tool?", "Yes."),
    ("shovel", "Is it a garden tool?", "Yes."), ("rock", "Is it alive?", "No."), ("tree", "Is it alive?", "Yes."),
    ("tree", "Is it a plant?", "Yes."), ("ocean", "Is it salty?", "Yes."), ("kite", "Is it a toy?", "Yes."),
    ("basketball", "Is it round?", "Yes."), ("basketball", "Is it used for sports?", "Yes."), ("lego", "Is it made of plastic?", "Yes."),
    ("toothbrush", "Is it an office supply?", "No."), ("refrigerator", "Is it used outdoors?", "No."),
    ("drum", "Does it make sound?", "Yes."), ("scissors", "Is it sharp?", "Yes."), ("meteorite", "Does it come from space?", "Yes."),
    ("apple", "Is it round?", "Yes."), ("plate", "Is it round?", "Yes."), ("plate", "Is it spherical?", "No."),
    ("tree", "Does it have a trunk?", "Yes."), ("apple", "Is it natural?", "Yes."), ("pillow", "Is it furniture?", "No."),
    ("sculpture", "Is it art?", "Yes."), ("paintbrush", "Is it art?", "No."), ("refrigerator", "Does it have shelves?", "Yes."),
]


@pytest.mark.parametrize("obj,question,answer", COMMON_SENSE)
def test_common_sense_facts(tq, obj, question, answer):
    assert ask(tq, obj, question) == answer


def load_city_facts():
    rows = []
    for line in open(os.path.join(HERE, "data", "cities_facts.txt"), encoding="utf-8"):
        if line.strip() and not line.startswith("#"):
            rows.append(tuple(line.rstrip("\n").split("\t")))
    return rows


def test_city_facts(city):
    facts = load_city_facts() + [("Cairo", "Is it in Africa?", "Yes"), ("Tokyo", "Is it on the coast?", "Yes"),
                                 ("Lima", "What continent is it on?", "It is in South America"),
                                 ("Sao Paulo", "Is it on the Tiete?", "Yes")]  # accents folded: Tietê
    assert len(facts) >= 25
    for name, question, expected in facts:
        secret = city.names[envs.normalize(name)]
        got = ask(city, secret, question)
        assert got.startswith(expected) or expected in got, (name, question, got, expected)


def test_city_oracle_never_says_the_name(city):
    for row in csv.DictReader(open(os.path.join(HERE, "data", "cities.tsv"), encoding="utf-8"), delimiter="\t"):
        names = [row["city"]] + [a for a in row["aliases"].split(";") if a]
        for q, answers in city.answers.items():
            for n in names:
                assert not re.search(rf"\b{re.escape(n.lower())}\b", answers[row["city"]].lower()), (row["city"], q)
    # Nor any other city of the list: an answer is never a guess in disguise.
    assert not [a for answers in city.answers.values() for a in answers.values() if city.named(envs.normalize(a))]


def test_city_guess_is_naming_exactly_one_city(city):
    for secret, utterance, reward, answer in [
            ("Lima", "I think it is Lima.", 0, "Yes."), ("Singapore", "Is it in Singapore?", 0, "Yes."),
            ("Sao Paulo", "Is it São Paulo?", 0, "Yes."), ("Mumbai", "Is it Bombay?", 0, "Yes."),
            ("Santiago", "Is it Santiago de Chile?", 0, "Yes."), ("Lima", "Is it near Cairo?", -1, "No."),
            ("Lima", "Is it Lima or Paris?", -1, envs.INVALID), ("Cali", "Is it in California?", -1, envs.INVALID)]:
        city.reset(secret)
        state, r, done = city.step(utterance)
        assert (r, done, state.splitlines()[-1]) == (reward, reward == 0, f"{envs.clean(utterance)} {answer}"), utterance


def test_paraphrases_agree(tq):
    groups = [["Can you eat it?", "Is it edible?", "Is it food?", "is it FOOD", "  Is it   food ?? "],
              ["Is it an animal?", "is it animal", "Is it a creature?"],
              ["Is it made of metal?", "Is it metal?", "Is it metallic?"]]
    for secret in ("apple", "dog", "spoon"):
        for group in groups:
            assert len({ask(tq, secret, q) for q in group}) == 1, (secret, group)


def test_unknown_questions_are_invalid(tq):
    for q in ("What is the meaning of life?", "Is it purple?", "Is it a zebra?", "", "asdf", "Is it made of"):
        assert ask(tq, "dog", q) == envs.INVALID


def test_every_object_and_synonym_can_be_won(tq):
    for line in open(os.path.join(HERE, "data", "twentyq_objects.txt"), encoding="utf-8"):
        if line.startswith("#"):
            continue
        syns = [s.strip() for s in line.split(":", 1)[1].split(";")]
        secret = syns[0].lower()
        for s in syns:
            for form in (f"Is it a {s}?", f"Is it {s}?", f"Is it the {s}?", f"is it an {s.upper()}"):
                tq.reset(secret)
                _, reward, done = tq.step(form)
                assert reward == 0 and done and tq.won, (secret, form)
        tq.reset(secret)
        assert tq.step(tq.guess_format(secret))[1] == 0


def test_substrings_never_win(tq, city):
    city.reset("Lima")
    for u in ("Is it climate?", "Is it a climate city?", "Is it Limassol?", "Is it Lima or Paris?"):
        assert city.step(u)[1] == -1
    tq.reset("cat")
    for u in ("Is it a category?", "Is it a catapult?", "Is it a cat food?"):
        assert tq.step(u)[1] == -1
    tq.reset("pen")
    assert tq.step("Is it a pencil?")[1] == -1
    assert tq.step("Is it a pen?")[1] == 0


def test_rewards_state_and_turn_limit(tq):
    state = tq.reset("dog")
    assert state == "Questions:\n"
    state, r, done = tq.step("Is it an animal?")
    assert (state, r, done) == ("Questions:\nIs it an animal? Yes.\n", -1.0, False)
    for t in range(2, 21):
        state, r, done = tq.step("Is it a cat?")
        assert r == -1.0 and done == (t == 20)
    assert len(state.splitlines()) == 21 and not tq.won
    with pytest.raises(RuntimeError, match="over"):
        tq.step("Is it a dog?")


def test_seeding_gives_same_secrets_and_demonstrations():
    def run(seed):
        env = envs.make_env("twentyq", seed=seed)
        rng = random.Random(seed)
        return [envs.play(env, lambda g: g.demonstrator(rng)) for _ in range(5)]

    assert run(3) == run(3)
    assert run(3) != run(4)


def test_bad_utterances_never_crash(tq):
    tq.reset("dog")
    for u in ("", "\n\n", "Is it an animal?\nIs it a dog?", "x" * 10000, "¿Es un perro? 🐶", None):
        state, r, done = tq.step(u)
        assert r == -1.0
    lines = state.splitlines()
    assert lines[3] == "Is it an animal? Yes."  # only the first line of a multi-line utterance
    assert max(len(line) for line in lines) <= envs.MAX_CHARS + 20


def test_demonstrator_never_repeats_and_reference_ignores_its_rng():
    for name in envs.ENV_NAMES:
        env, rng = envs.make_env(name, seed=0), random.Random(0)
        for _ in range(30):
            asked = [u for _, u, *_ in envs.play(env, lambda g: g.demonstrator(rng))]
            assert len(asked) == len(set(asked)), asked
        secret = env.secrets[7]
        assert envs.play(env, lambda g: g.reference(random.Random(1)), secret) == \
            envs.play(env, lambda g: g.reference(random.Random(2)), secret)


def test_possible_secrets_kept_per_game_match_the_whole_history():
    """consistent() is narrowed turn by turn in step() and _splits is memoized: both must equal the
    plain recomputation from the dialogue's history, for every game and for random utterances too."""
    for name in envs.ENV_NAMES:
        env, rng = envs.make_env(name, seed=1), random.Random(1)
        for k in range(15):
            env.reset()
            while not env.done:
                alive = [s for s in env.secrets if all((kind != "question" or env.answers[what][s] == ans)
                                                       and (kind != "guess" or what != s) for kind, what, ans in env.history)]
                assert env.consistent() == alive
                splits = [q for q, ans in env.answers.items() if len({ans[s] for s in alive}) > 1]
                assert [q for _, q in env._splits(alive)] == splits
                env.step(env.demonstrator(rng) if k % 3 else rng.choice(env.questions + ["Is it blue?"]))
        before, twin = env.consistent(), copy.deepcopy(env)
        twin.reset(env.secrets[0])
        twin.step(env.questions[0])
        assert env.consistent() == before != twin.consistent()  # a copy narrows its own list


def test_demonstrator_probs_is_what_the_demonstrator_draws_from():
    """demonstrator_probs() (the cloning gap's reference) against 3000 draws of demonstrator() in the same
    state: the same support, and each frequency within 0.03 of its probability."""
    for name in envs.ENV_NAMES:
        env, rng = envs.make_env(name, seed=2), random.Random(2)
        for k in range(4):
            env.reset(env.secrets[k])
            for _ in range(k + (name == "twentyq")):  # states deeper into the dialogue
                if not env.step(env.demonstrator(rng))[2]:
                    continue
                env.reset(env.secrets[k])  # won already: the opening state instead
                break
            probs, draws = env.demonstrator_probs(), collections.Counter(env.demonstrator(rng) for _ in range(3000))
            assert sum(probs.values()) == pytest.approx(1.0) and set(draws) <= set(probs)
            assert all(abs(draws[u] / 3000 - p) < 0.03 for u, p in probs.items()), (name, k)


def test_twentyq_demonstrator_follows_one_fixed_order(tq):
    """Full Twenty Questions' demonstrator: per dialogue one of its fixed orders, picked at random,
    skipping only questions that no longer split the possible objects; a guess once one is left."""
    rng, firsts = random.Random(5), set()
    for _ in range(20):
        tq.reset()
        while not tq.done:
            alive, u = tq.consistent(), tq.demonstrator(rng)
            kind, what = tq.parse(u)
            order = next(o for o in tq.orders if o[0] == (tq.history[0][1] if tq.history else what))
            asked = {w for _, w, _ in tq.history}
            splits = [q for q in order if q not in asked and len({tq.answers[q][s] for s in alive}) > 1]
            if kind == "question":
                assert len(alive) > 1 and what == splits[0]
            else:
                assert kind == "guess" and what in alive and (len(alive) == 1 or not splits)
            tq.step(u)
        firsts.add(tq.history[0][1])
    assert len(firsts) >= 3  # the order is drawn per dialogue
    with pytest.raises(ValueError, match="start alike"):  # one informative question: every order starts with it
        envs.KnowledgeGame("g", ["a", "b"], {"a": "a", "b": "b"}, ["Q?"], {"Q?": {"a": envs.YES, "b": envs.NO}},
                           {"q": "Q?"}, lambda s: f"Is it {s}?", 0, 0.5, 0.1, True, orders=2)


def test_unknown_game_and_secret():
    with pytest.raises(ValueError, match="unknown game"):
        envs.make_env("chess")
    with pytest.raises(ValueError, match="unknown secret"):
        envs.make_env("twentyq_subset").reset("zebra")


@pytest.mark.parametrize("name", envs.ENV_NAMES)
def test_players_demonstrator_leaves_room_below_reference(name):
    env = envs.make_env(name, seed=0)
    ref = envs.evaluate_player(env, lambda g: g.reference())
    rng = random.Random(0)
    demo = envs.evaluate_player(env, lambda g: g.demonstrator(rng))
    assert ref["success"] == 1.0
    assert demo["return"] < ref["return"] - 3  # clear room for RL
    assert demo["success"] > 0.3  # but it wins often enough to teach something


def test_oracle_is_fast(tq):
    rng = random.Random(0)
    t, n = time.perf_counter(), 0
    while n < 20000:
        tq.reset()
        while not tq.done:
            tq.step(rng.choice(tq.questions))
            n += 1
    assert (time.perf_counter() - t) / n < 1e-4  # well under a millisecond a step


def test_cli_demo_plays_to_the_end():
    r = subprocess.run([sys.executable, os.path.join(HERE, "envs.py"), "twentyq", "--demo", "reference",
                        "--secret", "lawn mower", "--seed", "1"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "won" in r.stdout and "lawn mower" in r.stdout
# Small budgets shared by the subprocess runs: a few seconds of warm start, short games, short
# utterances (a barely cloned policy's run on to --max-new-tokens, and decoding is most of a run's time).
QUICK = ["--bc-games", "200", "--bc-steps", "20", "--games", "8", "--critic-steps", "2", "--actor-steps", "1",
         "--batch-size", "16", "--warmup-iters", "1", "--eval-every", "1", "--max-new-tokens", "3", "--device", "cpu",
         "--probe-states", "0"]
PROBE = ["--probe-states", "2"]  # the ranking probe (off in QUICK: it would run at every iteration's evaluation)


def test_cli_unknown_secret_is_a_clear_error():
    r = subprocess.run([sys.executable, os.path.join(HERE, "envs.py"), "twentyq", "--secret", "zebra"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "'zebra' is not a secret of twentyq" in r.stderr and "Traceback" not in r.stderr


def run_archer(*flags, timeout=600, env=None, script="archer.py"):
    return subprocess.run([sys.executable, os.path.join(HERE, script), *flags], capture_output=True,
                          text=True, timeout=timeout, cwd=HERE, env=env)


def run_baseline(*flags):
    return run_archer(*flags, script="baselines.py")


@pytest.fixture(scope="module")
def policy():
    torch.manual_seed(0)
    model, tok = archer.load_actor("tiny", envs.make_env("twentyq_subset"))
    model.eval()
    return archer.Policy(model, tok, max_new_tokens=12)


def test_logprobs_match_model_loss_under_left_padding(policy):
    check_logprobs_against_model_loss(policy)


def check_logprobs_against_model_loss(policy):
    """Our per-utterance log-prob equals -(HF loss x tokens) on each row alone, unpadded."""
    states = ["Questions:\n", "Questions:\nIs it alive? No.\nIs it food? Yes.\n"]
    actions = ["Is it a dog?\n", "Is it a banana?\n"]
    pids, pmask = policy.encode(states)
    assert (pmask[0] == 0).any(), "the shorter prompt must be left-padded for this test"
    enc = policy.tok(actions, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
    saved = policy.banned.clone()
    policy.banned[:] = False  # HF's loss normalizes over the whole vocabulary
    try:
        ours = archer.sequence_logprobs(policy, pids, pmask, enc.input_ids, enc.attention_mask)
    finally:
        policy.banned.copy_(saved)
    for i, (s, a) in enumerate(zip(states, actions)):
        p = policy.tok(s, return_tensors="pt", add_special_tokens=False).input_ids
        x = policy.tok(a, return_tensors="pt", add_special_tokens=False).input_ids
        ids = torch.cat([p, x], 1)
        labels = ids.clone()
        labels[:, : p.shape[1]] = -100
        with torch.no_grad():
            loss = policy.model(input_ids=ids, labels=labels).loss
        assert torch.allclose(ours[i], -loss * x.shape[1], atol=1e-4), (ours[i], -loss * x.shape[1])


def test_logprobs_use_temperature_and_ignore_masked_tokens(policy):
    pids, pmask = policy.encode(["Questions:\n"])
    aids = torch.tensor([[5, 6, 7]])
    full = archer.sequence_logprobs(policy, pids, pmask, aids, torch.tensor([[1, 1, 1]]), temperature=0.7)
    # By hand: log_softmax of the banned-masked logits divided by the temperature.
    with torch.no_grad():
        logits = policy.model(input_ids=torch.cat([pids, aids[:, :2]], 1)).logits[0, -3:].float()
    logits[:, policy.banned] = float("-inf")
    ref = torch.log_softmax(logits / 0.7, -1).gather(-1, aids[0, :, None]).sum()
    assert torch.allclose(full[0], ref, atol=1e-4)
    # A masked position does not count, whatever id sits there (the pad id has log-prob -inf).
    a = archer.sequence_logprobs(policy, pids, pmask, torch.tensor([[5, 6, 0]]), torch.tensor([[1, 1, 0]]))
    b = archer.sequence_logprobs(policy, pids, pmask, torch.tensor([[5, 6, 9]]), torch.tensor([[1, 1, 0]]))
    assert torch.isfinite(a).all() and torch.allclose(a, b)


def test_greedy_sampling_is_independent_of_padding(policy):
    """Position ids under left padding: a row generates the same tokens alone and in a batch."""
    long_state = "Questions:\nIs it alive? No.\nIs it food? No.\nIs it sharp? Yes.\n"
    alone = policy.sample(["Questions:\n"], greedy=True)
    batched = policy.sample(["Questions:\n", long_state], greedy=True)
    n = int(alone[4][0].sum())
    assert torch.equal(alone[3][0, :n], batched[3][0, :n])
    assert alone[0][0] == batched[0][0]


def test_finished_utterances_leave_the_batch_without_changing_the_others(policy):
    """Rows that stop early are dropped from the batch and the cache mid-generation; every row
    must still produce exactly what it produces alone."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)  # large random weights: the greedy choice depends strongly on the context
    cfg = GPT2Config(vocab_size=len(policy.tok), n_layer=2, n_embd=64, n_head=4, initializer_range=1.0)
    policy = archer.Policy(GPT2LMHeadModel(cfg).eval(), policy.tok, max_new_tokens=12)
    policy.stop[:] = torch.arange(len(policy.stop)) % 3 == 0  # many stop tokens: rows end at different steps
    states = ["Questions:\n", "Questions:\nIs it alive? No.\n", "Questions:\nIs it food? Yes.\nIs it red? No.\n",
              "Questions:\nIs it sharp? Yes.\n"]
    batched = policy.sample(states, greedy=True)
    lengths = batched[4].sum(1)
    assert len(set(lengths.tolist())) > 1, "the test needs rows that end at different steps"
    for i, s in enumerate(states):
        alone = policy.sample([s], greedy=True)
        n = int(lengths[i])
        assert int(alone[4][0].sum()) == n and torch.equal(alone[3][0, :n], batched[3][i, :n])


@pytest.mark.parametrize("stop", ["\n", "?"])
def test_sample_masks_end_at_the_stop_string(policy, stop):
    policy = archer.Policy(policy.model, policy.tok, max_new_tokens=12, stop=stop)
    torch.manual_seed(3)
    texts, _, _, aids, amask, _ = policy.sample(["Questions:\n"] * 16)
    ended = 0
    for text, ids, m in zip(texts, aids, amask):
        n = int(m.sum())
        assert m[:n].all() and not m[n:].any()  # a prefix of ones
        decoded = policy.tok.decode(ids[:n])
        assert stop not in text
        if n < aids.shape[1] or stop in decoded:  # ended by a stop token: it is the last one
            assert stop in policy.tok.decode(ids[n - 1 : n]) and stop not in policy.tok.decode(ids[: n - 1])
            ended += 1
        assert not (ids[:n] == policy.tok.pad_token_id).any()  # special tokens are never sampled
    assert ended > 0 or stop == "\n"  # untrained, it seldom picks the one newline token; ~160 tokens hold '?'


def test_generation_batch_size_does_not_change_what_is_generated(policy):
    states = ["Questions:\n", "Questions:\nIs it alive? No.\n", "Questions:\nIs it food? Yes.\n"] * 3
    whole = archer.Policy(policy.model, policy.tok, max_new_tokens=12).generate(states, greedy=True)
    chunked = archer.Policy(policy.model, policy.tok, max_new_tokens=12, gen_batch_size=2).generate(states, greedy=True)
    assert whole[0] == chunked[0] and all(torch.equal(a, b) for a, b in zip(whole[1], chunked[1]))


def test_bf16_autocast_is_close_to_float32(policy):
    states, actions = ["Questions:\n", "Questions:\nIs it alive? No.\n"], ["Is it a dog?\n", "Is it food?\n"]
    pids, pmask = policy.encode(states)
    enc = policy.tok(actions, return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
    f32 = archer.sequence_logprobs(policy, pids, pmask, enc.input_ids, enc.attention_mask)
    half = archer.Policy(policy.model, policy.tok, max_new_tokens=12, bf16=True)
    b16 = archer.sequence_logprobs(half, pids, pmask, enc.input_ids, enc.attention_mask)
    assert b16.dtype == torch.float32 and not torch.equal(f32, b16)  # autocast did run in bf16
    assert torch.allclose(f32, b16, atol=0.3), (f32, b16)


def test_gradient_checkpointing_gives_the_same_gradients():
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = models.build_tiny_tokenizer(envs.make_env("twentyq_subset"))
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_layer=2, n_embd=32, n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(cfg).train()
        if ckpt:
            model.activation_checkpointing_enable({"use_reentrant": False})
        pol = archer.Policy(model, tok, max_new_tokens=4)
        dialogue = [("Questions:\n", "Is it alive?", -1.0, "Questions:\nIs it alive? No.\n", False),
                    ("Questions:\nIs it alive? No.\n", "Is it food?", -1.0, "Questions:\nIs it alive? No.\nIs it food? No.\n", False)]
        loss = archer.imitation_loss(pol, archer.clone_sequences(pol, [dialogue])[0])
        loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert grads[0].abs().sum() > 0 and torch.allclose(grads[0], grads[1], atol=1e-6)


def test_cloning_gap_by_hand(policy):
    """The mean over turns of sum_u p(u | s) (log p(u | s) - log pi(u + newline | s)), each utterance scored alone."""
    turns = envs.demonstrator_turns(envs.make_env("twentyq_subset", 0), 2, 0)
    assert len(turns) > 2 and all(len(p) > 1 for _, p in turns[:-1])  # the subset's demonstrator has choices
    total = 0.0
    for s, probs in turns:
        pids, pmask = policy.encode([s])
        for u, p in probs.items():
            enc = policy.tok([u + "\n"], return_tensors="pt", add_special_tokens=False)
            with torch.no_grad():
                total += p * (math.log(p) - archer.sequence_logprobs(policy, pids, pmask, enc.input_ids, enc.attention_mask).item())
    gap = archer.cloning_gap(policy, turns, batch_size=7)
    assert gap > 0 and gap == pytest.approx(total / len(turns), rel=1e-4)


def test_kl_to_the_reference_by_hand(policy):
    """sum over the utterance's tokens of KL(pi || ref) of the next-token distributions at the
    sampling temperature: 0 against itself, and the explicit sum against another model."""
    from transformers import GPT2Config, GPT2LMHeadModel

    states = ["Questions:\n", "Questions:\nIs it alive? No.\n"]
    texts, pids, pmask, gen, amask, _ = policy.sample(states, temperature=1.5)
    torch.manual_seed(1)
    other = GPT2LMHeadModel(GPT2Config(vocab_size=len(policy.tok), n_layer=1, n_embd=32, n_head=2)).eval()
    with torch.no_grad():
        _, same = archer.sequence_logprobs(policy, pids, pmask, gen, amask, 1.5, ref=policy.model)
        _, kl = archer.sequence_logprobs(policy, pids, pmask, gen, amask, 1.5, ref=other)
        for b in range(len(states)):  # row by row, unpadded, positions from 0
            n, ids = int(amask[b].sum()), torch.cat([pids[b][pmask[b].bool()], gen[b]])
            ids = ids[: int(pmask[b].sum()) + n]
            p, q = (F.log_softmax(policy.scores(m(ids[None]).logits[0], 1.5), -1)[-n - 1: -1] for m in (policy.model, other))
            keep = ~policy.banned
            assert kl[b].item() == pytest.approx((p.exp()[:, keep] * (p[:, keep] - q[:, keep])).sum().item(), rel=1e-4)
    assert torch.allclose(same, torch.zeros(2), atol=1e-5) and (kl > 0).all()


def test_cloning_whole_dialogues_equals_cloning_every_turn_alone(policy):
    """One teacher-forced pass per dialogue gives the per-token mean of -log pi(utterance + stop |
    state) over every turn, each scored alone; a turn whose next state does not extend the state
    (the second dialogue) is scored from its own state."""
    game = envs.make_env("twentyq_subset", 0)
    demos = envs.demonstrations(game, 4, 0)
    odd = [("Say it.\n", "Is it a dog?", -1.0, "Something else.\n", False), ("Something else.\n", "Is it red?", -1.0, "x", True)]
    num, den = 0.0, 0
    for s, a, *_ in [tr for d in demos + [odd] for tr in d]:
        pids, pmask = policy.encode([s])
        enc = policy.tok([a + "\n"], return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            num -= archer.sequence_logprobs(policy, pids, pmask, enc.input_ids, enc.attention_mask).item()
        den += enc.input_ids.numel()
    with torch.no_grad():
        seqs = [x for d in archer.clone_sequences(policy, demos + [odd]) for x in d]
        assert archer.imitation_loss(policy, seqs).item() == pytest.approx(num / den, rel=1e-5)


class FakeCritic(nn.Module):
    """Fixed Q and V values, to check the losses against hand computation."""

    def __init__(self, q, v):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))
        self.qv, self.vv = q, v

    def q(self, states, actions):
        return tuple(torch.tensor(x) + 0 * self.dummy for x in self.qv)

    def v(self, states):
        return tuple(torch.tensor(x) + 0 * self.dummy for x in self.vv)

    def q_and_v(self, states, actions, v_states):
        return self.q(states, actions) + self.v(v_states)


def test_diagnostics_by_hand():
    tr = lambda a, r=-1.0: ("s", a, r, "s2", False)
    games = [[tr("q1"), tr("q2"), tr("q1"), tr("q1"), tr("g", 0.0)], [tr("q2"), tr("q3")]]
    assert archer.repeat_share(games) == pytest.approx(2 / 7)  # the 3rd and 4th "q1" of the first game
    g, q = torch.tensor([-3.0, -2.0, -1.0, 0.0]), torch.tensor([-2.5, -2.5, -0.5, -0.5])
    # 1 - Var(G - Q) / Var(G) with G - Q = [-0.5, 0.5, -0.5, 0.5]: Var 1/3 against Var(G) 5/3
    assert archer.explained_variance(q, g) == pytest.approx(1 - (1 / 3) / (5 / 3))
    assert archer.explained_variance(g, g) == pytest.approx(1.0) and math.isnan(archer.explained_variance(q, g * 0))

    class ByAction(nn.Module):  # Q1 = Q2 = a number written in the utterance
        def q(self, states, actions):
            x = torch.tensor([float(a) for a in actions])
            return x, x + 1

    # returns to go at gamma 0.5: [-1 + 0.5 * -1, -1] = [-1.5, -1] and [0]; Q = [-1.5, -1, 0] fits them exactly
    games = [[("s", "-1.5", -1.0, "", False), ("s", "-1", -1.0, "", True)], [("s", "0", 0.0, "", True)]]
    assert archer.critic_fit(ByAction(), games, 0.5, batch_size=2) == pytest.approx(1.0)
    games[1][0] = ("s", "-3", 0.0, "", True)  # a Q of -3 where the return was 0
    g, q = torch.tensor([-1.5, -1.0, 0.0]), torch.tensor([-1.5, -1.0, -3.0])
    assert archer.critic_fit(ByAction(), games, 0.5, batch_size=2) == pytest.approx(archer.explained_variance(q, g))


def test_td_targets_by_hand():
    online = FakeCritic(q=([-1.0, -2.0], [-1.5, -1.0]), v=([-3.0, -1.0], [-2.0, -2.0]))
    target = FakeCritic(q=([-2.0, -4.0], [-3.0, -1.0]), v=([-5.0, -6.0], [-4.0, -7.0]))
    batch = (["s0", "s1"], ["a0", "a1"], torch.tensor([-1.0, 0.0]), ["n0", "n1"], torch.tensor([0.0, 1.0]))
    loss, stats = archer.critic_loss(online, target, batch, ["x0", "x1"], gamma=0.9)
    # Q1 targets: r + 0.9 (1 - d) Vbar1(s') = [-1 + 0.9 * -5, 0] = [-5.5, 0]
    # Q2 targets: [-1 + 0.9 * -4, 0] = [-4.6, 0]
    # V targets: min(Qbar1, Qbar2)(s, a~) = [-3, -4]
    mse = lambda a, b: sum((x - y) ** 2 for x, y in zip(a, b)) / len(a)
    expected = (mse([-1, -2], [-5.5, 0]) + mse([-1.5, -1], [-4.6, 0]) + mse([-3, -1], [-3, -4]) + mse([-2, -2], [-3, -4]))
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["q_mean"] == pytest.approx((-1.5 - 2.0) / 2)


def test_advantage_and_actor_loss_by_hand():
    critic = FakeCritic(q=([-1.0, -2.0, -3.0], [-2.0, -1.0, -1.0]), v=([-4.0, -1.0, -2.0], [-3.0, -2.0, -2.0]))
    adv = archer.advantage(critic, ["a", "b", "c"], ["x", "y", "z"])
    assert adv.tolist() == pytest.approx([-2.0 + 4.0, -2.0 + 2.0, -3.0 + 2.0])  # min Q - min V
    logp = torch.tensor([-1.0, -2.0, -3.0])
    a = torch.tensor([2.0, 0.0, -1.0])
    a_norm = (a - a.mean()) / a.std()
    assert archer.actor_loss(logp, adv).item() == pytest.approx(-(a_norm * logp).mean().item(), rel=1e-5)


def test_the_kl_penalty_pulls_the_actor_back_to_the_warm_started_one(tmp_path):
    """The actor's regularizer: its reference is the actor as cloned (not the fresh model, not a later copy),
    and with advantages that carry no preference its gradient step moves the actor towards that reference
    (a penalty with the wrong sign would push it away)."""
    run = small_run(tmp_path, "--kl-coef", "1.0", "--actor-lr", "1e-2")
    fresh = {k: v.clone() for k, v in run.policy.model.state_dict().items()}
    archer.warm_start(run)
    cloned = run.policy.model.state_dict()
    assert all(torch.equal(run.reference.state_dict()[k], v) for k, v in cloned.items())
    assert any(not torch.equal(fresh[k], v) for k, v in cloned.items())  # cloning moved the actor
    with torch.no_grad():  # the actor drifts away from its reference
        for p in run.policy.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    states = run.buffer.sample(16, random.Random(0))[0]
    _, ids, _ = run.policy.generate(states, 1.0)
    kls = []
    for _ in range(3):
        loss, kl = archer.policy_gradient_loss(run, states, ids, torch.zeros(len(states)))  # no preference
        assert kl > 0 and loss.item() == pytest.approx(run.args.kl_coef * kl, rel=1e-4)
        archer.clipped_step(run.actor_opt, run.policy.model.parameters(), loss, run.args.grad_clip)
        kls.append(kl)
    assert kls[2] < kls[1] < kls[0]


def test_polyak_by_hand():
    online, target = nn.Linear(2, 1), nn.Linear(2, 1)
    with torch.no_grad():
        online.weight.fill_(1.0), online.bias.fill_(2.0), target.weight.fill_(0.0), target.bias.fill_(-2.0)
    archer.polyak(target, online, tau=0.1)
    assert target.weight[0].tolist() == pytest.approx([0.1, 0.1])
    assert target.bias.item() == pytest.approx(0.9 * -2.0 + 0.1 * 2.0)


# ---- call sites: how train() wires the pieces together (each test fails if the wiring breaks) ----
def small_run(tmp_path, *flags, rule=None):
    """A real Run of the quick settings, its buffer filled with demonstrator games, no training."""
    args = archer.parse_args(["--out", str(tmp_path / "run"), *QUICK, *flags])
    run = archer.Run(args, None, rule or archer.ArCHer())
    run.buffer.add_games(envs.demonstrations(run.fresh(0), 20, 0))
    return run


def recording(calls, fn, name):
    """fn, with every call's positional arguments appended to calls as (name, args)."""
    def wrapped(*a):
        calls.append((name, [list(x) if isinstance(x, (list, tuple)) else x for x in a]))
        return fn(*a)
    return wrapped


class FreshAgent:
    """Answers every state with 'fresh <n>', n its position in the batch's states (known actions)."""

    def __init__(self):
        self.asked = []

    def generate(self, states, temperature=1.0, greedy=False):
        self.asked.append(list(states))
        return [f"fresh {k}" for k in range(len(states))], None, None


def test_the_v_target_scores_fresh_actions_on_the_batch_states_and_q_targets_the_next_states(tmp_path):
    run = small_run(tmp_path, "--critic-steps", "1")
    run.agent, calls = FreshAgent(), []
    for net, name in ((run.critic, "online"), (run.target, "target")):
        net.q_and_v = recording(calls, net.q_and_v, name)  # (Q's states, Q's utterances, V's states)
    archer.critic_steps(run)
    got = dict(calls)
    online_s, online_a, online_vs = got["online"]
    assert online_vs == online_s  # V_i(s) on the batch's states
    target_s, target_a, target_vs = got["target"]
    assert target_s == online_s and target_a == [f"fresh {k}" for k in range(len(online_s))]  # Qbar(s, a~): fresh, not a
    assert run.agent.asked == [online_s]  # the fresh actions were sampled for exactly those states
    assert online_a != target_a  # the buffer's actions trained Q, they did not make the V target
    by_state = {(tr[0], tr[1]): tr[3] for tr in run.buffer.data}
    assert target_vs == [by_state[(x, y)] for x, y in zip(online_s, online_a)]  # Vbar on s', not on s


def test_the_target_critic_follows_the_online_one_after_every_critic_step(tmp_path, monkeypatch):
    run = small_run(tmp_path, "--critic-steps", "3")
    real, seen = archer.polyak, []

    def watched(target, online, tau):
        before = [p.detach().clone() for p in (*target.parameters(), *online.parameters())]
        real(target, online, tau)
        n = len(list(target.parameters()))
        t0, o0 = before[:n], before[n:]
        moved = sum((t - o).abs().sum() for t, o in zip(t0, o0)) - sum((t - o).abs().sum() for t, o in zip(target.parameters(), online.parameters())).detach()
        seen.append((target is run.target, all(torch.equal(x, y) for x, y in zip(o0, online.parameters())), float(moved)))
    monkeypatch.setattr(archer, "polyak", watched)
    archer.critic_steps(run)
    assert len(seen) == 3  # one Polyak step after every critic step
    assert all(is_target and online_kept and moved > 0 for is_target, online_kept, moved in seen), seen


def test_the_actor_is_frozen_during_the_critic_warm_up_and_moves_after_it(tmp_path):
    run = small_run(tmp_path, "--warmup-iters", "2")
    trajs, ids, _ = archer.collect_games(run, [run.fresh(i) for i in range(4)])
    weights = lambda: [p.detach().clone() for p in run.policy.model.parameters()]
    for it, should_move in ((0, False), (1, False), (2, True)):
        before = weights()
        run.rule.update(run, it, trajs, ids)
        moved = any(not torch.equal(x, y) for x, y in zip(before, run.policy.model.parameters()))
        assert moved == should_move, it


def test_the_temperature_reaches_rollouts_fresh_actions_and_the_actor_log_probs(tmp_path, monkeypatch):
    run = small_run(tmp_path, "--temperature", "0.5", "--warmup-iters", "0")
    temps, sampled, scored = [], [], []
    real_scores, real_generate, real_loss = run.policy.scores, run.policy.generate, archer.actor_loss

    def scores(logits, temperature):
        temps.append(temperature)
        return real_scores(logits, temperature)

    def generate(states, temperature=1.0, greedy=False):
        out = real_generate(states, temperature, greedy)
        sampled.append(out[2])
        return out
    run.policy.scores, run.policy.generate = scores, generate
    monkeypatch.setattr(archer, "actor_loss", lambda logp, adv: scored.append(logp.detach()) or real_loss(logp, adv))
    trajs, ids, _ = archer.collect_games(run, [run.fresh(i) for i in range(4)])  # rollouts
    run.rule.update(run, 0, trajs, ids)  # fresh actions for the critic, then the actor step
    assert temps and set(temps) == {0.5}
    # the actor's loss scores exactly the distribution that sampled its utterances
    assert len(scored) == 1 and torch.allclose(scored[0], sampled[-1], atol=1e-4)


def test_the_critic_reads_each_texts_final_real_token_under_right_padding(tmp_path):
    run = small_run(tmp_path)
    texts = ["Questions:\n", "Questions:\nIs it alive? No.\nIs it food? Yes.\nIs it red? No.\n"]
    with torch.no_grad():
        together = run.critic.embed(texts)
        alone = torch.cat([run.critic.embed([t]) for t in texts])
    assert torch.allclose(together, alone, atol=1e-5)
    assert not torch.allclose(together[0], together[1])


def test_the_critics_batched_passes_equal_one_pass_per_head(tmp_path):
    """embed's length-sorted chunks, q_and_v's shared pass and critic_loss's two passes (one target, one online)
    compute what one padded call per text list did: the same hidden states, loss and gradients, to 1e-5."""
    run = small_run(tmp_path)
    critic, target = run.critic, run.target
    with torch.no_grad():
        for p in target.parameters():
            p.add_(0.01 * torch.randn_like(p))  # a target that differs from the online critic
    s, a, r, s2, d = run.buffer.sample(24, random.Random(0))
    fresh = [x[::-1] for x in a]  # any other utterances
    texts = list(s) + list(s2)
    assert len({len(critic.token_ids([t])[0]) for t in texts}) > 4  # lengths vary: the chunks differ
    with torch.no_grad():
        assert torch.allclose(critic.embed(texts), critic.embed(texts, chunks=1), atol=1e-5)

    def old_loss():  # the four separate passes, each one padded call
        heads = lambda net, x, h: net.__getattr__(h)(x).squeeze(-1)
        with torch.no_grad():
            xv2, xq = target.embed(s2, chunks=1), target.embed([x + y + "\n" for x, y in zip(s, fresh)], chunks=1)
            y1, y2 = r + 0.9 * (1 - d) * heads(target, xv2, "v1"), r + 0.9 * (1 - d) * heads(target, xv2, "v2")
            yv = torch.minimum(heads(target, xq, "q1"), heads(target, xq, "q2"))
        xq, xv = critic.embed([x + y + "\n" for x, y in zip(s, a)], chunks=1), critic.embed(s, chunks=1)
        return (F.mse_loss(heads(critic, xq, "q1"), y1) + F.mse_loss(heads(critic, xq, "q2"), y2)
                + F.mse_loss(heads(critic, xv, "v1"), yv) + F.mse_loss(heads(critic, xv, "v2"), yv))

    grads = []
    for loss in (archer.critic_loss(critic, target, (s, a, r, s2, d), fresh, 0.9)[0], old_loss()):
        critic.zero_grad()
        loss.backward()
        grads.append((loss.item(), torch.cat([p.grad.flatten() for p in critic.parameters() if p.grad is not None])))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-5)
    assert grads[0][1].abs().sum() > 0 and torch.allclose(grads[0][1], grads[1][1], atol=1e-5)


class ScriptedAgent:
    """Says "Is it a dog?" in every game; asked for 4 utterances on the opening state, offers three."""

    def generate(self, states, temperature=1.0, greedy=False):
        texts = (["Is it a dog?", "Is it a pen?", "Is it a cat?", "Is it a dog?"] if states == ["Questions:\n"] * 4
                 else ["Is it a dog?"] * len(states))
        return texts, [torch.zeros(1, dtype=torch.long) for _ in texts], torch.zeros(len(texts))


def test_probe_values_by_hand(tmp_path):
    """Monte Carlo values from the opening state of the subset, 10 rollouts (each secret once), the agent then
    asking "Is it a dog?" to the end: a right first guess is worth 0; otherwise -1, then 0 if the secret is the
    dog (won on the next turn), else -1 on each of the 19 turns left."""
    run = small_run(tmp_path)
    run.probe, run.agent, g = [("Questions:\n", [])], ScriptedAgent(), run.args.gamma
    keys, mean, se2 = archer.probe_values(run, rollouts=10)
    lost = -1 - g * sum(g ** t for t in range(19))
    assert keys == [("Questions:\n", u) for u in ("Is it a dog?", "Is it a pen?", "Is it a cat?")]  # "cat": invalid
    expected = [9 * lost / 10, (-1 + 8 * lost) / 10, (-1 + 9 * lost) / 10]
    assert mean.tolist() == pytest.approx(expected, rel=1e-5)
    assert se2[0].item() == pytest.approx(torch.tensor([0.0] + [lost] * 9).var().item() / 10, rel=1e-5)
    won, lost = (archer.replay(copy.deepcopy(run.game), x, ["Is it a dog?"]) for x in ("dog", "pen"))
    assert won is None and lost == "Questions:\nIs it a dog? No.\n"  # a replay that ends the game reaches no state


def test_ranking_accuracy_counts_clear_pairs_on_the_same_state(tmp_path, monkeypatch):
    run = small_run(tmp_path)
    keys = [("s1", "a"), ("s1", "b"), ("s1", "c"), ("s2", "d"), ("s2", "e")]
    mean = torch.tensor([0.0, -5.0, -5.1, -1.0, -3.0])  # clear (2 standard errors = 1.41): a-b, a-c, d-e; not b-c
    monkeypatch.setattr(archer, "probe_values", lambda run, rollouts: (keys, mean, torch.full((5,), 0.25)))
    q = {"a": 1.0, "b": 2.0, "c": 0.0, "d": 5.0, "e": 1.0}  # a-b in the wrong order, a-c and d-e right
    run.critic = FakeCritic(q=([q[k] for _, k in keys], [q[k] + 1 for _, k in keys]), v=([], []))
    assert archer.ranking_accuracy(run) == (pytest.approx(2 / 3), 3)


def test_no_behaviour_cloning_steps_still_seeds_the_buffer_and_runs(tmp_path):
    out = str(tmp_path / "run")
    r = run_archer("--iterations", "0", "--out", out, *QUICK, "--bc-steps", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    warm = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
    assert warm["bc_loss"] is None and "bc_loss none" in r.stdout
    assert len(torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["buffer"]) > 200  # 200 demo games


def test_filtered_bc_keeps_only_the_elite_and_the_returns(tmp_path):
    run = small_run(tmp_path, rule=baselines.FilteredBC())
    played = 0
    for it in range(3):
        trajs, ids, _ = archer.collect_games(run, [run.fresh(i) for i in range(8)])
        run.rule.update(run, it, trajs, ids)
        played += len(trajs)
        returns = sorted(run.extra["returns"], reverse=True)
        cut = returns[math.ceil(0.1 * played) - 1]
        assert len(returns) == played and all(sum(t[2] for t in d) >= cut for d in run.extra["elite"])
        assert 1 <= len(run.extra["elite"]) <= sum(r >= cut for r in returns)  # only games at or above the cut
    assert run.critic is None and run.target is None  # a rule without a critic builds none


def test_replay_buffer_capacity_and_sampling():
    buf = archer.ReplayBuffer(capacity=5)
    for i in range(8):
        buf.add((f"s{i}", f"a{i}", -1.0, f"s{i + 1}", i == 7))
    assert len(buf) == 5
    assert sorted(t[0] for t in buf.data) == ["s3", "s4", "s5", "s6", "s7"]  # the oldest were overwritten
    s, a, r, s2, d = buf.sample(100, random.Random(0))
    assert len(s) == 100 and r.shape == (100,) and d.dtype == torch.float32
    assert set(s) == {"s3", "s4", "s5", "s6", "s7"}  # uniform over what is stored: all of it shows up
    assert all(a_[1:] == s_[1:] for s_, a_ in zip(s, a))  # columns stay aligned


def test_run_resume_and_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    r = run_archer("--env", "twentyq_subset", "--iterations", "2", "--out", out, *QUICK, *PROBE)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "final evaluation" in r.stdout.strip().splitlines()[-1]
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["iteration"] for m in rows] == [-1, 0, 1]
    for key in ("env_steps", "train_return", "critic_loss", "actor_loss", "q_mean", "v_mean", "advantage_mean",
                "seconds", "eval_success", "eval_return", "eval_turns", "ranking_accuracy", "ranking_pairs", "ranking_seconds"):
        assert key in rows[-1], key
    assert "cloning_gap" in rows[0] and rows[0]["cloning_gap"] > 0
    ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert ck["iteration"] == 1 and len(ck["buffer"]) > 0
    r = run_archer("--env", "twentyq_subset", "--iterations", "3", "--out", out, "--resume", *QUICK, *PROBE)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resumed from" in r.stdout
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["iteration"] for m in rows] == [-1, 0, 1, 2]  # continued, not restarted
    assert rows[-1]["env_steps"] > rows[-2]["env_steps"]
    r = run_archer("--env", "twentyq_subset", "--out", out, "--eval-only", *QUICK)
    assert r.returncode == 0, r.stderr[-2000:]
    ev = json.loads(r.stdout.strip().splitlines()[-1])
    assert 0.0 <= ev["eval_success"] <= 1.0 and -20.0 <= ev["eval_return"] <= 0.0


@pytest.mark.parametrize("flag", ["--resume", "--eval-only"])
def test_resume_or_eval_without_checkpoint_is_a_clear_error(tmp_path, flag):
    r = run_archer("--out", str(tmp_path / "none"), flag, *QUICK)
    assert r.returncode == 2 and "no checkpoint" in r.stderr and "Traceback" not in r.stderr


def test_local_model_directory_loads_through_from_pretrained(tmp_path):
    model, tok = archer.load_actor("tiny", envs.make_env("twentyq_subset"))
    model.save_pretrained(tmp_path / "actor")
    tok.save_pretrained(tmp_path / "actor")
    loaded, ltok = archer.load_actor(str(tmp_path / "actor"), None)
    assert type(loaded) is type(model) and len(ltok) == len(tok)
    r = run_archer("--env", "twentyq_subset", "--iterations", "1", "--out", str(tmp_path / "run"),
                   "--model", str(tmp_path / "actor"), "--critic", "tiny", *QUICK)
    assert r.returncode == 0, r.stderr[-2000:]
    r = run_archer("--model", str(tmp_path / "missing"), "--out", str(tmp_path / "run2"), *QUICK)
    assert r.returncode == 2 and "no such directory" in r.stderr and "Traceback" not in r.stderr


# ---- models of each kind, saved like hub models and loaded through from_pretrained ----
def bpe_tokenizer(specials, template=None, **named):
    """A byte-level BPE tokenizer trained on the subset's text, wrapped for transformers."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(envs.make_env("twentyq_subset").corpus(), trainers.BpeTrainer(
        vocab_size=500, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    if template:  # an encoder's [CLS] text [SEP]
        a, b = template
        tok.post_processor = processors.TemplateProcessing(
            single=f"{a} $A {b}", special_tokens=[(a, tok.token_to_id(a)), (b, tok.token_to_id(b))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, **named)


@pytest.fixture(scope="module")
def hub_dirs(tmp_path_factory):
    """Small models of each kind from configs, saved with save_pretrained: a GPT-2 and a
    Llama-style actor (neither tokenizer has a pad token; the Llama's embedding is wider than
    its vocabulary), a BERT and a RoBERTa critic (special tokens around the text)."""
    from transformers import BertConfig, BertModel, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
    from transformers import RobertaConfig, RobertaModel

    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(0)
    gtok = bpe_tokenizer(["<|endoftext|>"], eos_token="<|endoftext|>", bos_token="<|endoftext|>")
    ltok = bpe_tokenizer(["<s>", "</s>"], bos_token="<s>", eos_token="</s>")
    btok = bpe_tokenizer(["[PAD]", "[UNK]", "[CLS]", "[SEP]"], ("[CLS]", "[SEP]"), pad_token="[PAD]", unk_token="[UNK]",
                         cls_token="[CLS]", sep_token="[SEP]")
    rtok = bpe_tokenizer(["<s>", "<pad>", "</s>"], ("<s>", "</s>"), bos_token="<s>", pad_token="<pad>", eos_token="</s>",
                         model_max_length=128)
    built = {
        "gpt2": (GPT2LMHeadModel(GPT2Config(vocab_size=len(gtok), n_layer=2, n_embd=32, n_head=4, n_positions=64)), gtok),
        "llama": (LlamaForCausalLM(LlamaConfig(vocab_size=len(ltok) + 6, hidden_size=32, intermediate_size=64,
                                               num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                               max_position_embeddings=256, bos_token_id=0, eos_token_id=1)), ltok),
        "bert": (BertModel(BertConfig(vocab_size=len(btok), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                      intermediate_size=64)), btok),
        "roberta": (RobertaModel(RobertaConfig(vocab_size=len(rtok), hidden_size=48, num_hidden_layers=2,
                                               num_attention_heads=4, intermediate_size=64, max_position_embeddings=130,
                                               pad_token_id=1, bos_token_id=0, eos_token_id=2)), rtok),
    }
    for name, (model, tok) in built.items():
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return {name: str(root / name) for name in built}


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hub_actors_logprobs_match_model_loss_under_left_padding(hub_dirs, kind):
    model, tok = archer.load_actor(hub_dirs[kind], None)
    assert tok.pad_token is not None and tok.padding_side == "left"
    pol = archer.Policy(model.eval(), tok, max_new_tokens=12)
    assert pol.banned[len(tok):].all() and len(pol.banned) == model.config.vocab_size
    check_logprobs_against_model_loss(pol)


def test_a_prompt_longer_than_the_context_loses_its_oldest_turns(hub_dirs):
    model, tok = archer.load_actor(hub_dirs["gpt2"], None)  # 64 positions
    pol = archer.Policy(model.eval(), tok, max_new_tokens=12)
    state = "Questions:\n" + "".join(f"Is it {w}? No.\n" for w in ["alive", "food", "red", "sharp", "metal"] * 6)
    ids, mask = pol.encode([state, "Questions:\n"])
    full = tok(state, add_special_tokens=False).input_ids
    assert len(full) > 64 and ids.shape[1] == pol.max_prompt == 52
    assert ids[0].tolist() == full[-52:]  # the newest turns are kept
    texts, *_ = pol.sample([state, "Questions:\n"])
    assert len(texts) == 2


@pytest.mark.parametrize("actor,critic", [("gpt2", "bert"), ("gpt2", "roberta"), ("llama", "bert"), ("llama", "roberta")])
def test_one_iteration_with_saved_models_of_each_kind(hub_dirs, tmp_path, actor, critic):
    out = str(tmp_path / "run")
    r = run_archer("--iterations", "1", "--out", out, "--model", hub_dirs[actor], "--critic", hub_dirs[critic], *QUICK,
                   "--warmup-iters", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["iteration"] for m in rows] == [-1, 0] and math.isfinite(rows[-1]["critic_loss"])
    assert math.isfinite(rows[-1]["actor_loss"])


def test_models_of_the_wrong_kind_or_out_of_reach_are_clear_errors(hub_dirs, tmp_path):
    r = run_archer("--model", hub_dirs["bert"], "--out", str(tmp_path / "a"), *QUICK)
    assert r.returncode == 2 and "bert model, which cannot serve here" in r.stderr and "Traceback" not in r.stderr
    r = run_archer("--critic", "./no/such/dir", "--out", str(tmp_path / "b"), *QUICK)
    assert r.returncode == 2 and "no such directory" in r.stderr and "Traceback" not in r.stderr
    offline = dict(os.environ, HF_HUB_OFFLINE="1")  # what a machine without network sees, without the retries
    r = run_archer("--model", "gpt2", "--out", str(tmp_path / "c"), *QUICK, env=offline)
    assert r.returncode == 2 and "could not load actor model 'gpt2'" in r.stderr and "--model tiny" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "c")


def test_gpu_recipe_is_the_bare_paper_command():
    """train_gpt2_twentyq.sh runs `python archer.py --env twentyq --model gpt2 ...` and nothing else, so it
    cannot drift from the preset; the command resolves to the paper's settings."""
    text = open(os.path.join(HERE, "train_gpt2_twentyq.sh")).read()
    commands = [line for line in text.splitlines() if line.startswith("python")]
    assert commands == ['python archer.py --env twentyq --model gpt2 --critic roberta-base "$@"']
    args = archer.settle(archer.parse_args(commands[0].split()[2:-1]))
    assert (args.env, args.model, args.critic, args.games, args.critic_steps, args.critic_lr) == \
        ("twentyq", "gpt2", "roberta-base", 128, 50, 2e-5)


def test_presets_follow_the_actor_and_the_game_and_a_given_flag_wins(hub_dirs):
    settle = lambda *argv: archer.settle(archer.parse_args(list(argv)))
    quick = settle()  # the tiny actor on the quick start's game: the CPU defaults
    assert (quick.critic, quick.bc_steps, quick.iterations, quick.games, quick.actor_lr) == ("tiny", 1200, 60, 32, 1e-4)
    for game in ("twentyq", "guess_my_city"):  # the README's recipe for the large games
        big = settle("--env", game)
        assert (big.bc_steps, big.iterations, big.eval_every, big.games, big.critic) == (3000, 150, 25, 32, "tiny")
    assert settle("--env", "examples.number_game:NumberGame").bc_steps == 1200  # a user's game: the quick start
    for env in ("twentyq", "twentyq_subset"):  # a pretrained actor, named or saved: the paper's settings
        for model in ("gpt2", hub_dirs["gpt2"]):
            paper = settle("--env", env, "--model", model)
            assert (paper.critic, paper.games, paper.batch_size, paper.critic_steps, paper.actor_steps, paper.warmup_iters,
                    paper.critic_lr, paper.actor_lr, paper.bc_lr, paper.max_new_tokens, paper.iterations) == \
                ("roberta-base", 128, 256, 50, 3, 20, 2e-5, 1e-5, 1e-4, 32, 200)
    mine = settle("--env", "twentyq", "--iterations", "60", "--model", "gpt2", "--critic", "tiny", "--games", "32")
    assert (mine.iterations, mine.critic, mine.games, mine.critic_steps) == (60, "tiny", 32, 50)  # given beats preset
    assert settle("--env", "twentyq", "--bc-steps", "1200").bc_steps == 1200  # even a value equal to another preset's
    py = archer.settle(archer.Args(env="twentyq", iterations=7))  # from Python: a field left at None is preset
    assert (py.iterations, py.bc_steps) == (7, 3000)
    assert "tiny (tiny), roberta-base (pretrained)" in " ".join(
        subprocess.run([sys.executable, "archer.py", "--help"], capture_output=True, text=True, cwd=HERE).stdout.split())


def test_the_checkpoint_keeps_the_resolved_settings_and_resume_continues_with_them(hub_dirs, tmp_path):
    out = str(tmp_path / "run")
    r = run_archer("--env", "twentyq_subset", "--model", hub_dirs["gpt2"], "--critic", hub_dirs["bert"], "--out", out,
                   "--iterations", "0", "--bc-games", "20", "--bc-steps", "2", "--device", "cpu")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "pretrained actor preset" in r.stdout and "given: --critic" in r.stdout
    saved = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["args"]
    assert (saved["games"], saved["batch_size"], saved["max_new_tokens"], saved["bc_steps"]) == (128, 256, 32, 2)
    # resumed without those flags, the run keeps its own settings, not the tiny model's preset or defaults
    args = archer.settle(archer.parse_args(["--out", out, "--resume", "--iterations", "3"]), saved)
    assert (args.games, args.batch_size, args.critic, args.iterations) == (128, 256, hub_dirs["bert"], 3)
    r = run_archer("--env", "twentyq_subset", "--model", hub_dirs["gpt2"], "--out", out, "--resume", "--iterations", "0",
                   "--games", "8", "--device", "cpu")  # a setting that would change what the run means
    assert r.returncode == 2 and "has --games 128, not 8" in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_bf16_checkpointing_and_small_generation_batches_run_end_to_end(tmp_path):
    out = str(tmp_path / "run")
    r = run_archer("--iterations", "1", "--out", out, "--dtype", "bfloat16", "--grad-checkpointing",
                   "--gen-batch-size", "3", *QUICK, "--warmup-iters", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    assert "bf16 autocast" in r.stdout
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert math.isfinite(rows[-1]["critic_loss"]) and math.isfinite(rows[-1]["actor_loss"])


def test_lora_asks_for_peft_when_it_is_missing(tmp_path):
    (tmp_path / "hide" / "peft").mkdir(parents=True)
    (tmp_path / "hide" / "peft" / "__init__.py").write_text("raise ImportError('no peft here')\n")
    no_peft = dict(os.environ, PYTHONPATH=str(tmp_path / "hide"))
    r = run_archer("--iterations", "1", "--out", str(tmp_path / "run"), "--lora-rank", "4", *QUICK, env=no_peft)
    assert r.returncode == 2 and "pip install peft" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="peft is optional and not installed")
def test_lora_trains_the_adapters_only(tmp_path):
    out = str(tmp_path / "run")
    r = run_archer("--iterations", "1", "--out", out, "--lora-rank", "4", *QUICK, "--warmup-iters", "0")
    assert r.returncode == 0, r.stderr[-2000:]
    total, trained = map(float, re.search(r"actor tiny: ([\d.]+)M params \(([\d.]+)M trained\)", r.stdout).groups())
    assert 0 < trained < total
    ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert any("lora_" in k for k in ck["actor"])



def test_elite_keeps_the_top_tenth_with_ties():
    def dialogue(ret):  # one transition per -1 of return, the last one winning
        return [("s", "a", -1.0, "s", False)] * int(-ret) + [("s", "win", 0.0, "s", True)]
    games = [dialogue(-r) for r in range(20)]  # returns 0, -1, ..., -19
    assert [sum(t[2] for t in d) for d in baselines.elite(games)] == [0.0, -1.0]  # top 10% of 20
    games.append(dialogue(-1))  # a tie at the cut is kept: 3 games now
    assert sorted(sum(t[2] for t in d) for d in baselines.elite(games)) == [-1.0, -1.0, 0.0]
    assert len(baselines.elite(games[:3])) == 1  # at least one game, even from few


def test_returns_to_go_by_hand():
    assert archer.returns_to_go([-1.0, -1.0, 0.0], 0.5) == pytest.approx([-1.5, -1.0, 0.0])
    assert archer.returns_to_go([-1.0, -1.0, -1.0], 1.0) == pytest.approx([-3.0, -2.0, -1.0])


def test_utterance_logprobs_are_those_of_the_sampled_ids(policy):
    states = ["Questions:\n", "Questions:\nIs it alive? No.\n"]
    texts, pids, pmask, gen, amask, _ = policy.sample(states, temperature=1.3)
    ids = [g[m.bool()] for g, m in zip(gen, amask)]
    with torch.no_grad():
        ref = archer.sequence_logprobs(policy, pids, pmask, gen, amask, 1.3)
        got = archer.utterance_logprobs(policy, states, ids, 1.3)
    assert torch.allclose(got, ref, atol=1e-5)


def test_chai_says_the_candidate_with_the_highest_min_q():
    class Candidates:  # the k calls return the k candidates of both states in turn
        def __init__(self):
            self.calls = []

        def generate(self, states, temperature=1.0, greedy=False):
            self.calls.append(greedy)
            j = len(self.calls) - 1
            return [f"{s}-c{j}" for s in states], [torch.tensor([j, i]) for i in range(len(states))], torch.full((len(states),), -float(j))

    class Scores(nn.Module):  # Q1, Q2 per (state, candidate): state 0 prefers c2 by min Q, state 1 c0
        table = {"a-c0": (0.0, -5.0), "a-c1": (-1.0, -1.5), "a-c2": (-1.2, -1.2),
                 "b-c0": (-2.0, -2.0), "b-c1": (9.0, -3.0), "b-c2": (-4.0, 0.0)}

        def q(self, states, actions):
            assert list(states) == ["a", "b"] * 3 and all(x.startswith(s) for s, x in zip(states, actions))
            return tuple(torch.tensor([self.table[x][h] for x in actions]) for h in (0, 1))

    policy = Candidates()
    texts, ids, logps = baselines.ChaiAgent(policy, Scores(), k=3).generate(["a", "b"], greedy=True)
    assert texts == ["a-c2", "b-c0"] and policy.calls == [True, False, False]  # the greedy one is a candidate too
    assert [x.tolist() for x in ids] == [[2, 0], [0, 1]] and logps.tolist() == [-2.0, 0.0]  # the chosen one's


@pytest.mark.parametrize("algo", ["filtered_bc", "reinforce", "chai"])
def test_baselines_run_end_to_end_within_a_step_budget(tmp_path, algo):
    out = str(tmp_path / algo)
    r = run_baseline("--algo", algo, "--iterations", "50", "--max-env-steps", "200", "--out", out, *QUICK)
    assert r.returncode == 0, r.stderr[-2000:]
    log = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    assert log[-1]["env_steps"] >= 200 and log[-2]["env_steps"] < 200  # stopped at the budget
    if algo == "chai":  # ArCHer's critic, trained; the actor never moves
        assert log[-1]["critic_loss"] is not None and "actor_loss" not in log[-1] and "eval_success" in log[-1]
        ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
        assert ck["actor_opt"]["state"] == {} and ck["critic_opt"]["state"]  # no actor step was ever taken
    else:  # no critic built, checkpointed or exported
        assert log[-1]["actor_loss"] is not None and "eval_success" in log[-1] and "critic_loss" not in log[-1]
        assert not os.path.exists(os.path.join(out, "critic"))
    r = run_baseline("--algo", algo, "--iterations", "50", "--max-env-steps", "200", "--out", out, "--resume", *QUICK)
    assert r.returncode == 0 and len(open(os.path.join(out, "metrics.jsonl")).readlines()) == len(log)


def test_unknown_algo_is_a_clear_error(tmp_path):
    r = run_baseline("--algo", "ppo", "--out", str(tmp_path), *QUICK)
    assert r.returncode == 2 and "unknown --algo" in r.stderr and "Traceback" not in r.stderr


def test_benchmark_runs_every_algorithm_and_writes_its_table(tmp_path, capsys):
    import benchmark
    argv = ["--games", "twentyq_subset", "--seeds", "1", "--env-steps", "100", "--eval-every", "1",
            "--out", str(tmp_path), "--", *QUICK]
    benchmark.main(argv)
    table = open(tmp_path / "results.md").read()
    header = next(line for line in table.splitlines() if line.startswith("| algorithm"))
    for algo in benchmark.ALGOS:
        row = next(line for line in table.splitlines() if line.startswith(f"| {algo} |"))
        assert row.count("|") == header.count("|")  # a value in every column
        log = benchmark.read_log(benchmark.run_dir(str(tmp_path), "twentyq_subset", algo, 1))
        assert log[-1]["env_steps"] >= 100 and "eval_success" in log[-1]
    # ArCHer gets the paper's critic steps unless the flags after -- say otherwise (QUICK does)
    ck = torch.load(os.path.join(benchmark.run_dir(str(tmp_path), "twentyq_subset", "archer", 1), "checkpoint.pt"),
                    weights_only=False)
    assert benchmark.ALGO_FLAGS["archer"] == ["--critic-steps", "50"] and ck["args"]["critic_steps"] == 2
    capsys.readouterr()
    benchmark.main(argv)  # finished runs are not run again
    assert capsys.readouterr().out.count("done already") == len(benchmark.ALGOS)
    with pytest.raises(SystemExit, match="was run with other archer.py flags"):  # nor counted when asked differently
        benchmark.main(argv + ["--actor-steps", "2"])
    benchmark.main([a if a != "100" else "150" for a in argv])  # a larger budget continues the kept runs
    for algo in benchmark.ALGOS:
        log = benchmark.read_log(benchmark.run_dir(str(tmp_path), "twentyq_subset", algo, 1))
        assert log[-1]["env_steps"] >= 150 and [m["iteration"] for m in log] == list(range(-1, len(log) - 1))


def test_benchmark_gives_the_large_games_a_longer_warm_start(tmp_path, monkeypatch):
    """The benchmark's runs take archer.py's presets (3000 cloning steps on the large games only), and
    flags after -- still win."""
    import benchmark
    cmds = []
    monkeypatch.setattr(benchmark.subprocess, "run", lambda cmd: cmds.append(cmd) or subprocess.CompletedProcess(cmd, 0))
    asked = benchmark.argparse.Namespace(out=str(tmp_path), env_steps=10, eval_every=1)
    for game in ("twentyq", "twentyq_subset"):
        benchmark.run(game, "archer", 1, asked, ["--actor-steps", "1"])
    big, small = (archer.settle(archer.parse_args(c[2:])) for c in cmds)
    assert (big.bc_steps, small.bc_steps) == (3000, 1200) and big.actor_steps == small.actor_steps == 1
    benchmark.run("guess_my_city", "archer", 1, asked, ["--bc-steps", "50"])
    assert archer.settle(archer.parse_args(cmds[-1][2:])).bc_steps == 50


@pytest.mark.skipif(importlib.util.find_spec("matplotlib") is None, reason="matplotlib is optional and not installed")
def test_benchmark_plots_one_runs_curves(tmp_path):
    import benchmark
    rows = [{"iteration": -1, "env_steps": 0}] + [{"iteration": i, "env_steps": 10 * i, "train_return": -10.0 + i, "invalid": 0.01,
                                                    "critic_fit": 0.1 * i, "logp": -4.0, "actor_loss": None if i < 2 else 0.1} for i in range(5)]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in rows))
    benchmark.main(["--curves", str(tmp_path)])
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(SystemExit, match="no iterations"):
        benchmark.main(["--curves", str(tmp_path / "empty")])


def test_benchmark_training_games_average_the_last_iterations_only():
    import benchmark
    log = [{"iteration": -1, "env_steps": 0, "eval_success": 0.9}]  # the warm start is not an iteration
    log += [{"iteration": i, "env_steps": 10 * i, "train_success": i / 10, "train_return": -float(i)} for i in range(12)]
    assert benchmark.training_games(log, last=3) == pytest.approx((1.0, -10.0))  # iterations 9, 10, 11
    assert benchmark.training_games(log[:3], last=10) == pytest.approx((0.05, -0.5))  # fewer than `last`: all of them


def metrics_without_times(out):
    rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
    return [{k: v for k, v in m.items() if not k.endswith("seconds")} for m in rows]


def test_interrupted_and_resumed_run_matches_an_uninterrupted_one(tmp_path):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    assert run_archer("--iterations", "4", "--out", straight, *QUICK, *PROBE).returncode == 0
    assert run_archer("--iterations", "2", "--out", split, *QUICK, *PROBE).returncode == 0
    r = run_archer("--iterations", "4", "--out", split, "--resume", *QUICK, *PROBE)
    assert r.returncode == 0, r.stderr[-2000:]
    assert metrics_without_times(split) == metrics_without_times(straight)
    assert len(metrics_without_times(split)) == 5  # warm start + 4 iterations, none twice


def test_sigterm_finishes_the_iteration_and_leaves_a_checkpoint(tmp_path):
    out = str(tmp_path / "run")
    p = subprocess.Popen([sys.executable, os.path.join(HERE, "archer.py"), "--iterations", "1000", "--out", out, *QUICK],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)
    metrics = os.path.join(out, "metrics.jsonl")
    deadline = time.time() + 300
    while time.time() < deadline and (not os.path.exists(metrics) or len(open(metrics).readlines()) < 2):
        time.sleep(0.2)
    p.send_signal(signal.SIGTERM)
    stdout, stderr = p.communicate(timeout=300)
    assert p.returncode == 0 and "stopped by signal" in stdout, stderr[-2000:]
    ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    assert ck["iteration"] == len(open(metrics).readlines()) - 2 < 999
    r = run_archer("--iterations", str(ck["iteration"] + 2), "--out", out, "--resume", *QUICK)
    assert r.returncode == 0 and f"at iteration {ck['iteration'] + 1}" in r.stdout


def test_checkpoint_write_is_atomic_and_a_corrupt_one_is_refused_untouched(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    archer.save_checkpoint(path, {"iteration": 1})

    def crash(obj, f):  # a crash halfway through writing
        open(f, "wb").write(b"half")
        raise OSError("disk full")
    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        archer.save_checkpoint(path, {"iteration": 2})
    assert torch.load(path, weights_only=False) == {"iteration": 1}  # the previous one is intact
    monkeypatch.undo()
    out = str(tmp_path / "run")
    assert run_archer("--iterations", "1", "--out", out, *QUICK).returncode == 0
    ck = os.path.join(out, "checkpoint.pt")
    data = open(ck, "rb").read()
    open(ck, "wb").write(data[: len(data) // 2])
    r = run_archer("--iterations", "2", "--out", out, "--resume", *QUICK)
    assert r.returncode == 2 and "cannot read the checkpoint" in r.stderr and "Traceback" not in r.stderr
    assert open(ck, "rb").read() == data[: len(data) // 2]
    assert torch.load(os.path.join(out, "best.pt"), weights_only=False)["iteration"] in (-1, 0)


@pytest.mark.parametrize("flags, message", [
    (["--iterations", "-1"], "--iterations cannot be negative"),
    (["--batch-size", "0"], "--batch-size must be at least 1"),
    (["--tau", "0"], "--tau must be in (0, 1]"),
    (["--tau", "1.5"], "--tau must be in (0, 1]"),
    (["--gamma", "1"], "--gamma must be in [0, 1)"),
    (["--actor-lr=-1e-4"], "--actor-lr must be positive"),
    (["--batch-size", "many"], "argument --batch-size: invalid int value"),
])
def test_impossible_numbers_are_clear_errors(tmp_path, flags, message):
    r = run_archer("--out", str(tmp_path / "run"), *QUICK, *flags)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "run")


def test_a_directory_holding_a_run_is_never_overwritten(tmp_path):
    out = str(tmp_path / "run")
    assert run_archer("--iterations", "1", "--out", out, *QUICK).returncode == 0
    before = open(os.path.join(out, "checkpoint.pt"), "rb").read()
    r = run_archer("--iterations", "1", "--out", out, *QUICK)
    assert r.returncode == 2 and "already holds a run" in r.stderr
    r = run_baseline("--iterations", "2", "--out", out, "--resume", "--algo", "reinforce", *QUICK)
    assert r.returncode == 2 and "--algo archer, not reinforce" in r.stderr and "Traceback" not in r.stderr
    assert open(os.path.join(out, "checkpoint.pt"), "rb").read() == before


def test_a_non_finite_loss_is_skipped_and_counted(tmp_path, monkeypatch):
    net = nn.Linear(3, 1)
    opt = torch.optim.Adam(net.parameters(), lr=0.1)
    w = net.weight.detach().clone()
    assert not archer.clipped_step(opt, net.parameters(), net(torch.ones(1, 3)).sum() * float("nan"), 1.0)
    assert torch.equal(net.weight, w)
    real = archer.critic_loss
    calls = []

    def poisoned(*a, **k):  # the first critic loss of the run is NaN
        loss, stats = real(*a, **k)
        calls.append(1)
        return (loss * float("nan") if len(calls) == 1 else loss), stats
    monkeypatch.setattr(archer, "critic_loss", poisoned)
    args = archer.parse_args(["--iterations", "2", "--out", str(tmp_path), *QUICK])
    policy, critic, log = archer.train(args)
    assert [m["skipped_updates"] for m in log[1:]] == [1, 0]
    assert all(torch.isfinite(p).all() for p in critic.parameters())

# ---- a user's own game: module:factory on the command line, a game object from Python ----
def test_the_example_game_trains_from_the_command_line_and_saves_a_loadable_actor(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = str(tmp_path / "run")
    r = run_archer("--env", "examples.number_game:NumberGame", "--iterations", "2", "--out", out, *QUICK)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "(twentyq" not in r.stdout and "32 evaluation games" in r.stdout
    rows = [json.loads(x) for x in open(os.path.join(out, "metrics.jsonl"))]
    assert [m["iteration"] for m in rows] == [-1, 0, 1] and rows[0]["demo_success"] > 0.5
    model, tok = AutoModelForCausalLM.from_pretrained(os.path.join(out, "actor")), AutoTokenizer.from_pretrained(os.path.join(out, "actor"))
    ids = tok("Find my number from 1 to 32.\n", return_tensors="pt").input_ids
    gen = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id)
    assert gen.shape[1] > ids.shape[1]
    ck = torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)
    saved = {k: v for k, v in model.state_dict().items()}
    assert all(torch.equal(saved[k], v) for k, v in ck["actor"].items() if k in saved)
    r = run_archer("--env", "examples.number_game:NumberGame", "--out", out, "--eval-only", "--show", "3", *QUICK)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("--- evaluation game") == 3 and "Find my number from 1 to 32." in r.stdout


def test_the_example_game_trains_from_python(tmp_path):
    sys.path.insert(0, HERE)
    from examples.number_game import NumberGame

    args = archer.parse_args(["--out", str(tmp_path / "py"), "--iterations", "2", *QUICK])
    policy, critic, log = archer.train(args, game=NumberGame(seed=3))
    assert [m["iteration"] for m in log] == [-1, 0, 1] and 0 <= log[-1]["eval_success"] <= 1
    assert isinstance(policy, archer.Policy) and isinstance(critic, archer.Critic)
    assert os.path.isdir(tmp_path / "py" / "actor") and os.path.isdir(tmp_path / "py" / "critic")


class Bare:
    """No secrets, no demonstrator, no corpus, no `won`: say words until 'stop' (reward 0)."""

    def reset(self):
        self.n, self.state = 0, "Say stop.\n"
        return self.state

    def step(self, utterance):
        self.n += 1
        self.state += utterance + "\n"
        done = utterance.strip() == "stop" or self.n >= 3
        return self.state, 0.0 if utterance.strip() == "stop" else -1.0, done


def test_a_game_without_demonstrator_or_secrets_runs(tmp_path, capsys):
    args = archer.parse_args(["--out", str(tmp_path / "bare"), "--iterations", "2", "--eval-games", "5", *QUICK])
    _, _, log = archer.train(args, game=Bare())
    assert "no demonstrator" in capsys.readouterr().out
    assert "bc_loss" not in log[0] and [m["iteration"] for m in log] == [-1, 0, 1]
    assert 8 <= log[1]["env_steps"] <= 8 * 3  # 8 games of 1 to 3 turns
    assert all(-3 <= m["eval_return"] <= 0 for m in log if "eval_return" in m)


def test_evaluation_without_secrets_is_seeded():
    class Drawn(Bare):  # draws its prompt from Python's random module
        def reset(self):
            super().reset()
            self.state = f"Say stop {random.randrange(1000)}.\n"
            return self.state

    games = [Drawn() for _ in range(4)]
    a = envs.reset_all(games, ["eval 0", "eval 1", "eval 2", "eval 3"])
    b = envs.reset_all(games, ["eval 0", "eval 1", "eval 2", "eval 3"])
    assert a == b and len(set(a)) > 1  # the same games every time, and not all the same game


def test_the_tiny_tokenizer_keeps_every_character_of_unseen_text():
    tok = models.build_tiny_tokenizer(Bare())
    text = "Ünïcödé, 東京, emoji 🙂 and\ttabs\n"
    ids = tok(text, add_special_tokens=False).input_ids
    assert tok.decode(ids) == text


def write_module(tmp_path, body):
    (tmp_path / "mygames.py").write_text(body)
    return dict(os.environ, PYTHONPATH=str(tmp_path))


@pytest.mark.parametrize("spec,body,message", [
    ("nosuchmodule:make", "", "cannot import module 'nosuchmodule'"),
    ("mygames:missing", "x = 1\n", "has no 'missing'"),
    ("mygames:make", "def make():\n    raise RuntimeError('no dictionary file')\n", "the factory raised RuntimeError: no dictionary file"),
    ("mygames:make", "class G:\n    def reset(self):\n        return ''\ndef make():\n    return G()\n", "no step() method"),
    ("chess", "", "unknown game 'chess'"),
])
def test_a_game_that_cannot_load_is_a_clear_error(tmp_path, spec, body, message):
    env = write_module(tmp_path, body)
    r = run_archer("--env", spec, "--out", str(tmp_path / "run"), *QUICK, env=env)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not os.path.exists(tmp_path / "run")


def test_a_game_object_without_step_is_a_clear_error(tmp_path, capsys):
    class NoStep:
        def reset(self):
            return ""

    with pytest.raises(SystemExit) as e:
        archer.train(archer.parse_args(["--out", str(tmp_path / "run"), *QUICK]), game=NoStep())
    assert e.value.code == 2 and "NoStep, which has no step() method" in capsys.readouterr().err


# ---- data parallel (torchrun): gloo on CPU, two processes ----
def spawn_two(fn, tmp_path):
    """Run fn(rank, tmp_path) in two processes joined in a gloo process group."""
    import torch.multiprocessing as mp

    mp.spawn(rendezvous, args=(fn, str(tmp_path)), nprocs=2, join=True)


def rendezvous(rank, fn, tmp):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2)
    try:
        fn(rank, tmp)
    finally:
        dist.destroy_process_group()


def one_update(rows):
    """One critic step and one actor step from identical fresh models on the given transitions;
    returns every weight after them."""
    torch.manual_seed(0)
    model, tok = archer.load_actor("tiny", envs.make_env("twentyq_subset"))
    policy = archer.Policy(model, tok, max_new_tokens=12)
    encoder, ctok = archer.load_critic_encoder("tiny", tok)
    critic = archer.Critic(encoder, ctok)
    target = copy.deepcopy(critic)
    s, a, r, s2, d = zip(*rows)
    batch = list(s), list(a), torch.tensor(r), list(s2), torch.tensor(d, dtype=torch.float32)
    loss, _ = archer.critic_loss(critic, target, batch, list(a), 0.95)
    # SGD, not Adam: Adam's first step is about lr * sign(gradient), which turns rounding noise
    # in a near-zero gradient into a full-size difference.
    archer.clipped_step(torch.optim.SGD(critic.parameters(), lr=0.1), critic.parameters(), loss, 1e9)  # no clipping: it would hide a wrong scale
    pids, pmask = policy.encode(list(s))
    enc = tok([x + "\n" for x in a], return_tensors="pt", padding=True, padding_side="right", add_special_tokens=False)
    logp = archer.sequence_logprobs(policy, pids, pmask, enc.input_ids, enc.attention_mask)
    adv = torch.tensor([float(len(x) % 5) for x in a])  # any fixed, varied advantages
    archer.clipped_step(torch.optim.SGD(model.parameters(), lr=0.1), model.parameters(), archer.actor_loss(logp, adv), 1e9)
    return {**{"actor." + k: v for k, v in model.state_dict().items()}, **{"critic." + k: v for k, v in critic.state_dict().items()}}


def demo_rows(n=8):
    rng = random.Random(0)
    game = envs.make_env("twentyq_subset", seed=0)
    return [tr for _ in range(3) for tr in envs.play(game, lambda g: g.demonstrator(rng))][:n]


def update_half(rank, tmp):
    rows = demo_rows()
    torch.save(one_update(rows[rank * 4:(rank + 1) * 4]), f"{tmp}/update{rank}.pt")


def test_two_ranks_with_half_the_batch_each_take_the_step_of_one_process_with_all_of_it(tmp_path):
    spawn_two(update_half, tmp_path)
    whole = one_update(demo_rows())
    for rank in (0, 1):
        got = torch.load(tmp_path / f"update{rank}.pt")
        for k, v in whole.items():
            assert torch.allclose(got[k], v, atol=1e-5), k


def train_two_iterations(rank, tmp):
    args = archer.parse_args(["--out", f"{tmp}/run", "--iterations", "2", *QUICK, "--warmup-iters", "0"])
    policy, critic, log = archer.train(args)
    game = envs.make_env("twentyq_subset", seed=1)
    _, shown = archer.evaluate(policy, [copy.copy(game) for _ in game.secrets], list(game.secrets), 1, 1.0)
    torch.save({"actor": policy.model.state_dict(), "critic": critic.state_dict(), "log": log,
                "games_played": len(shown)}, f"{tmp}/trained{rank}.pt")


def test_two_ranks_stay_identical_and_evaluate_each_secret_once(tmp_path):
    spawn_two(train_two_iterations, tmp_path)
    r0, r1 = (torch.load(tmp_path / f"trained{r}.pt", weights_only=False) for r in (0, 1))
    for part in ("actor", "critic"):
        assert all(torch.equal(r0[part][k], r1[part][k]) for k in r0[part]), part
    assert r0["games_played"] + r1["games_played"] == 10  # the 10 secrets of the fixed evaluation set, split between ranks
    rows = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    assert [m["iteration"] for m in rows] == [-1, 0, 1] and rows[1]["env_steps"] >= 2 * 8  # both ranks' games
    # The reduced greedy figures are those of one process playing every secret with the same weights.
    model, tok = archer.load_actor("tiny", envs.make_env("twentyq_subset"))
    model.load_state_dict(r0["actor"])
    game = envs.make_env("twentyq_subset", seed=1)
    alone, _ = archer.evaluate(archer.Policy(model.eval(), tok, 12), [copy.copy(game) for _ in game.secrets],
                               list(game.secrets), 1, 1.0)
    last = r0["log"][-1]
    assert (alone["eval_success"], alone["eval_return"]) == pytest.approx((last["eval_success"], last["eval_return"]))


def test_torchrun_trains_and_resume_needs_the_same_number_of_processes(tmp_path):
    out = str(tmp_path / "run")
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                        os.path.join(HERE, "archer.py"), "--iterations", "1", "--out", out, *QUICK],
                       capture_output=True, text=True, timeout=600, cwd=HERE)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "2 ranks" in r.stdout and r.stdout.count("final evaluation") == 1  # one voice
    assert os.path.exists(os.path.join(out, "rank1.pt")) and torch.load(os.path.join(out, "checkpoint.pt"), weights_only=False)["world"] == 2
    r = run_archer("--iterations", "2", "--out", out, "--resume", *QUICK)
    assert r.returncode == 2 and "trained by 2 processes, not 1" in r.stderr and "Traceback" not in r.stderr


def test_signal_handlers_are_restored_even_when_training_raises(tmp_path):
    class Breaks(Bare):
        calls = 0

        def step(self, utterance):
            Breaks.calls += 1  # the warm start's evaluation makes at most 12 calls, training many more
            if Breaks.calls > 20:
                raise RuntimeError("the game crashed")
            return super().step(utterance)

    before = signal.getsignal(signal.SIGINT)
    args = archer.parse_args(["--out", str(tmp_path / "run"), "--iterations", "3", "--eval-games", "2", *QUICK])
    with pytest.raises(RuntimeError, match="the game crashed"):
        archer.train(args, game=Breaks())
    assert Breaks.calls > 12 and signal.getsignal(signal.SIGINT) is before
