"""ArCHer in one file: hierarchical multi-turn RL for language-model agents.

Implements Zhou, Zanette, Pan, Levine, Kumar, "ArCHer: Training Language Model Agents via
Hierarchical Multi-Turn RL" (2024, arXiv 2402.19446). Two RL problems at two time scales:

  * utterance level: an off-policy double critic Q(s, a), V(s) over whole utterances, trained
    by temporal differences from a replay buffer (turns are the time steps: horizon ~20);
  * token level: the language model (the actor) trained by a policy gradient inside each
    utterance, with the critic's advantage A = min Q - min V as the utterance's reward.

Read top to bottom (models.py builds or loads the models, envs.py holds the games):
config -> token plumbing -> critic -> replay buffer -> rollouts
-> losses -> evaluation -> warm start -> baselines (--algo filtered_bc | reinforce, for the
comparison in benchmark.py) -> checkpoints -> training loop.

Deliberate deviations from the paper and its reference code (each explained where it happens):
  1. Log-probs are those of the token ids that were sampled, at the sampling temperature,
     with position ids that follow left padding (the reference code re-tokenizes the decoded
     text, ignores temperature and pads on the right).
  2. Losses are means, not sums over accumulation steps, so learning rates are per step.
  3. Advantages are normalized per batch (mean 0, std 1); raw ones made tiny actors collapse.
  4. The critic reads the state followed by the utterance in one encoder pass and takes the
     final token's hidden state, instead of embedding them separately and concatenating.
  5. The critic's heads start at the worst return the game allows (a pessimistic start).
  6. The warm start is behaviour cloning on the game's scripted demonstrator (stands in for
     the paper's SFT checkpoint), and its dialogues seed the replay buffer.
  7. Evaluation is on a fixed held-out set: every secret of the game once.
  8. The built-in "tiny" models (2-layer, 64-wide GPT-2 and BERT) train on a laptop CPU; their
     tokenizer learns each phrase of the game as one token, with a byte-level fallback.

Quick start (CPU, no download):   python archer.py --env twentyq_subset
Paper setting (GPU):              bash train_gpt2_twentyq.sh   (GPT-2 actor, roberta-base critic)
Your own game:                    python archer.py --env examples.number_game:NumberGame
Data parallel:                    torchrun --standalone --nproc_per_node=2 archer.py --device cpu
"""
import argparse
import copy
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

import envs
from models import ModelError, build_tiny_tokenizer, export, load_actor, load_critic_encoder, with_lora


ALGOS = ("archer", "filtered_bc", "reinforce")


