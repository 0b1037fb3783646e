"""A benchmark's report: its record (bench.measure) as reports/bench-<device>[-name].json and
.md, rendered from the record alone (nothing measured or computed here)."""

from __future__ import annotations

import json
from pathlib import Path


def write_bench(record: dict, out: Path, args: list[str]) -> Path:
    """The record as reports/bench-<device>[-name].json and .md."""
    settings = record["settings"]
    slug = "cpu" if record["device"].startswith("cpu") else record["device"].lower().replace(" ", "-")
    if settings["name"]:
        slug += "-" + settings["name"]
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench-{slug}.json").write_text(json.dumps(record, indent=2))
    lines = render(record, args)
    path = out / f"bench-{slug}.md"
    path.write_text("\n".join(lines))
    print("\n".join(lines[6:14]))
    return path


def render(record: dict, args: list[str]) -> list[str]:
    """The benchmark report's lines, from its record alone."""
    import pandas as pd

    s, med, results, ratios = (
        record["settings"],
        record["median_img_per_s"],
        record["rounds_img_per_s"],
        record["ratios"],
    )
    device_name, folders = record["device"], record["data_paths"]
    # On a GPU a 32 px step is short and per-step overhead weighs most: the 0.90 there.
    on_gpu = not device_name.startswith("cpu")
    targets = {"lightning / plain": 0.90 if on_gpu else 0.95, "real data / synthetic": 0.90}
    lines = [
        f"# Training throughput on {device_name}",
        "",
        f"`vgg-ablation bench {' '.join(args)}` · torch {record['torch']}, Lightning {record['lightning']}, "
        f"Python {record['python']} · {record['written']}",
        "",
        f"arch {s['arch']}, data `{s['data']}`, batch {s['batch_size']}, width x{s['width']}, "
        f"input {s['input_size']}px, precision {s['precision']}; median of {s['rounds']} interleaved rounds of "
        f"{s['steps']} steps after {s['warmup']} warm-up steps. Absolute images/s on a shared machine "
        "vary from run to run; the ratios (per round, side by side, then the median) are the result.",
        "",
        "| path | images/s (median) | rounds |",
        "|---|---:|---|",
        *[f"| {k} | {med[k]:.0f} | {', '.join(f'{v:.0f}' for v in results[k])} |" for k in results],
        "",
        "| ratio | measured | target |",
        "|---|---:|---:|",
        *[f"| {k} | {v:.3f} | ≥ {targets[k]:.2f} |" for k, v in ratios.items()],
        "",
        "## Per configuration (plain loop, synthetic batches)",
        "",
        pd.DataFrame(record["per_arch"]).to_markdown(index=False, floatfmt=".3g"),
        "",
        "FLOPs count multiply-adds as 2 (torch's FlopCounterMode); training = 3 x forward. "
        "MFU needs a GPU (bf16 dense peak of the device).",
        "",
    ]
    if folders:
        lines += _render_paths(folders)
    return lines


def _render_paths(folders: dict) -> list[str]:
    targets = {
        "32 px folder / data=sample": "≥ 0.90",
        "224 px files (workers) / pre-decoded": "keeps the net fed",
    }
    return [
        "## Data paths (Lightning path, same net; interleaved rounds)",
        "",
        "32 px: the embedded sample laid out as a user's folder (`data=imagefolder`, decoded once and held "
        "in memory) against `data=sample`. 224 px: a folder of 256 px JPEGs (the sample's images, "
        f"re-encoded) decoded per image by {folders['workers']} DataLoader workers (S=256, 224 crops, the "
        "ImageNet path) against the same images pre-decoded in memory, batch 32.",
        "",
        "| path | images/s per round |",
        "|---|---|",
        *[
            f"| {size} {path} | {', '.join(f'{v:.0f}' for v in vals)} |"
            for size in ("32px", "224px")
            for path, vals in folders[size].items()
        ],
        "",
        "| ratio | measured (median of rounds) | target |",
        "|---|---:|---|",
        *[f"| {k} | {v:.3f} | {targets[k]} |" for k, v in folders["ratios"].items()],
        "",
    ]


# -- bench.mode=cells -------------------------------------------------------------------------------------
PER_EPOCH = (
    "training steps",
    "between steps",
    "validation",
    "checkpoints",
)  # a cell's phases each epoch repeats


