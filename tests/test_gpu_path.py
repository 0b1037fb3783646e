"""The GPU path's rules, checked on CPU: what a training step may not do to a GPU (wait for it),
LRN's precision under autocast, the benchmark's fairness. The meta device stands in for the GPU:
its tensors have shapes but no values, so any read back to the host fails loudly, and every copy
from the CPU onto it is an op that can be counted."""

from __future__ import annotations

import sys

import pytest
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from vgg_ablation.config import OptimConfig
from vgg_ablation.data.batches import IGNORE, TensorBatches
from vgg_ablation.nets.models import AlexNetLRN, build_model
from vgg_ablation.training.module import Classifier, FiniteCheck, NonFiniteLoss


class HostToDevice(TorchDispatchMode):
    """Counts the ops that take a CPU tensor and make a meta one: host-to-device copies. Tensors
    built from Python values on the device (torch.tensor(..., device=...)) skip the dispatcher:
    a function mode inside catches those."""

    def __init__(self):
        super().__init__()
        self.copies: list[str] = []
        outer = self

        class FromPython(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func in (torch.tensor, torch.as_tensor) and str(kwargs.get("device", "cpu")) != "cpu":
                    outer.copies.append(f"{func.__name__} from Python values")
                return func(*args, **kwargs)

        self.from_python = FromPython()

    def __enter__(self):
        self.from_python.__enter__()
        return super().__enter__()

    def __exit__(self, *exc):
        super().__exit__(*exc)
        return self.from_python.__exit__(*exc)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = [a for a in torch.utils._pytree.tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
        outputs = [o for o in torch.utils._pytree.tree_leaves(out) if isinstance(o, torch.Tensor)]
        if any(t.device.type == "cpu" and t.dim() > 0 for t in inputs) and any(
            o.device.type == "meta" for o in outputs
        ):
            self.copies.append(str(func))
        return out


def meta_batches(n=200, batch=32, train=True):
    images = torch.empty(n, 3, 32, 32, dtype=torch.uint8, device="meta")
    labels = torch.empty(n, dtype=torch.long, device="meta")
    mean, std = torch.full((3,), 0.5), torch.full((3,), 0.25)
    return TensorBatches(images, labels, mean, std, batch, train=train, augment=True, seed=1)


def test_an_epoch_of_augmented_batches_costs_one_host_to_device_copy():
    batches = meta_batches()
    with HostToDevice() as watch:
        got = [(x.shape, y.shape) for x, y in batches]  # two epochs' worth of draws, one copy each
        got += [(x.shape, y.shape) for x, y in batches]
    assert len(got) == 2 * (200 // 32) and got[0] == ((32, 3, 32, 32), (32,))
    assert len(watch.copies) == 2, watch.copies


def test_epoch_draws_are_the_same_whatever_the_device():
    cpu = TensorBatches(torch.zeros(50, 3, 32, 32, dtype=torch.uint8), torch.zeros(50, dtype=torch.long),
                        torch.zeros(3), torch.ones(3), 10, train=True, augment=True, seed=4)  # fmt: skip
    meta = meta_batches(n=50, batch=10)
    draws = [b.epoch_draws(50, torch.Generator().manual_seed(7)) for b in (cpu, meta)]
    assert torch.equal(*draws) and draws[0].shape == (4, 50)
    assert set(draws[0][3].tolist()) == {0, 1} and draws[0][1:3].max() == 8  # offsets 0..2*pad


def test_evaluation_batches_have_one_shape_and_padding_counts_nowhere():
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(20) % 3
    batches = TensorBatches(
        images, labels, torch.zeros(3), torch.ones(3), 16, train=False, augment=True, seed=0
    )
    (x1, y1), (x2, y2) = list(batches)
    assert x1.shape == x2.shape == (16, 3, 32, 32)
    assert torch.equal(y2[:4], labels[16:]) and (y2[4:] == IGNORE).all()
    module = Classifier(build_model("A", num_classes=3, input_size=32, width=1 / 16), OptimConfig())
    module.eval()
    with torch.no_grad():
        module.validation_step((x1, y1), 0)
        module.validation_step((x2, y2), 1)
        # the same images, unpadded: the sums must agree
        module._sums["ref"] = module._sums.pop("val")
        module.validation_step((x2[:4], y2[:4]), 1)
        module.validation_step((x1, y1), 0)
    torch.testing.assert_close(module._sums["val"], module._sums["ref"])
    assert module._sums["val"][3].item() == 20


def test_a_training_step_reads_nothing_back_from_the_device():
    with torch.device("meta"):
        model = build_model("A-LRN", num_classes=10, input_size=32, width=1 / 16)
    module = Classifier(model, OptimConfig())
    batch = next(iter(meta_batches()))
    with HostToDevice() as watch:
        for step in range(1, 25):  # the steps between two finiteness checks
            loss = module.training_step(batch, step)  # a read (.item(), bool()) on meta raises
            loss.backward()
    assert watch.copies == [] and module._sums["train"].device.type == "meta"


def test_finite_check_catches_a_nan_loss_on_cpu():
    check = FiniteCheck()
    check.check(torch.tensor(1.0), "at step 0")
    with pytest.raises(NonFiniteLoss, match="at step 25"):
        check.check(torch.tensor(float("nan")), "at step 25")


def hand_lrn(a: torch.Tensor, n=5, alpha=1e-4, beta=0.75, k=2.0) -> torch.Tensor:
    """AlexNet's formula, channel by channel."""
    out = torch.empty_like(a)
    for i in range(a.shape[1]):
        lo, hi = max(0, i - n // 2), min(a.shape[1], i + n // 2 + 1)
        out[:, i] = a[:, i] / (k + alpha * (a[:, lo:hi] ** 2).sum(1)) ** beta
    return out


def test_lrn_under_bf16_autocast_is_computed_in_fp32():
    torch.manual_seed(0)
    # activations where alpha * window is ~1e-3: below bf16's resolution at k = 2 (0.0156)
    a = (torch.rand(2, 8, 5, 5) * 2).to(torch.bfloat16)
    layer = AlexNetLRN()
    reference = hand_lrn(a.float())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = layer(a)
        denominator_in_bf16 = layer.k + layer.alpha * torch.nn.functional.conv2d(
            a * a, torch.ones(8, 8, 1, 1, dtype=torch.bfloat16).triu(-2).tril(2)
        )
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, reference.to(torch.bfloat16))  # fp32 maths, one rounding at the end
    torch.testing.assert_close(layer(a.float()), reference)
    # what the layer guards against: in bf16 the denominator's alpha term rounds away entirely
    assert (denominator_in_bf16 == layer.k).all()


def test_both_benchmark_paths_time_between_the_same_two_syncs(tmp_path):
    from vgg_ablation.commands import bench
    from vgg_ablation.config import compose

    cfg = compose(["model.width=0.0625", "data.batch_size=8", "optim.schedule=none", "trainer.progress_bar=false",
                   "data.input_size=32"])  # fmt: skip
    from vgg_ablation.training.build import model_for, prepare

    batches = bench.synthetic_batches(cfg, torch.device("cpu"), n=2)
    datamodule, _ = prepare(cfg)
    before = bench.Stopwatch.syncs
    plain = bench.plain_loop(
        cfg, model_for(cfg, "A", datamodule), batches, 6, 2, torch.device("cpu"), "32-true", False
    )
    plain_syncs = bench.Stopwatch.syncs - before
    lightning = bench.lightning_path(
        cfg, model_for(cfg, "A", datamodule), bench.Cycle(batches, 8), 6, 2, tmp_path
    )
    lightning_syncs = bench.Stopwatch.syncs - before - plain_syncs
    assert plain_syncs == lightning_syncs == 2 and plain > 0 and lightning > 0


@pytest.mark.slow
@pytest.mark.long
def test_the_gpu_check_dry_run_writes_and_prints_every_figure(tmp_path):
    import os
    import subprocess
    import zipfile
    from pathlib import Path

    repo = Path(__file__).parent.parent
    env = {
        **os.environ,
        "OUT": str(tmp_path / "out"),
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    proc = subprocess.run(["bash", ".ci/gpu-check.sh", "--dry-run"], cwd=repo, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = tmp_path / "out"
    names = sorted(p.name for p in out.iterdir())
    assert names == ["bench-cpu-d224.md", "bench-cpu-e32.md", "cifar10-gpu-runs.csv", "cifar10-gpu.md",
                     "gpu-check.json", "gpu-check.log", "gpu-check.md", "study-report.zip"]  # fmt: skip
    assert len(names) <= 8  # what the GPU machine sends back
    summary = (out / "gpu-check.md").read_text()
    for figure in ("MFU", "Lightning path / plain loop", "host-sync warnings", "GPU study", "projected"):
        assert figure in summary and figure in proc.stdout, figure
    # the GPU study ran its looks until the cap (half a minute in the dry run) and wrote its report
    assert "stopped: time limit (0.5 min) reached" in proc.stdout, proc.stdout[-3000:]
    report = (out / "cifar10-gpu.md").read_text()
    assert (
        "Stopped: time limit (0.5 min) reached" in report and "## The paper's conclusions, tested" in report
    )
    assert (out / "cifar10-gpu-runs.csv").read_text().startswith("net,arch,seed,status")
    packed = zipfile.ZipFile(out / "study-report.zip").namelist()
    assert (
        "study.log" in packed
        and "bench-cpu-e32.json" in packed
        and "cifar10-gpu-error-vs-depth.png" in packed
    )
    assert not (repo / "reports" / "gpu-check").exists()
