"""The prepared GPU check and the GPU study: everything a lent GPU machine must show, in one
command, within one lease (12 minutes, start-up included, on an H100/H200).

    python -m vgg_ablation.commands.gpucheck --out DIR --data FOLDER   # on the GPU machine (.ci/gpu-check.sh)
    python -m vgg_ablation.commands.gpucheck --out DIR --dry-run       # anywhere: the same steps, CPU-sized

Steps, each writing under DIR and printing every figure it measures:
1. bench, the paper's setting: VGG-D at 224 px, bf16, full width, paper head (MFU vs bf16 peak);
2. bench, the GPU study's setting: full-width nets at 32 px, data held on the GPU (every paper
   arch's images/s and peak memory, the Lightning path against the plain loop);
3. host syncs inside a training step, counted under torch.cuda.set_sync_debug_mode("warn");
4. the GPU study (experiments/cifar10-gpu.yaml), run until decided, sized from step 2's speeds
   (its maximum seeds what the time left can train) and capped by the time left
   (`study.time_limit`): its report and runs CSV under DIR, its plots and log in a zip.
The summary goes to DIR/gpu-check.md. --dry-run shrinks every step (width, steps, batches, the
cap) and skips what needs CUDA (the sync debug mode), so CI runs the whole path on a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import pytorch_lightning as pl
import torch

STUDY_ARCHS = ["A", "A-LRN", "B", "C", "D", "E", "B-5x5"]
SYNC_WARNING = "called a synchronizing CUDA operation"


def bench_args(name: str, out: Path, dry_run: bool) -> list[str]:
    """The two bench settings; a dry run keeps their shape and shrinks their size."""
    if name == "d224":
        real = ["arch=D", "bench.archs=[D]", "data=synthetic", "data.input_size=224", "data.synthetic_size=1024",
                "data.batch_size=128", "model.width=1", "model.head=paper", "bench.steps=20", "bench.warmup=8",
                "bench.rounds=2"]  # fmt: skip
        small = ["data.input_size=64", "data.synthetic_size=16", "data.batch_size=4", "model.width=0.0625",
                 "bench.steps=2", "bench.warmup=1", "bench.rounds=1"]  # fmt: skip
    else:  # e32: the cifar10 study's nets, data on the GPU
        real = ["arch=E", f"bench.archs=[{','.join(STUDY_ARCHS)}]", "data=sample", "data.batch_size=128",
                "model.width=1", "bench.steps=60", "bench.warmup=15", "bench.rounds=3"]  # fmt: skip
        small = [
            "data.batch_size=8",
            "model.width=0.0625",
            "bench.steps=2",
            "bench.warmup=1",
            "bench.rounds=1",
        ]
    return [*real, *(small if dry_run else []), "logger=none", f"bench.name={name}", f"bench.out={out}"]


class SyncWatch(pl.Callback):
    """Turns CUDA's sync debug mode on for the length of each training step (from batch start to
    the optimizer step's end), so the warnings counted are the step's own."""

    def __init__(self, cuda: bool):
        self.cuda, self.steps = cuda, 0

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.cuda:
            torch.cuda.set_sync_debug_mode("warn")

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        if self.cuda:
            torch.cuda.set_sync_debug_mode(0)
        self.steps += 1


def count_step_syncs(dry_run: bool) -> dict:
    """Two epochs of A-LRN (the net with every layer kind) on the sample, data on the device,
    bf16 on a GPU: the sync warnings raised inside training steps."""
    from vgg_ablation.config import compose
    from vgg_ablation.training.build import device_choice, model_for, prepare
    from vgg_ablation.training.fitting import LightningData, make_module, make_trainer

    size = ["model.width=0.0625", "trainer.limit_train_batches=4", "data.batch_size=16"] if dry_run else []
    cfg = compose(["arch=A-LRN", "data=sample", "logger=none", "trainer.max_epochs=2", "trainer.progress_bar=false",
                   "trainer.limit_val_batches=2", *size])  # fmt: skip
    accelerator, precision, channels_last = device_choice(cfg)
    cuda = accelerator == "gpu"
    datamodule, _ = prepare(cfg)
    datamodule.setup("fit")
    if cuda:
        datamodule.move_to(torch.device("cuda"))
    watch = SyncWatch(cuda)
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        module = make_module(cfg, model_for(cfg, "A-LRN", datamodule), accelerator, channels_last)
        trainer = make_trainer(cfg, accelerator, precision, Path(tmp), extra_callbacks=[watch])
        trainer.fit(module, datamodule=LightningData(datamodule))
    syncs = [str(w.message) for w in caught if SYNC_WARNING in str(w.message)]
    return {
        "steps": watch.steps,
        "sync_warnings": len(syncs),
        "per_step": len(syncs) / max(1, watch.steps),
        "first": syncs[:3],
        "checked": cuda,  # the debug mode exists on CUDA only
    }


LEASE_SECONDS = 12 * 60  # the check and the study, start-up included (about 90 s of it)
START_UP = 90
REPORT_SECONDS = 45  # the report, its plans and plots, after the cap


def study_size(per_arch: list[dict], lightning_ratio: float, seconds_left: float, dry_run: bool) -> dict:
    """The GPU study's maximum seeds and cap, from the measured speeds: each cell's 15 epochs of
    31,500 images (plus validation at ~3x) at its arch's speed, plus a fixed ~15 s per cell
    (process, data to the GPU, test); as many looks as the time left trains, on the study's grid
    (5 seeds, then 3 more a look)."""
    if dry_run:
        return {"max_seeds": 5, "minutes": 0.5, "cell_seconds": None}
    speed = {row["arch"]: row["train img/s"] * lightning_ratio for row in per_arch}
    cell = {a: 15 * (31_500 / speed[a] + 3_500 / (3 * speed[a])) + 15 for a in STUDY_ARCHS}
    per_seed = sum(cell.values())
    minutes = max(1.0, (seconds_left - REPORT_SECONDS) / 60)
    seeds = int(60 * minutes // per_seed)
    max_seeds = max(5, 5 + 3 * ((seeds - 5) // 3)) if seeds >= 5 else 5
    return {
        "max_seeds": min(max_seeds, 20),
        "minutes": minutes,
        "cell_seconds": cell,
        "seconds_per_seed": per_seed,
    }


def run_gpu_study(work: Path, out: Path, dry_run: bool, size: dict, data: Path | None) -> dict:
    """The GPU study through the CLI (Hydra multiruns, MLflow store, report) in `work`."""
    if dry_run:
        where = ["data=sample", "model.width=0.0625", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
                 "trainer.limit_test_batches=4", "data.batch_size=16", "trainer.max_epochs=1", "study.seeds=[0,1]",
                 "study.seeds_per_look=3", "study.parallel=off", "study.futility=0"]  # fmt: skip  # as on the GPU: a cell at a time; the cap, not futility, ends it
    else:
        where = [f"data.root={data}"]
    args = ["study", "experiment=cifar10-gpu", *where, f"study.max_seeds={size['max_seeds']}",
            f"study.time_limit={size['minutes']:.2f}"]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(__file__).resolve().parents[2]), env.get("PYTHONPATH")])
    )
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "vgg_ablation", *args], cwd=work, env=env,
                          capture_output=True, text=True)  # fmt: skip
    seconds = time.time() - start
    reports = work / "reports"
    reports.mkdir(exist_ok=True)
    (reports / "study.log").write_text(
        " ".join(args) + "\n" + proc.stdout + "\n--- stderr ---\n" + proc.stderr
    )
    for name in ("cifar10-gpu.md", "cifar10-gpu-runs.csv"):
        if (reports / name).is_file():
            shutil.copy(reports / name, out / name)
    for bench in out.glob("bench-*.json"):  # the zip holds them: 8 files come back from a lent machine
        shutil.move(bench, reports / bench.name)
    shutil.make_archive(str(out / "study-report"), "zip", reports)
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    headline = next((line for line in (reports / "cifar10-gpu.md").read_text().splitlines()
                     if line.startswith("**")), "") if (reports / "cifar10-gpu.md").is_file() else ""  # fmt: skip
    stopped = next(
        (line.split("stopped: ", 1)[1] for line in proc.stdout.splitlines() if "; stopped: " in line), ""
    )
    return {"returncode": proc.returncode, "seconds": seconds, "table": table, "log_tail": proc.stderr[-3000:],
            "finished": sum(" FINISHED " in line for line in table[2:]),
            "cells": sum(" MISSING " not in line for line in table[2:]),  # those started before the cap
            "headline": headline, "stopped": stopped}  # fmt: skip


def projected_cifar10_hours(per_arch: list[dict], lightning_ratio: float) -> dict | None:
    """The `cifar10` study's training time from measured images/s: each cell's epochs x 45,000
    images at its arch's speed (plain loop x the Lightning/plain ratio), plus a pass over the
    5,000 validation images per epoch at ~3x the training speed (forward only)."""
    import yaml

    from vgg_ablation.config import CONF_DIR

    spec = yaml.safe_load((CONF_DIR / "experiment" / "cifar10.yaml").read_text())
    speed = {row["arch"]: row["train img/s"] * lightning_ratio for row in per_arch}
    archs, seeds, epochs = (
        spec["study"]["archs"],
        spec["study"]["seeds"],
        spec["trainer"]["max_epochs"],
    )  # its first look
    if any(a not in speed for a in archs):
        return None
    seconds = sum(epochs * (45_000 / speed[a] + 5_000 / (3 * speed[a])) for a in archs for _ in seeds)
    return {"runs": len(archs) * len(seeds), "epochs": epochs, "hours": seconds / 3600}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vgg_ablation.commands.gpucheck", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="folder for every result (the GPU machine's $OUT)"
    )
    parser.add_argument("--data", type=Path, help="CIFAR-10 as a folder (train/, test/) for the GPU study")
    parser.add_argument("--dry-run", action="store_true", help="CPU-sized steps; skip what needs CUDA")
    opts = parser.parse_args(argv)
    out: Path = opts.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not opts.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device here; use --dry-run to try the check on a CPU", file=sys.stderr)
        return 2
    if not opts.dry_run and not (opts.data and (opts.data / "train").is_dir()):
        print(
            "error: the GPU study needs --data <folder with train/ and test/> (make gpu-data)",
            file=sys.stderr,
        )
        return 2
    start = time.time()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    print(
        f"gpu-check on {device}{' (dry run)' if opts.dry_run else ''}: torch {torch.__version__}", flush=True
    )
    results: dict = {"device": device, "dry_run": opts.dry_run, "torch": torch.__version__}
    timings = measure_first(results, out, opts.dry_run)
    e32 = results["e32"]
    left = LEASE_SECONDS - START_UP - (time.time() - start)
    size = study_size(e32["per_arch"], e32["ratios"]["lightning / plain"], left, opts.dry_run)
    results["study_size"] = size
    print(f"GPU study: up to {size['max_seeds']} seeds per net, capped at {size['minutes']:.1f} min "
          f"(from the bench's speeds and the {left / 60:.1f} min left of the lease)", flush=True)  # fmt: skip
    with tempfile.TemporaryDirectory() as work:
        t = time.time()
        results["study"] = run_gpu_study(Path(work), out, opts.dry_run, size, opts.data)
        timings["GPU study"] = time.time() - t
    st = results["study"]
    print(f"GPU study: exit {st['returncode']}, {st['finished']} of {st['cells']} cells FINISHED in "
          f"{st['seconds']:.0f} s; stopped: {st['stopped'] or '?'}\n{st['headline']}", flush=True)  # fmt: skip
    print("\n".join(st["table"]))
    if st["returncode"] != 0:
        print("study failed; the end of its log:\n" + st["log_tail"], file=sys.stderr)
    results["projection"] = projected_cifar10_hours(e32["per_arch"], e32["ratios"]["lightning / plain"])
    results["seconds"] = time.time() - start
    results["timings"] = timings
    (out / "gpu-check.json").write_text(json.dumps(results, indent=2, default=str))
    print(write_summary(results, out))
    return 0 if st["returncode"] == 0 and st["finished"] == st["cells"] else 1


def measure_first(results: dict, out: Path, dry_run: bool) -> dict[str, float]:
    """The two benches and the sync count, into `results`; their times."""
    from vgg_ablation.commands.bench import run_bench

    timings: dict[str, float] = {}
    for name in ("d224", "e32"):
        t = time.time()
        run_bench(bench_args(name, out, dry_run))
        timings[f"bench {name}"] = time.time() - t
        results[name] = json.loads(next(out.glob(f"bench-*-{name}.json")).read_text())
    t = time.time()
    results["syncs"] = count_step_syncs(dry_run)
    timings["sync count"] = time.time() - t
    s = results["syncs"]
    print(f"host syncs inside training steps: {s['sync_warnings']} warnings in {s['steps']} steps "
          f"({s['per_step']:.2f} per step)" + ("" if s["checked"] else " (not checked: no CUDA)"), flush=True)  # fmt: skip
    for message in s["first"]:
        print(f"  {message}")
    return timings


def write_summary(r: dict, out: Path) -> str:
    d224, e32, s, p = r["d224"], r["e32"], r["syncs"], r["projection"]
    d = d224["per_arch"][0]
    lines = [
        f"# GPU check on {r['device']}{' (dry run: CPU-sized, not figures)' if r['dry_run'] else ''}",
        "",
        f"torch {r['torch']} · `python -m vgg_ablation.commands.gpucheck` · {r['seconds']:.0f} s in all "
        f"({', '.join(f'{k} {v:.0f} s' for k, v in r['timings'].items())})",
        "",
        "| figure | measured | target |",
        "|---|---:|---|",
        f"| VGG-D {d224['settings']['input_size']} px {d224['settings']['precision']}: images/s (plain loop) "
        f"| {d['train img/s']:.0f} | |",
        f"| VGG-D: MFU (dense bf16 peak) | {_pct(d['MFU'])} | ≥ 40% |",
        f"| VGG-D: peak GPU memory | {_gib(d['peak GPU GiB'])} | |",
        f"| 32 px, E: Lightning path / plain loop | {e32['ratios']['lightning / plain']:.3f} | ≥ 0.90 |",
        f"| 32 px, E: real data (on the device) / synthetic | {e32['ratios']['real data / synthetic']:.3f} | ≥ 0.90 |",
        "| host-sync warnings per training step | "
        + (f"{s['per_step']:.2f} ({s['sync_warnings']} in {s['steps']} steps)" if s["checked"] else "not checked (no CUDA)")
        + " | 0 |",
        f"| GPU study (cifar10-gpu: 7 nets, up to {r['study_size']['max_seeds']} seeds, capped at "
        f"{r['study_size']['minutes']:.1f} min) | {r['study']['finished']} of {r['study']['cells']} FINISHED, "
        f"{r['study']['seconds']:.0f} s, stopped: {r['study']['stopped'] or '?'} | every cell it started |",
    ]  # fmt: skip
    if p:
        lines.append(
            f"| `cifar10` study, projected ({p['runs']} runs x {p['epochs']} epochs) | {p['hours']:.2f} h | < 1 h |"
        )
    lines += ["", "## Per arch at 32 px (plain loop, full width unless a dry run)", "", "| arch | images/s | MFU | peak GPU memory |",
              "|---|---:|---:|---:|"]  # fmt: skip
    lines += [
        f"| {a['arch']} | {a['train img/s']:.0f} | {_pct(a['MFU'])} | {_gib(a['peak GPU GiB'])} |"
        for a in e32["per_arch"]
    ]
    if r["study"]["headline"]:
        lines += ["", "## The GPU study's verdicts (cifar10-gpu.md)", "", r["study"]["headline"]]
    text = "\n".join(lines) + "\n"
    (out / "gpu-check.md").write_text(text)
    return text


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _gib(x) -> str:
    return "n/a" if x is None else f"{x:.1f} GiB"


if __name__ == "__main__":
    sys.exit(main())
