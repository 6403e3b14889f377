"""ArCHer in one file: hierarchical multi-turn RL for language-model agents.

Implements Zhou, Zanette, Pan, Levine, Kumar, "ArCHer: Training Language Model Agents via
Hierarchical Multi-Turn RL" (2024, arXiv 2402.19446). Two RL problems at two time scales:
  * utterance level: an off-policy double critic Q(s, a), V(s) over whole utterances, trained
    by temporal differences from a replay buffer (turns are the time steps: horizon ~20);
  * token level: the language model (the actor) trained by a policy gradient inside each
    utterance, with the critic's advantage A = min Q - min V as the utterance's reward.

Read top to bottom: config -> token plumbing -> critic -> replay buffer -> rollouts -> the two
losses -> ArCHer's critic and actor steps -> evaluation -> warm start -> checkpoints -> the loop
(models.py builds the models, envs.py holds the games, baselines.py the rules compared with).

Deliberate deviations from the paper and its reference code (each explained where it happens):
  1. Log-probs are of the sampled ids, at the sampling temperature, with left-padded positions (see Token plumbing).
  2. Losses are means, not sums over accumulation steps, so learning rates are per step.
  3. Advantages are normalized per batch (mean 0, std 1); raw ones made tiny actors collapse.
  4. The critic encodes state + utterance in one pass and reads the final token's hidden state.
  5. The critic's heads start at a return below any the game can give (a pessimistic start).
  6. The warm start (for the paper's SFT model) clones the game's scripted demonstrator; its dialogues seed the buffer.
  7. Evaluation is on a fixed set, every secret once (training draws them too): the policy, not generalization.
  8. The built-in "tiny" models (2-layer, 64-wide GPT-2 and BERT; a token per game phrase) train on a CPU.
  9. The actor loss adds --kl-coef x KL(actor || warm-started actor): without it the stop token after a
     question loses probability under noisy advantages and utterances run on into invalid text (a collapse).
  10. Behaviour cloning scores whole dialogues in one pass each (teacher forcing), every turn for the cost of one.

Quick start (CPU, no download):   python archer.py --env twentyq_subset      (flags left unset: see PRESETS)
Full Twenty Questions (CPU):      python archer.py --env twentyq
Paper setting (GPU):              python archer.py --env twentyq --model gpt2   (roberta-base critic, the paper's settings)
Your own game:                    python archer.py --env examples.number_game:NumberGame
Data parallel:                    torchrun --standalone --nproc_per_node=2 archer.py --device cpu
Baselines:                        python baselines.py --algo chai   (or filtered_bc, reinforce)
"""
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
import runtime
from models import ModelError, export, load_actor, load_critic_encoder, with_lora
from runtime import (all_sum, check_args, device_and_world, fail, open_run_dir, rng_states, save_checkpoint,
                     seed_everything, seeded, set_rng_states, stop_signals, world)