# ----------------------------------------------------------------------------------------
# Config: one dataclass; every field becomes a command-line flag (--field-name).
# ----------------------------------------------------------------------------------------
@dataclass
class Args:
    env: str = field(default="twentyq_subset", metadata={"help": "game: " + ", ".join(envs.ENV_NAMES) + ", or module.path:factory for your own"})
    model: str = field(default="tiny", metadata={"help": "actor: 'tiny' (built in) or a hub name / local directory of a causal LM"})
    critic: str = field(default="tiny", metadata={"help": "critic encoder: 'tiny' or a hub name / local directory of an encoder"})
    seed: int = field(default=1, metadata={"help": "seeds python, numpy, torch and the games"})
    iterations: int = field(default=60, metadata={"help": "outer iterations (rollouts, then critic and actor steps)"})
    out: str = field(default="runs/archer", metadata={"help": "run directory: metrics.jsonl and checkpoint.pt"})
    device: str = field(default="auto", metadata={"help": "'auto' (cuda if available), 'cpu' or 'cuda'"})
    resume: bool = field(default=False, metadata={"help": "continue from <out>/checkpoint.pt"})
    eval_only: bool = field(default=False, metadata={"help": "evaluate <out>/checkpoint.pt on the held-out set and exit"})
    show: int = field(default=0, metadata={"help": "with --eval-only: print this many held-out dialogues of the greedy agent"})
    algo: str = field(default="archer", metadata={"help": "learning rule: " + ", ".join(ALGOS) + " (the last two are baselines)"})
    max_env_steps: int = field(default=0, metadata={"help": "also stop once this many environment steps were played (0: no limit)"})
    # warm start (behaviour cloning on the game's demonstrator)
    bc_games: int = field(default=2000, metadata={"help": "demonstrator dialogues for the warm start (also seed the buffer)"})
    bc_steps: int = field(default=600, metadata={"help": "behaviour-cloning gradient steps"})
    bc_lr: float = field(default=1e-3, metadata={"help": "behaviour-cloning learning rate"})
    # rollouts
    games: int = field(default=32, metadata={"help": "games played in parallel per iteration"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature for rollouts and fresh actions"})
    max_new_tokens: int = field(default=12, metadata={"help": "cap on the tokens of one utterance"})
    stop: str = field(default="\n", metadata={"help": "the string that ends an utterance (default: newline)"})
    gen_batch_size: int = field(default=0, metadata={"help": "utterances generated per call (0: all at once); bounds generation memory"})
    # hardware and large models
    dtype: str = field(default="auto", metadata={"help": "'auto' (bf16 autocast on a GPU that supports it, else float32), 'float32' or 'bfloat16'"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward: less memory, more compute"})
    lora_rank: int = field(default=0, metadata={"help": "train LoRA adapters of this rank on the actor instead of all its weights (needs peft; 0: off)"})
    # ArCHer
    buffer_size: int = field(default=10000, metadata={"help": "replay buffer capacity in transitions (paper: 10k)"})
    batch_size: int = field(default=64, metadata={"help": "transitions per critic or actor step"})
    critic_steps: int = field(default=20, metadata={"help": "critic steps per iteration"})
    actor_steps: int = field(default=2, metadata={"help": "actor steps per iteration"})
    warmup_iters: int = field(default=10, metadata={"help": "iterations of critic-only training before the actor moves"})
    critic_lr: float = field(default=1e-3, metadata={"help": "critic learning rate (Adam)"})
    actor_lr: float = field(default=1e-4, metadata={"help": "actor learning rate (Adam)"})
    gamma: float = field(default=0.95, metadata={"help": "discount per turn"})
    tau: float = field(default=0.1, metadata={"help": "Polyak rate of the target critic"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm, per network"})
    eval_every: int = field(default=10, metadata={"help": "evaluate on the held-out set every N iterations"})
    eval_games: int = field(default=100, metadata={"help": "held-out games for a game without a `secrets` list (seeded)"})
    save_every: int = field(default=1, metadata={"help": "checkpoint every N iterations (and at the end, and on Ctrl-C)"})


def parse_args(argv=None) -> Args:
    """Turn the dataclass into argparse flags; booleans become store_true switches."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    for f in dataclasses.fields(Args):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or f.type == "bool":
            p.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            p.add_argument(flag, type=type(f.default), default=f.default, help=f.metadata["help"])
    p.error = fail  # a mistyped flag is one line and exit status 2, like every other user mistake
    return Args(**vars(p.parse_args(argv)))


def fail(msg: str):
    """A user mistake: one clear line on stderr and exit status 2, no traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# Data parallel (torchrun): every rank plays its own games into its own replay buffer, and
# every update averages the ranks' gradients, so the replicas stay identical. Alone, these
# two helpers are the identity.
def world():
    """(rank, number of ranks): (0, 1) in a single process."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def all_sum(x):
    """x summed over the ranks (nccl needs the tensor on the GPU, gloo on the CPU)."""
    if not dist.is_initialized():
        return x
    y = x.to("cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(y)
    return y.to(x.device)


# ----------------------------------------------------------------------------------------
# Token plumbing: sampling and the log-probs of what was sampled. The three bugs of the
# reference code live here (re-tokenized text, ignored temperature, right padding).
# ----------------------------------------------------------------------------------------
class Policy:
    """The actor with its tokenizer and the facts about its vocabulary that sampling needs."""

    def __init__(self, model, tok, max_new_tokens: int, stop: str = "\n", gen_batch_size: int = 0, bf16: bool = False):
        self.model, self.tok, self.max_new_tokens, self.stop_text = model, tok, max_new_tokens, stop
        self.gen_batch_size, self.bf16 = gen_batch_size, bf16
        vocab = model.config.vocab_size  # the logits' width; may exceed len(tok) (padded embeddings)
        # A token "ends the utterance" if its text contains the stop string ("\n", "\n\n", ".\n"...).
        texts = tok.batch_decode([[i] for i in range(len(tok))]) + [""] * (vocab - len(tok))
        self.stop = torch.tensor([stop in t for t in texts])
        # Special tokens (pad, eos, bos...) and ids beyond the tokenizer are never sampled.
        self.banned = torch.zeros(vocab, dtype=torch.bool)
        self.banned[[i for i in tok.all_special_ids if i < vocab]] = True
        self.banned[len(tok):] = True
        # Leave room for the utterance inside the model's context window.
        ctx = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 1024)
        self.max_prompt = ctx - max_new_tokens

    def amp(self):
        """Autocast for a forward pass: bf16 matmuls, float32 weights and optimizer (--dtype)."""
        return torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def scores(self, logits, temperature: float):
        """Logits -> the scores actually sampled from: special tokens banned, then temperature.

        The same function feeds sampling and the loss, so the loss's distribution is exactly
        the sampler's. float32 so log_softmax is accurate even under bf16 weights.
        """
        logits = logits.float().masked_fill(self.banned.to(logits.device), float("-inf"))
        return logits / max(temperature, 1e-6)

    def encode(self, states):
        """Left-padded prompt ids and mask, (B, P)."""
        enc = self.tok(list(states), return_tensors="pt", padding=True, truncation=True,
                       max_length=self.max_prompt, add_special_tokens=False)
        dev = self.model.device
        return enc.input_ids.to(dev), enc.attention_mask.to(dev)

    @torch.no_grad()
    def sample(self, states, temperature: float = 1.0, greedy: bool = False):
        """Sample one utterance per state with a key/value cache.

        Returns (texts, prompt_ids (B, P), prompt_mask (B, P), action_ids (B, T), action_mask (B, T)).
        action_ids are the sampled ids themselves, newline token included (it ends the
        utterance and its probability is part of the action's); the text is cut before it.
        """
        ids, mask = self.encode(states)
        B, dev = ids.shape[0], ids.device
        # Under left padding the first real token must sit at position 0, not at the padding's
        # length: positions count real tokens only.
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        with self.amp():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        cache, logits, next_pos = out.cache, out.logits[:, -1], pos[:, -1:] + 1
        stop, pad = self.stop.to(dev), self.tok.pad_token_id
        gen = torch.full((B, self.max_new_tokens), pad, dtype=torch.long, device=dev)
        rows, attn = torch.arange(B, device=dev), mask  # rows: batch index of each row still writing
        for t in range(self.max_new_tokens):
            s = self.scores(logits, temperature)
            nxt = s.argmax(-1) if greedy else torch.multinomial(F.softmax(s, -1), 1).squeeze(-1)
            gen[rows, t] = nxt
            keep = ~stop[nxt]
            if not keep.any():
                break
            if not keep.all():  # finished utterances leave the batch (and the cache) at once:
                # one long utterance must not make every finished row pay for its extra steps
                cache.batch_select_indices(keep.nonzero().squeeze(-1))
                rows, nxt, attn, next_pos = rows[keep], nxt[keep], attn[keep], next_pos[keep]
            attn = torch.cat([attn, torch.ones(len(rows), 1, dtype=attn.dtype, device=dev)], 1)
            with self.amp():
                out = self.model(input_ids=nxt[:, None], attention_mask=attn, position_ids=next_pos,
                                 cache=cache, use_cache=True)
            cache, logits, next_pos = out.cache, out.logits[:, -1], next_pos + 1
        gen = gen[:, : t + 1]
        # Action mask: every token up to and including the first stop token (all of them if the
        # utterance hit max_new_tokens without ending).
        is_stop = stop[gen] & (gen != pad)
        ended_before = (is_stop.cumsum(-1) - is_stop.long()) > 0
        amask = (~ended_before).long()
        texts = [self.tok.decode(g[m.bool()], skip_special_tokens=True).split(self.stop_text)[0].strip()
                 for g, m in zip(gen, amask)]
        return texts, ids, mask, gen, amask

    def generate(self, states, temperature: float = 1.0, greedy: bool = False):
        """Utterances for many states, --gen-batch-size at a time (generation memory grows with
        the batch, independently of the training batch). Returns (texts, list of (T_i,) sampled
        ids on the CPU, stop token included)."""
        n = self.gen_batch_size or len(states)
        texts, ids = [], []
        for k in range(0, len(states), n):
            t, _, _, gen, amask = self.sample(states[k: k + n], temperature, greedy)
            texts += t
            ids += [g[m.bool()].cpu() for g, m in zip(gen, amask)]
        return texts, ids


def sequence_logprobs(policy: Policy, prompt_ids, prompt_mask, action_ids, action_mask, temperature=1.0):
    """sum_t log pi(a_t | s, a_<t) over each utterance's tokens, with gradient. Shape (B,).

    prompt (B, P) left-padded, action (B, T) right-padded: [pad pad s1 s2 s3 | a1 a2 \\n pad].
    The logits at position i predict token i+1, so positions P-1 .. P+T-2 score the action.
    Prompt and padding are excluded by the mask; masked with `where`, not a product, because
    a banned pad id has log-prob -inf and -inf * 0 is NaN.
    """
    ids = torch.cat([prompt_ids, action_ids], 1)
    mask = torch.cat([prompt_mask, action_mask], 1)
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    T = action_ids.shape[1]
    # Only the last T + 1 positions need the (vocabulary-sized) output layer.
    with policy.amp():
        logits = policy.model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=T + 1).logits
    logp = F.log_softmax(policy.scores(logits[:, :-1], temperature), -1)  # (B, T, V)
    tok_logp = logp.gather(-1, action_ids[..., None]).squeeze(-1)  # (B, T)
    return torch.where(action_mask.bool(), tok_logp, torch.zeros_like(tok_logp)).sum(-1)


# ----------------------------------------------------------------------------------------
# Critic: an encoder with four heads, Q1, Q2 on (state, utterance) and V1, V2 on the state.
# ----------------------------------------------------------------------------------------
class Critic(nn.Module):
    def __init__(self, encoder, tok, max_len: int = 512, bf16: bool = False):
        super().__init__()
        self.encoder, self.tok, self.bf16 = encoder, tok, bf16
        self.max_len = min(max_len, tok.model_max_length, getattr(encoder.config, "max_position_embeddings", max_len))
        h = encoder.config.hidden_size  # head size from the encoder's config, never hard-coded

        def head():
            return nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1))

        self.q1, self.q2, self.v1, self.v2 = head(), head(), head(), head()

    @torch.no_grad()
    def start_pessimistic(self, value: float):
        """Start every head at `value` (the worst return the game allows). A fresh critic says ~0
        for everything, and 0 is optimistic when every reward is -1: the actor would chase
        utterances the critic has never seen (gibberish) because their unfitted Q beats the
        fitted ones. Started at the worst case, the unknown looks bad until data says otherwise."""
        for h in (self.q1, self.q2, self.v1, self.v2):
            h[-1].bias.fill_(value)

    def embed(self, texts):
        """The encoder's last hidden state at each text's final real token: (B, H).

        The final token is the utterance's end in Q's input and the newest turn's end in V's:
        it attends to the whole text, and unlike a mean over ~30 tokens it is not dominated
        by the state when the utterance is 2 tokens of it.
        """
        enc = self.tok(list(texts), return_tensors="pt", padding=True, truncation=True, max_length=self.max_len)
        ids, mask = enc["input_ids"].to(self.encoder.device), enc["attention_mask"].to(self.encoder.device)
        with torch.autocast(ids.device.type, dtype=torch.bfloat16, enabled=self.bf16):
            hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, L, H), right-padded
        last = mask.sum(1) - 1  # index of the final real token
        return hidden[torch.arange(len(last), device=last.device), last].float()  # heads run in float32

    def q(self, states, actions):
        """Q1, Q2 (each (B,)). Deviation 4: one pass over the state followed by the utterance,
        so attention can relate the question to the answers already in the dialogue (e.g. it
        was asked before), which a tiny encoder learns much faster than from two pooled vectors."""
        x = self.embed([s + a + "\n" for s, a in zip(states, actions)])
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)

    def v(self, states):
        """V1, V2 (each (B,))."""
        x = self.embed(states)
        return self.v1(x).squeeze(-1), self.v2(x).squeeze(-1)


@torch.no_grad()
def polyak(target: nn.Module, online: nn.Module, tau: float):
    """target <- (1 - tau) * target + tau * online, for every parameter (encoder included)."""
    for t, o in zip(target.parameters(), online.parameters()):
        t.lerp_(o, tau)


# ----------------------------------------------------------------------------------------
# Replay buffer of utterance-level transitions (s, a, r, s', done): a ring of fixed capacity.
# ----------------------------------------------------------------------------------------
class ReplayBuffer:
    def __init__(self, capacity: int):
        self.capacity, self.data, self.next = capacity, [], 0

    def __len__(self):
        return len(self.data)

    def add(self, transition):
        if len(self.data) < self.capacity:
            self.data.append(transition)
        else:  # full: overwrite the oldest
            self.data[self.next] = transition
        self.next = (self.next + 1) % self.capacity

    def sample(self, n: int, rng: random.Random):
        """n transitions drawn uniformly with replacement, as columns: states, actions,
        rewards (n,), next_states, dones (n,)."""
        batch = [self.data[rng.randrange(len(self.data))] for _ in range(n)]
        s, a, r, s2, d = zip(*batch)
        return list(s), list(a), torch.tensor(r, dtype=torch.float32), list(s2), torch.tensor(d, dtype=torch.float32)


# ----------------------------------------------------------------------------------------
# Rollouts: many games at once, one batched sampling call per turn; finished games drop out.
# ----------------------------------------------------------------------------------------
def reset(games, draws):
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


def play(policy: Policy, games, draws, temperature=1.0, greedy=False, keep_ids=False):
    """Play len(games) games to the end, one batched generation per turn. Returns one
    envs.Episode of transitions (state, utterance, reward, next_state, done) per game; with
    keep_ids, also the sampled token ids of every utterance ((T_i,) tensors, stop included)."""
    states = reset(games, draws)
    trajs, ids = [envs.Episode() for _ in games], [[] for _ in games]
    live = list(range(len(games)))
    while live:
        texts, sampled = policy.generate([states[i] for i in live], temperature, greedy)
        still = []
        for i, text, x in zip(live, texts, sampled):
            nxt, r, done = games[i].step(text)
            trajs[i].append((states[i], text, float(r), nxt, bool(done)))
            if keep_ids:
                ids[i].append(x)
            states[i] = nxt
            if done:
                envs.finish(games[i], trajs[i])
            else:
                still.append(i)
        live = still
    return (trajs, ids) if keep_ids else trajs


def summarize(trajs):
    """Success rate, mean return and mean turns of a list of Episodes (of every rank's share)."""
    won, ret, turns, n = all_sum(torch.tensor([sum(t.won for t in trajs), sum(x[2] for t in trajs for x in t),
                                               sum(len(t) for t in trajs), len(trajs)], dtype=torch.float64)).tolist()
    return {"success": won / n, "return": ret / n, "turns": turns / n}


# ----------------------------------------------------------------------------------------
# Losses
# ----------------------------------------------------------------------------------------
def critic_loss(critic: Critic, target: Critic, batch, fresh_actions, gamma: float):
    """TD losses of ArCHer's double critic on one batch; returns (loss, stats).

    Q_i(s, a)  -> r + gamma * (1 - done) * Vbar_i(s')          (Vbar: the target critic)
    V_i(s)     -> min(Qbar_1, Qbar_2)(s, a~),  a~ ~ pi(.|s) sampled fresh
    Q head i regresses on target V head i (as the reference code), which keeps the two
    Q heads independent estimates; V regresses on the min of the target Qs (clipped double Q)
    because V feeds the actor's advantage, and an overestimated Q is what a policy gradient
    exploits. V's target uses a fresh action so V tracks the current policy, not the
    behaviour policy that filled the buffer. A game that hits its 20-turn limit counts as
    terminal (done = 1), as in the original: a simplification, since the state does not
    say how many turns are left to a critic that cannot count lines.
    """
    s, a, r, s2, d = batch
    dev = next(critic.parameters()).device
    r, d = r.to(dev), d.to(dev)
    with torch.no_grad():
        tv1, tv2 = target.v(s2)
        y1, y2 = r + gamma * (1 - d) * tv1, r + gamma * (1 - d) * tv2  # (B,)
        tq1, tq2 = target.q(s, fresh_actions)
        yv = torch.minimum(tq1, tq2)
    q1, q2 = critic.q(s, a)
    v1, v2 = critic.v(s)
    loss = F.mse_loss(q1, y1) + F.mse_loss(q2, y2) + F.mse_loss(v1, yv) + F.mse_loss(v2, yv)
    stats = {"q_mean": torch.minimum(q1, q2).mean().item(), "v_mean": torch.minimum(v1, v2).mean().item()}
    return loss, stats


def advantage(critic: Critic, states, actions):
    """A(s, a) = min(Q1, Q2)(s, a) - min(V1, V2)(s), no gradient. Shape (B,)."""
    with torch.no_grad():
        q1, q2 = critic.q(states, actions)
        v1, v2 = critic.v(states)
        return torch.minimum(q1, q2) - torch.minimum(v1, v2)


def actor_loss(logp, adv):
    """-mean(A_norm * sum_t log pi(a_t | ...)): REINFORCE inside the utterance, with the critic's
    advantage as its terminal reward. No PPO ratio or clipping: the actions are sampled fresh
    from the current policy for every step, so the gradient is on-policy.

    Deviation 3: A is normalized per batch. The raw advantage of an uncalibrated critic is
    small and biased; its scale would set the effective step size, and a too-large step makes
    a small actor collapse into utterances the game does not understand.
    """
    if dist.is_initialized():  # normalize over the global batch, every rank's share
        n, s, ss = all_sum(torch.stack([adv.new_tensor(float(adv.numel())), adv.sum(), adv.pow(2).sum()]))
        mean = s / n
        a = (adv - mean) / (((ss - n * mean**2) / (n - 1)).clamp(min=0).sqrt() + 1e-6)
    else:
        a = (adv - adv.mean()) / (adv.std() + 1e-6) if adv.numel() > 1 else adv
    return -(a * logp).mean()


def clipped_step(opt, params, loss, max_norm: float) -> bool:
    """One optimizer step on this network's parameters only (fresh gradients, clipped).

    A non-finite loss or gradient norm skips the step (returns False, with a warning): one NaN
    let through would turn every weight, and the optimizer's moments, into NaN for good."""
    params = [p for p in params if p.requires_grad]
    opt.zero_grad(set_to_none=True)
    finite = bool(torch.isfinite(loss))
    if finite:
        loss.backward()
    if dist.is_initialized():
        # One all-reduce of the flattened gradients, averaged: every replica takes the same step.
        # A rank whose loss is not finite sends NaN, so that every rank skips the step together.
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
        flat = all_sum(flat if finite else flat.fill_(float("nan"))) / world()[1]
        for p, g in zip(params, flat.split([p.numel() for p in params])):
            p.grad = g.view_as(p)
        finite = True  # a NaN now shows in the gradient norm, on every rank alike
    if finite and torch.isfinite(torch.nn.utils.clip_grad_norm_(params, max_norm)):
        opt.step()
        return True
    opt.zero_grad(set_to_none=True)
    tqdm.write(f"warning: non-finite loss or gradient ({loss.item()}); update skipped", file=sys.stderr)
    return False


# ----------------------------------------------------------------------------------------
# Evaluation on the fixed held-out set: every secret of the game once.
# ----------------------------------------------------------------------------------------
def evaluate(policy: Policy, games, draws, seed: int, temperature: float):
    """Greedy and sampled play of the held-out draws (every secret once, or --eval-games seeds).
    Sampling uses its own seeded generator state so that evaluating does not change the
    training run's random stream. Returns (metrics, the greedy Episodes)."""
    rank, n = world()
    games, draws = games[rank::n], draws[rank::n]  # each rank plays its share; summarize adds them up
    greedy_games = play(policy, games, draws, greedy=True)
    greedy = summarize(greedy_games)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sampled = summarize(play(policy, games, draws, temperature))
    return {"eval_success": greedy["success"], "eval_return": greedy["return"], "eval_turns": greedy["turns"],
            "eval_sampled_success": sampled["success"], "eval_sampled_return": sampled["return"]}, greedy_games


# ----------------------------------------------------------------------------------------
# Warm start: behaviour cloning on the demonstrator (the paper starts from an SFT model).
# ----------------------------------------------------------------------------------------
def demonstrations(game, n: int, seed: int):
    """n dialogues of the game's scripted demonstrator (none if it has no demonstrator)."""
    rng = random.Random(seed)
    if not hasattr(game, "demonstrator"):
        return []
    return [envs.play(game, lambda g: g.demonstrator(rng)) for _ in range(n)]


def imitation_loss(policy: Policy, pairs):
    """-log pi(utterance + stop string | state), averaged over tokens, on (state, utterance) pairs.
    The utterance is tokenized from its text: cloning imitates text, whatever ids produced it."""
    pids, pmask = policy.encode([s for s, _ in pairs])
    enc = policy.tok([a + policy.stop_text for _, a in pairs], return_tensors="pt", padding="longest",
                     add_special_tokens=False, padding_side="right")
    aids, amask = enc.input_ids.to(pids.device), enc.attention_mask.to(pids.device)
    return -sequence_logprobs(policy, pids, pmask, aids, amask).sum() / amask.sum()


def behaviour_clone(policy: Policy, demos, args: Args, rng: random.Random):
    """Maximize log pi(utterance + stop string | state) on demonstrator transitions."""
    pairs = [(s, a) for t in demos for (s, a, *_rest) in t]
    opt = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=args.bc_lr, weight_decay=0.0)
    policy.model.train()
    bar = tqdm(range(args.bc_steps), desc="behaviour cloning", leave=False, disable=world()[0] > 0)
    for step in bar:
        loss = imitation_loss(policy, [pairs[rng.randrange(len(pairs))] for _ in range(args.batch_size)])
        # A short linear warm-up then cosine decay: from-scratch tiny models need the large lr
        # early and a small one late to settle on the state-dependent choices.
        for g in opt.param_groups:
            g["lr"] = args.bc_lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / args.bc_steps))
        clipped_step(opt, policy.model.parameters(), loss, args.grad_clip)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    policy.model.eval()
    return loss.item()


# ----------------------------------------------------------------------------------------
# Baselines (--algo): the same warm start, rollouts and evaluation; only the learning rule
# differs, so a comparison with ArCHer measures the rule and nothing else.
#   filtered_bc: online filtered behaviour cloning, clone the best 10% of the games so far.
#   reinforce:   token-level policy gradient on Monte Carlo returns, no critic (the stand-in
#                for the paper's token-level PPO: on-policy, one update per sample).
# ----------------------------------------------------------------------------------------
def elite(dialogues, frac: float = 0.1):
    """The dialogues whose return is in the top `frac` of all collected so far (ties at the
    cut are kept, so a plateau of equal returns is cloned whole)."""
    rets = sorted((sum(tr[2] for tr in d) for d in dialogues), reverse=True)
    cut = rets[max(1, math.ceil(len(rets) * frac)) - 1]
    return [d for d in dialogues if sum(tr[2] for tr in d) >= cut]


def returns_to_go(rewards, gamma: float):
    """G_t = r_t + gamma * G_{t+1}: the Monte Carlo return from each turn of one dialogue."""
    out, g = [], 0.0
    for r in reversed(rewards):
        g = r + gamma * g
        out.append(g)
    return out[::-1]


def utterance_logprobs(policy: Policy, states, ids, temperature: float):
    """sequence_logprobs of utterances given as the token ids that were sampled (list of (T_i,)
    tensors), so the gradient is on exactly what the policy did. Shape (B,)."""
    pids, pmask = policy.encode(states)
    aids = nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=policy.tok.pad_token_id)
    amask = nn.utils.rnn.pad_sequence([torch.ones_like(x) for x in ids], batch_first=True)
    return sequence_logprobs(policy, pids, pmask, aids.to(pids.device), amask.to(pids.device), temperature)


# ----------------------------------------------------------------------------------------
# Checkpoints: everything that affects the future, written atomically.
# ----------------------------------------------------------------------------------------
def save_checkpoint(path, state: dict):
    tmp = path + ".tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)  # atomic: a crash mid-write leaves the previous checkpoint intact


def rng_states(rng: random.Random):
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None, "trainer": rng.getstate()}


def set_rng_states(st, rng: random.Random):
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if st["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])
    rng.setstate(st["trainer"])


def check_args(args: Args):
    """Impossible settings fail at once, in one line, before anything is built or written."""
    if args.algo not in ALGOS:
        fail(f"unknown --algo '{args.algo}'; choose one of: {', '.join(ALGOS)}")
    for name in ("games", "batch_size", "buffer_size", "max_new_tokens", "eval_every", "save_every", "bc_games"):
        if getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    for name in ("iterations", "bc_steps", "critic_steps", "actor_steps", "warmup_iters", "max_env_steps",
                 "gen_batch_size", "lora_rank"):
        if getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} cannot be negative (got {getattr(args, name)})")
    for name in ("bc_lr", "critic_lr", "actor_lr", "grad_clip", "temperature"):
        if not getattr(args, name) > 0:
            fail(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")
    if args.dtype not in ("auto", "float32", "bfloat16"):
        fail(f"--dtype {args.dtype}: use auto, float32 or bfloat16")
    if not args.stop:
        fail("--stop cannot be empty: utterances need a string that ends them")
    if not 0 < args.tau <= 1:
        fail(f"--tau must be in (0, 1] (got {args.tau}): the share of the online critic mixed into the target per step")
    if not 0 <= args.gamma < 1:
        fail(f"--gamma must be in [0, 1) (got {args.gamma})")
    if args.device not in ("auto", "cpu") and not (args.device.startswith("cuda") and torch.cuda.is_available()):
        fail(f"--device {args.device}: use auto, cpu or cuda (cuda only where a GPU is visible)")


def load_checkpoint(path, args: Args, dev):
    """The checkpoint at `path`, refused in one line if it is unreadable or from another run;
    a refused file is left as it is."""
    try:
        ck = torch.load(path, map_location=dev, weights_only=False)
    except Exception as e:  # truncated, corrupt, not a checkpoint: all the same to the user
        fail(f"cannot read the checkpoint {path} ({type(e).__name__}); it is left untouched: "
             "best.pt beside it holds the best evaluated state, or start a new run in another --out")
    saved = ck.get("args", {}) if isinstance(ck, dict) else {}
    for key in ("env", "model", "critic", "algo"):
        if saved.get(key) != getattr(args, key):
            fail(f"{path} is a run with --{key} {saved.get(key)}, not {getattr(args, key)}; "
                 f"resume it with the same flags or use another --out")
    return ck


# ----------------------------------------------------------------------------------------
# The training loop
# ----------------------------------------------------------------------------------------
def train(args: Args, game=None):
    """Warm start, then iterations of args.algo on args.env, or on `game` if given (any object
    that follows the protocol in envs.py; args.env then only names it in the checkpoint).
    Returns (policy, critic, list of metric dicts, one per iteration). The command line is
    this with parse_args(): `archer.train(archer.Args(out="runs/mine"), game=MyGame())`."""
    check_args(args)
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():  # launched by torchrun
        dist.init_process_group("nccl" if args.device != "cpu" and torch.cuda.is_available() else "gloo")
    rank, n_ranks = world()
    if rank > 0:  # one voice: only rank 0 prints and shows progress bars
        sys.stdout = open(os.devnull, "w")
    try:  # the game first: a user's game that cannot load fails before anything is built
        env0 = envs.check_game(game, "the game object") if game is not None else envs.load_game(args.env, args.seed)
    except envs.GameError as e:
        fail(str(e))

    def fresh(seed):
        """Another copy of the game: a built-in one seeded its own way, a user's one deep-copied."""
        return envs.load_game(args.env, seed) if game is None else copy.deepcopy(game)

    ckpt_path, best_path = os.path.join(args.out, "checkpoint.pt"), os.path.join(args.out, "best.pt")
    rank_path = os.path.join(args.out, f"rank{rank}.pt")  # ranks > 0: their own buffer and random states
    if (args.resume or args.eval_only) and not os.path.exists(ckpt_path):
        flag = "--resume" if args.resume else "--eval-only"
        fail(f"{flag}: no checkpoint at {ckpt_path}; train first (without {flag}) or point --out at a run")
    if not (args.resume or args.eval_only) and os.path.exists(ckpt_path):
        fail(f"{args.out} already holds a run; continue it with --resume, or choose another --out")
    seed_everything(args.seed)  # the same on every rank: the replicas start identical
    rng = random.Random(args.seed + rank)  # the trainer's own stream: secrets and buffer sampling
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    if dev.type == "cuda" and n_ranks > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    ck = load_checkpoint(ckpt_path, args, dev) if args.resume or args.eval_only else None
    if ck is not None and ck.get("world", 1) != n_ranks and not args.eval_only:
        fail(f"{ckpt_path} was trained by {ck.get('world', 1)} processes, not {n_ranks}: resume it with "
             f"--nproc_per_node={ck.get('world', 1)} (each rank continues its own buffer and random states)")
    if ck is not None and rank > 0 and not args.eval_only:
        ck.update(torch.load(rank_path, map_location=dev, weights_only=False))
    # The held-out set: every secret once, or --eval-games seeds no training game uses.
    secrets = list(getattr(env0, "secrets", []))
    eval_draws = secrets or [f"eval {k}" for k in range(args.eval_games)]
    eval_games = [copy.deepcopy(env0) for _ in eval_draws]  # the draws set each game: copies will do
    # bf16 autocast: matmuls in bfloat16, weights, optimizer states and losses in float32.
    bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and dev.type == "cuda" and torch.cuda.is_bf16_supported())

    try:
        model, tok = load_actor(args.model, env0)
        model = with_lora(model, args.lora_rank) if args.lora_rank else model
        encoder, ctok = load_critic_encoder(args.critic, tok)
    except ModelError as e:
        fail(str(e))
    policy = Policy(model.to(dev), tok, args.max_new_tokens, args.stop, args.gen_batch_size, bf16)
    if not policy.stop.any():
        fail(f"--stop {args.stop!r}: no token of the actor's vocabulary contains it, so no utterance could end")
    critic = Critic(encoder, ctok, bf16=bf16).to(dev).train()  # train mode: no dropout, but checkpointing
    if args.grad_checkpointing:
        for net in (policy.model, critic.encoder):
            net.activation_checkpointing_enable({"use_reentrant": False})
    target = copy.deepcopy(critic).eval()  # the only model copy: the critic's target
    for p in target.parameters():
        p.requires_grad_(False)
    os.makedirs(args.out, exist_ok=True)
    actor_opt = torch.optim.Adam([p for p in policy.model.parameters() if p.requires_grad], lr=args.actor_lr)
    critic_opt = torch.optim.Adam(critic.parameters(), lr=args.critic_lr)
    buffer = ReplayBuffer(args.buffer_size)
    log = []
    start_it, env_steps, best = 0, 0, None  # best: (greedy success, return) of the best evaluation
    dialogues = []  # filtered_bc: every game played so far
    n_actor = sum(p.numel() for p in policy.model.parameters())
    n_trained = sum(p.numel() for p in policy.model.parameters() if p.requires_grad)
    n_critic = sum(p.numel() for p in critic.parameters())
    print(f"actor {args.model}: {n_actor / 1e6:.2f}M params ({n_trained / 1e6:.2f}M trained) | critic {args.critic}: "
          f"{n_critic / 1e6:.2f}M params | device {dev}{' (bf16 autocast)' if bf16 else ''}"
          + (f" | {n_ranks} ranks" if n_ranks > 1 else ""))
    if n_ranks > 1:  # identical models, then each rank samples its own games
        seed_everything(args.seed + 1000 * rank)

    if ck is not None:
        try:
            policy.model.load_state_dict(ck["actor"])
            critic.load_state_dict(ck["critic"])
            target.load_state_dict(ck["target"])
            actor_opt.load_state_dict(ck["actor_opt"])
            critic_opt.load_state_dict(ck["critic_opt"])
        except (KeyError, RuntimeError, ValueError) as e:
            fail(f"{ckpt_path} does not fit these models ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        buffer.data, buffer.next = ck["buffer"], ck["buffer_next"]
        start_it, env_steps, log, dialogues = ck["iteration"] + 1, ck["env_steps"], ck["log"], ck["dialogues"]
        best = ck["best"]
        set_rng_states(ck["rng"], rng)
        print(f"resumed from {ckpt_path} at iteration {start_it}")

    if args.eval_only:
        ev, shown = evaluate(policy, eval_games, eval_draws, args.seed, args.temperature)
        for k, episode in enumerate(shown[: args.show]):
            print(f"--- held-out game {k + 1} ({'won' if episode.won else 'lost'}, "
                  f"return {sum(t[2] for t in episode):g}) ---\n{episode[0][0]}", end="")
            for state, utterance, _, nxt, _ in episode:  # the agent's line, then what the game added
                print(f"> {utterance}\n{nxt[len(state):] if nxt.startswith(state) else nxt}", end="")
            print()
        print(json.dumps(ev))
        return policy, critic, log + [ev]

    metrics_path = os.path.join(args.out, "metrics.jsonl")

    def record(rows, mode="a"):
        if rank == 0:
            with open(metrics_path, mode) as f:
                f.writelines(json.dumps(m) + "\n" for m in rows)

    def checkpoint(it):
        """Everything that affects the future, atomically; best.pt keeps the best evaluation.
        Rank 0 writes the models (identical on every rank); each other rank its own share."""
        own = {"buffer": buffer.data, "buffer_next": buffer.next, "rng": rng_states(rng), "dialogues": dialogues}
        if rank > 0:
            return save_checkpoint(rank_path, own)
        save_checkpoint(ckpt_path, {
            "actor": policy.model.state_dict(), "critic": critic.state_dict(), "target": target.state_dict(),
            "actor_opt": actor_opt.state_dict(), "critic_opt": critic_opt.state_dict(), "iteration": it,
            "env_steps": env_steps, "log": log, "args": dataclasses.asdict(args), "best": best, "world": n_ranks, **own})
        if "eval_success" in log[-1] and best == (log[-1]["eval_success"], log[-1]["eval_return"]):
            shutil.copyfile(ckpt_path, best_path + ".tmp")
            os.replace(best_path + ".tmp", best_path)

    if args.resume:  # the metrics file may hold iterations past the checkpoint: rewrite it from the log
        record(log, "w")
    else:
        # Warm start: clone the demonstrator, and seed the replay buffer with its dialogues
        # (the critic's first targets then come from real, if suboptimal, play).
        t0 = time.time()
        demos = demonstrations(fresh(args.seed + 1), args.bc_games, args.seed + 1)
        for traj in demos if args.algo == "archer" else []:
            for tr in traj:
                buffer.add(tr)
        warm = {"iteration": -1, "env_steps": 0}
        if demos:
            r_min = min(tr[2] for traj in demos for tr in traj)
            critic.start_pessimistic(min(r_min, 0.0) / (1 - args.gamma))
            target.load_state_dict(critic.state_dict())
            warm["bc_loss"] = behaviour_clone(policy, demos, args, rng)
            demo = summarize(demos)
            warm.update(demo_return=demo["return"], demo_success=demo["success"])
            print(f"warm start: bc_loss {warm['bc_loss']:.3f} | demonstrator success {demo['success']:.0%} "
                  f"return {demo['return']:.2f}", end=" | ")
        else:
            print("the game has no demonstrator: RL starts from the model as it is", end=" | ")
        warm.update(evaluate(policy, eval_games, eval_draws, args.seed, args.temperature)[0], seconds=time.time() - t0)
        log = [warm]
        record(log, "w")
        print(f"greedy success {warm['eval_success']:.0%} return {warm['eval_return']:.2f} | sampled success "
              f"{warm['eval_sampled_success']:.0%} ({warm['seconds']:.0f}s)")
        best = (warm["eval_success"], warm["eval_return"])
        checkpoint(-1)  # an interrupted run resumes after the warm start, not before it

    games = [fresh(args.seed * 1000 + i) for i in range(args.games)]
    end = start_it if 0 < args.max_env_steps <= env_steps else args.iterations  # a resumed run may be done

    # Ctrl-C or SIGTERM (a scheduler's "time is up") finishes the current iteration, saves a
    # checkpoint and stops; a second Ctrl-C quits at once. Stopping mid-iteration would save a
    # half-updated state that --resume could not continue exactly.
    stop = []

    def on_signal(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)
        tqdm.write("stopping after this iteration to save a checkpoint (Ctrl-C again quits at once)")

    old_handlers = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    bar = tqdm(range(start_it, end), desc=args.algo, initial=start_it, total=args.iterations, disable=rank > 0)
    try:
        for it in bar:
            t0 = time.time()
            m, skipped = {"iteration": it}, 0
            # 1. Rollouts with the current policy, sampled at the training temperature.
            policy.model.eval()
            draws = [rng.choice(secrets) if secrets else rng.randrange(2**31) for _ in games]
            trajs, ids = play(policy, games, draws, args.temperature, keep_ids=True)
            if args.algo == "archer":
                for traj in trajs:
                    for tr in traj:
                        buffer.add(tr)
            env_steps += int(all_sum(torch.tensor(sum(len(t) for t in trajs))))  # every rank's games
            roll = summarize(trajs)
            m.update(env_steps=env_steps, train_return=roll["return"], train_success=roll["success"])
            if game is None:  # the built-in games' answer to an utterance they do not understand
                bad, n = all_sum(torch.tensor([sum(x[3].endswith(envs.INVALID + "\n") for t in trajs for x in t),
                                               sum(len(t) for t in trajs)])).tolist()
                m["invalid"] = bad / n

            if args.algo == "archer":
                # 2. Critic steps. The fresh on-policy actions a~ for every V target of this iteration are
                # sampled up front (the policy does not change during critic steps), one batch at a time:
                # all of them at once would hold a key/value cache for critic_steps x batch_size prompts.
                batches = [buffer.sample(args.batch_size, rng) for _ in range(args.critic_steps)]
                fresh_actions = [policy.generate(b[0], args.temperature)[0] for b in batches]
                c_losses, c_stats = [], []
                for batch, a_fresh in zip(batches, fresh_actions):
                    loss, st = critic_loss(critic, target, batch, a_fresh, args.gamma)
                    skipped += not clipped_step(critic_opt, critic.parameters(), loss, args.grad_clip)
                    polyak(target, critic, args.tau)
                    c_losses.append(loss.item())
                    c_stats.append(st)
                m.update(critic_loss=float(np.mean(c_losses)), q_mean=float(np.mean([s["q_mean"] for s in c_stats])),
                         v_mean=float(np.mean([s["v_mean"] for s in c_stats])))

                # 3. Actor steps, after the critic's warm-up: fresh actions for buffer states, scored by
                # the critic's advantage, pushed up or down by REINFORCE inside the utterance.
                a_losses, advs = [], []
                if it >= args.warmup_iters:
                    for _ in range(args.actor_steps):
                        states = buffer.sample(args.batch_size, rng)[0]
                        texts, pids, pmask, aids, amask = policy.sample(states, args.temperature)
                        adv = advantage(critic, states, texts)
                        policy.model.train()
                        logp = sequence_logprobs(policy, pids, pmask, aids, amask, args.temperature)
                        loss = actor_loss(logp, adv)
                        skipped += not clipped_step(actor_opt, policy.model.parameters(), loss, args.grad_clip)
                        policy.model.eval()
                        a_losses.append(loss.item())
                        advs.append(adv.mean().item())
                m.update(actor_loss=float(np.mean(a_losses)) if a_losses else None,
                         advantage_mean=float(np.mean(advs)) if advs else None)

            elif args.algo == "filtered_bc":  # clone the best games so far, no critic
                dialogues.extend(trajs)
                pairs = [(s, a) for d in elite(dialogues) for (s, a, *_rest) in d]
                a_losses = []
                policy.model.train()
                for _ in range(args.actor_steps):
                    loss = imitation_loss(policy, [pairs[rng.randrange(len(pairs))] for _ in range(args.batch_size)])
                    skipped += not clipped_step(actor_opt, policy.model.parameters(), loss, args.grad_clip)
                    a_losses.append(loss.item())
                policy.model.eval()
                m.update(actor_loss=float(np.mean(a_losses)), elite_transitions=len(pairs))

            else:  # reinforce: every transition of this iteration once, split into actor_steps batches
                flat = [(tr[0], x, g) for traj, tids in zip(trajs, ids)
                        for tr, x, g in zip(traj, tids, returns_to_go([t[2] for t in traj], args.gamma))]
                rng.shuffle(flat)
                a_losses = []
                policy.model.train()
                for k in range(args.actor_steps):
                    part = flat[k::args.actor_steps]
                    logp = utterance_logprobs(policy, [p[0] for p in part], [p[1] for p in part], args.temperature)
                    # actor_loss's normalization is the mean baseline (and a common scale with ArCHer)
                    loss = actor_loss(logp, torch.tensor([p[2] for p in part], device=logp.device))
                    skipped += not clipped_step(actor_opt, policy.model.parameters(), loss, args.grad_clip)
                    a_losses.append(loss.item())
                policy.model.eval()
                m.update(actor_loss=float(np.mean(a_losses)))

            # 4. Held-out evaluation, metrics, checkpoint.
            last = it == args.iterations - 1 or 0 < args.max_env_steps <= env_steps
            if (it + 1) % args.eval_every == 0 or last:
                m.update(evaluate(policy, eval_games, eval_draws, args.seed, args.temperature)[0])
                best = max(best, (m["eval_success"], m["eval_return"]))
            m["skipped_updates"], m["seconds"] = skipped, time.time() - t0
            if dev.type == "cuda":  # the iteration's peak, then reset for the next one
                m["gpu_peak_gb"] = torch.cuda.max_memory_allocated(dev) / 2**30
                torch.cuda.reset_peak_memory_stats(dev)
            log.append(m)
            record([m])
            line = (f"it {it:4d} | steps {env_steps:6d} | train return {m['train_return']:6.2f} success "
                    f"{m['train_success']:4.0%}" + (f" invalid {m['invalid']:4.0%}" if "invalid" in m else ""))
            if "critic_loss" in m:
                line += f" | critic {m['critic_loss']:.3f} q {m['q_mean']:6.2f} v {m['v_mean']:6.2f}"
            if "eval_success" in m:
                line += f" | eval greedy {m['eval_success']:4.0%} {m['eval_return']:6.2f} sampled {m['eval_sampled_success']:4.0%}"
            gpu = f" | gpu {m['gpu_peak_gb']:.1f} GB" if "gpu_peak_gb" in m else ""
            tqdm.write(line + f" | {m['seconds']:.1f}s{gpu}")
            if n_ranks > 1 and int(all_sum(torch.tensor(len(stop)))) and not stop:
                stop.append(signal.SIGTERM)  # a signal reached another rank: all stop after this iteration
            if last or stop or (it + 1) % args.save_every == 0:
                checkpoint(it)
            if last or stop:
                break
    finally:  # a library caller gets its own handlers back, whatever happened
        signal.signal(signal.SIGINT, old_handlers[0])
        signal.signal(signal.SIGTERM, old_handlers[1])
    if rank == 0:
        export(policy, critic, args.out)
    if stop:
        print(f"stopped by signal {stop[0]} after iteration {it}; checkpoint saved: continue with --resume")
    final = next((m for m in reversed(log) if "eval_success" in m), {})
    if final:
        print(f"final evaluation ({args.env if game is None else type(game).__name__}, {len(eval_draws)} held-out games): greedy success "
              f"{final['eval_success']:.0%}, return {final['eval_return']:.2f}, turns {final['eval_turns']:.1f}; "
              f"sampled success {final['eval_sampled_success']:.0%}, return {final['eval_sampled_return']:.2f}")
    return policy, critic, log


if __name__ == "__main__":
    train(parse_args())
    if dist.is_initialized():
        dist.destroy_process_group()
