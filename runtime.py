"""The plumbing of a training run that is not the algorithm: flags and one-line errors, seeding,
the device and data-parallel (torchrun) helpers, stop signals, checkpoint files and random states.
archer.py uses these; nothing here knows about ArCHer."""
import argparse
import dataclasses
import os
import random
import signal
import sys
from contextlib import contextmanager

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm


def parse_args(argv, cls, description: str, notes: dict = None):
    """Turn a config dataclass into argparse flags (--field-name); booleans become store_true switches. Every
    flag's help ends with its default, or with notes[field] for a field whose default (None) a preset sets."""
    p = argparse.ArgumentParser(description=description)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type is bool or f.type == "bool":
            p.add_argument(flag, action="store_true", help=f.metadata["help"])
        else:
            note = (notes or {}).get(f.name) if f.default is None else f"default: {f.default!r}".replace("%", "%%")
            p.add_argument(flag, type=f.type, default=f.default, help=f"{f.metadata['help']} ({note})")
    p.error = fail  # a mistyped flag is one line and exit status 2, like every other user mistake
    return cls(**vars(p.parse_args(argv)))


def fail(msg: str):
    """A user mistake: one clear line on stderr and exit status 2, no traceback."""
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@contextmanager
def seeded(seed: int):
    """Run the block under torch's random state seeded with `seed` (the CPU and every GPU); the caller's
    state is restored on leaving, so its own stream is untouched."""
    with torch.random.fork_rng(devices=range(torch.cuda.device_count())):
        torch.manual_seed(seed)
        yield


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


def check_args(args):
    """Impossible settings fail at once, in one line, before anything is built or written (a field still None
    waits for its preset, which is valid)."""
    for name in ("games", "batch_size", "buffer_size", "max_new_tokens", "eval_every", "save_every", "bc_games"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            fail(f"--{name.replace('_', '-')} must be at least 1 (got {getattr(args, name)})")
    for name in ("iterations", "bc_steps", "critic_steps", "actor_steps", "warmup_iters", "max_env_steps",
                 "gen_batch_size", "lora_rank", "kl_coef"):
        if getattr(args, name) is not None and getattr(args, name) < 0:
            fail(f"--{name.replace('_', '-')} cannot be negative (got {getattr(args, name)})")
    for name in ("bc_lr", "critic_lr", "actor_lr", "grad_clip", "temperature"):
        if getattr(args, name) is not None and not getattr(args, name) > 0:
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


def load_checkpoint(path, args, algo: str, dev):
    """The checkpoint at `path`, refused in one line if it is unreadable or from another run;
    a refused file is left as it is."""
    try:
        ck = torch.load(path, map_location=dev, weights_only=False)
    except Exception as e:  # truncated, corrupt, not a checkpoint: all the same to the user
        fail(f"cannot read the checkpoint {path} ({type(e).__name__}); it is left untouched: "
             "best.pt beside it holds the best evaluated state, or start a new run in another --out")
    saved = ck.get("args", {}) if isinstance(ck, dict) else {}
    for key, value in (("env", args.env), ("model", args.model), ("critic", args.critic), ("algo", algo)):
        if value is not None and saved.get(key, "archer" if key == "algo" else None) != value:
            fail(f"{path} is a run with --{key} {saved.get(key, 'archer')}, not {value}; "
                 f"resume it with the same flags or use another --out")
    return ck


def open_run_dir(args, algo: str, ckpt_path: str, rank_path: str, n_ranks: int, dev):
    """The checkpoint to continue (--resume) or evaluate (--eval-only), else None for a new run;
    refuses in one line a missing checkpoint, a directory that already holds a run, and a
    resume with another number of processes. Ranks > 0 add their own share (rank<R>.pt)."""
    if (args.resume or args.eval_only) and not os.path.exists(ckpt_path):
        flag = "--resume" if args.resume else "--eval-only"
        fail(f"{flag}: no checkpoint at {ckpt_path}; train first (without {flag}) or point --out at a run")
    if not (args.resume or args.eval_only):
        if os.path.exists(ckpt_path):
            fail(f"{args.out} already holds a run; continue it with --resume, or choose another --out")
        return None
    ck = load_checkpoint(ckpt_path, args, algo, dev)
    if not args.eval_only and ck.get("world", 1) != n_ranks:
        fail(f"{ckpt_path} was trained by {ck.get('world', 1)} processes, not {n_ranks}: resume it with "
             f"--nproc_per_node={ck.get('world', 1)} (each rank continues its own buffer and random states)")
    if not args.eval_only and world()[0] > 0:
        ck.update(torch.load(rank_path, map_location=dev, weights_only=False))
    return ck


def device_and_world(args):
    """Join torchrun's process group if launched by it; returns (rank, number of ranks, device).
    Ranks other than 0 are silenced: one voice prints and shows progress bars."""
    if "WORLD_SIZE" in os.environ and not dist.is_initialized():
        dist.init_process_group("nccl" if args.device != "cpu" and torch.cuda.is_available() else "gloo")
    rank, n_ranks = world()
    if rank > 0:
        sys.stdout = open(os.devnull, "w")
    dev = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                       ("cpu" if args.device == "auto" else args.device))
    if dev.type == "cuda" and n_ranks > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.cuda.set_device(dev)
    return rank, n_ranks, dev


@contextmanager
def stop_signals():
    """Ctrl-C or SIGTERM (a scheduler's "time is up") asks the loop to stop: the yielded list
    gets the signal, the loop finishes its iteration and checkpoints; a second Ctrl-C quits at
    once. Stopping mid-iteration would save a half-updated state that --resume could not
    continue exactly. The caller's own handlers come back on leaving, whatever happened."""
    stop = []

    def on_signal(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)
        tqdm.write("stopping after this iteration to save a checkpoint (Ctrl-C again quits at once)")

    old = signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, old[0])
        signal.signal(signal.SIGTERM, old[1])