# ----------------------------------------------------------------------------------------
# Config: one dataclass; every field becomes a command-line flag (--field-name). A field left at None
# takes its value from PRESETS (below) when the run starts, or from the checkpoint on --resume.
@dataclass
class Args:
    env: str = field(default="twentyq_subset", metadata={"help": "game: " + ", ".join(envs.ENV_NAMES) + ", or module.path:factory for your own"})
    model: str = field(default="tiny", metadata={"help": "actor: 'tiny' (built in) or a hub name / local directory of a causal LM"})
    critic: str = field(default=None, metadata={"help": "critic encoder: 'tiny' or a hub name / local directory of an encoder"})
    seed: int = field(default=1, metadata={"help": "seeds python, numpy, torch and the games"})
    iterations: int = field(default=None, metadata={"help": "outer iterations (rollouts, then critic and actor steps)"})
    out: str = field(default="runs/archer", metadata={"help": "run directory: metrics.jsonl and checkpoint.pt"})
    device: str = field(default="auto", metadata={"help": "'auto' (cuda if available), 'cpu' or 'cuda'"})
    resume: bool = field(default=False, metadata={"help": "continue from <out>/checkpoint.pt"})
    eval_only: bool = field(default=False, metadata={"help": "evaluate <out>/checkpoint.pt on the fixed evaluation set and exit"})
    show: int = field(default=0, metadata={"help": "with --eval-only: print this many evaluation dialogues of the greedy agent"})
    max_env_steps: int = field(default=0, metadata={"help": "also stop once this many environment steps were played (0: no limit)"})
    # warm start (behaviour cloning on the game's demonstrator)
    bc_games: int = field(default=None, metadata={"help": "demonstrator dialogues for the warm start (also seed the buffer)"})
    bc_steps: int = field(default=None, metadata={"help": "behaviour-cloning gradient steps (0: no cloning, the buffer is still seeded)"})
    bc_lr: float = field(default=None, metadata={"help": "behaviour-cloning learning rate"})
    # rollouts
    games: int = field(default=None, metadata={"help": "games played in parallel per iteration"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature for rollouts, fresh actions and the actor's log-probs"})
    max_new_tokens: int = field(default=None, metadata={"help": "cap on the tokens of one utterance"})
    stop: str = field(default="\n", metadata={"help": "the string that ends an utterance (default: newline)"})
    gen_batch_size: int = field(default=None, metadata={"help": "utterances generated per call (0: all at once); bounds generation memory"})
    # hardware and large models
    dtype: str = field(default="auto", metadata={"help": "'auto' (bf16 autocast on a GPU that supports it, else float32), 'float32' or 'bfloat16'"})
    grad_checkpointing: bool = field(default=False, metadata={"help": "recompute activations in backward: less memory, more compute"})
    lora_rank: int = field(default=0, metadata={"help": "train LoRA adapters of this rank on the actor instead of all its weights (needs peft; 0: off)"})
    # ArCHer
    buffer_size: int = field(default=10000, metadata={"help": "replay buffer capacity in transitions (paper: 10k)"})
    batch_size: int = field(default=None, metadata={"help": "transitions per critic or actor step"})
    critic_steps: int = field(default=None, metadata={"help": "critic steps per iteration"})
    actor_steps: int = field(default=None, metadata={"help": "actor steps per iteration"})
    warmup_iters: int = field(default=None, metadata={"help": "iterations of critic-only training before the actor moves"})
    critic_lr: float = field(default=None, metadata={"help": "critic learning rate (Adam)"})
    actor_lr: float = field(default=None, metadata={"help": "actor learning rate (Adam)"})
    kl_coef: float = field(default=0.5, metadata={"help": "weight of KL(actor || warm-started actor) in the actor loss (0: off; deviation 9)"})
    gamma: float = field(default=0.95, metadata={"help": "discount per turn"})
    tau: float = field(default=0.1, metadata={"help": "Polyak rate of the target critic"})
    grad_clip: float = field(default=1.0, metadata={"help": "max gradient norm, per network"})
    eval_every: int = field(default=None, metadata={"help": "evaluate on the fixed evaluation set every N iterations"})
    eval_games: int = field(default=100, metadata={"help": "evaluation games for a game without a `secrets` list (seeded)"})
    probe_states: int = field(default=8, metadata={"help": "states of the critic's ranking probe (16 rollouts per utterance), run at each evaluation (0: off)"})
    save_every: int = field(default=1, metadata={"help": "checkpoint every N iterations (and at the end, and on Ctrl-C)"})


# Presets: what a flag left unset takes, by the actor ("tiny", or "pretrained" for a hub name or a local
# directory) and the game ("*": any game). The game's entry overrides its actor's; a flag given always wins.
PRESETS = {
    ("tiny", "*"): dict(  # the CPU quick start (twentyq_subset): 0.2M-parameter models, minutes on a laptop
        critic="tiny", bc_games=2000, bc_lr=1e-3,  # from-scratch models: a large cloning lr
        bc_steps=1200,  # 600 steps left ~2% invalid text in the clone's games (chance alone crossed 5%); 1200: ~0.8%
        iterations=60, games=32, gen_batch_size=0, max_new_tokens=12,  # bank utterances are 1-2 tokens + stop
        batch_size=64, critic_steps=20, actor_steps=2, warmup_iters=10,  # more critic than actor steps, as the paper
        critic_lr=1e-3, actor_lr=1e-4, eval_every=10),  # actor lr 1e-4 under the KL anchor (deviation 9)
    # 157 objects / 91 cities: the 2-layer actor needs ~3000 steps to clone the fixed-order demonstrator (loss
    # 0.008; greedy ~40%), and ArCHer ~150 iterations to find the best opening (README, full Twenty Questions).
    ("tiny", "twentyq"): dict(bc_steps=3000, iterations=150, eval_every=25),
    ("tiny", "guess_my_city"): dict(bc_steps=3000, iterations=150, eval_every=25),
    ("pretrained", "*"): dict(  # the paper's setting (GPT-2 actor, one GPU), after the paper and its code
        critic="roberta-base",  # the paper's critic encoder
        bc_games=5000, bc_steps=2000, bc_lr=1e-4,  # a gentle lr: the model is pretrained, not from scratch
        iterations=200, games=128, gen_batch_size=128,  # the paper's 128 rollouts per iteration
        max_new_tokens=32,  # room for a free-form question in GPT-2's tokens
        batch_size=256, critic_steps=50, actor_steps=3, warmup_iters=20,  # the paper's code: 50 critic / 3 actor steps
        critic_lr=2e-5, actor_lr=1e-5,  # the paper's code: 2e-5 critic; actor 1e-5 (its 1e-6 on this game barely moves)
        eval_every=10),
}


def preset(args: Args):
    """(name, settings) of the preset for this actor and game, the game's entry over its actor's."""
    kind = "tiny" if args.model == "tiny" else "pretrained"
    game = {} if kind == "pretrained" else PRESETS.get((kind, args.env), {})
    return f"{kind} actor" + (f" on {args.env}" if game else ""), {**PRESETS["tiny", "*"], **PRESETS[kind, "*"], **game}


def settle(args: Args, saved: dict = None):
    """The run's settings: every preset field left unset (None) takes the checkpoint's value (`saved`, on --resume
    or --eval-only) or its preset's. Prints where they came from; a given flag that would change what a resumed
    run means is refused (only --iterations, --eval-every and --gen-batch-size may change)."""
    name, values = ("the checkpoint's", saved) if saved else preset(args)
    base = PRESETS["tiny", "*"]  # every field a preset sets
    given = {k: getattr(args, k) for k in base if getattr(args, k) is not None}
    for k, v in given.items():
        if saved and k not in ("iterations", "eval_every", "gen_batch_size") and saved.get(k, v) != v:
            flag = "--" + k.replace("_", "-")
            fail(f"the run in {args.out} has {flag} {saved[k]}, not {v}; resume it without {flag} (it keeps its own settings)")
    args = dataclasses.replace(args, **{k: values[k] for k in base if k not in given})
    changed = [f"{k.replace('_', '-')} {values[k]}" for k in base if not saved and values[k] != base[k] and k not in given]
    print(f"settings: {name}" + (f" preset ({', '.join(changed)}; the rest as the quick start)" if changed else
                                 "" if saved else " preset (the quick start's)")
          + (" | given: " + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in given.items()) if given else ""))
    return args


def parse_args(argv=None, cls=Args):
    """The flags as an Args (runtime.py turns every field into --field-name); --help names each preset's values."""
    notes = {k: "preset: " + ", ".join(f"{p[k]} ({a}{'' if g == '*' else ' on ' + g})" for (a, g), p in PRESETS.items() if k in p)
             for k in PRESETS["tiny", "*"]}
    return runtime.parse_args(argv, cls, __doc__.split("\n")[0], notes)


# ----------------------------------------------------------------------------------------
# Token plumbing: sampling and the log-probs of what was sampled. The three bugs of the
# reference code live here (re-tokenized text, ignored temperature, right padding).
class Policy:
    """The actor with its tokenizer and the facts about its vocabulary that sampling needs."""

    def __init__(self, model, tok, max_new_tokens: int, stop: str = "\n", gen_batch_size: int = 0, bf16: bool = False):
        self.model, self.tok, self.max_new_tokens, self.stop_text = model, tok, max_new_tokens, stop
        self.gen_batch_size, self.bf16 = gen_batch_size, bf16
        vocab = model.config.vocab_size  # the logits' width; may exceed len(tok) (padded embeddings)
        # A token "ends the utterance" if its text contains the stop string ("\n", "\n\n", ".\n"...).
        texts = tok.batch_decode([[i] for i in range(len(tok))]) + [""] * (vocab - len(tok))
        self.stop = torch.tensor([stop in t for t in texts])
        self.banned = torch.arange(vocab) >= len(tok)  # never sampled: ids beyond the tokenizer, and special tokens
        self.banned[[i for i in tok.all_special_ids if i < vocab]] = True  # (pad, eos, bos...)
        ctx = getattr(model.config, "n_positions", None) or getattr(model.config, "max_position_embeddings", 1024)
        self.max_prompt = ctx - max_new_tokens  # room for the utterance inside the context window
        self.stop_id = tok(stop, add_special_tokens=False).input_ids[-1]  # what cloning scores as an utterance's end

    def amp(self):
        """Autocast for a forward pass: bf16 matmuls, float32 weights and optimizer (--dtype)."""
        return torch.autocast(self.model.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def scores(self, logits, temperature: float):
        """Logits -> the scores sampled from: special tokens banned, then temperature. Sampling and the
        loss both use it, so the loss's distribution is the sampler's; float32 for an accurate log_softmax."""
        logits = logits.float().masked_fill(self.banned.to(logits.device), float("-inf"))
        return logits / max(temperature, 1e-6)

    def encode(self, states, max_length: int = None):
        """Left-padded prompt ids and mask, (B, P), cut to max_length tokens (at most max_prompt) from the left."""
        enc = self.tok(list(states), return_tensors="pt", padding=True, truncation=True,
                       max_length=min(self.max_prompt, max_length or self.max_prompt), add_special_tokens=False)
        return enc.input_ids.to(self.model.device), enc.attention_mask.to(self.model.device)

    @torch.no_grad()
    def sample(self, states, temperature: float = 1.0, greedy: bool = False):
        """Sample one utterance per state with a key/value cache. Returns (texts, prompt_ids (B, P), prompt_mask
        (B, P), action_ids (B, T), action_mask (B, T), logp (B,)): action_ids are the sampled ids, stop token
        included (its probability is the action's too; texts are cut before it); logp = log pi(utterance | state)
        at `temperature`, a diagnostic whose mean estimates minus the policy's entropy per utterance."""
        ids, mask = self.encode(states)
        B, dev = ids.shape[0], ids.device
        pos = (mask.cumsum(-1) - 1).clamp(min=0)  # positions count real tokens only: left padding starts at 0
        with self.amp():
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
        cache, logits, next_pos = out.cache, out.logits[:, -1], pos[:, -1:] + 1
        stop, pad = self.stop.to(dev), self.tok.pad_token_id
        gen = torch.full((B, self.max_new_tokens), pad, dtype=torch.long, device=dev)
        rows, attn, logp = torch.arange(B, device=dev), mask, torch.zeros(B, device=dev)  # rows: batch index of the live rows
        for t in range(self.max_new_tokens):
            s = self.scores(logits, temperature)
            nxt = s.argmax(-1) if greedy else torch.multinomial(F.softmax(s, -1), 1).squeeze(-1)
            gen[rows, t] = nxt
            logp[rows] += F.log_softmax(s, -1).gather(-1, nxt[:, None]).squeeze(-1)
            keep = ~stop[nxt]
            if not keep.any():
                break
            if not keep.all():  # finished rows leave the batch and cache: one long utterance must not slow them all
                cache.batch_select_indices(keep.nonzero().squeeze(-1))
                rows, nxt, attn, next_pos = rows[keep], nxt[keep], attn[keep], next_pos[keep]
            attn = torch.cat([attn, torch.ones(len(rows), 1, dtype=attn.dtype, device=dev)], 1)
            with self.amp():
                out = self.model(input_ids=nxt[:, None], attention_mask=attn, position_ids=next_pos,
                                 cache=cache, use_cache=True)
            cache, logits, next_pos = out.cache, out.logits[:, -1], next_pos + 1
        gen = gen[:, : t + 1]
        is_stop = stop[gen] & (gen != pad)
        amask = ((is_stop.cumsum(-1) - is_stop.long()) == 0).long()  # action mask: up to and including the first stop
        texts = [self.tok.decode(g[m.bool()], skip_special_tokens=True).split(self.stop_text)[0].strip()
                 for g, m in zip(gen, amask)]
        return texts, ids, mask, gen, amask, logp

    def generate(self, states, temperature: float = 1.0, greedy: bool = False):
        """Utterances for many states, --gen-batch-size at a time (it bounds generation memory).
        Returns (texts, list of (T_i,) sampled ids, stop included, their log-probs (B,)), on the CPU."""
        n = self.gen_batch_size or len(states)
        texts, ids, logps = [], [], []
        for k in range(0, len(states), n):
            t, _, _, gen, amask, logp = self.sample(states[k: k + n], temperature, greedy)
            texts += t
            ids += [g[m.bool()].cpu() for g, m in zip(gen, amask)]
            logps.append(logp.cpu())
        return texts, ids, torch.cat(logps) if logps else torch.zeros(0)


def sequence_logprobs(policy: Policy, prompt_ids, prompt_mask, action_ids, action_mask, temperature=1.0, ref=None):
    """sum_t log pi(a_t | s, a_<t) over each utterance's tokens, with gradient: (B,). With a reference model
    `ref`, also the KL penalty's term (see actor_steps): sum_t KL(pi || ref) of the next-token distributions (B,).

    prompt (B, P) left-padded, action (B, T) right-padded: [pad pad s1 s2 s3 | a1 a2 \\n pad].
    The logits at position i predict token i+1, so positions P-1 .. P+T-2 score the action.
    Masked with `where`, not a product: a banned pad id has log-prob -inf, and -inf * 0 is NaN."""
    ids, mask = torch.cat([prompt_ids, action_ids], 1), torch.cat([prompt_mask, action_mask], 1)
    pos, T = (mask.cumsum(-1) - 1).clamp(min=0), action_ids.shape[1]
    # Only the last T + 1 positions need the (vocabulary-sized) output layer.
    with policy.amp():
        logits = policy.model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=T + 1).logits
    logp = F.log_softmax(policy.scores(logits[:, :-1], temperature), -1)  # (B, T, V)
    tok_logp = logp.gather(-1, action_ids[..., None]).squeeze(-1)  # (B, T)
    seq = torch.where(action_mask.bool(), tok_logp, torch.zeros_like(tok_logp)).sum(-1)
    if ref is None:
        return seq
    with torch.no_grad(), policy.amp():
        ref_logits = ref(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=T + 1).logits
    ref_logp = F.log_softmax(policy.scores(ref_logits[:, :-1], temperature), -1)
    banned = policy.banned.to(logp.device)  # -inf under both: zeroed, as -inf - -inf is NaN
    kl = (logp.exp() * (logp.masked_fill(banned, 0.0) - ref_logp.masked_fill(banned, 0.0))).sum(-1)  # (B, T)
    return seq, torch.where(action_mask.bool(), kl, torch.zeros_like(kl)).sum(-1)


def utterance_logprobs(policy: Policy, states, ids, temperature: float, ref=None):
    """sequence_logprobs of the token ids that were sampled (list of (T_i,), as Policy.generate
    gives them): the gradient is on exactly what the policy did, never on re-tokenized text. (B,)
    A prompt is cut as when sampling, or further if a longer utterance (a demonstrator's) would overflow the context."""
    pids, pmask = policy.encode(states, policy.max_prompt + policy.max_new_tokens - max(len(x) for x in ids))
    aids = nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=policy.tok.pad_token_id)
    amask = nn.utils.rnn.pad_sequence([torch.ones_like(x) for x in ids], batch_first=True)
    return sequence_logprobs(policy, pids, pmask, aids.to(pids.device), amask.to(pids.device), temperature, ref)


