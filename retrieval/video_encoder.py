"""One vector per video from its frame vectors: mean pooling, or a GRU trained without labels.

API for the web app (frame vectors are the backbone's unit vectors, one row per sampled frame,
in time order):

    vector = mean_pool(frame_vectors)                          # the baseline, no training
    model, losses = train(list_of_frame_vector_arrays, source_key=spec_key)   # self-supervised
    save(model, path, metadata={...}); model = load(path, dim=1280, source_key=spec_key)
    vector = encode(model, frame_vectors)                      # (D,) float32, unit length
    model.identifier                                           # names the model version

The GRU reads the sequence and its output is added to the mean: `normalise(mean_pool(x) +
W·mean_t GRU(x)_t)` with `W` initialised to zero, so an untrained encoder *is* mean pooling and
training can only move away from that baseline where the loss asks. The mean of the GRU's
outputs (rather than its last state) keeps the vector stable on videos much longer than the
clips it was trained on.

Training is self-supervised (no labels): two random contiguous clips of each video in a batch
are encoded, and NT-Xent (SimCLR's loss, at temperature 0.5) pulls the two clips of a video
together and pushes clips of other videos apart. On the CPU a fixed seed gives the same
weights and losses.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence
from tqdm import tqdm

from retrieval.errors import RetrievalError
from retrieval.extraction import l2_normalize

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "simili-video-gru"
CHECKPOINT_VERSION = 1
#: GRU width: 512 holds a short sequence's state at ~2.8 M parameters for 1280-d frames, which
#: trains in seconds on 2 cores on a collection's few hundred videos.
DEFAULT_HIDDEN = 512
#: NT-Xent's temperature. SimCLR's 0.1 pushes every other video away hard, same-class ones
#: included, and with a collection's few dozen videos the GRU learns to tell them apart. A sweep
#: on 60 synthetic Corel videos trained on themselves (docs/quality.md, Video): 0.969 mAP with
#: mean pooling; 0.80 at 0.1, 0.87 at 0.2, 0.94 at 0.3, 0.989 at 0.5, 0.985 at 1.0. A low
#: temperature trades tolerance to similar samples for uniformity (Wang & Liu 2021).
TEMPERATURE = 0.5
#: Frames per training clip: 8 s at one frame a second, shorter than most videos so that two
#: clips of a video can differ, long enough to hold a cut.
DEFAULT_CLIP_LEN = 8
#: Passes over the videos: at temperature 0.5, 10 / 30 epochs gave 0.987 / 0.989 mAP on the test
#: videos themselves (0.987 / 0.994 trained on others); ~10 s on 2 cores for 60 videos.
DEFAULT_EPOCHS = 30
DEFAULT_BATCH_SIZE = 32
DEFAULT_LEARNING_RATE = 1e-3


class CheckpointMismatch(RetrievalError, ValueError):
    """A video-encoder checkpoint does not fit the frame vectors it is asked to encode."""


class VideoEncoder(nn.Module):
    """normalise(mean + W · mean_t GRU(x)_t): a GRU's correction to mean pooling."""

    def __init__(self, dim: int, *, hidden: int = DEFAULT_HIDDEN) -> None:
        super().__init__()
        self.dim = dim
        self.hidden = hidden
        self.gru = nn.GRU(dim, hidden, num_layers=1, batch_first=True)
        self.out = nn.Linear(hidden, dim)
        nn.init.zeros_(self.out.weight)  # untrained, the encoder is mean pooling exactly
        nn.init.zeros_(self.out.bias)
        self.metadata: dict[str, Any] = {}

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Encode a padded batch (B, T, D) of sequences of the given lengths into (B, D) unit rows."""
        lengths_cpu = lengths.detach().to("cpu", torch.int64)
        mask = (torch.arange(x.shape[1], device=x.device)[None, :] < lengths[:, None]).to(x.dtype)
        counts = lengths.to(x.dtype)[:, None]
        mean = (x * mask[..., None]).sum(dim=1) / counts
        packed = pack_padded_sequence(x, lengths_cpu, batch_first=True, enforce_sorted=False)
        outputs, _ = pad_packed_sequence(self.gru(packed)[0], batch_first=True, total_length=x.shape[1])
        summary = (outputs * mask[..., None]).sum(dim=1) / counts
        return nn.functional.normalize(nn.functional.normalize(mean, dim=1) + self.out(summary), dim=1)

    @property
    def identifier(self) -> str:
        """Return a stable id for the model version, e.g. "video-gru512-1280-3f2a9c01b7de"."""
        digest = hashlib.sha256()
        for name, tensor in sorted(self.state_dict().items()):
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return f"video-gru{self.hidden}-{self.dim}-{digest.hexdigest()[:12]}"


def _check_frames(frames: np.ndarray) -> np.ndarray:
    frames = np.asarray(frames, dtype=np.float32)
    if frames.ndim != 2 or frames.shape[0] < 1:
        raise ValueError(f"expected a (frames, dim) array with at least one frame, got shape {frames.shape}")
    return frames


def mean_pool(frames: np.ndarray) -> np.ndarray:
    """Return the unit-length mean of a video's frame vectors, float32.

    Args:
        frames: (T, D) unit vectors, T >= 1.

    Returns:
        A (D,) unit vector.
    """
    return l2_normalize(_check_frames(frames).mean(axis=0, keepdims=True))[0]


def _pad(sequences: Sequence[np.ndarray], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.int64)
    batch = np.zeros((len(sequences), int(lengths.max()), sequences[0].shape[1]), dtype=np.float32)
    for row, sequence in enumerate(sequences):
        batch[row, : len(sequence)] = sequence
    return torch.from_numpy(batch).to(device), lengths.to(device)


def encode_many(model: VideoEncoder, videos: Sequence[np.ndarray], *, batch_size: int = 64) -> np.ndarray:
    """Return one unit vector per video, (n, D) float32, in input order.

    Args:
        model: a trained (or loaded) encoder.
        videos: (T_i, D) frame vectors per video, in time order.
        batch_size: videos per forward pass.

    Returns:
        The video vectors.
    """
    videos = [_check_frames(v) for v in videos]
    for video in videos:
        if video.shape[1] != model.dim:
            raise CheckpointMismatch(f"expected {model.dim}-d frame vectors, got {video.shape[1]}-d")
    device = next(model.parameters()).device
    model.eval()
    out = []
    with torch.inference_mode():
        for start in range(0, len(videos), batch_size):
            x, lengths = _pad(videos[start : start + batch_size], device)
            out.append(model(x, lengths).float().cpu().numpy())
    return l2_normalize(np.concatenate(out)) if out else np.zeros((0, model.dim), dtype=np.float32)


def encode(model: VideoEncoder, frames: np.ndarray) -> np.ndarray:
    """Return one video's vector: (D,) float32, unit length, from its (T, D) frame vectors."""
    return encode_many(model, [frames])[0]


