"""The LightningModule: image classification with the paper's recipe as the default.

SGD, momentum 0.9, weight decay 5e-4, lr 1e-2 divided by 10 when validation top-1 accuracy stops
improving (section 3.1); cosine and step schedules selectable. Logs loss, top-1/top-5 accuracy
and error on train, val and test.
"""

from __future__ import annotations

import math

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from vgg_ablation.config import OptimConfig
from vgg_ablation.data.batches import IGNORE


class NonFiniteLoss(RuntimeError):
    """Training diverged: the loss became NaN or infinite."""


def topk_correct(logits: torch.Tensor, target: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits.shape[1])
    return (logits.topk(k, dim=1).indices == target[:, None]).any(1).sum()


class FiniteCheck:
    """Raises NonFiniteLoss when a loss handed to `check` was NaN or infinite, without a host sync.

    On a CPU the loss is read at once. On a GPU `check` copies isfinite(loss) into pinned host
    memory without waiting and records an event; the flag is read at a later call, once that
    event has completed (a query, not a wait). A diverged run is caught one check late."""

    def __init__(self):
        self._pending: tuple[torch.Tensor, torch.cuda.Event, str] | None = None

    def check(self, loss: torch.Tensor, where: str) -> None:
        if loss.device.type != "cuda":
            if not torch.isfinite(loss):
                raise NonFiniteLoss(f"loss became {loss.item()} {where}")
            return
        if self._pending is not None and self._pending[1].query():
            flag, _, seen_where = self._pending
            self._pending = None
            if not flag.item():  # a host tensor: no device sync
                raise NonFiniteLoss(f"loss became non-finite {seen_where}")
        if self._pending is None:
            flag = torch.empty((), dtype=torch.bool, pin_memory=True)
            flag.copy_(torch.isfinite(loss.detach()), non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (flag, event, where)


class Classifier(pl.LightningModule):
    def __init__(
        self, model: nn.Module, optim: OptimConfig, channels_last: bool = False, lr: float | None = None
    ):
        super().__init__()
        self.model = model
        self.optim = optim
        self.lr = optim.lr if lr is None else lr  # this net's own (optim.lr_per_arch), else optim.lr
        self.channels_last = channels_last
        # Sums over an epoch, kept as tensors on the device: one sync per epoch, not per step.
        self._sums: dict[str, torch.Tensor] = {}
        self._finite = FiniteCheck()
        self._best_val = 0.0  # best validation top-1 so far (checkpointed: a resume keeps it)
        self._missed_plateau_step: float | None = None  # see on_train_start

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def _step(self, batch, split: str) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        # Padding images (label IGNORE, evaluation's short last batch) count nowhere: cross-entropy
        # skips their label, and no logit index equals it.
        loss = F.cross_entropy(logits, y, ignore_index=IGNORE)
        real = (y != IGNORE).sum()  # a device tensor: nothing here reads back to the host
        stats = torch.stack(
            [
                loss.detach().float() * real,
                topk_correct(logits.detach(), y, 1).float(),
                topk_correct(logits.detach(), y, 5).float(),
                real.float(),
            ]
        )
        self._sums[split] = self._sums.get(split, 0) + stats
        return loss

    def training_step(self, batch, batch_idx: int) -> torch.Tensor:
        loss = self._step(batch, "train")
        # Every 25 steps (once the weights are NaN, every later loss is too), without making the
        # host wait: on a GPU the check reads a flag copied 25 steps earlier; the epoch's sum is
        # checked at its end.
        if batch_idx % 25 == 0:
            self._finite.check(loss, f"at epoch {self.current_epoch}, step {self.global_step}")
        return loss

    def validation_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "val")

    def test_step(self, batch, batch_idx: int) -> None:
        self._step(batch, "test")

    def _log_epoch(self, split: str) -> None:
        sums = self._sums.pop(split, None)
        if sums is None:
            return
        if self.trainer.world_size > 1:  # DDP: every rank's share of the images, summed
            sums = self.trainer.strategy.reduce(sums, reduce_op="sum")
        loss, top1, top5, n = (sums / sums[3]).tolist()[:3] + [sums[3].item()]
        metrics = {
            f"{split}/loss": loss,
            f"{split}/acc1": top1,
            f"{split}/acc5": top5,
            f"{split}/err1": 1 - top1,
            f"{split}/err5": 1 - top5,
        }
        if split == "test":  # how many images the test figures rest on (for the chance test)
            metrics["test/images"] = n
        if split == "val":  # best so far beside the last epoch's (what checkpointing selects on)
            self._best_val = max(self._best_val, top1)
            metrics["val/acc1_best"] = self._best_val
        # Values are already reduced over the epoch and the ranks (every rank holds the same ones:
        # sync_dist's mean leaves them as they are, and Lightning asks for it under DDP);
        # Lightning forwards them to the logger once per epoch.
        self.log_dict(metrics, prog_bar=split != "test", sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["best_val_acc1"] = self._best_val
        # Dropout's draws come from torch's global generator, which Lightning does not keep: a
        # resumed run would restart them from the seed and differ from the uninterrupted one.
        checkpoint["rng_cpu"] = torch.get_rng_state()
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            checkpoint["rng_cuda"] = torch.cuda.get_rng_state_all()
        monitored = self.trainer.callback_metrics.get("val/acc1")  # what a plateau schedule judges
        if monitored is not None:
            checkpoint["plateau_metric"] = float(monitored)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self._best_val = checkpoint.get("best_val_acc1", 0.0)
        if "rng_cpu" in checkpoint:  # absent from checkpoints written before it was kept
            torch.set_rng_state(checkpoint["rng_cpu"])
        if len(checkpoint.get("rng_cuda", ())) == torch.cuda.device_count() > 0:  # the same GPUs
            torch.cuda.set_rng_state_all(checkpoint["rng_cuda"])
        self._missed_plateau_step = checkpoint.get("plateau_metric")

    def on_train_start(self) -> None:
        # An epoch's checkpoint is written before its end-of-epoch lr step; on resuming, Lightning
        # takes the step for a LambdaLR but not for a ReduceLROnPlateau (it keeps no metrics), so
        # that scheduler would miss one epoch's judgement and cut the lr an epoch late. Taken
        # here, with the metric the checkpoint kept. (Not after a mid-epoch checkpoint: the value
        # then is the previous epoch's, already judged.)
        loop, value = self.trainer.fit_loop, self._missed_plateau_step
        self._missed_plateau_step = None
        if value is not None and (loop.restarted_on_epoch_end or loop.resumed_on_epoch_end):
            for config in self.trainer.lr_scheduler_configs:
                if config.reduce_on_plateau:
                    config.scheduler.step(value)

    def _close_train_epoch(self) -> None:
        """The training epoch's figures and lr, once its batches are done (a second call is a no-op)."""
        if "train" not in self._sums:
            return
        if not torch.isfinite(self._sums["train"][0]):
            raise NonFiniteLoss(f"loss became non-finite during epoch {self.current_epoch}")
        self._log_epoch("train")
        self.log("lr", self.trainer.optimizers[0].param_groups[0]["lr"], sync_dist=True)

    def on_train_epoch_end(self) -> None:
        self._close_train_epoch()  # an epoch without validation (limit_val_batches=0)

    def on_validation_epoch_end(self) -> None:
        # Validation runs once an epoch's batches are done (the project sets no val_check_interval),
        # and the epoch's checkpoints are written after it (by the checkpoint callbacks'
        # on_train_epoch_end), but before Lightning hands the training epoch's figures to the
        # logger: they go here, with the validation ones, so a process killed just after a
        # checkpoint never resumes past an epoch whose training figures it lost.
        if not self.trainer.sanity_checking:
            self._close_train_epoch()
        self._log_epoch("val")

    def on_test_epoch_end(self) -> None:
        self._log_epoch("test")

    def configure_optimizers(self):
        o = self.optim
        decay, no_decay = [], []
        for p in self.model.parameters():
            (no_decay if p.ndim <= 1 else decay).append(p)
        # Weight decay on weights only (biases and BN parameters are not regularised).
        optimizer = torch.optim.SGD(
            [{"params": decay, "weight_decay": o.weight_decay}, {"params": no_decay, "weight_decay": 0}],
            lr=self.lr,
            momentum=o.momentum,
        )
        epochs = max(1, self.trainer.max_epochs or 1)
        if o.schedule == "plateau":
            scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode="max", factor=0.1, patience=o.plateau_patience
            )
            return {
                "optimizer": optimizer,
                "lr_scheduler": {"scheduler": scheduler, "monitor": "val/acc1", "interval": "epoch"},
            }
        # The warm-up, cosine and step schedules as closed forms in one LambdaLR, not torch's LinearLR
        # + CosineAnnealingLR in a SequentialLR (or StepLR): those give the same lr, epoch by epoch,
        # to within 7e-16 of it (measured for 20-90 epochs, 0-5 warm-up), but their state in a
        # checkpoint is another shape, and every checkpoint a study has written (archives carry the
        # unfinished cells' ones) holds LambdaLR's: switching would stop those cells resuming.
        warm = o.warmup_epochs
        if o.schedule == "cosine":

            def factor(e: int) -> float:
                if e < warm:
                    return (e + 1) / (warm + 1)
                return 0.5 * (1 + math.cos(math.pi * (e - warm) / max(1, epochs - warm)))
        elif o.schedule == "step":

            def factor(e: int) -> float:
                return 0.1 ** (e // o.step_every)
        else:

            def factor(e: int) -> float:
                return 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
