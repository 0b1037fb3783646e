"""`vgg-ablation bench`: where a training run's time goes, as ratios measured in one sitting.

Three measurements, interleaved over `rounds` so that a shared machine's drift hits all alike
(the median of the rounds is reported):
1. plain PyTorch loop vs the project's Lightning path, both on the same synthetic in-memory
   batches, same model, optimizer, batch and precision: what Lightning + our module cost;
2. the Lightning path on synthetic batches vs on the chosen data's real input pipeline: what the
   data path costs;
3. each configuration's training images/s (plain loop), FLOPs per image computed from the model
   definition (torch's FlopCounterMode on the meta device) and, on a GPU, model FLOPs utilisation
   against the device's bf16 dense peak.
`measure` takes them and returns a record; bench_report.py renders and writes it
(reports/bench-<device>.md and .json), computing nothing.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from pathlib import Path

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf, open_dict

from vgg_ablation.config import compose
from vgg_ablation.errors import UserError
from vgg_ablation.nets.models import PAPER_STEPS, forward_flops
from vgg_ablation.training.build import (
    apply_device_flags,
    arch_of,
    device_choice,
    is_deterministic,
    model_for,
    prepare,
)
from vgg_ablation.training.fitting import make_module, make_trainer

# bf16 dense tensor-core peaks, TFLOP/s (vendor datasheets), for model FLOPs utilisation.
PEAK_BF16_TFLOPS = {"H100 SXM": 989.0, "H100 PCIe": 756.0, "H100": 989.0, "H200": 989.0, "A100": 312.0}


def arch_flops(cfg: DictConfig, arch: str, datamodule) -> int:
    """Forward FLOPs per image of `arch` under this config, counted on the meta device."""
    with torch.device("meta"):
        model = model_for(cfg, arch, datamodule)
    return forward_flops(model, datamodule.input_size)


def peak_tflops(device_name: str) -> float | None:
    for key in sorted(PEAK_BF16_TFLOPS, key=len, reverse=True):
        if key in device_name:
            return PEAK_BF16_TFLOPS[key]
    return None


def synthetic_batches(cfg: DictConfig, device: torch.device, n: int = 8, num_classes: int = 10):
    """A few random batches of this config's shape, made once (what 'synthetic' means here)."""
    g = torch.Generator().manual_seed(0)
    size, b = cfg.data.input_size, cfg.data.batch_size
    return [
        (
            torch.randn(b, 3, size, size, generator=g).to(device),
            torch.randint(0, num_classes, (b,), generator=g).to(device),
        )
        for _ in range(n)
    ]


class Cycle:
    """An endless-enough iterable over a few prepared batches (what 'synthetic' means here)."""

    def __init__(self, batches, length: int):
        self.batches, self.length = batches, length

    def __len__(self) -> int:
        return self.length

    def __iter__(self):
        for i in range(self.length):
            yield self.batches[i % len(self.batches)]


def plain_loop(
    cfg: DictConfig, model, batches, steps: int, warmup: int, device, precision: str, channels_last: bool
) -> float:
    """Images/s of the textbook loop on `model`: forward, cross-entropy, backward, SGD step."""
    # the same algorithm choice and device flags as the Lightning path (make_module) sets
    accelerator = "gpu" if device.type == "cuda" else "cpu"
    torch.use_deterministic_algorithms(is_deterministic(cfg, accelerator))
    apply_device_flags(cfg, accelerator)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.train()
    opt = torch.optim.SGD(
        model.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum, weight_decay=cfg.optim.weight_decay
    )
    autocast = precision.startswith("bf16")
    watch = Stopwatch(device)
    for i in range(warmup + steps):
        if i == warmup:
            watch.start()
        x, y = batches[i % len(batches)]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return steps * cfg.data.batch_size / watch.stop()


