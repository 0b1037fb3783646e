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
