"""fastai pieces: DataLoaders, multi-task loss, the paper's metrics, epoch table, Learner."""

from __future__ import annotations

import csv
import operator
import time
from collections.abc import Callable
from pathlib import Path

import fastai.callback.fp16
import fastai.callback.schedule
import torch
from fastai.callback.core import Callback
from fastai.callback.progress import ProgressCallback
from fastai.data.block import CategoryBlock, DataBlock, MultiCategoryBlock
from fastai.data.transforms import IndexSplitter, Normalize
from fastai.learner import AvgMetric, Learner, Recorder
from fastai.vision.augment import Resize, aug_transforms
from fastai.vision.data import ImageBlock
from fastcore.basics import noop
from torch import nn

from fashionrec_embedder.network import MultiTaskNet, body_and_heads
from fashionrec_embedder.preprocess import Normalisation
from fashionrec_embedder.training.data import Sample, TrainingData

# Imported for their side effect: they add Learner.to_fp16 and Learner.fit_one_cycle.
_LEARNER_PATCHES = (fastai.callback.fp16, fastai.callback.schedule)

COLUMNS = (
    "epoch",
    "train_loss",
    "valid_loss",
    "category_accuracy",
    "attr_accuracy_multi",
    "attr_fbeta",
    "time",
)


class _Attributes:
    """get_y of one attribute head (a picklable callable, unlike a lambda)."""

    def __init__(self, head: str) -> None:
        self.head = head

    def __call__(self, sample: Sample) -> list[str]:
        return list(sample.attributes.get(self.head, ()))


def build_dataloaders(
    data: TrainingData,
    *,
    norm: Normalisation,
    image_size: int,
    batch_size: int,
    device: torch.device,
    num_workers: int = 0,
    augment: bool = True,
):  # type: ignore[no-untyped-def]
    """fastai DataLoaders yielding (image, category, *attribute one-hots) for splits train/val.

    Resize crops the square the serving code uses (shorter side, centre crop on validation; a
    random crop position on training), then light GPU-side augmentation and ImageNet stats.
    """
    heads = data.heads()
    items = data.split("train") + data.split("val")
    valid_idx = list(range(len(data.split("train")), len(items)))
    # sort=False: the head's outputs must follow the class order the exported config lists.
    blocks = [ImageBlock, CategoryBlock(vocab=list(heads[0].classes), sort=False)]
    blocks += [MultiCategoryBlock(vocab=list(h.classes)) for h in heads[1:]]
    getters = [operator.attrgetter("image"), operator.attrgetter("category")]
    getters += [_Attributes(h.name) for h in heads[1:]]
    batch_tfms = []
    if augment:
        batch_tfms += aug_transforms(
            do_flip=True, max_rotate=5.0, max_zoom=1.05, max_lighting=0.1, max_warp=0.0
        )
    # The backbone's own normalisation, as serving applies it (preprocess.py).
    batch_tfms.append(Normalize.from_stats(list(norm.mean), list(norm.std)))
    block = DataBlock(
        blocks=blocks,
        getters=getters,
        n_inp=1,
        splitter=IndexSplitter(valid_idx),
        item_tfms=Resize(image_size),
        batch_tfms=batch_tfms,
    )
    return block.dataloaders(items, bs=batch_size, num_workers=num_workers, device=device)


def _plain(x: torch.Tensor) -> torch.Tensor:
    # fastai's tensor subclasses carry metadata; plain tensors keep the losses simple.
    return x.as_subclass(torch.Tensor)


class MultiTaskLoss:
    """Cross-entropy for the category head + BCE-with-logits per attribute head, summed."""

    def __init__(self) -> None:
        self.ce = nn.CrossEntropyLoss()
        self.bce = nn.BCEWithLogitsLoss()

    def __call__(self, preds: tuple[torch.Tensor, ...], *targets: torch.Tensor) -> torch.Tensor:
        loss = self.ce(_plain(preds[0]).float(), _plain(targets[0]).long())
        for pred, target in zip(preds[1:], targets[1:], strict=True):
            loss = loss + self.bce(_plain(pred).float(), _plain(target).float())
        return loss


def category_accuracy(preds: tuple[torch.Tensor, ...], *targets: torch.Tensor) -> torch.Tensor:
    return (_plain(preds[0]).argmax(dim=1) == _plain(targets[0])).float().mean()


def _attributes(preds: tuple, targets: tuple) -> tuple[torch.Tensor, torch.Tensor]:
    probs = torch.cat([_plain(p).float().sigmoid() for p in preds[1:]], dim=1)
    truth = torch.cat([_plain(t).float() for t in targets[1:]], dim=1)
    return probs, truth


def attribute_metrics(threshold: float, beta: float = 2.0) -> list[AvgMetric]:
    """accuracy_multi and sample-averaged F-beta over all attribute heads (fastai v1's fbeta)."""

    def attr_accuracy_multi(preds: tuple, *targets: torch.Tensor) -> torch.Tensor:
        probs, truth = _attributes(preds, targets)
        return ((probs > threshold).float() == truth).float().mean()

    def attr_fbeta(preds: tuple, *targets: torch.Tensor) -> torch.Tensor:
        probs, truth = _attributes(preds, targets)
        predicted = (probs > threshold).float()
        eps = 1e-9
        tp = (predicted * truth).sum(dim=1)
        precision = tp / (predicted.sum(dim=1) + eps)
        recall = tp / (truth.sum(dim=1) + eps)
        b2 = beta * beta
        return ((1 + b2) * precision * recall / (b2 * precision + recall + eps)).mean()

    return [AvgMetric(attr_accuracy_multi), AvgMetric(attr_fbeta)]