def write_cells(record: dict, out: Path, args: list[str]) -> Path:
    """The cells benchmark's record as reports/bench-<device>-cells.json and .md."""
    slug = "cpu" if record["device"].startswith("cpu") else record["device"].lower().replace(" ", "-")
    out.mkdir(parents=True, exist_ok=True)
    (out / f"bench-{slug}-cells.json").write_text(json.dumps(record, indent=2))
    path = out / f"bench-{slug}-cells.md"
    path.write_text("\n".join(render_cells(record, args)))
    return path


def _profile_rows(profiles: list[dict], epochs: int | None = None) -> list[dict]:
    """Each profiled cell's phases as fractions of its wall time; with `epochs`, of a cell of that
    many epochs (per-epoch phases scaled from the cell's own epochs, the rest as measured)."""
    from vgg_ablation.training.profiling import PHASES

    rows = []
    for p in profiles:
        scale = (epochs / p["epochs"]) if epochs else 1.0
        phases = {k: v * (scale if k in PER_EPOCH else 1.0) for k, v in p["phases"].items()}
        total = sum(phases.values())
        row = {"net": p["arch"], "threads": p["threads"], "compiled": "yes" if p["compiled"] else "",
               "channels_last": "yes" if p.get("channels_last") else "", "cell s": f"{total:.0f}"}  # fmt: skip
        row.update({k: f"{100 * phases[k] / total:.1f}%" for k in PHASES})
        if not epochs:
            row["cell img/s (steps)"] = f"{p['cell img/s']:.0f}"
            row["step bench img/s"] = f"{p['step bench img/s']:.0f}"
            row["cell / bench"] = f"{p['cell img/s'] / p['step bench img/s']:.2f}"
        rows.append(row)
    return rows


def render_cells(record: dict, args: list[str]) -> list[str]:
    import pandas as pd

    studies = record["studies"]
    n = record["epochs"]
    return [
        f"# Whole cells on {record['device']}: where the time goes, and cells per hour",
        "",
        f"`vgg-ablation bench {' '.join(args)}` · torch {record['torch']}, Lightning {record['lightning']}, "
        f"Python {record['python']} · {record['written']}",
        "",
        f"Real cells of the study ({', '.join(record['archs'])}), shortened to {n} epochs, each in its own process as "
        "`vgg-ablation train` runs one, all measured in one sitting on this machine (absolute times on a shared "
        "machine vary; the fractions and ratios are the result).",
        "",
        "## Where a cell's time goes",
        "",
        "Phases as fractions of the cell's wall time, from its process's creation to its exit: start-up (imports, "
        "Hydra), data (listed, read back from the decode cache, split), tracking (the MLflow run opened, its records, "
        "its last writes), training steps (forward, backward, optimizer), between steps (the next batch cut and "
        "augmented, Lightning's loop, the logger), validation, checkpoint writes, the test (the best checkpoint "
        "loaded, 10,000 images), other (Lightning's set-up and teardown, the FLOPs count, the LRN probe, exit). "
        "Beside them, the cell's training images/s against the training-step bench (plain loop, synthetic batches) "
        "at the same thread count.",
        "",
        pd.DataFrame(_profile_rows(record["profiles"])).to_markdown(index=False, disable_numparse=True)
        if record["profiles"]
        else "(not profiled in this run: bench.profiles=false)",
        "",
        f"The same cells at the study's {record['study_epochs']} epochs (the per-epoch phases scaled from these "
        f"{n}, the rest as measured):",
        "",
        pd.DataFrame(_profile_rows(record["profiles"], record["study_epochs"])).to_markdown(
            index=False, disable_numparse=True
        )
        if record["profiles"]
        else "",
        "",
        *_ceiling(record),
        "## Cells per hour, way by way",
        "",
        f"The same study ({', '.join(record['archs'])} x {studies[0]['cells'] // len(record['archs'])} seeds, {n} epochs) "
        "run whole (`vgg-ablation study`: its sweep, store and report) in a fresh folder and store, once per way "
        "and round, the ways interleaved round by round; each ratio compares a way with `basic` in the same round:",
        "",
        pd.DataFrame(
            [
                {
                    "way": s["way"],
                    "round": s.get("round", 1),
                    "what": s["what"],
                    "cells": s["cells"],
                    "wall s": f"{s['wall']:.0f}",
                    "cells / hour": f"{s['cells per hour']:.1f}",
                    "ratio to basic": f"{s['ratio to basic']:.2f}",
                    "threads recorded": ", ".join(t for t in s["threads"] if t),
                }
                for s in studies
            ]
        ).to_markdown(index=False, disable_numparse=True),  # fmt: skip
        "",
        "Test top-1 error of each cell, way by way (1 and 2 threads, compiled or not, sum in different orders: "
        "the same seed gives slightly different numbers, which is why a study keeps one setting for all its cells):",
        "",
        pd.DataFrame(
            {
                f"{s['way']} ({s.get('round', 1)})": {
                    k: f"{100 * v:.2f}" for k, v in s["test errors"].items()
                }
                for s in studies
            }
        ).to_markdown(disable_numparse=True),
        "",
        *_ratio_summary(studies),
    ]