def nt_xent(first: torch.Tensor, second: torch.Tensor, *, temperature: float = TEMPERATURE) -> torch.Tensor:
    """Return SimCLR's NT-Xent: row i of `first` and row i of `second` are the only positive pair.

    Args:
        first: (B, D) embeddings of one clip per video.
        second: (B, D) embeddings of another clip of the same videos.
        temperature: divides the cosine similarities.

    Returns:
        The mean over the 2B clips of -log softmax of their partner among the other 2B - 1.
    """
    z = nn.functional.normalize(torch.cat([first, second]), dim=1)
    logits = z @ z.T / temperature
    n = first.shape[0]
    logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool, device=z.device), float("-inf"))
    partner = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return nn.functional.cross_entropy(logits, partner)


def _clip(frames: np.ndarray, length: int, rng: np.random.Generator) -> np.ndarray:
    length = min(length, len(frames))
    start = int(rng.integers(0, len(frames) - length + 1))
    return frames[start : start + length]


def train(
    videos: Sequence[np.ndarray],
    *,
    epochs: int = DEFAULT_EPOCHS,
    clip_len: int = DEFAULT_CLIP_LEN,
    batch_size: int = DEFAULT_BATCH_SIZE,
    learning_rate: float = DEFAULT_LEARNING_RATE,
    hidden: int = DEFAULT_HIDDEN,
    temperature: float = TEMPERATURE,
    seed: int = 0,
    device: str = "cpu",
    source_key: str = "",
    progress: bool = False,
) -> tuple[VideoEncoder, list[float]]:
    """Train a video encoder without labels: two clips of a video closer than clips of others.

    Args:
        videos: (T_i, D) unit frame vectors of each video, in time order; at least two videos.
        epochs: passes over the videos.
        clip_len: frames per clip (a shorter video gives its whole self, twice).
        batch_size: videos per step; each brings two clips, the others' clips are its negatives.
        learning_rate: AdamW's step size.
        hidden: GRU width.
        temperature: NT-Xent's.
        seed: seeds the initialisation, the shuffles and the clips.
        device: "cpu", "cuda" or "cuda:N".
        source_key: the embedding key of the frame vectors, kept in the model's metadata.
        progress: show a progress bar.

    Returns:
        The encoder, in eval mode, and the mean loss of each epoch.
    """
    videos = [_check_frames(v) for v in videos]
    if len(videos) < 2:
        raise ValueError(f"expected at least two videos to contrast, got {len(videos)}")
    dims = {v.shape[1] for v in videos}
    if len(dims) != 1:
        raise ValueError(f"expected frame vectors of one dimension, got {sorted(dims)}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    target = torch.device(device)
    model = VideoEncoder(dims.pop(), hidden=hidden).to(target)
    optimiser = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=1e-4)
    steps = max(1, math.ceil(len(videos) / batch_size))
    losses: list[float] = []
    for _ in tqdm(range(epochs), desc="video encoder", unit="epoch", disable=not progress):
        model.train()
        order = rng.permutation(len(videos))
        total = 0.0
        for step in range(steps):
            batch = [videos[i] for i in order[step * batch_size : (step + 1) * batch_size]]
            if len(batch) < 2:
                batch = [videos[i] for i in order[-2:]]  # a last batch of one has no negative
            x, lengths = _pad([_clip(v, clip_len, rng) for v in batch] + [_clip(v, clip_len, rng) for v in batch],
                              target)
            z = model(x, lengths)
            loss = nt_xent(z[: len(batch)], z[len(batch) :], temperature=temperature)
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            total += float(loss.detach())
        losses.append(total / steps)
    model.eval()
    model.metadata = {
        "source_key": source_key, "epochs": epochs, "clip_len": clip_len, "batch_size": batch_size,
        "learning_rate": learning_rate, "temperature": temperature, "seed": seed, "videos": len(videos),
        "losses": losses,
    }
    return model, losses