class Stopwatch:
    """Wall time between two device syncs: the only syncs either timed path makes, so the plain
    loop and the Lightning path are measured alike (a sync per step would stall the GPU's queue
    in one of them only)."""

    syncs = 0  # across instances: tests count them

    def __init__(self, device):
        self.device, self.started = torch.device(device), None

    def _sync(self) -> None:
        Stopwatch.syncs += 1
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def start(self) -> None:
        self._sync()
        self.started = time.perf_counter()

    def stop(self) -> float:
        self._sync()
        return time.perf_counter() - self.started


class _Timer(pl.Callback):
    """Times the steps after the warm-up, across epoch boundaries (their cost is part of the path):
    one sync as the first timed step starts, one after the last."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps, self.seen, self.images = warmup, steps, 0, 0
        self.watch, self.seconds = None, None

    def on_train_batch_start(self, trainer, module, batch, batch_idx):
        if self.seen == self.warmup:
            self.watch = Stopwatch(module.device)
            self.watch.start()

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.seen += 1
        if self.seen > self.warmup:
            self.images += len(batch[1])
        if self.seen == self.warmup + self.steps:
            self.seconds = self.watch.stop()


def lightning_path(cfg: DictConfig, model, train_batches, steps: int, warmup: int, tmp: Path) -> float:
    """Images/s of the project's own training step on `model`: our Trainer settings, module and
    callbacks."""
    accelerator, precision, channels_last = device_choice(cfg)
    timer = _Timer(warmup, steps)
    trainer = make_trainer(
        cfg,
        accelerator,
        precision,
        tmp,
        extra_callbacks=[timer],
        max_steps=warmup + steps,
        max_epochs=-1,
        limit_val_batches=0,
    )
    module = make_module(cfg, model, accelerator, channels_last)
    trainer.fit(module, train_dataloaders=train_batches)
    return timer.images / timer.seconds


def run_bench(args: list[str]) -> int:
    """`vgg-ablation bench`: measure, then write the report (bench.* keys in the schema)."""
    overrides = list(args)
    if not any(o.startswith("data=") for o in overrides):
        overrides = ["data=sample", *overrides]
    if not any(o.startswith("model.width=") for o in overrides):
        overrides.append("model.width=0.125")
    # Throughput only: no validation (so no plateau schedule), no progress bar.
    cfg = compose(["optim.schedule=none", *overrides, "trainer.progress_bar=false"])
    for key in ("steps", "rounds"):
        if cfg.bench[key] < 1:
            raise UserError(f"bench.{key} must be positive, got {cfg.bench[key]}")
    if cfg.bench.warmup < 0:
        raise UserError(f"bench.warmup must be 0 or more, got {cfg.bench.warmup}")
    from vgg_ablation.commands.bench_report import write_bench

    record = measure(cfg, overrides)
    path = write_bench(record, Path(cfg.bench.out), args)
    print(f"wrote {path}")
    return 0


def measure(cfg: DictConfig, overrides: list[str]) -> dict:
    """Every measurement of one benchmark, as a record (what `render` shows, nothing computed there)."""
    import tempfile

    opts = cfg.bench
    steps, warmup, rounds = opts.steps, opts.warmup, opts.rounds
    archs = list(opts.archs) if opts.archs else list(PAPER_STEPS)
    for a in archs:
        arch_of(a)
    accelerator, precision, channels_last = device_choice(cfg)
    apply_device_flags(cfg, accelerator)  # before the first round: both paths get the same kernels
    device = torch.device("cuda" if accelerator == "gpu" else "cpu")
    device_name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({os.cpu_count()} cores)"
    datamodule, _ = prepare(cfg)
    with open_dict(cfg):  # sizes the data chose (a folder's own size when none was set)
        cfg.data.input_size = datamodule.input_size
    if device.type == "cuda" and hasattr(datamodule, "move_to"):
        datamodule.move_to(device)
    synthetic = synthetic_batches(cfg, device, num_classes=datamodule.num_classes)
    results: dict[str, list[float]] = {"plain": [], "lightning_synthetic": [], "lightning_real": []}

    def fresh(arch: str):  # the same initial weights for every measurement of a net
        torch.manual_seed(0)
        return model_for(cfg, arch, datamodule)

    print(
        f"bench: arch={cfg.arch} data={cfg.data.name} batch={cfg.data.batch_size} width={cfg.model.width} "
        f"precision={precision} on {device_name}; {rounds} rounds of {steps} steps (+{warmup} warm-up)",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(rounds):
            results["plain"].append(
                plain_loop(cfg, fresh(cfg.arch), synthetic, steps, warmup, device, precision, channels_last)
            )
            cycle = Cycle(synthetic, warmup + steps)
            results["lightning_synthetic"].append(
                lightning_path(cfg, fresh(cfg.arch), cycle, steps, warmup, Path(tmp))
            )
            real = datamodule.train_dataloader()  # epochs repeat as needed, as in training
            results["lightning_real"].append(
                lightning_path(cfg, fresh(cfg.arch), real, steps, warmup, Path(tmp))
            )
            print(
                f"  round {r + 1}: " + ", ".join(f"{k} {v[-1]:.0f} img/s" for k, v in results.items()),
                flush=True,
            )
        per_arch = [per_configuration(cfg, a, fresh, synthetic, device, device_name, precision, channels_last, datamodule)
                    for a in archs]  # fmt: skip
    # Ratios of measurements taken side by side in the same round, then the median over rounds:
    # a shared machine's drift between rounds cancels out.
    ratios = {
        "lightning / plain": statistics.median(
            lit / plain for lit, plain in zip(results["lightning_synthetic"], results["plain"], strict=True)
        ),
        "real data / synthetic": statistics.median(
            real / syn
            for real, syn in zip(results["lightning_real"], results["lightning_synthetic"], strict=True)
        ),
    }
    return {
        "device": device_name,
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "python": platform.python_version(),
        "settings": {
            "arch": cfg.arch,
            "data": cfg.data.name,
            "batch_size": cfg.data.batch_size,
            "width": cfg.model.width,
            "input_size": cfg.data.input_size,
            "precision": precision,
            **OmegaConf.to_container(opts),
        },  # fmt: skip
        "rounds_img_per_s": results,
        "median_img_per_s": {k: statistics.median(v) for k, v in results.items()},
        "ratios": ratios,
        "per_arch": per_arch,
        "data_paths": folder_paths(cfg, overrides) if opts.folders else None,
        "written": time.strftime("%Y-%m-%d %H:%M %Z"),
    }


def per_configuration(
    cfg, arch, fresh, synthetic, device, device_name, precision, channels_last, datamodule
) -> dict:
    """One net's training images/s (plain loop), its FLOPs, and on a GPU its MFU and peak memory."""
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    steps, warmup = cfg.bench.steps, cfg.bench.warmup
    ips = statistics.median(
        plain_loop(cfg, fresh(arch), synthetic, steps, warmup, device, precision, channels_last)
        for _ in range(max(1, cfg.bench.rounds - 1))
    )
    peak_memory = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    flops = arch_flops(cfg, arch, datamodule)
    achieved = 3 * flops * ips  # forward + backward = 3x forward
    peak = peak_tflops(device_name) if device.type == "cuda" else None
    print(f"  {arch}: {ips:.0f} img/s, {flops / 1e6:.1f} MFLOPs/img forward", flush=True)
    return {
        "arch": arch,
        "forward MFLOPs/img": flops / 1e6,
        "train img/s": ips,
        "achieved TFLOP/s": achieved / 1e12,
        "MFU": achieved / (peak * 1e12) if peak else None,
        "peak GPU GiB": peak_memory,
    }