# The way that fills the machine with each 1-thread profile's setting: (compiled, channels_last) -> way
PER_CORE_WAY = {
    (False, False): "per-core",
    (False, True): "per-core-channels_last",
    (True, False): "per-core-compile",
}


def _ceiling(record: dict) -> list[str]:
    """What a cell per core can give at most: the cores times a cell's speed on one thread, as a
    share of its speed on all of them, as if the cells side by side slowed each other not at all;
    beside it, what the study measured that way."""
    import statistics

    import pandas as pd

    if not record["profiles"]:
        return []
    cores, epochs = record["cores"], record["study_epochs"]

    def cell_seconds(at_epochs: int) -> dict:
        """(threads, compiled, channels_last) -> net -> a cell's seconds at that many epochs."""
        out: dict = {}
        for p in record["profiles"]:
            per_epoch = sum(v for k, v in p["phases"].items() if k in PER_EPOCH) / p["epochs"]
            key = (p["threads"], p["compiled"], bool(p.get("channels_last")))
            out.setdefault(key, {})[p["arch"]] = p["seconds"] + per_epoch * (at_epochs - p["epochs"])
        return out

    def ceiling(seconds: dict, setting: tuple) -> float | None:
        full, one = seconds.get((cores, False, False)), seconds.get((1, *setting))
        return (
            cores * sum(full.values()) / sum(one.values()) if full and one and set(one) == set(full) else None
        )

    bench_epochs, at_study = cell_seconds(record["epochs"]), cell_seconds(epochs)
    steps = {
        (p["arch"], p["threads"], bool(p.get("channels_last"))): p["step bench img/s"]
        for p in record["profiles"]
    }
    rows = []
    for (compiled, cl), way in PER_CORE_WAY.items():
        here = ceiling(bench_epochs, (compiled, cl))
        if here is None:
            continue
        measured = [s["ratio to basic"] for s in record["studies"] if s["way"] == way]
        step = [cores * steps[(a, 1, cl)] / steps[(a, cores, False)]
                for a in record["archs"] if (a, 1, cl) in steps and (a, cores, False) in steps]  # fmt: skip
        rows.append({
            "way": way,
            "ceiling, steps alone": f"{statistics.median(step):.2f}" if step and not compiled else "",
            f"ceiling, cells of {record['epochs']} epochs": f"{here:.2f}",
            f"ceiling, cells of {epochs} epochs": f"{ceiling(at_study, (compiled, cl)):.2f}",
            f"measured ({record['epochs']} epochs, median)": f"{statistics.median(measured):.2f}" if measured else "not run",
            "measured / ceiling": f"{statistics.median(measured) / here:.2f}" if measured else "",
        })  # fmt: skip
    if not rows:
        return []
    return [
        "## The ceiling of a cell per core",
        "",
        f"What {cores} cells side by side, one thread each, can give over one cell at a time on {cores} threads if "
        "they slowed each other not at all: from the training-step bench alone (the cores times a net's step rate "
        f"on one thread over its rate on {cores}, median over the nets), and from the profiled cells (the cores "
        f"times the nets' summed cell time on {cores} threads over their summed time on one, at the bench's "
        f"epochs and at the study's {epochs}: per-epoch phases scaled, the rest as measured). Beside them, what "
        "the way measured (the median of its rounds' ratios to basic, at the bench's epochs). Measured below the "
        "ceiling is what the cells side by side cost each other: the cores' shared cache and memory bandwidth, "
        "and anything else running on the machine.",
        "",
        pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True),
        "",
    ]


def _ratio_summary(studies: list[dict]) -> list[str]:
    """Each way's ratio to basic, round by round, and their median."""
    import statistics

    ways = list(dict.fromkeys(s["way"] for s in studies))
    ratios = {w: [s["ratio to basic"] for s in studies if s["way"] == w] for w in ways}
    rows = [
        f"| {w} | {', '.join(f'{r:.2f}' for r in rs)} | {statistics.median(rs):.2f} |"
        for w, rs in ratios.items()
    ]
    return ["| way | cells per hour / basic's, each round | median |", "|---|---|---:|", *rows, ""]
