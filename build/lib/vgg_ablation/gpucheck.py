"""The prepared GPU check: everything a lent GPU machine must show, in one command, in minutes.

    python -m vgg_ablation.gpucheck --out DIR            # on the GPU machine (.ci/gpu-check.sh)
    python -m vgg_ablation.gpucheck --out DIR --dry-run  # anywhere: the same steps, CPU-sized

Steps, each writing under DIR and printing every figure it measures:
1. bench, the paper's setting: VGG-D at 224 px, bf16, full width, paper head (MFU vs bf16 peak);
2. bench, the cifar10 study's setting: full-width nets at 32 px, data held on the GPU (every
   paper arch's images/s and peak memory, the Lightning path against the plain loop);
3. host syncs inside a training step, counted under torch.cuda.set_sync_debug_mode("warn");
4. a tiny real study: every study arch, one seed, two epochs, 32 px, through Hydra and MLflow;
5. the cifar10 study's projected time from step 2's per-arch speeds.
The summary goes to DIR/gpu-check.md. --dry-run shrinks every step (width, steps, batches) and
skips what needs CUDA (the sync debug mode), so CI can run the whole path on a CPU.
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
    from vgg_ablation.build import device_choice, make_module, make_trainer, model_for, prepare
    from vgg_ablation.config import compose

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
        trainer.fit(module, datamodule=datamodule)
    syncs = [str(w.message) for w in caught if SYNC_WARNING in str(w.message)]
    return {
        "steps": watch.steps,
        "sync_warnings": len(syncs),
        "per_step": len(syncs) / max(1, watch.steps),
        "first": syncs[:3],
        "checked": cuda,  # the debug mode exists on CUDA only
    }


def run_study(work: Path, out: Path, dry_run: bool) -> dict:
    """The tiny real study through the CLI (Hydra multirun, MLflow store, report) in `work`."""
    size = (["model.width=0.0625", "trainer.limit_train_batches=2", "trainer.limit_val_batches=1",
             "trainer.limit_test_batches=2", "data.batch_size=16"] if dry_run else ["model.width=1"])  # fmt: skip
    args = ["study", "experiment=sample", "study.name=gpu-check", f"study.archs=[{','.join(STUDY_ARCHS)}]",
            "study.seeds=[0]", "trainer.max_epochs=2", "model.init=from_A", *size]  # fmt: skip
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(
        filter(None, [str(Path(__file__).parent.parent), env.get("PYTHONPATH")])
    )
    start = time.time()
    proc = subprocess.run([sys.executable, "-m", "vgg_ablation", *args], cwd=work, env=env,
                          capture_output=True, text=True)  # fmt: skip
    seconds = time.time() - start
    # The report, its plots and the study's log as one file (the GPU machine returns 8 files)
    (work / "reports").mkdir(exist_ok=True)
    (work / "reports" / "study.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    shutil.make_archive(str(out / "study-report"), "zip", work / "reports")
    table = [line for line in proc.stdout.splitlines() if line.startswith("|")]
    cells = table[2:]  # the summary's rows (a from-A study adds a B from scratch)
    return {"returncode": proc.returncode, "seconds": seconds, "table": table, "log_tail": proc.stderr[-3000:],
            "finished": sum(" FINISHED " in line for line in cells), "cells": max(len(cells), len(STUDY_ARCHS))}  # fmt: skip


def projected_cifar10_hours(per_arch: list[dict], lightning_ratio: float) -> dict | None:
    """The `cifar10` study's training time from measured images/s: each cell's epochs x 45,000
    images at its arch's speed (plain loop x the Lightning/plain ratio), plus a pass over the
    5,000 validation images per epoch at ~3x the training speed (forward only)."""
    import yaml

    from vgg_ablation.config import CONF_DIR

    spec = yaml.safe_load((CONF_DIR / "experiment" / "cifar10.yaml").read_text())
    speed = {row["arch"]: row["train img/s"] * lightning_ratio for row in per_arch}
    archs, seeds, epochs = spec["study"]["archs"], spec["study"]["seeds"], spec["trainer"]["max_epochs"]
    if any(a not in speed for a in archs):
        return None
    seconds = sum(epochs * (45_000 / speed[a] + 5_000 / (3 * speed[a])) for a in archs for _ in seeds)
    return {"runs": len(archs) * len(seeds), "epochs": epochs, "hours": seconds / 3600}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m vgg_ablation.gpucheck", description=__doc__.splitlines()[0]
    )
    parser.add_argument(
        "--out", required=True, type=Path, help="folder for every result (the GPU machine's $OUT)"
    )
    parser.add_argument("--dry-run", action="store_true", help="CPU-sized steps; skip what needs CUDA")
    opts = parser.parse_args(argv)
    out: Path = opts.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    if not opts.dry_run and not torch.cuda.is_available():
        print("error: no CUDA device here; use --dry-run to try the check on a CPU", file=sys.stderr)
        return 2
    from vgg_ablation.bench import run_bench

    start = time.time()
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else f"cpu ({os.cpu_count()} cores)"
    print(
        f"gpu-check on {device}{' (dry run)' if opts.dry_run else ''}: torch {torch.__version__}", flush=True
    )
    results: dict = {"device": device, "dry_run": opts.dry_run, "torch": torch.__version__}
    timings: dict[str, float] = {}
    for name in ("d224", "e32"):
        t = time.time()
        run_bench(bench_args(name, out, opts.dry_run))
        timings[f"bench {name}"] = time.time() - t
        results[name] = json.loads(next(out.glob(f"bench-*-{name}.json")).read_text())
    t = time.time()
    results["syncs"] = count_step_syncs(opts.dry_run)
    timings["sync count"] = time.time() - t
    s = results["syncs"]
    print(f"host syncs inside training steps: {s['sync_warnings']} warnings in {s['steps']} steps "
          f"({s['per_step']:.2f} per step)" + ("" if s["checked"] else " (not checked: no CUDA)"), flush=True)  # fmt: skip
    for message in s["first"]:
        print(f"  {message}")
    with tempfile.TemporaryDirectory() as work:
        t = time.time()
        results["study"] = run_study(Path(work), out, opts.dry_run)
        timings["tiny study"] = time.time() - t
    st = results["study"]
    print(f"tiny study: exit {st['returncode']}, {st['finished']} of {st['cells']} cells FINISHED "
          f"in {st['seconds']:.0f} s", flush=True)  # fmt: skip
    print("\n".join(st["table"]))
    if st["returncode"] != 0:
        print("study failed; the end of its log:\n" + st["log_tail"], file=sys.stderr)
    e32 = results["e32"]
    results["projection"] = projected_cifar10_hours(e32["per_arch"], e32["ratios"]["lightning / plain"])
    results["seconds"] = time.time() - start
    results["timings"] = timings
    (out / "gpu-check.json").write_text(json.dumps(results, indent=2, default=str))
    summary = write_summary(results, out)
    print(summary)
    ok = st["returncode"] == 0 and st["finished"] == st["cells"]
    return 0 if ok else 1


def write_summary(r: dict, out: Path) -> str:
    d224, e32, s, p = r["d224"], r["e32"], r["syncs"], r["projection"]
    d = d224["per_arch"][0]
    lines = [
        f"# GPU check on {r['device']}{' (dry run: CPU-sized, not figures)' if r['dry_run'] else ''}",
        "",
        f"torch {r['torch']} · `python -m vgg_ablation.gpucheck` · {r['seconds']:.0f} s in all "
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
        f"| tiny study (every arch, 1 seed, 2 epochs) | {r['study']['finished']} of {r['study']['cells']} FINISHED, "
        f"{r['study']['seconds']:.0f} s | all |",
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
    text = "\n".join(lines) + "\n"
    (out / "gpu-check.md").write_text(text)
    return text


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.1%}"


def _gib(x) -> str:
    return "n/a" if x is None else f"{x:.1f} GiB"


if __name__ == "__main__":
    sys.exit(main())
