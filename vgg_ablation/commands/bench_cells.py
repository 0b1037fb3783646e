"""`vgg-ablation bench bench.mode=cells`: whole cells as a study trains them, in one sitting.

1. **Where a cell's time goes**: real cells of the study the overrides name (each in its own
   process, as `vgg-ablation train` runs one), shortened to `bench.epochs`, profiled phase by phase
   (profiling.py), for each net in each of `PROFILED` (the machine's thread count, 1 thread, 1
   thread with channels_last as a CPU study trains); beside each, the
   training-step bench (plain loop, synthetic batches) at the same threads and memory format,
   measured in this process in the same sitting. From them, the ceiling of filling the machine
   a cell per core (bench_report.py): what it would give if cells side by side slowed nothing.
2. **Cells per hour, way by way**: the same shortened study run whole (its sweep, store, report)
   once per way of filling the machine (`WAYS`), each in a fresh folder and store; cells FINISHED
   per hour of wall time, and each way's ratio to today's default.

Returns a record; bench_report.py renders it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from vgg_ablation.errors import UserError

CORES = os.cpu_count() or 1
# Ways to fill the machine with a study's cells: (what it is, the overrides that make it).
PER_CORE = ["hydra/launcher=joblib", f"hydra.launcher.n_jobs={CORES}", "trainer.threads=1"]
# said, not left to the default: a CPU study's default is now a cell per core (study.parallel=auto)
BASIC = ["study.parallel=off"]
WAYS = {
    "basic": ("one cell at a time on torch's threads (the basic launcher: the default before this bench)", BASIC),
    "basic-compile": ("one cell at a time on torch's threads, torch.compile", [*BASIC, "trainer.compile=true"]),
    "basic-channels_last": ("one cell at a time on torch's threads, channels_last",
                            [*BASIC, "trainer.channels_last=on"]),
    "per-core": (f"a cell per core at once ({CORES}), 1 thread each (Hydra's joblib launcher)", PER_CORE),
    "per-core-channels_last": ("a cell per core, 1 thread each, channels_last", [*PER_CORE, "trainer.channels_last=on"]),
    "per-core-compile": ("a cell per core, 1 thread each, torch.compile (inductor's C++ backend)",
                         [*PER_CORE, "trainer.compile=true"]),
    "per-core-compile-channels_last": ("a cell per core, 1 thread each, torch.compile and channels_last",
                                       [*PER_CORE, "trainer.compile=true", "trainer.channels_last=on"]),
}  # fmt: skip


# The cells profiled, per net: (threads, compiled, channels_last); 0 threads: the machine's count
# (a compiled cell is a way of its own, not profiled: its compile time is most of a short cell's difference)
PROFILED = ((0, False, False), (1, False, False), (1, False, True))


def run_bench(args: list[str]) -> int:
    """`vgg-ablation bench`: the training step (bench.py), or with bench.mode=cells, whole cells."""
    import platform

    import pytorch_lightning as pl

    from vgg_ablation.commands import bench
    from vgg_ablation.commands.bench_report import write_cells
    from vgg_ablation.config import compose

    if not any(a.startswith("bench.mode=") and a != "bench.mode=steps" for a in args):
        return bench.run_bench(args)
    cfg = compose(args)
    if cfg.bench.mode != "cells":
        raise UserError(f"unknown bench.mode {cfg.bench.mode!r}; choose steps or cells")
    if cfg.bench.epochs < 1 or cfg.bench.seeds < 1:
        raise UserError("bench.epochs and bench.seeds must be positive")
    record = measure_cells(cfg, list(args))
    record.update(device=f"cpu ({os.cpu_count()} cores)" if not torch.cuda.is_available() else torch.cuda.get_device_name(),
                  torch=torch.__version__, lightning=pl.__version__, python=platform.python_version(),
                  written=time.strftime("%Y-%m-%d %H:%M %Z"))  # fmt: skip
    path = write_cells(record, Path(cfg.bench.out), args)
    print(f"wrote {path}")
    return 0


def measure_cells(cfg: DictConfig, overrides: list[str]) -> dict:
    opts = cfg.bench
    ways = list(opts.ways) if opts.ways else list(WAYS)
    unknown = [w for w in ways if w not in WAYS]
    if unknown:
        raise UserError(f"unknown bench.ways {unknown[0]!r}; choose from: {', '.join(WAYS)}")
    archs = list(opts.archs) if opts.archs else list(cfg.study.archs)
    base = [o for o in overrides if not o.startswith(("bench.", "trainer.threads=", "trainer.max_epochs="))]
    base += [f"trainer.max_epochs={opts.epochs}", "trainer.progress_bar=false", "archive.with_report=false"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # a fresh process's imports from cached bytecode, as a user's
    print(f"bench cells: {', '.join(archs)} x {opts.epochs} epochs; profiles at {CORES} and 1 thread(s), then "
          f"ways {', '.join(ways)} ({opts.seeds} seeds per net each)", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="vgg-ablation-bench-") as tmp:
        cells = [(a, t or CORES, c, cl) for a in archs for t, c, cl in PROFILED] if opts.profiles else []
        profiles = [profile_cell(base, arch, threads, compiled, Path(tmp), env, seed=900 + i, channels_last=cl)
                    for i, (arch, threads, compiled, cl) in enumerate(cells)]  # fmt: skip
        steps = {
            key: step_rate(cfg, *key)
            for key in dict.fromkeys((p["arch"], p["threads"], p["channels_last"]) for p in profiles)
        }
        # the ways interleaved, round by round: a shared machine's drift falls on every way alike,
        # and each round's ratios compare studies run minutes apart
        studies = [study_rate(base, way, archs, opts.seeds, Path(tmp), env, r)
                   for r in range(opts.rounds) for way in ways]  # fmt: skip
    for p in profiles:
        p["step bench img/s"] = steps[(p["arch"], p["threads"], p["channels_last"])]
    for s in studies:
        basic = next((b for b in studies if b["way"] == "basic" and b["round"] == s["round"]), s)
        s["ratio to basic"] = s["cells per hour"] / basic["cells per hour"]
    return {"profiles": profiles, "studies": studies, "epochs": opts.epochs, "study_epochs": cfg.trainer.max_epochs,
            "archs": archs, "cores": CORES}  # fmt: skip


def profile_cell(
    base: list[str], arch: str, threads: int, compiled: bool, tmp: Path, env: dict, seed: int,
    channels_last: bool = False,
) -> dict:  # fmt: skip
    """One real cell in its own process, its phases from profiling.py's timeline."""
    from vgg_ablation.training.profiling import PROFILE_ENV

    out = tmp / f"profile-{arch}-{threads}-{compiled}-{channels_last}.json"
    command = [sys.executable, "-m", "vgg_ablation", "train", *base, f"arch={arch}", f"seed={seed}",
               f"trainer.threads={threads}", f"trainer.compile={str(compiled).lower()}",
               f"trainer.channels_last={'on' if channels_last else 'off'}",
               f"logger.tracking_uri=sqlite:///{tmp / 'profiles.db'}", "logger.checkpoint_root=" + str(tmp / "ckpt")]  # fmt: skip
    started = time.time()
    done = subprocess.run(
        command, cwd=tmp, env={**env, PROFILE_ENV: str(out)}, capture_output=True, text=True
    )
    wall = time.time() - started
    if done.returncode != 0 or not out.is_file():
        raise UserError(
            f"bench: the {arch} cell failed: {(done.stderr or done.stdout).strip().splitlines()[-1:]}"
        )
    t = json.loads(out.read_text())
    m, sums = t["marks"], t["sums"]
    phases = {
        "start-up": m["cell"] - t["process_start"],
        "data": m["prepared"] - m["cell"],
        "tracking": (m["opened"] - m["prepared"])
        + (m["recorded"] - m["finish_start"])
        + t["tracking_seconds"],
        "training steps": sums.get("train_steps", 0.0),
        "between steps": sums.get("between_steps", 0.0),
        "validation": sums.get("validation", 0.0),
        "checkpoints": t["checkpoint_seconds"],
        "test": m["test_end"] - m["fit_end"],
    }
    total = wall
    phases["other"] = total - sum(phases.values())
    label = (
        f"{arch}, {threads} thread{'s' if threads > 1 else ''}"
        + (", compiled" if compiled else "")
        + (", channels_last" if channels_last else "")
    )
    print(f"  profile {label}: {total:.0f} s, steps {phases['training steps']:.0f} s "
          f"({t['images_trained'] / max(phases['training steps'], 1e-9):.0f} img/s)", flush=True)  # fmt: skip
    return {"arch": arch, "threads": threads, "compiled": compiled, "channels_last": channels_last,
            "seconds": total, "phases": phases,
            "epochs": t["epochs"], "cell img/s": t["images_trained"] / max(phases["training steps"], 1e-9),
            "cell img/s (fit)": t["images_trained"] / (m["fit_end"] - m["fit_start"])}  # fmt: skip


