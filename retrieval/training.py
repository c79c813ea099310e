"""Training on a labelled folder: the small CNN from scratch, and projection heads on cached features."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm import tqdm

from retrieval.backbones import IMAGENET_MEAN, IMAGENET_STD, BackboneSpec, preprocessing_spec
from retrieval.evaluation import evaluate_ranking, rank_by_similarity
from retrieval.extraction import l2_normalize
from retrieval.folders import LabelledFolder, open_rgb
from retrieval.preprocessing import to_tensor
from retrieval.projection import Projection
from retrieval.small_cnn import INPUT_SIZE, SmallCNN, save_checkpoint

logger = logging.getLogger(__name__)

#: SupCon's temperature (Khosla et al. 2020 use 0.1 for their supervised runs).
TEMPERATURE = 0.1
#: Projection output size: 256 floats per image keep the database small, and 10-1000 classes
#: fit in it with room to spare.
PROJECTION_DIM = 256
#: Hidden width of the MLP head.
HIDDEN_DIM = 512


@dataclass
class History:
    """Per-epoch curves, saved as JSON and drawn as PNG."""

    columns: dict[str, list[float]] = field(default_factory=dict)

    def add(self, **values: float) -> None:
        for name, value in values.items():
            self.columns.setdefault(name, []).append(float(value))


def held_out_map(vectors: np.ndarray, labels: np.ndarray, classes: Sequence[str], *, qe: int = 0) -> float:
    """Return the mAP of unit vectors queried all-against-all (self excluded), optionally with QE."""
    from retrieval.reranking import expand_queries

    itself = np.arange(len(vectors))
    ranking = rank_by_similarity(vectors, vectors, exclude=itself)
    if qe:
        ranking = rank_by_similarity(expand_queries(vectors, vectors, ranking, n=qe), vectors, exclude=itself)
    return evaluate_ranking(ranking, labels, labels, classes=classes).mean_ap


# --- the small CNN -------------------------------------------------------------------------


@dataclass(frozen=True)
class CNNResult:
    checkpoint: Path
    test_accuracy: float
    test_map: float
    history: History
    seconds: float
    real_images: int = 0
    generated_images: int = 0


@dataclass(frozen=True)
class Generated:
    """Images made by a generator, with the class each was made for: training data, never test data."""

    images: Sequence[Image.Image]
    labels: np.ndarray

    def __post_init__(self) -> None:
        if len(self.images) != len(self.labels):
            raise ValueError(f"expected one label per generated image, got {len(self.labels)} for {len(self.images)}")


def _tensor_spec(input_size: int) -> BackboneSpec:
    """A spec carrying only the preprocessing the small CNN is trained with."""
    return preprocessing_spec("small_cnn", input_size=input_size, resize="center_crop")


def _load_tensors(paths: Sequence[Path], spec: BackboneSpec, *, progress: bool) -> torch.Tensor:
    images = tqdm(paths, desc="loading images", unit="img", disable=not progress)
    return torch.stack([to_tensor(spec, open_rgb(path)) for path in images])


def train_small_cnn(
    folder: LabelledFolder,
    *,
    train_indices: np.ndarray,
    test_indices: np.ndarray,
    out_dir: Path,
    epochs: int = 30,
    batch_size: int = 32,
    learning_rate: float = 1e-3,
    input_size: int = INPUT_SIZE,
    seed: int = 0,
    generated: Generated | None = None,
    progress: bool = True,
) -> CNNResult:
    """Train the small CNN from scratch with cross-entropy; report test accuracy and retrieval mAP.

    Args:
        folder: the labelled images.
        train_indices: images to learn from.
        test_indices: images only ever used to measure (accuracy, and mAP of the flattened
            penultimate features, test images querying each other).
        out_dir: receives small_cnn.pt (rewritten after every epoch).
        epochs: passes over the training images.
        batch_size: images per step.
        learning_rate: Adam's step size.
        input_size: square input side.
        seed: seeds the initialisation and the shuffles.
        generated: images added to the training images (GAN augmentation); never tested on.
        progress: show progress bars.

    Returns:
        The checkpoint path, final test accuracy and mAP, the per-epoch history, and how many
        real and generated images it learnt from.
    """
    started = time.perf_counter()
    torch.manual_seed(seed)
    spec = _tensor_spec(input_size)
    images = _load_tensors(folder.paths, spec, progress=progress)
    labels = torch.from_numpy(folder.labels)
    train_x, train_y = images[train_indices], labels[train_indices]
    test_x, test_y = images[test_indices], labels[test_indices]
    real_images = len(train_x)
    if generated is not None and len(generated.images):
        made = torch.stack([to_tensor(spec, image) for image in generated.images])
        train_x, train_y = torch.cat([train_x, made]), torch.cat([train_y, torch.from_numpy(generated.labels)])
    model = SmallCNN(len(folder.classes), input_size=input_size)
    optimiser = torch.optim.Adam(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    loss_fn = nn.CrossEntropyLoss()
    history = History()
    checkpoint = Path(out_dir) / "small_cnn.pt"
    generator = torch.Generator().manual_seed(seed)
    for epoch in tqdm(range(1, epochs + 1), desc="small CNN", unit="epoch", disable=not progress):
        model.train()
        order = torch.randperm(len(train_x), generator=generator)
        total_loss = correct = 0.0
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            x = train_x[batch]
            flip = torch.rand(len(batch), generator=generator) < 0.5  # mirror images are the same class
            x = torch.where(flip[:, None, None, None], x.flip(3), x)
            logits = model(x)
            loss = loss_fn(logits, train_y[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total_loss += float(loss.detach()) * len(batch)
            correct += float((logits.argmax(1) == train_y[batch]).sum())
        test_loss, test_accuracy = _evaluate_classifier(model, test_x, test_y, loss_fn)
        history.add(
            epoch=epoch,
            train_loss=total_loss / len(train_x),
            train_accuracy=correct / len(train_x),
            test_loss=test_loss,
            test_accuracy=test_accuracy,
        )
        save_checkpoint(model, checkpoint, classes=folder.classes, mean=IMAGENET_MEAN, std=IMAGENET_STD, epoch=epoch)
    model.eval()
    with torch.inference_mode():
        features = torch.cat([model.penultimate(test_x[i : i + 256]) for i in range(0, len(test_x), 256)])
    test_map = held_out_map(l2_normalize(features.numpy()), folder.labels[test_indices], folder.classes)
    return CNNResult(checkpoint, history.columns["test_accuracy"][-1], test_map, history, time.perf_counter() - started,
                     real_images=real_images, generated_images=len(train_x) - real_images)


def _evaluate_classifier(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: Callable[..., torch.Tensor]
) -> tuple[float, float]:
    model.eval()
    with torch.inference_mode():
        logits = torch.cat([model(x[i : i + 256]) for i in range(0, len(x), 256)])
    return float(loss_fn(logits, y)), float((logits.argmax(1) == y).float().mean())


# --- projection heads on frozen, cached features ----------------------------------------------


def supervised_contrastive_loss(embeddings: torch.Tensor, labels: torch.Tensor, *, temperature: float) -> torch.Tensor:
    """Return SupCon (Khosla et al. 2020): each item's mean -log softmax over its same-class partners.

    Args:
        embeddings: (n, d) rows, normalised here.
        labels: (n,) class indices.
        temperature: divides the cosine similarities.

    Returns:
        The mean over items that have at least one partner in the batch.
    """
    z = nn.functional.normalize(embeddings, dim=1)
    logits = z @ z.T / temperature
    itself = torch.eye(len(z), dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(itself, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positives = (labels[:, None] == labels[None, :]) & ~itself
    counts = positives.sum(1)
    has = counts > 0
    if not has.any():
        raise ValueError("expected at least two items of one class in the batch")
    per_item = -(log_prob.masked_fill(~positives, 0.0)).sum(1)[has] / counts[has]
    return per_item.mean()


class ProjectionHead(nn.Module):
    """Linear, or Linear-ReLU-Linear, on centred unit vectors."""

    def __init__(self, kind: str, in_dim: int, out_dim: int, *, hidden: int = HIDDEN_DIM) -> None:
        super().__init__()
        if kind == "linear":
            self.layers = nn.Sequential(nn.Linear(in_dim, out_dim))
        elif kind == "mlp":
            self.layers = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, out_dim))
        else:
            raise ValueError(f"unknown projection kind {kind!r}; expected linear or mlp")
        self.kind = kind

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)

    def to_projection(self, *, mean: np.ndarray, source_key: str, notes: str) -> Projection:
        linears = [layer for layer in self.layers if isinstance(layer, nn.Linear)]
        return Projection(
            kind=self.kind,
            source_key=source_key,
            mean=mean.astype(np.float32),
            weights=tuple(layer.weight.detach().numpy().T.copy() for layer in linears),
            biases=tuple(layer.bias.detach().numpy().copy() for layer in linears),
            notes=notes,
        )


@dataclass(frozen=True)
class ProjectionRun:
    projection: Projection
    history: History


def train_projection(
    vectors: np.ndarray,
    labels: np.ndarray,
    *,
    source_key: str,
    kind: str = "linear",
    out_dim: int = PROJECTION_DIM,
    epochs: int = 40,
    batch_size: int = 256,
    learning_rate: float = 1e-3,
    seed: int = 0,
    monitor: Callable[[Projection], dict[str, float]] | None = None,
    progress: bool = True,
) -> ProjectionRun:
    """Train a projection head with the supervised contrastive loss on frozen unit vectors.

    Args:
        vectors: (n, d) unit vectors of the training images (from the feature cache).
        labels: (n,) their classes.
        source_key: the embedding-config key of `vectors`, stored with the projection.
        kind: "linear" or "mlp".
        out_dim: output size.
        epochs: passes over the vectors.
        batch_size: vectors per step; large batches give SupCon many positives and negatives.
        learning_rate: Adam's step size.
        seed: seeds initialisation and shuffles.
        monitor: called with the projection after each epoch; its numbers go into the history
            (used to draw held-out curves, never to choose an epoch).
        progress: show a progress bar.

    Returns:
        The trained projection and the per-epoch history.
    """
    torch.manual_seed(seed)
    mean = vectors.mean(axis=0)
    x = torch.from_numpy(np.asarray(vectors - mean, dtype=np.float32))
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    head = ProjectionHead(kind, x.shape[1], out_dim)
    optimiser = torch.optim.AdamW(head.parameters(), lr=learning_rate, weight_decay=1e-4)
    steps = max(1, math.ceil(len(x) / batch_size))
    history = History()
    generator = torch.Generator().manual_seed(seed)
    notes = f"{kind} SupCon head, {epochs} epochs on {len(x)} vectors of {int(y.max()) + 1} classes"
    for epoch in tqdm(range(1, epochs + 1), desc=f"{kind} projection", unit="epoch", disable=not progress):
        head.train()
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for step in range(steps):
            batch = order[step * batch_size : (step + 1) * batch_size]
            loss = supervised_contrastive_loss(head(x[batch]), y[batch], temperature=TEMPERATURE)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach())
        head.eval()
        row = {"epoch": float(epoch), "train_loss": total / steps}
        if monitor is not None:
            row.update(monitor(head.to_projection(mean=mean, source_key=source_key, notes=notes)))
        history.add(**row)
    return ProjectionRun(head.to_projection(mean=mean, source_key=source_key, notes=notes), history)


def plot_history(history: History, path: Path, *, title: str) -> Path:
    """Draw losses (left) and accuracies / mAPs (right) against the epoch, as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = history.columns
    epochs = columns.get("epoch", [])
    fig, (losses, scores) = plt.subplots(1, 2, figsize=(11, 4))
    for name, values in columns.items():
        if name == "epoch":
            continue
        axis = losses if "loss" in name else scores
        axis.plot(epochs, values, marker=".", label=name)
    losses.set(xlabel="epoch", ylabel="loss", title=f"{title}: loss")
    scores.set(xlabel="epoch", ylabel="accuracy / mAP", title=f"{title}: held-out scores", ylim=(0, 1.02))
    for axis in (losses, scores):
        axis.grid(alpha=0.3)
        if axis.get_legend_handles_labels()[0]:
            axis.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