# ----------------------------------------------------------------------------------------
# Critic: an encoder with four heads, Q1, Q2 on (state, utterance) and V1, V2 on the state.
class Critic(nn.Module):
    def __init__(self, encoder, tok, max_len: int = 512, bf16: bool = False):
        super().__init__()
        self.encoder, self.tok, self.bf16 = encoder, tok, bf16
        self.max_len = min(max_len, tok.model_max_length, getattr(encoder.config, "max_position_embeddings", max_len))
        h = encoder.config.hidden_size  # head size from the encoder's config, never hard-coded
        self.q1, self.q2, self.v1, self.v2 = (nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 1)) for _ in range(4))
        self.ids_cache = {}  # text -> its token ids (token_ids)

    @torch.no_grad()
    def start_pessimistic(self, value: float):
        """Start every head at `value`, at or below any return the game gives: a fresh critic's ~0 is optimistic when
        every reward is -1, and the actor would chase never-seen utterances (gibberish) whose unfitted Q beats the rest."""
        for h in (self.q1, self.q2, self.v1, self.v2):
            h[-1].bias.fill_(value)

    def token_ids(self, texts):
        """Each text's token ids, cached: buffered texts are drawn again and again, and tokenizing them at
        every step cost a tenth of a critic step. The cache is emptied at 50,000 texts to bound its memory."""
        new = [t for t in dict.fromkeys(texts) if t not in self.ids_cache]
        if new:
            if len(self.ids_cache) + len(new) > 50_000:
                self.ids_cache.clear()
                new = list(dict.fromkeys(texts))
            self.ids_cache.update(zip(new, self.tok(new, truncation=True, max_length=self.max_len)["input_ids"]))
        return [self.ids_cache[t] for t in texts]

    def embed(self, texts, chunks: int = 4):
        """The encoder's last hidden state at each text's final real token, (B, H): the end of the utterance (Q)
        or newest turn (V), it attends to the whole text, and unlike a mean is not swamped by a long state.
        The texts run shortest first in `chunks` calls, each padded only to its own longest text: one call
        padded to the batch's longest was two-thirds padding (states run from 1 to 20 turns), and a text's
        hidden state does not depend on its neighbours' padding, so only the cost changes."""
        ids = self.token_ids(texts)
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        size, out = max(1, -(-len(ids) // chunks)), []
        for k in range(0, len(ids), size):
            part = [torch.tensor(ids[i]) for i in order[k: k + size]]
            x = nn.utils.rnn.pad_sequence(part, batch_first=True, padding_value=self.tok.pad_token_id)  # right padding
            mask = nn.utils.rnn.pad_sequence([torch.ones_like(t) for t in part], batch_first=True)
            x, mask = x.to(self.encoder.device), mask.to(self.encoder.device)
            with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.bf16):
                hidden = self.encoder(input_ids=x, attention_mask=mask).last_hidden_state  # (b, L, H)
            out.append(hidden[torch.arange(len(part), device=x.device), mask.sum(1) - 1].float())  # final real token
        if not out:
            return torch.zeros(0, self.encoder.config.hidden_size, device=self.encoder.device)
        return torch.cat(out)[torch.tensor(order, device=self.encoder.device).argsort()]  # back to the texts' order

    def q_and_v(self, states, actions, v_states):
        """Q1, Q2 on (states, actions) and V1, V2 on v_states (each (B,)), from one encoder call: one set of
        length-sorted chunks for both. Deviation 4: one pass over state + utterance lets attention relate the
        question to the dialogue (was it asked before?), learnt far faster than from two pooled vectors."""
        x = self.embed([s + a + "\n" for s, a in zip(states, actions)] + list(v_states))
        xq, xv = x[: len(states)], x[len(states):]
        return self.q1(xq).squeeze(-1), self.q2(xq).squeeze(-1), self.v1(xv).squeeze(-1), self.v2(xv).squeeze(-1)

    def q(self, states, actions):
        """Q1, Q2 (each (B,))."""
        return self.q_and_v(states, actions, [])[:2]

    def v(self, states):
        """V1, V2 (each (B,))."""
        return self.q_and_v([], [], states)[2:]


@torch.no_grad()
def polyak(target: nn.Module, online: nn.Module, tau: float):
    """target <- (1 - tau) * target + tau * online, for every parameter (encoder included)."""
    for t, o in zip(target.parameters(), online.parameters()):
        t.lerp_(o, tau)


# ----------------------------------------------------------------------------------------
# Replay buffer of utterance-level transitions (s, a, r, s', done): a ring of fixed capacity.
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

    def add_games(self, trajs):
        for tr in [tr for traj in trajs for tr in traj]:
            self.add(tr)

    def sample(self, n: int, rng: random.Random):
        """n transitions, uniform with replacement, as columns: states, actions, rewards (n,), next_states, dones (n,)."""
        s, a, r, s2, d = zip(*[self.data[rng.randrange(len(self.data))] for _ in range(n)])
        return list(s), list(a), torch.tensor(r, dtype=torch.float32), list(s2), torch.tensor(d, dtype=torch.float32)


# ----------------------------------------------------------------------------------------
# Rollouts: many games at once, one batched sampling call per turn; finished games drop out.
def play(agent, games, draws, temperature=1.0, greedy=False, states=None):
    """Play len(games) games to the end, one batched generation per turn (agent: a Policy, or anything
    with its generate()); with `states`, games already under way are played on from there, without a reset.
    Returns per game an envs.Episode of transitions (state, utterance, reward, next_state, done), its
    utterances' sampled ids ((T_i,), stop included) and their log-probs."""
    states = list(states) if states is not None else envs.reset_all(games, draws)
    trajs, ids, logps = [envs.Episode() for _ in games], [[] for _ in games], [[] for _ in games]
    live = list(range(len(games)))
    while live:
        texts, sampled, lp = agent.generate([states[i] for i in live], temperature, greedy)
        still = []
        for i, text, x, l in zip(live, texts, sampled, lp.tolist()):
            nxt, r, done = games[i].step(text)
            trajs[i].append((states[i], text, float(r), nxt, bool(done)))
            ids[i].append(x)
            logps[i].append(l)
            states[i] = nxt
            if done:
                envs.finish(games[i], trajs[i])
            else:
                still.append(i)
        live = still
    return trajs, ids, logps


def summarize(trajs):
    """Success rate, mean return and mean turns of a list of Episodes (of every rank's share)."""
    won, ret, turns, n = all_sum(torch.tensor([sum(t.won for t in trajs), sum(x[2] for t in trajs for x in t),
                                               sum(len(t) for t in trajs), len(trajs)], dtype=torch.float64)).tolist()
    return {"success": won / n, "return": ret / n, "turns": turns / n}


def returns_to_go(rewards, gamma: float):
    """G_t = r_t + gamma * G_{t+1}: the Monte Carlo return from each turn of one dialogue."""
    out, g = [], 0.0
    for r in reversed(rewards):
        g = r + gamma * g
        out.append(g)
    return out[::-1]


def repeat_share(trajs):
    """The share of utterances that repeat one already said in the same dialogue."""
    seen = [[tr[1] for tr in t] for t in trajs]
    return sum(a in u[:k] for u in seen for k, a in enumerate(u)) / max(1, sum(map(len, seen)))


def explained_variance(pred, target):
    """1 - Var(G - Q) / Var(G), as CleanRL logs it: 1 is a perfect fit, 0 no better than a constant, < 0 worse."""
    var = target.var()
    return float(1 - (target - pred).var() / var) if len(target) > 1 and var > 0 else float("nan")


@torch.no_grad()
def critic_fit(critic, trajs, gamma: float, batch_size: int):
    """Explained variance of these games' Monte Carlo returns by min(Q1, Q2) of each (state, utterance) played."""
    pairs = [(tr[0], tr[1]) for t in trajs for tr in t]
    g = torch.tensor([x for t in trajs for x in returns_to_go([tr[2] for tr in t], gamma)])
    q = torch.cat([torch.minimum(*critic.q(*zip(*pairs[k: k + batch_size]))).cpu()
                   for k in range(0, len(pairs), batch_size)])
    return explained_variance(q, g)


# ----------------------------------------------------------------------------------------
# The two losses (the paper's equations), and one optimizer step.
def critic_loss(critic: Critic, target: Critic, batch, fresh_actions, gamma: float):
    """TD losses of ArCHer's double critic on one batch; returns (loss, stats).

    Q_i(s, a)  -> r + gamma * (1 - done) * Vbar_i(s')          (Vbar: the target critic)
    V_i(s)     -> min(Qbar_1, Qbar_2)(s, a~),  a~ ~ pi(.|s) sampled fresh
    Q head i regresses on target V head i (as the reference code): the Q heads stay independent estimates.
    V regresses on the min of the target Qs (clipped double Q): V feeds the actor's advantage, and a policy
    gradient exploits any overestimated Q. The fresh a~ makes V track the current policy, not the behaviour
    policy that filled the buffer. A game cut at its 20-turn limit counts as terminal (done = 1), as in the
    original: a simplification, as the state does not show a critic how many turns are left."""
    s, a, r, s2, d = batch
    dev = next(critic.parameters()).device
    r, d = r.to(dev), d.to(dev)
    with torch.no_grad():  # one target pass: Qbar on (s, a~), the current policy's actions, and Vbar on s'
        tq1, tq2, tv1, tv2 = target.q_and_v(s, fresh_actions, s2)
        y1, y2 = r + gamma * (1 - d) * tv1, r + gamma * (1 - d) * tv2  # (B,)
        yv = torch.minimum(tq1, tq2)
    q1, q2, v1, v2 = critic.q_and_v(s, a, s)  # one online pass, one backward
    loss = F.mse_loss(q1, y1) + F.mse_loss(q2, y2) + F.mse_loss(v1, yv) + F.mse_loss(v2, yv)
    return loss, {"q_mean": torch.minimum(q1, q2).mean().item(), "v_mean": torch.minimum(v1, v2).mean().item()}


def advantage(critic: Critic, states, actions):
    """A(s, a) = min(Q1, Q2)(s, a) - min(V1, V2)(s), no gradient. Shape (B,)."""
    with torch.no_grad():
        q1, q2, v1, v2 = critic.q_and_v(states, actions, states)
        return torch.minimum(q1, q2) - torch.minimum(v1, v2)


def actor_loss(logp, adv):
    """-mean(A_norm * sum_t log pi(a_t | ...)): REINFORCE inside the utterance, the critic's advantage as its
    terminal reward. No PPO ratio or clipping: every step samples fresh actions from the current policy, so the
    gradient is on-policy. Deviation 3: A is normalized per batch; an uncalibrated critic's raw advantage is
    small and biased, and a too-large step makes a small actor collapse into utterances the game rejects."""
    if dist.is_initialized():  # normalize over the global batch, every rank's share
        n, s, ss = all_sum(torch.stack([adv.new_tensor(float(adv.numel())), adv.sum(), adv.pow(2).sum()]))
        mean = s / n
        a = (adv - mean) / (((ss - n * mean**2) / (n - 1)).clamp(min=0).sqrt() + 1e-6)
    else:
        a = (adv - adv.mean()) / (adv.std() + 1e-6) if adv.numel() > 1 else adv
    return -(a * logp).mean()


def clipped_step(opt, params, loss, max_norm: float) -> bool:
    """One optimizer step on this network's parameters only (fresh gradients, clipped). A non-finite loss or
    gradient norm skips it (returns False, warns): one NaN let through would make every weight NaN for good."""
    params = [p for p in params if p.requires_grad]
    opt.zero_grad(set_to_none=True)
    finite = bool(torch.isfinite(loss))
    if finite:
        loss.backward()
    if dist.is_initialized():
        # One all-reduce of the flattened gradients, averaged: every replica takes the same step; a rank
        # whose loss is not finite sends NaN, so every rank skips the step together.
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
# ArCHer's learning, one iteration: what train() does with the games it just played.
def critic_steps(run) -> dict:
    """--critic-steps TD steps on replay-buffer batches, each followed by the target's Polyak step. The fresh
    actions a~ of the V targets are sampled up front (the policy does not change during critic steps), a
    batch at a time: all at once would hold a key/value cache for critic_steps x batch_size prompts."""
    args, stats = run.args, []
    batches = [run.buffer.sample(args.batch_size, run.rng) for _ in range(args.critic_steps)]
    fresh = [run.agent.generate(b[0], args.temperature)[0] for b in batches]
    for batch, a_fresh in zip(batches, fresh):
        loss, st = critic_loss(run.critic, run.target, batch, a_fresh, args.gamma)
        run.skipped += not clipped_step(run.critic_opt, run.critic.parameters(), loss, args.grad_clip)
        polyak(run.target, run.critic, args.tau)
        stats.append({"critic_loss": loss.item(), **st})
    return {k: float(np.mean([s[k] for s in stats])) for k in ("critic_loss", "q_mean", "v_mean")} if stats else {}


def policy_gradient_loss(run, states, ids, weights):
    """actor_loss on the sampled ids, scored at the training temperature and weighted per utterance,
    plus --kl-coef x KL(actor || warm start) when the run keeps that reference. Returns (loss, mean KL)."""
    out = utterance_logprobs(run.policy, states, ids, run.args.temperature, run.reference)
    logp, kl = (out, torch.zeros(1)) if run.reference is None else out
    return actor_loss(logp, weights.to(logp.device)) + run.args.kl_coef * kl.mean(), kl.mean().item()


def actor_steps(run) -> dict:
    """--actor-steps policy-gradient steps: fresh utterances for buffer states, scored by the
    critic's advantage, pushed up or down by REINFORCE inside the utterance (token level)."""
    args, policy, stats = run.args, run.policy, []
    for _ in range(args.actor_steps):
        states = run.buffer.sample(args.batch_size, run.rng)[0]
        texts, ids, _ = policy.generate(states, args.temperature)  # --gen-batch-size at a time
        adv = advantage(run.critic, states, texts)
        policy.model.train()
        loss, kl = policy_gradient_loss(run, states, ids, adv)
        run.skipped += not clipped_step(run.actor_opt, policy.model.parameters(), loss, args.grad_clip)
        policy.model.eval()
        stats.append({"actor_loss": loss.item(), "advantage_mean": adv.mean().item(), "kl": kl})
    return {k: float(np.mean([s[k] for s in stats])) if stats else None for k in ("actor_loss", "advantage_mean", "kl")}


class ArCHer:
    """The rule train() runs by default; baselines.py's have the same parts: uses_critic, uses_kl
    (a policy gradient with --kl-coef's penalty), agent() and update()."""
    name, uses_critic, uses_kl = "archer", True, True

    def agent(self, run):
        """What plays the games and samples the fresh actions: ArCHer's actor itself."""
        return run.policy

    def update(self, run, it: int, trajs, ids) -> dict:
        run.buffer.add_games(trajs)  # off-policy: every transition ever played may be replayed
        m = critic_steps(run)  # 2. the utterance-level critic, by temporal differences
        if it >= run.args.warmup_iters:  # 3. the token-level actor, once the critic has warmed up
            m.update(actor_steps(run))
        else:
            m.update(actor_loss=None, advantage_mean=None)
        m["critic_fit"] = critic_fit(run.critic, trajs, run.args.gamma, run.args.batch_size)
        return m


# ----------------------------------------------------------------------------------------
# Evaluation on the fixed evaluation set (deviation 7): the policy, not generalization to new secrets.
def evaluate(agent, games, draws, seed: int, temperature: float):
    """Greedy and sampled play of the evaluation draws (every secret once, or --eval-games seeds) under their own
    seeded random state, restored after, so the training stream is untouched. Returns (metrics, greedy Episodes)."""
    rank, n = world()
    games, draws = games[rank::n], draws[rank::n]  # each rank plays its share; summarize adds them up
    with seeded(seed):
        greedy_games = play(agent, games, draws, greedy=True)[0]
        greedy = summarize(greedy_games)
        sampled = summarize(play(agent, games, draws, temperature)[0])
    return {"eval_success": greedy["success"], "eval_return": greedy["return"], "eval_turns": greedy["turns"],
            "eval_sampled_success": sampled["success"], "eval_sampled_return": sampled["return"]}, greedy_games


def probe_set(run, n: int):
    """The ranking probe's fixed states: one random turn (not the last) of each of n demonstrator games, with
    the utterances that led to it; none for a game without a demonstrator or a `secrets` list."""
    if not (n and run.secrets and hasattr(run.game, "demonstrator")):
        return []
    rng, demos = random.Random(run.args.seed + 3), envs.demonstrations(run.fresh(run.args.seed + 3), n, run.args.seed + 3)
    return [(d[t][0], [tr[1] for tr in d[:t]]) for d in demos if len(d) > 1 for t in [rng.randrange(len(d) - 1)]]


def replay(game, secret, utterances):
    """Reset `game` to `secret` and say `utterances`: the state reached, None if the game ended on the way."""
    state = game.reset(secret=secret)
    for u in utterances:
        state, _, done = game.step(u)
        if done:
            return None
    return state


@torch.no_grad()
def probe_values(run, rollouts: int):
    """For each probe state, up to 4 different utterances of the current agent, and each one's value under the
    current agent estimated by `rollouts` Monte Carlo games from that state (their secrets taken in turn from
    those consistent with the dialogue): ((state, utterance) keys, mean values (K,), squared standard errors (K,))."""
    args, keys, games, starts, first = run.args, [], [], [], []  # first: (reward, done) of the utterance tried
    for state, prefix in run.probe:
        replayed = [copy.deepcopy(run.game) for _ in run.secrets]
        at = [g for g, x in zip(replayed, run.secrets) if replay(g, x, prefix) == state]  # the consistent secrets' games
        for u in dict.fromkeys(run.agent.generate([state] * 4, args.temperature)[0]):  # distinct, in order
            keys.append((state, u))
            for r in range(rollouts):
                games.append(copy.deepcopy(at[r % len(at)]))
                nxt, reward, done = games[-1].step(u)
                first.append((reward, done))
                starts.append(nxt)
    go = [i for i, (_, done) in enumerate(first) if not done]
    rest = play(run.agent, [games[i] for i in go], None, args.temperature, states=[starts[i] for i in go])[0]
    later = dict(zip(go, [sum(args.gamma ** t * tr[2] for t, tr in enumerate(ep)) for ep in rest]))
    g = torch.tensor([r + args.gamma * later.get(i, 0.0) for i, (r, _) in enumerate(first)]).view(len(keys), rollouts)
    return keys, g.mean(1), g.var(1) / rollouts


def ranking_accuracy(run, rollouts: int = 16):
    """Does the critic rank utterances on one state as their true values do? Over the pairs of probe utterances on
    the same state whose Monte Carlo values differ by more than twice their standard error, the share that
    min(Q1, Q2) orders the same way: (that share or None, the number of such pairs)."""
    keys, mean, se2 = probe_values(run, rollouts)
    with torch.no_grad():
        q = torch.minimum(*run.critic.q(*zip(*keys))).cpu() if keys else torch.zeros(0)
    agree = [bool((q[i] - q[j]) * (mean[i] - mean[j]) > 0) for i in range(len(keys)) for j in range(i + 1, len(keys))
             if keys[i][0] == keys[j][0] and (mean[i] - mean[j]).abs() > 2 * (se2[i] + se2[j]).sqrt()]
    return (sum(agree) / len(agree) if agree else None), len(agree)


def evaluate_only(run):
    """--eval-only: the checkpoint's agent on the fixed set; --show N prints N greedy dialogues."""
    ev, shown = evaluate(run.agent, run.eval_games, run.eval_draws, run.args.seed, run.args.temperature)
    for k, episode in enumerate(shown[: run.args.show]):
        print(f"--- evaluation game {k + 1} ({'won' if episode.won else 'lost'}, "
              f"return {sum(t[2] for t in episode):g}) ---\n{episode[0][0]}", end="")
        for state, utterance, _, nxt, _ in episode:  # the agent's line, then what the game added
            print(f"> {utterance}\n{nxt[len(state):] if nxt.startswith(state) else nxt}", end="")
        print()
    print(json.dumps(ev))
    return run.policy, run.critic, run.log + [ev]


# ----------------------------------------------------------------------------------------
# Warm start: behaviour cloning on the demonstrator (the paper starts from an SFT model).
def clone_sequences(policy: Policy, dialogues):
    """Each dialogue as teacher-forcing sequences (ids, targets): targets[i] is the token the logits at
    position i must predict, -100 where there is no loss. Every earlier state is a prefix of the last, so
    one sequence scores every turn for the cost of the last. Answers get no loss; the position after an
    utterance is scored on its stop token. A turn whose next state does not extend state + utterance starts
    a new sequence (any game stays clonable). Tokenized once, in one batched call: cloning then draws from
    these (re-tokenizing every sampled turn at every step took a third of the warm start)."""
    pieces = []  # the texts to tokenize: a dialogue's first state, then per turn the utterance and the answer
    for d in dialogues:
        start = True
        for s, a, _, s2, _ in d:
            pieces += ([s] if start else []) + [a, s2[len(s) + len(a):] if s2.startswith(s + a) else ""]
            start = not s2.startswith(s + a)
    toks = iter(policy.tok(pieces, add_special_tokens=False).input_ids if pieces else [])
    stop, out = policy.stop_id, []
    for d in dialogues:
        seqs, ids = [], None
        for s, a, _, s2, _ in d:
            if ids is None:
                ids = next(toks)
                tgt = [-100] * len(ids)
            u, rest = next(toks), next(toks)
            tgt[-1:] = [u[0] if u else stop]
            ids, tgt = ids + u, tgt + u[1:] + [stop] * bool(u)
            if s2.startswith(s + a):
                ids, tgt = ids + rest, tgt + [-100] * len(rest)
            else:
                seqs.append((ids, tgt))
                ids = None
        out.append(seqs + ([(ids, tgt)] if ids is not None else []))
    return out


def imitation_loss(policy: Policy, seqs):
    """-log pi(utterance + stop | state) per agent token, averaged, over teacher-forcing sequences
    (clone_sequences' (ids, targets) pairs), one right-padded pass."""
    ctx = policy.max_prompt + policy.max_new_tokens  # a dialogue longer than the context keeps its end
    ids, tgt = ([torch.tensor(x[k][-ctx:]) for x in seqs] for k in (0, 1))  # each (L_i,)
    mask = nn.utils.rnn.pad_sequence([torch.ones_like(x) for x in ids], batch_first=True)  # right padding
    ids = nn.utils.rnn.pad_sequence(ids, batch_first=True, padding_value=policy.tok.pad_token_id)
    tgt = nn.utils.rnn.pad_sequence(tgt, batch_first=True, padding_value=-100)
    dev, tgt = policy.model.device, tgt.to(policy.model.device)
    with policy.amp():
        logits = policy.model(input_ids=ids.to(dev), attention_mask=mask.to(dev)).logits  # (B, L, V)
    scored = tgt != -100  # the agent's tokens: the softmax over the vocabulary only where there is a loss
    return F.cross_entropy(policy.scores(logits[scored], 1.0), tgt[scored])


def behaviour_clone(policy: Policy, demos, args: Args, rng: random.Random):
    """Maximize log pi(utterance + stop string | state) on demonstrator dialogues, --batch-size // 4
    a step (about a transition batch's turns, or more); returns the last loss (None for --bc-steps 0)."""
    opt = torch.optim.AdamW([p for p in policy.model.parameters() if p.requires_grad], lr=args.bc_lr, weight_decay=0.0)
    policy.model.train()
    loss, bar = None, tqdm(range(args.bc_steps), desc="behaviour cloning", leave=False, disable=world()[0] > 0)
    seqs = clone_sequences(policy, demos) if args.bc_steps else []
    for step in bar:
        picked = [seqs[rng.randrange(len(seqs))] for _ in range(max(1, args.batch_size // 4))]  # dialogues
        loss = imitation_loss(policy, [x for d in picked for x in d])
        # Linear warm-up, then cosine decay: from-scratch tiny models need a large lr early, a small one late.
        for g in opt.param_groups:
            g["lr"] = args.bc_lr * min(1.0, (step + 1) / 50) * 0.5 * (1 + math.cos(math.pi * step / args.bc_steps))
        clipped_step(opt, policy.model.parameters(), loss, args.grad_clip)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    policy.model.eval()
    return None if loss is None else loss.item()


@torch.no_grad()
def cloning_gap(policy: Policy, turns, batch_size: int):
    """How far the clone is from the demonstrator, in nats per turn: the mean over the probe turns of
    KL(demonstrator || clone) = sum_u p(u | s) (log p(u | s) - log pi(u + stop | s)), the clone's cross-entropy
    on the demonstrator's choices minus the demonstrator's own entropy, exact over its choices (turns:
    envs.demonstrator_turns). 0 is a perfect clone; a clone that ignores the answers stays well above it."""
    rows = [(s, u, p) for s, probs in turns for u, p in probs.items() if p > 0]
    ids = [torch.tensor(x + [policy.stop_id]) for x in policy.tok([u for _, u, _ in rows], add_special_tokens=False).input_ids]
    logpi = torch.cat([utterance_logprobs(policy, [r[0] for r in rows[k: k + batch_size]], ids[k: k + batch_size], 1.0)
                       for k in range(0, len(rows), batch_size)]).cpu()
    p = torch.tensor([r[2] for r in rows], dtype=torch.float64)
    return float((p * (p.log() - logpi.double())).sum()) / len(turns)


def warm_start(run):
    """Clone the demonstrator and seed the buffer with its dialogues (the critic's first targets come
    from real, if suboptimal, play); evaluate; checkpoint, so a stopped run resumes after the warm start."""
    args, t0 = run.args, time.time()
    demos = envs.demonstrations(run.fresh(args.seed + 1), args.bc_games, args.seed + 1)
    warm = {"iteration": -1, "env_steps": 0}
    if demos:
        if run.critic is not None:
            run.buffer.add_games(demos)
            # Deviation 5, the pessimistic start: sum_t gamma^t r_min over the longest game (-12.8 at 20
            # turns, gamma 0.95; r_min / (1 - gamma) = -20 for a game of unknown length).
            r_min, turns = min(min(tr[2] for t in demos for tr in t), 0.0), getattr(run.game, "max_turns", None)
            run.critic.start_pessimistic(r_min * (1 - args.gamma ** turns if turns else 1) / (1 - args.gamma))
            run.target.load_state_dict(run.critic.state_dict())
        warm["bc_loss"] = behaviour_clone(run.policy, demos, args, run.rng)
        probe = envs.demonstrator_turns(run.fresh(args.seed + 2), 20, args.seed + 2)  # turns no cloning step saw
        warm["cloning_gap"] = cloning_gap(run.policy, probe, args.batch_size) if probe else None
        if run.reference is not None:  # the KL penalty's anchor: the warm-started actor
            run.reference.load_state_dict(run.policy.model.state_dict())
        demo = summarize(demos)
        warm.update(demo_return=demo["return"], demo_success=demo["success"])
        bc = "none" if warm["bc_loss"] is None else f"{warm['bc_loss']:.3f}"
        gap = "" if warm["cloning_gap"] is None else f" cloning gap {warm['cloning_gap']:.2f} nats/turn"
        print(f"warm start: bc_loss {bc}{gap} | demonstrator success {demo['success']:.0%} return {demo['return']:.2f}", end=" | ")
    else:
        print("the game has no demonstrator: RL starts from the model as it is", end=" | ")
    warm.update(evaluate(run.agent, run.eval_games, run.eval_draws, args.seed, args.temperature)[0], seconds=time.time() - t0)
    run.log = [warm]
    run.record(run.log, "w")
    print(f"greedy success {warm['eval_success']:.0%} return {warm['eval_return']:.2f} | sampled success "
          f"{warm['eval_sampled_success']:.0%} ({warm['seconds']:.0f}s)")
    run.best = (warm["eval_success"], warm["eval_return"])
    run.checkpoint(-1)


# ----------------------------------------------------------------------------------------
# The run: models, optimizers, replay buffer and log, and the checkpoint that holds them all.
class Run:
    """Everything a training run holds: the game and its fixed evaluation set, the models and optimizers, the
    buffer, the random streams and the log; built from the flags, restored with --resume or --eval-only."""

    def __init__(self, args: Args, game, rule):
        check_args(args)
        self.args, self.rule, self.user_game = args, rule, game
        self.rank, self.n_ranks, dev = device_and_world(args)
        try:  # the game first: a user's game that cannot load fails before anything is built
            self.game = envs.check_game(game, "the game object") if game is not None else envs.load_game(args.env, args.seed)
        except envs.GameError as e:
            fail(str(e))
        self.ckpt_path, self.best_path = os.path.join(args.out, "checkpoint.pt"), os.path.join(args.out, "best.pt")
        self.rank_path = os.path.join(args.out, f"rank{self.rank}.pt")  # ranks > 0: their own buffer and random states
        ck = open_run_dir(args, rule.name, self.ckpt_path, self.rank_path, self.n_ranks, dev)  # None for a new run
        self.args = args = settle(args, ck and ck["args"])  # the flags left unset, from the preset or the checkpoint
        seed_everything(args.seed)  # the same on every rank: the replicas start identical
        self.rng, self.dev = random.Random(args.seed + self.rank), dev  # the trainer's own stream: secrets, buffer samples
        # The fixed evaluation set: every secret once, or --eval-games seeds no training game uses.
        self.secrets = list(getattr(self.game, "secrets", []))
        self.eval_draws = self.secrets or [f"eval {k}" for k in range(args.eval_games)]
        self.eval_games = [copy.deepcopy(self.game) for _ in self.eval_draws]  # the draws set each game: copies will do
        bf16 = args.dtype == "bfloat16" or (args.dtype == "auto" and dev.type == "cuda" and torch.cuda.is_bf16_supported())
        try:
            model, tok = load_actor(args.model, self.game)
            model = with_lora(model, args.lora_rank) if args.lora_rank else model
            encoder, ctok = load_critic_encoder(args.critic, tok) if rule.uses_critic else (None, None)
        except ModelError as e:
            fail(str(e))
        self.policy = Policy(model.to(dev), tok, args.max_new_tokens, args.stop, args.gen_batch_size, bf16)
        if not self.policy.stop.any():
            fail(f"--stop {args.stop!r}: no token of the actor's vocabulary contains it, so no utterance could end")
        nets = [self.policy.model]
        self.critic = self.target = self.critic_opt = None  # a rule without a critic builds none
        if rule.uses_critic:
            self.critic = Critic(encoder, ctok, bf16=bf16).to(dev).train()  # train mode: no dropout, but checkpointing
            self.target = copy.deepcopy(self.critic).eval().requires_grad_(False)  # the critic's target
            self.critic_opt = torch.optim.Adam(self.critic.parameters(), lr=args.critic_lr)
            nets.append(self.critic.encoder)
        for net in nets if args.grad_checkpointing else []:
            net.activation_checkpointing_enable({"use_reentrant": False})
        self.actor_opt = torch.optim.Adam([p for p in self.policy.model.parameters() if p.requires_grad], lr=args.actor_lr)
        # --kl-coef: a frozen copy of the actor, set to the warm-started one after cloning
        self.reference = copy.deepcopy(self.policy.model).eval().requires_grad_(False) if args.kl_coef > 0 and rule.uses_kl else None
        self.agent = rule.agent(self)
        # (state, utterances before it); rank 0 alone: every rank would compute the same, and only rank 0 records it
        self.probe = probe_set(self, args.probe_states) if rule.uses_critic and self.rank == 0 else []
        os.makedirs(args.out, exist_ok=True)
        self.buffer, self.log, self.extra = ReplayBuffer(args.buffer_size), [], {}  # extra: a rule's own state
        self.start_it, self.env_steps, self.best, self.skipped = 0, 0, None, 0  # best: (greedy success, return)
        n_actor = sum(p.numel() for p in self.policy.model.parameters())
        n_trained = sum(p.numel() for p in self.policy.model.parameters() if p.requires_grad)
        critic_line = f"{sum(p.numel() for p in self.critic.parameters()) / 1e6:.2f}M params" if self.critic else "none"
        print(f"actor {args.model}: {n_actor / 1e6:.2f}M params ({n_trained / 1e6:.2f}M trained) | critic {args.critic}: "
              f"{critic_line} | device {dev}{' (bf16 autocast)' if bf16 else ''}"
              + (f" | {self.n_ranks} ranks" if self.n_ranks > 1 else ""))
        if self.n_ranks > 1:  # identical models, then each rank samples its own games
            seed_everything(args.seed + 1000 * self.rank)
        if ck is not None:
            self.restore(ck)

    def fresh(self, seed):
        """Another copy of the game: a built-in one seeded its own way, a user's one deep-copied."""
        return envs.load_game(self.args.env, seed) if self.user_game is None else copy.deepcopy(self.user_game)

    def models(self):
        """The networks and optimizers to checkpoint, by name (none for what the rule lacks)."""
        parts = {"actor": self.policy.model, "actor_opt": self.actor_opt, "critic": self.critic,
                 "target": self.target, "critic_opt": self.critic_opt, "reference": self.reference}
        return {k: v for k, v in parts.items() if v is not None}

    def restore(self, ck):
        try:
            for name, part in self.models().items():
                part.load_state_dict(ck[name])
        except (KeyError, RuntimeError, ValueError) as e:
            fail(f"{self.ckpt_path} does not fit these models ({type(e).__name__}: {str(e).splitlines()[0][:200]})")
        self.buffer.data, self.buffer.next, self.extra = ck["buffer"], ck["buffer_next"], ck["extra"]
        self.start_it, self.env_steps, self.log, self.best = ck["iteration"] + 1, ck["env_steps"], ck["log"], ck["best"]
        set_rng_states(ck["rng"], self.rng)
        print(f"resumed from {self.ckpt_path} at iteration {self.start_it}")

    def record(self, rows, mode="a"):
        """Append metric rows to <out>/metrics.jsonl (rank 0 only)."""
        if self.rank == 0:
            with open(os.path.join(self.args.out, "metrics.jsonl"), mode) as f:
                f.writelines(json.dumps(m) + "\n" for m in rows)

    def checkpoint(self, it):
        """Everything that affects the future, atomically; best.pt keeps the best evaluation.
        Rank 0 writes the models (identical on every rank); each other rank its own share."""
        own = {"buffer": self.buffer.data, "buffer_next": self.buffer.next, "rng": rng_states(self.rng), "extra": self.extra}
        if self.rank > 0:
            return save_checkpoint(self.rank_path, own)
        save_checkpoint(self.ckpt_path, {
            **{k: v.state_dict() for k, v in self.models().items()}, "iteration": it, "env_steps": self.env_steps,
            "log": self.log, "args": {**dataclasses.asdict(self.args), "algo": self.rule.name}, "best": self.best,
            "world": self.n_ranks, **own})
        last = self.log[-1]
        if "eval_success" in last and self.best == (last["eval_success"], last["eval_return"]):
            shutil.copyfile(self.ckpt_path, self.best_path + ".tmp")
            os.replace(self.best_path + ".tmp", self.best_path)


# ----------------------------------------------------------------------------------------
# The training loop: (1) collect games, (2) critic steps, (3) actor steps after the warm-up, (4) evaluate, save.
def collect_games(run, games):
    """(1) One game per slot with the current agent at the training temperature: (Episodes, sampled ids, metrics)."""
    draws = [run.rng.choice(run.secrets) if run.secrets else run.rng.randrange(2**31) for _ in games]
    run.policy.model.eval()
    trajs, ids, logps = play(run.agent, games, draws, run.args.temperature)
    run.env_steps += int(all_sum(torch.tensor(sum(len(t) for t in trajs))))  # every rank's games
    roll, lp = summarize(trajs), [x for t in logps for x in t]
    m = {"env_steps": run.env_steps, "train_return": roll["return"], "train_success": roll["success"],
         "logp": sum(lp) / len(lp), "repeats": repeat_share(trajs)}
    if run.user_game is None:  # the built-in games' answer to an utterance they do not understand
        bad, n = all_sum(torch.tensor([sum(x[3].endswith(envs.INVALID + "\n") for t in trajs for x in t),
                                       sum(len(t) for t in trajs)])).tolist()
        m["invalid"] = bad / n
    return trajs, ids, m


def end_iteration(run, it: int, m: dict, t0: float) -> bool:
    """(4) Evaluate every --eval-every iterations and at the end; log, print; True once the run is over."""
    args = run.args
    last = it == args.iterations - 1 or 0 < args.max_env_steps <= run.env_steps
    if (it + 1) % args.eval_every == 0 or last:
        m.update(evaluate(run.agent, run.eval_games, run.eval_draws, args.seed, args.temperature)[0])
        run.best = max(run.best, (m["eval_success"], m["eval_return"]))
        if run.probe:  # under its own seeded random state, as evaluate
            t = time.time()
            with seeded(args.seed):
                m["ranking_accuracy"], m["ranking_pairs"] = ranking_accuracy(run)
            m["ranking_seconds"] = time.time() - t
    m["skipped_updates"], m["seconds"], run.skipped = run.skipped, time.time() - t0, 0
    if run.dev.type == "cuda":  # the iteration's peak, then reset for the next one
        m["gpu_peak_gb"] = torch.cuda.max_memory_allocated(run.dev) / 2**30
        torch.cuda.reset_peak_memory_stats(run.dev)
    run.log.append(m)
    run.record([m])
    line = (f"it {it:4d} | steps {run.env_steps:6d} | train return {m['train_return']:6.2f} success "
            f"{m['train_success']:4.0%}" + (f" invalid {m['invalid']:4.0%}" if "invalid" in m else "")
            + f" repeats {m['repeats']:4.0%} logp {m['logp']:5.2f}")
    if "critic_loss" in m:
        line += f" | critic {m['critic_loss']:.3f} fit {m['critic_fit']:5.2f} q {m['q_mean']:6.2f} v {m['v_mean']:6.2f}"
    if "eval_success" in m:
        line += f" | eval greedy {m['eval_success']:4.0%} {m['eval_return']:6.2f} sampled {m['eval_sampled_success']:4.0%}"
        if m.get("ranking_accuracy") is not None:
            line += f" rank {m['ranking_accuracy']:.0%} of {m['ranking_pairs']} ({m['ranking_seconds']:.0f}s)"
    tqdm.write(line + f" | {m['seconds']:.1f}s" + (f" | gpu {m['gpu_peak_gb']:.1f} GB" if "gpu_peak_gb" in m else ""))
    return last


def train(args: Args, game=None, rule=None):
    """Warm start, then iterations of `rule` (ArCHer unless baselines.py passes another) on args.env, or on `game`
    (any object following envs.py's protocol; args.env then only names it in the checkpoint). Returns (policy,
    critic, metric dicts, one per iteration). From Python: `archer.train(archer.Args(out="runs/mine"), game=MyGame())`."""
    run = Run(args, game, rule or ArCHer())
    args = run.args  # the settings resolved: the flags given, the rest from the preset or the checkpoint
    if args.eval_only:
        return evaluate_only(run)
    if args.resume:  # the metrics file may hold iterations past the checkpoint: rewrite it from the log
        run.record(run.log, "w")
    else:
        warm_start(run)
    games = [run.fresh(args.seed * 1000 + i) for i in range(args.games)]
    end = run.start_it if 0 < args.max_env_steps <= run.env_steps else args.iterations  # a resumed run may be done
    with stop_signals() as stop:  # Ctrl-C / SIGTERM: finish the iteration, checkpoint, stop
        # Under --max-env-steps the number of iterations is not known ahead: the bar then shows no total and no ETA.
        for it in tqdm(range(run.start_it, end), desc=run.rule.name, initial=run.start_it,
                       total=float("inf") if args.max_env_steps else args.iterations, disable=run.rank > 0):
            t0 = time.time()
            trajs, ids, m = collect_games(run, games)  # 1. play with the current policy
            m = {"iteration": it, **m, **run.rule.update(run, it, trajs, ids)}  # 2.-3. ArCHer.update: critic, then actor
            last = end_iteration(run, it, m, t0)  # 4. evaluate, log
            if run.n_ranks > 1 and int(all_sum(torch.tensor(len(stop)))) and not stop:
                stop.append(signal.SIGTERM)  # a signal reached another rank: all stop after this iteration
            if last or stop or (it + 1) % args.save_every == 0:
                run.checkpoint(it)
            if last or stop:
                break
    if run.rank == 0:
        export(run.policy, run.critic, args.out)
    if stop:
        print(f"stopped by signal {stop[0]} after iteration {it}; checkpoint saved: continue with --resume")
    final = next((m for m in reversed(run.log) if "eval_success" in m), {})
    if final:
        print(f"final evaluation ({args.env if game is None else type(game).__name__}, {len(run.eval_draws)} evaluation games):"
              f" greedy success {final['eval_success']:.0%}, return {final['eval_return']:.2f}, turns {final['eval_turns']:.1f};"
              f" sampled success {final['eval_sampled_success']:.0%}, return {final['eval_sampled_return']:.2f}")
    return run.policy, run.critic, run.log


if __name__ == "__main__":
    train(parse_args())
    if dist.is_initialized():
        dist.destroy_process_group()
