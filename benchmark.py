"""Side-by-side benchmark: ArCHer against its baselines at the same budget of environment steps.

Runs `archer.py --env G --seed S` for ArCHer and `baselines.py --algo A ...` for each baseline
(filtered BC, REINFORCE, CHAI), for every game and seed (each run in its own directory, resumed
if interrupted, skipped if finished), then writes a markdown table and, when matplotlib is
installed, one learning-curve PNG per game:

    python benchmark.py                                   # 3 seeds, both Twenty Questions games
    python benchmark.py --games twentyq_subset --env-steps 5000 --seeds 1 -- --bc-steps 300

Flags after `--` go to every run unchanged (and override ALGO_FLAGS and archer.py's presets). The question it
answers is the paper's headline: how many environment steps does each learning rule need to
play well? Steps, not seconds: so ArCHer runs with the paper's 50 critic steps per iteration
(archer.py's default of 20 keeps its quick start short; more critic steps per environment
step is exactly what an off-policy critic buys).
"""
import argparse
import json
import math
import os
import subprocess
import sys

import envs

HERE = os.path.dirname(os.path.abspath(__file__))
ALGOS = ("archer", "filtered_bc", "reinforce", "chai")
# the paper's critic updates per iteration, for both rules that train ArCHer's critic
ALGO_FLAGS = {"archer": ["--critic-steps", "50"], "chai": ["--critic-steps", "50"]}


def run_dir(out, game, algo, seed):
    return os.path.join(out, game, algo, f"seed{seed}")


def read_log(path):
    """The metrics of one run (empty if it never started)."""
    f = os.path.join(path, "metrics.jsonl")
    return [json.loads(line) for line in open(f)] if os.path.exists(f) else []


def finished(log, budget):
    return bool(log) and log[-1]["env_steps"] >= budget and "eval_success" in log[-1]


def run(game, algo, seed, args, extra):
    """One run to the step budget; resumes from its checkpoint when there is one."""
    path = run_dir(args.out, game, algo, seed)
    # A run kept from an earlier benchmark counts only if it was asked for with the same settings
    # (a larger --env-steps may extend it; a moved --out may hold it).
    flags, asked = [*ALGO_FLAGS.get(algo, []), *extra], os.path.join(path, "flags.json")
    before = json.load(open(asked)) if os.path.exists(asked) else flags
    if before != flags:
        sys.exit(f"error: {path} was run with other archer.py flags ({' '.join(before) or 'none'}); "
                 "give this benchmark another --out, or delete that run")
    if finished(read_log(path), args.env_steps):
        print(f"done already: {path}")
        return
    os.makedirs(path, exist_ok=True)
    with open(asked, "w") as f:
        json.dump(flags, f)
    script = ["archer.py"] if algo == "archer" else ["baselines.py", "--algo", algo]
    cmd = [sys.executable, os.path.join(HERE, script[0]), *script[1:], "--env", game, "--seed", str(seed),
           "--out", path, "--max-env-steps", str(args.env_steps), "--iterations", "1000000",
           "--eval-every", str(args.eval_every), *flags]
    if os.path.exists(os.path.join(path, "checkpoint.pt")):
        cmd.append("--resume")
    print("running:", " ".join(cmd[1:]), flush=True)
    if subprocess.run(cmd).returncode != 0:
        sys.exit(f"error: the run in {path} failed (its output is above); fix it and rerun, finished runs are kept")


def mean_std(xs):
    m = sum(xs) / len(xs)
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / len(xs))


def curve(log):
    """(env_steps, greedy success) at the warm start and at every evaluation."""
    return [(m["env_steps"], m["eval_success"]) for m in log if "eval_success" in m]


def iterations(log):
    """The rows of a run's training iterations (the warm-start row is not one)."""
    return [m for m in log if m["iteration"] >= 0]


def training_games(log, last=10):
    """Mean (success, return) of the training games of the last `last` iterations: sampled play
    of the current policy, 32 games per iteration by default, so hundreds of games where the
    fixed evaluation set of the subset has 10."""
    rows = iterations(log)[-last:]
    return (sum(m["train_success"] for m in rows) / len(rows), sum(m["train_return"] for m in rows) / len(rows))


def steps_to(log, level):
    """The first env step count at which the training games' return, a 5-iteration moving
    average, reached `level` (None: never)."""
    rows = iterations(log)
    return next((rows[i]["env_steps"] for i in range(4, len(rows))
                 if sum(m["train_return"] for m in rows[i - 4: i + 1]) / 5 >= level), None)


def reference_player(game):
    """(success, return) of the information-gain reference player on every secret once."""
    r = envs.evaluate_player(envs.make_env(game, seed=0), lambda g: g.reference())
    return r["success"], r["return"]