def _images_per_s(cfg: DictConfig, datamodule, steps: int, warmup: int) -> float:
    import tempfile

    with open_dict(cfg):
        cfg.data.input_size = datamodule.input_size
    torch.manual_seed(0)
    model = model_for(cfg, cfg.arch, datamodule)
    with tempfile.TemporaryDirectory() as tmp:
        return lightning_path(cfg, model, datamodule.train_dataloader(), steps, warmup, Path(tmp))


def _write_folder(root: Path, side: int | None, per_class: int | None = None) -> Path:
    """The embedded sample as a user's folder (train/ = its train, val/ = its test), copied as
    is, or re-encoded as side x side JPEGs (what a folder of photos looks like to the loader)."""
    import shutil

    from PIL import Image

    from vgg_ablation.data.datasets import SAMPLE_ROOT

    for split, target in (("train", "train"), ("test", "val")):
        for cls_dir in sorted((SAMPLE_ROOT / split).iterdir()):
            out = root / target / cls_dir.name
            out.mkdir(parents=True)
            for src in sorted(cls_dir.glob("*.jpg"))[:per_class]:
                if side is None:
                    shutil.copy(src, out / src.name)
                else:
                    with Image.open(src) as im:
                        im.resize((side, side), Image.BICUBIC).save(out / src.name, quality=90)
    return root