def _cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.6f}"
    return str(value)


class EpochTable(Callback):
    """Prints the paper's per-epoch table and writes it as CSV, numbering epochs across the
    frozen and unfrozen stages (fastai's own CSVLogger restarts per fit and repeats its header).
    """

    order = Recorder.order + 1  # after the Recorder has filled its log for the epoch

    def __init__(self, path: Path, echo: Callable[[str], object] = print) -> None:
        self.path, self.echo = Path(path), echo
        self.rows: list[dict[str, object]] = []
        self.seconds: list[float] = []  # wall time of each epoch (training + validation)
        self._started = 0.0
        self._trained = False

    def before_fit(self) -> None:
        self.learn.logger = noop  # the Recorder would print its raw list too

    def before_epoch(self) -> None:
        self._started = time.perf_counter()
        self._trained = False

    def before_train(self) -> None:
        self._trained = True

    def after_epoch(self) -> None:
        if not self._trained:  # `Learner.validate()` runs epoch events too; not a row
            return
        if not self.rows:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.echo("  ".join(f"{c:>19}" if i else f"{c:>5}" for i, c in enumerate(COLUMNS)))
        self.seconds.append(time.perf_counter() - self._started)
        recorder = self.learn.recorder
        logged = dict(zip(recorder.metric_names, recorder.log, strict=False))
        row: dict[str, object] = {c: logged.get(c) for c in COLUMNS}
        row["epoch"] = len(self.rows)
        for column in COLUMNS[1:-1]:
            if row[column] is not None:
                row[column] = float(row[column])  # type: ignore[arg-type]
        self.rows.append(row)
        self.echo(
            "  ".join(
                f"{_cell(row[c]):>19}" if i else f"{row[c]:>5}" for i, c in enumerate(COLUMNS)
            )
        )
        with self.path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(COLUMNS)
            writer.writerows([[_cell(r[c]) for c in COLUMNS] for r in self.rows])


class KeepBest(Callback):
    """Remembers the weights of the epoch with the lowest validation loss; `restore()` puts them
    back before export. Kept in memory (no checkpoint pickles), so an epoch that overfits, or an
    unfrozen epoch that upsets a weak body's BatchNorm statistics, never reaches the artifact.
    """

    order = Recorder.order + 1  # after the Recorder has the epoch's validation loss

    def __init__(self) -> None:
        self.best_loss = float("inf")
        self.best_epoch: int | None = None
        self._state: dict[str, torch.Tensor] | None = None
        self._epoch = -1  # numbered across the frozen and unfrozen stages, like EpochTable
        self._trained = False

    def before_epoch(self) -> None:
        self._trained = False

    def before_train(self) -> None:
        self._trained = True

    def after_epoch(self) -> None:
        if not self._trained:  # `Learner.validate()` runs epoch events too
            return
        self._epoch += 1
        recorder = self.learn.recorder
        valid_loss = float(
            dict(zip(recorder.metric_names, recorder.log, strict=False))["valid_loss"]
        )
        if valid_loss < self.best_loss:
            self.best_loss, self.best_epoch = valid_loss, self._epoch
            self._state = {
                k: v.detach().to("cpu", copy=True) for k, v in self.learn.model.state_dict().items()
            }

    def restore(self) -> None:
        if self._state is not None:
            self.learn.model.load_state_dict(self._state)


class FrozenBodyStatistics(Callback):
    """While the body is frozen, its BatchNorm layers keep their running statistics (eval mode).

    fastai leaves frozen BatchNorm layers in training mode, so the body's features are
    normalised with each small batch's statistics while the heads learn, and the running
    statistics drift under the heads. Keeping them fixed makes the frozen stage train the heads
    on exactly the features validation and serving see.
    """

    order = 1  # after TrainEvalCallback has put the model in training mode

    def before_train(self) -> None:
        body = self.learn.model.body
        if not any(
            p.requires_grad
            for m in body.modules()
            if isinstance(m, nn.Conv2d)
            for p in m.parameters()
        ):
            for module in body.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()


def build_learner(
    dls,  # type: ignore[no-untyped-def]
    model: MultiTaskNet,
    *,
    out: Path,
    threshold: float,
    table: EpochTable,
) -> Learner:
    metrics: list = [AvgMetric(category_accuracy)]
    if len(model.heads) > 1:
        metrics += attribute_metrics(threshold)
    learn = Learner(
        dls,
        model,
        loss_func=MultiTaskLoss(),
        metrics=metrics,
        splitter=body_and_heads,
        path=out,
        model_dir=".",
        cbs=[FrozenBodyStatistics(), table, KeepBest()],
    )
    learn.remove_cb(ProgressCallback)  # the EpochTable prints; no per-batch bar in logs
    learn.logger = noop
    return learn


def fine_tune(learn: Learner, epochs: int, freeze_epochs: int, lr: float, lr_mult: float = 100):
    """fastai's `Learner.fine_tune`: heads with the body frozen (BatchNorm still adapts), then
    everything with discriminative learning rates (body lr/`lr_mult`); each stage one cycle.
    Either stage may be skipped with 0 epochs."""
    if freeze_epochs > 0:
        learn.freeze()
        learn.fit_one_cycle(freeze_epochs, slice(lr), pct_start=0.99)
    if epochs > 0:
        lr /= 2
        learn.unfreeze()
        learn.fit_one_cycle(epochs, slice(lr / lr_mult, lr), pct_start=0.3, div=5.0)