def save(model: VideoEncoder, path: Path, metadata: dict[str, Any] | None = None) -> Path:
    """Write the encoder's weights, dimensions and metadata (plain values) to one .pt file.

    Args:
        model: the encoder.
        path: the file; its folder is created.
        metadata: added to the model's own (the training settings, `source_key`).

    Returns:
        The path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "format": CHECKPOINT_FORMAT,
            "version": CHECKPOINT_VERSION,
            "dim": model.dim,
            "hidden": model.hidden,
            "metadata": {**model.metadata, **(metadata or {})},
            "state_dict": {name: t.detach().cpu() for name, t in model.state_dict().items()},
        },
        path,
    )
    return path


def load(path: Path, *, dim: int | None = None, source_key: str | None = None, device: str = "cpu") -> VideoEncoder:
    """Read an encoder saved by `save`, refusing one that does not fit the frame vectors.

    Args:
        path: the .pt file.
        dim: the frame vectors' dimension (the backbone's); a checkpoint of another is refused.
        source_key: the frame vectors' embedding key; a checkpoint trained on other vectors is
            refused (checked only when both this and the checkpoint's are set).
        device: where the model runs.

    Returns:
        The encoder, in eval mode, with `metadata` as saved.
    """
    try:
        checkpoint = torch.load(Path(path), map_location="cpu", weights_only=True)
    except (OSError, RuntimeError, EOFError, ValueError) as exc:
        raise CheckpointMismatch(f"{path} is not a readable video-encoder checkpoint: {exc}") from exc
    if not isinstance(checkpoint, dict) or checkpoint.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointMismatch(f"{path} is not a video-encoder checkpoint (expected format {CHECKPOINT_FORMAT!r})")
    if checkpoint.get("version") != CHECKPOINT_VERSION:
        raise CheckpointMismatch(
            f"{path} is a version {checkpoint.get('version')} checkpoint; this code reads version {CHECKPOINT_VERSION}"
        )
    if dim is not None and checkpoint["dim"] != dim:
        raise CheckpointMismatch(
            f"{path} encodes {checkpoint['dim']}-d frame vectors; the frame vectors here are {dim}-d "
            "(was it trained with another backbone?)"
        )
    saved_key = checkpoint["metadata"].get("source_key")
    if source_key and saved_key and saved_key != source_key:
        raise CheckpointMismatch(f"{path} was trained on {saved_key!r} frame vectors, not {source_key!r}")
    model = VideoEncoder(int(checkpoint["dim"]), hidden=int(checkpoint["hidden"]))
    try:
        model.load_state_dict(checkpoint["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckpointMismatch(f"{path}: the weights do not fit a GRU of the saved sizes: {exc}") from exc
    model.metadata = dict(checkpoint["metadata"])
    return model.to(torch.device(device)).eval()