def folder_paths(cfg: DictConfig, overrides: list[str]) -> dict:
    """Two data-path ratios, interleaved rounds of the Lightning path, same net and batch:
    - 32 px: the sample laid out as a folder (data=imagefolder, decoded once into memory) vs
      data=sample;
    - 224 px: a folder of 256 px JPEGs decoded per image by DataLoader workers (the ImageNet
      path) vs the same images pre-decoded in memory."""
    import tempfile

    base = [o for o in overrides if not o.startswith(("data=", "data.root=", "data.input_size="))]
    base = ["optim.schedule=none", *base, "trainer.progress_bar=false"]
    steps, warmup, rounds = cfg.bench.steps, cfg.bench.warmup, cfg.bench.rounds
    out: dict = {"32px": {"folder": [], "sample": []}, "224px": {"files": [], "in_memory": []}}
    with tempfile.TemporaryDirectory() as tmp:
        small = _write_folder(Path(tmp) / "small", None)
        large = _write_folder(Path(tmp) / "large", 256, per_class=40)
        workers = min(8, os.cpu_count() or 1)
        paths = {
            ("32px", "sample"): compose(["data=sample", *base]),
            ("32px", "folder"): compose(["data=imagefolder", f"data.root={small}", *base]),
            ("224px", "files"): compose(
                [
                    "data=imagefolder",
                    f"data.root={large}",
                    "data.in_memory=off",
                    f"data.num_workers={workers}",
                    "data.batch_size=32",
                    *base,
                ]
            ),
            ("224px", "in_memory"): compose(
                ["data=imagefolder", f"data.root={large}", "data.in_memory=on", "data.batch_size=32", *base]
            ),
        }
        modules = {key: prepare(c)[0] for key, c in paths.items()}
        print(f"data paths: {rounds} rounds; 224 px with {workers} DataLoader workers", flush=True)
        for r in range(rounds):
            for (size, path), c in paths.items():
                # 224 px steps cost ~50x a 32 px step on a CPU: fewer of them
                n = steps if size == "32px" else max(4, steps // 6)
                out[size][path].append(
                    _images_per_s(c, modules[(size, path)], n, min(warmup, 2) if size == "224px" else warmup)
                )
            print(
                "  round "
                + str(r + 1)
                + ": "
                + ", ".join(f"{s} {p} {v[-1]:.0f} img/s" for s, d in out.items() for p, v in d.items()),
                flush=True,
            )
    out["ratios"] = {
        "32 px folder / data=sample": statistics.median(
            f / s for f, s in zip(out["32px"]["folder"], out["32px"]["sample"], strict=True)
        ),
        "224 px files (workers) / pre-decoded": statistics.median(
            f / m for f, m in zip(out["224px"]["files"], out["224px"]["in_memory"], strict=True)
        ),
    }
    out["workers"] = workers
    return out
