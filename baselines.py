"""The rules ArCHer is compared with, built from archer.py's own pieces.

Each rule plugs into archer.train(): the same warm start, rollouts, evaluation, checkpoints,
resume and torchrun, so that a comparison measures the learning rule and nothing else.

  filtered_bc  online filtered behaviour cloning: clone the best 10% of the games played so far.
  reinforce    token-level policy gradient on Monte Carlo returns, no critic (the stand-in for
               the paper's token-level PPO: on-policy, one update per sample).
  chai         CHAI as the ArCHer paper runs it: the actor stays the warm-started policy, the
               critic is trained exactly as ArCHer's, and at every turn the agent samples
               --chai-k candidate utterances and says the one with the highest min(Q1, Q2).

    python baselines.py --algo chai --env twentyq_subset        # any archer.py flag works too
"""
import math
from dataclasses import dataclass, field

import numpy as np
import torch

import archer


@dataclass
class BaselineArgs(archer.Args):
    algo: str = field(default="chai", metadata={"help": "learning rule: filtered_bc, reinforce or chai"})
    chai_k: int = field(default=5, metadata={"help": "chai: candidate utterances sampled per turn (paper: 5)"})
    out: str = field(default="runs/baseline", metadata={"help": "run directory: metrics.jsonl and checkpoint.pt"})


# ---- online filtered behaviour cloning ----
def elite(dialogues, frac: float = 0.1, returns=None):
    """The dialogues whose return is in the top `frac` of `returns` (default: their own), ties at
    the cut kept, so a plateau of equal returns is cloned whole."""
    rets = sorted(returns if returns is not None else [sum(tr[2] for tr in d) for d in dialogues], reverse=True)
    cut = rets[max(1, math.ceil(len(rets) * frac)) - 1]
    return [d for d in dialogues if sum(tr[2] for tr in d) >= cut]


class FilteredBC:
    """Clone the top 10% of every game played so far. Only that elite and the returns of all
    games (a float per game) are kept, not every dialogue: a game that falls below the cut is
    dropped for good, even if a later, lower cut would have let it back in."""
    name, uses_critic, uses_kl = "filtered_bc", False, False

    def agent(self, run):
        return run.policy

    def update(self, run, it, trajs, ids):
        returns = run.extra.setdefault("returns", [])
        returns += [sum(tr[2] for tr in t) for t in trajs]
        run.extra["elite"] = elite(run.extra.get("elite", []) + list(trajs), returns=returns)
        best, losses = run.extra["elite"], []
        run.policy.model.train()
        for _ in range(run.args.actor_steps):  # --batch-size // 4 dialogues a step, as in the warm start
            picked = [best[run.rng.randrange(len(best))] for _ in range(max(1, run.args.batch_size // 4))]
            loss = archer.imitation_loss(run.policy, [x for d in archer.clone_sequences(run.policy, picked) for x in d])
            run.skipped += not archer.clipped_step(run.actor_opt, run.policy.model.parameters(), loss, run.args.grad_clip)
            losses.append(loss.item())
        run.policy.model.eval()
        return {"actor_loss": float(np.mean(losses)) if losses else None, "elite_transitions": sum(map(len, best))}


# ---- token-level REINFORCE ----
class Reinforce:
    """Every transition of this iteration once, split into --actor-steps batches, each utterance's
    log-prob weighted by its Monte Carlo return-to-go (normalized: the mean is the baseline)."""
    name, uses_critic, uses_kl = "reinforce", False, True

    def agent(self, run):
        return run.policy

    def update(self, run, it, trajs, ids):
        args = run.args
        flat = [(tr[0], x, g) for traj, tids in zip(trajs, ids)
                for tr, x, g in zip(traj, tids, archer.returns_to_go([t[2] for t in traj], args.gamma))]
        run.rng.shuffle(flat)
        losses = []
        run.policy.model.train()
        for k in range(args.actor_steps):
            part = flat[k::args.actor_steps]
            if not part:
                continue
            # ArCHer's actor loss and KL penalty, with the return-to-go in place of the critic's advantage
            loss, _ = archer.policy_gradient_loss(run, [p[0] for p in part], [p[1] for p in part], torch.tensor([p[2] for p in part]))
            run.skipped += not archer.clipped_step(run.actor_opt, run.policy.model.parameters(), loss, args.grad_clip)
            losses.append(loss.item())
        run.policy.model.eval()
        return {"actor_loss": float(np.mean(losses)) if losses else None}


# ---- CHAI: the critic picks among the frozen actor's candidates ----
class ChaiAgent:
    """Plays like Policy.generate, but samples k candidates per state and returns the one with
    the highest min(Q1, Q2). With greedy=True the first candidate is the greedy utterance (the
    others still sampled), so the greedy evaluation is the critic's pick among them."""

    def __init__(self, policy, critic, k: int):
        self.policy, self.critic, self.k = policy, critic, k

    @torch.no_grad()
    def generate(self, states, temperature: float = 1.0, greedy: bool = False):
        n, cands = len(states), []
        for j in range(self.k):
            cands.append(self.policy.generate(states, temperature, greedy=greedy and j == 0))
        texts = [c[0][i] for c in cands for i in range(n)]  # candidate-major: (k * n,)
        q = torch.minimum(*self.critic.q(list(states) * self.k, texts)).view(self.k, n)
        best = q.argmax(0).tolist()
        return ([cands[b][0][i] for i, b in enumerate(best)], [cands[b][1][i] for i, b in enumerate(best)],
                torch.stack([cands[b][2][i] for i, b in enumerate(best)]) if n else torch.zeros(0))


class Chai(archer.ArCHer):
    """ArCHer's critic, trained exactly as ArCHer trains it (its fresh actions are the CHAI
    agent's own, the policy it evaluates); the actor never moves."""
    name, uses_kl = "chai", False

    def __init__(self, k: int = 5):
        self.k = k

    def agent(self, run):
        return ChaiAgent(run.policy, run.critic, self.k)

    def update(self, run, it, trajs, ids):
        run.buffer.add_games(trajs)
        m = archer.critic_steps(run)
        m["critic_fit"] = archer.critic_fit(run.critic, trajs, run.args.gamma, run.args.batch_size)
        return m


RULES = {"filtered_bc": lambda args: FilteredBC(), "reinforce": lambda args: Reinforce(),
         "chai": lambda args: Chai(args.chai_k)}


def main(argv=None):
    args = archer.parse_args(argv, BaselineArgs)
    if args.algo not in RULES:
        archer.fail(f"unknown --algo '{args.algo}'; choose one of: {', '.join(RULES)}")
    if args.chai_k < 1:
        archer.fail(f"--chai-k must be at least 1 (got {args.chai_k})")
    return archer.train(args, rule=RULES[args.algo](args))


if __name__ == "__main__":
    main()
    if archer.dist.is_initialized():
        archer.dist.destroy_process_group()
