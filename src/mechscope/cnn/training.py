"""Training and evaluating the CNN on an image dataset (MNIST by default)."""

from __future__ import annotations

import ctypes
import logging
import math
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from tqdm import tqdm

from mechscope.cnn.config import TrainConfig
from mechscope.cnn.data.images import ImageDataset
from mechscope.cnn.data.mnist import MNIST
from mechscope.cnn.models.cnn import CNN, CNNConfig
from mechscope.core.errors import MechscopeError
from mechscope.core.results import Result
from mechscope.core.torch_utils import Timer, WorkCounter, evaluating, n_parameters

log = logging.getLogger(__name__)


class TrainingDiverged(MechscopeError):
    """Training produced a non-finite loss or weights: nothing is written."""

    def __init__(self, what: str) -> None:
        super().__init__(f"training diverged: {what}; try a smaller --lr (nothing was written)")


@dataclass(frozen=True)
class Evaluation:
    accuracy: float
    loss: float
    per_class_accuracy: list[float]
    confusion_matrix: list[list[int]]  # [true class][predicted class]

    def to_dict(self) -> dict:
        return {
            "test_accuracy": self.accuracy,
            "test_loss": self.loss,
            "per_class_accuracy": self.per_class_accuracy,
            "confusion_matrix": self.confusion_matrix,
        }


@dataclass(frozen=True)
class TrainResult:
    """What :func:`train_cnn` returns: the trained model and its measurements."""

    model: CNN
    evaluation: Evaluation
    train_seconds: float
    steps: int
    history: list[dict] = field(default_factory=list)
    work: dict | None = None  # forward and backward passes, in passes over the training images (WorkCounter)


@dataclass(frozen=True)
class RunMetrics(Result):
    """A run's ``metrics.json``: the test-set evaluation and how training went."""

    SCHEMA = "mechscope.cnn-metrics/1"
    FILE = "metrics.json"

    test_accuracy: float
    test_loss: float
    per_class_accuracy: list[float]
    confusion_matrix: list[list[int]]  # [true class][predicted class]
    train_seconds: float
    n_parameters: int
    steps: int
    history: list[dict]
    class_names: list[str]
    # forward and backward passes, in passes over the training images (WorkCounter): the training steps' batches
    # forward and back, then the test images forward once (the evaluation)
    work: dict | None = None

    @classmethod
    def of(cls, trained: TrainResult, class_names) -> RunMetrics:
        e = trained.evaluation
        return cls(e.accuracy, e.loss, e.per_class_accuracy, e.confusion_matrix, trained.train_seconds,
                   n_parameters(trained.model), trained.steps, trained.history, list(class_names),
                   trained.work)  # fmt: skip