def step_rate(cfg: DictConfig, arch: str, threads: int, channels_last: bool = False) -> float:
    """The training-step bench (plain loop, synthetic batches) for `arch` at `threads` threads."""
    from vgg_ablation.commands.bench import plain_loop, synthetic_batches
    from vgg_ablation.training.build import data_for, model_for

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        datamodule = data_for(cfg)
        batches = synthetic_batches(
            cfg.copy() if cfg.data.input_size else _sized(cfg, datamodule), torch.device("cpu")
        )
        torch.manual_seed(0)
        model = model_for(cfg, arch, datamodule)
        rates = [plain_loop(cfg, model, batches, cfg.bench.steps, cfg.bench.warmup, torch.device("cpu"), "32-true",
                            channels_last) for _ in range(3)]  # fmt: skip
    finally:
        torch.set_num_threads(previous)
    return statistics.median(rates)


def _sized(cfg: DictConfig, datamodule) -> DictConfig:
    from omegaconf import open_dict

    sized = cfg.copy()
    with open_dict(sized):
        sized.data.input_size = datamodule.input_size
    return sized


def study_rate(
    base: list[str], way: str, archs: list[str], seeds: int, tmp: Path, env: dict, round_: int = 0
) -> dict:
    """The shortened study run whole one way, in a fresh folder and store: cells per hour."""
    from mlflow.tracking import MlflowClient

    folder = tmp / f"study-{way}-{round_}"
    folder.mkdir()
    _, extra = WAYS[way]
    command = [sys.executable, "-m", "vgg_ablation", "study", *base, *extra, f"study.name=bench-{way}",
               f"study.archs=[{','.join(archs)}]", f"study.seeds=[{','.join(str(800 + s) for s in range(seeds))}]",
               "study.max_seeds=null"]  # fmt: skip
    started = time.time()
    done = subprocess.run(command, cwd=folder, env=env, capture_output=True, text=True)
    wall = time.time() - started
    client = MlflowClient(f"sqlite:///{folder / 'mlflow.db'}")
    runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])
            if "cell" in r.data.tags]  # fmt: skip
    finished = [r for r in runs if r.info.status == "FINISHED"]
    if done.returncode != 0 or len(finished) != len(archs) * seeds:
        raise UserError(f"bench: the {way} study did not finish ({len(finished)} cells FINISHED): "
                        f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}")  # fmt: skip
    errors = {f"{r.data.tags['arch']} {r.data.tags['seed']}": r.data.metrics["test/err1"] for r in finished}
    print(f"  way {way}: {len(finished)} cells in {wall:.0f} s = {3600 * len(finished) / wall:.1f} cells/hour",
          flush=True)  # fmt: skip
    return {"way": way, "round": round_ + 1, "what": WAYS[way][0], "overrides": extra, "cells": len(finished), "wall": wall,
            "cells per hour": 3600 * len(finished) / wall, "test errors": errors,
            "threads": sorted({r.data.tags.get("cpu_threads") for r in finished})}  # fmt: skip