def report(game, args):
    """Markdown rows for one game and, with matplotlib, its PNG. Returns the table as text."""
    logs = {a: [read_log(run_dir(args.out, game, a, s)) for s in args.seeds] for a in args.algos}
    finals = {a: [next(m for m in reversed(L) if "eval_success" in m) for L in logs[a]] for a in args.algos}
    # The steps column's bar: halfway from the warm start's sampled return to the reference player's
    # return, on the training games (sampled play), so that it is neither met at step 0 nor out of reach.
    warm = mean_std([L[0]["eval_sampled_return"] for runs in logs.values() for L in runs])[0]
    target = (warm + reference_player(game)[1]) / 2
    rows = [f"### {game}: {args.env_steps} environment steps, seeds {' '.join(map(str, args.seeds))}", "",
            f"Steps to halfway: the first step at which the training games' return (5-iteration mean) reached "
            f"{target:.2f}, halfway from the warm start's sampled return ({warm:.2f}) to the reference player's.", "",
            "| algorithm | greedy success | greedy return | sampled success | sampled return | training-game success "
            "| training-game return | steps to halfway | steps / ArCHer's | wall time | s / iteration |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    reach = {}
    for a in args.algos:
        cols = {k: [f[k] for f in finals[a]] for k in ("eval_success", "eval_return", "eval_sampled_success",
                                                         "eval_sampled_return")}
        cols["train_success"], cols["train_return"] = zip(*[training_games(L) for L in logs[a]])
        cols = ["{:.0%} ± {:.0%}".format(*mean_std(xs)) if "success" in k else "{:.2f} ± {:.2f}".format(*mean_std(xs))
                for k, xs in cols.items()]
        hits = [steps_to(L, target) for L in logs[a]]
        reach[a] = mean_std(hits)[0] if None not in hits else None
        base = reach.get("archer")
        ratio = f"{reach[a] / base:.1f}x" if reach[a] is not None and base else "-"
        wall = mean_std([sum(m["seconds"] for m in L) for L in logs[a]])[0]
        per_it = mean_std([sum(m["seconds"] for m in iterations(L)) / len(iterations(L)) for L in logs[a]])[0]
        cols += [f"{reach[a]:.0f}" if reach[a] is not None else "not reached", ratio, f"{wall / 60:.1f} min",
                 f"{per_it:.1f}"]
        rows.append(f"| {a} | " + " | ".join(cols) + " |")
    plot(game, logs, args)
    return "\n".join(rows) + "\n"


def pyplot():
    """matplotlib's pyplot, drawing to files only (no display needed), or None without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def plot(game, logs, args):
    plt = pyplot()
    if plt is None:
        print("matplotlib is not installed: table only (pip install matplotlib for the plots)")
        return
    fig, (ax, tr) = plt.subplots(1, 2, figsize=(12, 4))
    for a, runs in logs.items():
        curves = [curve(L) for L in runs]
        n = min(len(c) for c in curves)  # evaluations every run reached
        xs = [sum(c[i][0] for c in curves) / len(curves) for i in range(n)]
        ys = [[c[i][1] for c in curves] for i in range(n)]
        ax.plot(xs, [sum(y) / len(y) for y in ys], label=a)
        ax.fill_between(xs, [min(y) for y in ys], [max(y) for y in ys], alpha=0.2)
        # the training games, a moving average over 5 iterations (160 games by default), mean over seeds
        its = [iterations(L) for L in runs]
        n = min(len(r) for r in its)
        xs = [sum(r[i]["env_steps"] for r in its) / len(its) for i in range(4, n)]
        ys = [sum(m["train_success"] for r in its for m in r[i - 4: i + 1]) / (5 * len(its)) for i in range(4, n)]
        tr.plot(xs, ys, label=a)
    warm = [L[0]["eval_success"] for runs in logs.values() for L in runs]
    ax.axhline(sum(warm) / len(warm), color="gray", ls=":", label="warm start")
    demo = [L[0]["demo_success"] for runs in logs.values() for L in runs if "demo_success" in L[0]]
    if demo:
        tr.axhline(sum(demo) / len(demo), color="gray", ls=":", label="demonstrator")
    reference = reference_player(game)[0]  # plays every secret once: computed once for both panels
    for axis in (ax, tr):
        axis.axhline(reference, color="black", ls="--", label="reference player")
        axis.legend()
    ax.set(xlabel="environment steps", ylabel="success", title="fixed evaluation set, greedy (min-max over seeds)")
    tr.set(xlabel="environment steps", ylabel="success", title="training games, sampled (5-iteration mean)")
    fig.suptitle(game)
    path = os.path.join(args.out, f"{game}.png")
    fig.savefig(path, dpi=120, bbox_inches="tight")
    print(f"wrote {path}")


def plot_curves(run, path):
    """One run's health at a glance: the training games' return and invalid share, the critic's fit
    to their Monte Carlo returns, and the sampled utterance's log-prob, per iteration."""
    plt = pyplot()
    if plt is None:
        sys.exit("error: --curves draws with matplotlib: pip install matplotlib")
    rows = iterations(read_log(run))
    if not rows:
        sys.exit(f"error: {run} holds no iterations (no metrics.jsonl rows past the warm start)")
    its = [m["iteration"] for m in rows]
    start = next((m["iteration"] for m in rows if m.get("actor_loss") is not None), None)
    panels = [("train_return", "training games' return"), ("invalid", "invalid utterances (share)"),
              ("critic_fit", "critic's explained variance"), ("logp", "log-prob of a sampled utterance")]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.2))
    for ax, (key, title) in zip(axes, panels):
        ax.plot(its, [m.get(key) if m.get(key) is not None else float("nan") for m in rows])
        if start is not None:
            ax.axvline(start - 0.5, color="gray", ls=":")  # the actor's first step
        ax.set(xlabel="iteration", title=title)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    print(f"wrote {path}")


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--games", nargs="+", default=["twentyq_subset", "twentyq"], choices=envs.ENV_NAMES)
    p.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2, 3])
    p.add_argument("--env-steps", type=int, default=25000, help="budget of environment steps per run")
    p.add_argument("--eval-every", type=int, default=10, help="iterations between evaluations on the fixed set")
    p.add_argument("--out", default="runs/benchmark", help="one directory per run below it; table and plots here")
    p.add_argument("--curves", metavar="RUN_DIR", help="only plot one run's diagnostics to RUN_DIR/curves.png")
    args = p.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if args.curves:
        return plot_curves(args.curves, os.path.join(args.curves, "curves.png"))
    for game in args.games:
        for algo in args.algos:
            for seed in args.seeds:
                run(game, algo, seed, args, extra)
    table = "\n".join(report(game, args) for game in args.games)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(table)
    print(table)


if __name__ == "__main__":
    main()