@torch.no_grad()
def predict_logits(model: torch.nn.Module, images: torch.Tensor, batch_size: int = 2000) -> torch.Tensor:
    """Logits [n, classes] for float images [n, C, H, W]; the model's train/eval mode is restored."""
    with evaluating(model):
        return torch.cat([model(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def evaluate(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, n_classes: int = 10) -> Evaluation:
    logits = predict_logits(model, images)
    loss = F.cross_entropy(logits, labels).item()
    pred = logits.argmax(1)
    confusion = torch.zeros(n_classes, n_classes, dtype=torch.int64)
    confusion.index_put_((labels, pred), torch.ones_like(labels), accumulate=True)
    per_class = (confusion.diag().double() / confusion.sum(1).clamp(min=1).double()).tolist()
    return Evaluation(
        accuracy=(pred == labels).double().mean().item(),
        loss=loss,
        per_class_accuracy=per_class,
        confusion_matrix=confusion.tolist(),
    )


def keep_freed_memory() -> bool:
    """Ask glibc to keep freed memory instead of returning it to the OS after every step.

    Training allocates and frees the same few-megabyte activation buffers at every step. With
    glibc's defaults they are mmap'ed and trimmed back each time, and the page faults to get
    them again cost about 40% of a training run's time on this CPU (measured: 59.5 s against
    40.0 s for the same run). Raising the mmap and trim thresholds, as MALLOC_MMAP_THRESHOLD_ and
    MALLOC_TRIM_THRESHOLD_ would, removes that. No-op where libc is not glibc.

    This changes the whole process's allocator, so the library never calls it: the training CLI
    opts in (``mechscope cnn train``; ``--no-malloc-tuning`` opts out) and so do the benchmarks.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3
        ok_trim = libc.mallopt(m_trim_threshold, 1 << 30)
        ok_mmap = libc.mallopt(m_mmap_threshold, 32 << 20)  # glibc's maximum on 64-bit
        return bool(ok_trim and ok_mmap)
    except (OSError, AttributeError):
        return False


def random_shift(images: torch.Tensor, max_shift: int, generator: torch.Generator) -> torch.Tensor:
    """Translate each image [B, C, H, W] by its own random (dy, dx) in [-max_shift, max_shift], zero-filled."""
    b, c, h, w = images.shape
    padded = F.pad(images, (max_shift,) * 4)  # [B, C, H + 2s, W + 2s]
    oy, ox = torch.randint(0, 2 * max_shift + 1, (2, b, 1), generator=generator)
    rows = (oy + torch.arange(h)).view(b, 1, h, 1).expand(b, c, h, w + 2 * max_shift)
    out = padded.gather(2, rows)  # [B, C, H, W + 2s]
    cols = (ox + torch.arange(w)).view(b, 1, 1, w).expand(b, c, h, w)
    return out.gather(3, cols)  # [B, C, H, W]


def _splits(data: ImageDataset | MNIST) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train images, train labels, test images, test labels), images float [n, C, H, W]."""
    to_float = MNIST.to_float if isinstance(data, MNIST) else ImageDataset.to_float
    return to_float(data.train_images), data.train_labels, to_float(data.test_images), data.test_labels


def model_config_for(data: ImageDataset, base: CNNConfig | None = None) -> CNNConfig:
    """``base`` (the network's shape) fitted to the data: channels, size, classes, normalisation.

    MNIST keeps the published mean and std of its training pixels (0.1307, 0.3081, the default);
    other data get the mean and std of their own training images, one per channel.
    """
    base = base or CNNConfig()
    c, h, _ = data.shape
    mean, std = base.mean, base.std
    if data.name != "mnist":
        x = data.train_float().double()  # [N, C, H, W]
        m, s = x.mean((0, 2, 3)), x.std((0, 2, 3)).clamp(min=1e-3)
        mean, std = (round(float(m[0]), 4), round(float(s[0]), 4)) if c == 1 else (
            tuple(round(float(v), 4) for v in m), tuple(round(float(v), 4) for v in s))  # fmt: skip
    return replace(base, in_channels=c, image_size=h, n_classes=data.n_classes, mean=mean, std=std)


def train_cnn(
    data: ImageDataset | MNIST,
    config: TrainConfig | None = None,
    model_config: CNNConfig | None = None,
    progress: bool = True,
) -> TrainResult:
    """Train a :class:`CNN` on the training split; evaluate on the test split.

    ``model_config`` defaults to the default network fitted to the data (:func:`model_config_for`).
    Deterministic for a given seed on a given machine: the initial weights come from
    ``torch.manual_seed(seed)`` (inside ``fork_rng``: the global generator is restored afterwards)
    and the batch order and shifts from a generator seeded with it.
    """
    config = config or TrainConfig()
    config.validate()
    if model_config is None and isinstance(data, ImageDataset):
        model_config = model_config_for(data)
    with torch.random.fork_rng(devices=[]):  # the seed sets the initial weights; the caller's RNG is left alone
        torch.manual_seed(config.seed)
        model = CNN(model_config)
    # channels_last makes oneDNN's convolutions about 30% faster on CPU; numerics are the same model
    model = model.to(memory_format=torch.channels_last)
    generator = torch.Generator().manual_seed(config.seed)

    images, labels, test_images, test_labels = _splits(data)
    if config.train_limit is not None:
        images, labels = images[: config.train_limit], labels[: config.train_limit]
    n = len(images)
    steps_per_epoch = max(1, n // config.batch_size)  # drop the ragged last batch
    total = steps_per_epoch * config.epochs
    if config.max_steps is not None:
        total = min(total, config.max_steps)

    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    warmup = config.warmup_fraction
    if warmup * total == 1:  # torch's one-cycle schedule divides by zero when the warm-up is exactly one step
        warmup = 2 / total
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=config.lr, total_steps=total, pct_start=warmup)
    log.info("training %d parameters for %d steps on %d images", n_parameters(model), total, n)
    history: list[dict] = []
    step = 0
    model.train()
    # images through the stages' convolutions (as CNNSpec.work_counter counts them), training and evaluation
    counter = WorkCounter([block.conv for block in model.stages], "images")
    clock = Timer()  # seconds since the start of training
    with counter.counting(), tqdm(total=total, desc="train", unit="step", disable=not progress, leave=False) as bar:
        for epoch in range(config.epochs):
            order = torch.randperm(n, generator=generator)
            running, count = 0.0, 0
            for i in range(steps_per_epoch):
                if step >= total:
                    break
                idx = order[i * config.batch_size : (i + 1) * config.batch_size]
                batch = images[idx]
                if config.shift:
                    batch = random_shift(batch, config.shift, generator)
                loss = F.cross_entropy(model(batch), labels[idx], label_smoothing=config.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                schedule.step()
                step += 1
                value = loss.item()
                if not math.isfinite(value):
                    raise TrainingDiverged(f"the training loss is {value} at step {step} (peak --lr {config.lr:g})")
                running += value
                count += 1
                bar.update(1)
                if step % 50 == 0:
                    bar.set_postfix(epoch=epoch + 1, loss=f"{running / count:.4f}")
            if count:
                history.append(
                    {
                        "epoch": epoch + 1,
                        "step": step,
                        "train_loss": running / count,
                        "seconds": clock.total(),
                    }
                )
            if step >= total:
                break
    train_seconds = clock.total()
    uniform = math.log(model.config.n_classes)
    if history and history[-1]["train_loss"] > 1.5 * uniform:
        log.warning(
            "the training loss ended at %.3g, above the %.3g of guessing every class alike: training diverged "
            "(peak --lr %g too high?)", history[-1]["train_loss"], uniform, config.lr,
        )  # fmt: skip
    model = model.to(memory_format=torch.contiguous_format).eval()
    bad = [name for name, p in model.state_dict().items() if p.is_floating_point() and not torch.isfinite(p).all()]
    if bad:
        raise TrainingDiverged(f"non-finite weights after training ({', '.join(bad[:3])}; peak --lr {config.lr:g})")
    with counter.counting():
        evaluation = evaluate(model, test_images, test_labels, model.config.n_classes)
    log.info("test accuracy %.4f after %.1f s", evaluation.accuracy, train_seconds)
    return TrainResult(model, evaluation, train_seconds, step, history, counter.report("cnn train", n))
