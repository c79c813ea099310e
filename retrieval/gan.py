"""The founding document's GAN: a DCGAN trained without labels on a collection or a folder.

Its discriminator describes images (a backbone: every block's output, average-pooled and
concatenated), and its generator makes extra training images (one GAN per class, so that what
it makes carries that class's label). Radford et al. 2016 for the architecture, Miyato et al.
2018 for the spectral norm and the hinge loss that keep the discriminator in check.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import logging
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm
from tqdm import tqdm

from retrieval.backbones import BackboneSpec, FeatureModel, preprocessing_spec, register_backbone
from retrieval.errors import WeightsNotFound
from retrieval.folders import open_rgb
from retrieval.preprocessing import to_tensor

logger = logging.getLogger(__name__)

#: DCGAN's own size: 64 px squares.
DEFAULT_SIZE = 64
#: DCGAN's noise length.
LATENT_DIM = 100
#: Channels of the discriminator's first block (and of the generator's last), doubling per scale.
#: DCGAN uses 64; 32 costs a quarter of the arithmetic, which makes 25 epochs over 1000 images
#: a run of minutes on one CPU core (docs/quality.md).
WIDTH = 32
#: Adam as DCGAN tuned it: a small step and beta1 = 0.5, because momentum destabilises the game.
LEARNING_RATE = 2e-4
BETAS = (0.5, 0.999)
#: Small batches, because a GAN needs steps: at 64, 25 epochs over Corel-1k's 1000 images were
#: 400 steps and every sample was still the same striped texture; at 16 they are 1600.
BATCH_SIZE = 16
EPOCHS = 25
#: DCGAN's weight initialisation: N(0, 0.02).
INIT_STD = 0.02
LEAK = 0.2
#: The generator ends in tanh, so real images are mapped to [-1, 1] as well.
MEAN = (0.5, 0.5, 0.5)
STD = (0.5, 0.5, 0.5)
#: The sample grid after each epoch: 8 x 8 images from the same noise, so epochs compare.
GRID_ROWS = 8
GRID_PADDING = 2

GENERATOR_FILE = "generator.pt"
DISCRIMINATOR_FILE = "discriminator.pt"
HISTORY_FILE = "history.json"
SAMPLES_FILE = "samples.png"
SAMPLES_DIR = "samples"


def check_size(size: int) -> int:
    """Return `size` if it is a power of two from 16 to 256, else raise ValueError."""
    if size < 16 or size > 256 or size & (size - 1):
        raise ValueError(f"expected a power-of-two size from 16 to 256, got {size}")
    return size


def _init(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.Conv2d | nn.ConvTranspose2d):
        nn.init.normal_(module.weight, 0.0, INIT_STD)
    elif isinstance(module, nn.BatchNorm2d):
        nn.init.normal_(module.weight, 1.0, INIT_STD)
        nn.init.zeros_(module.bias)
    return module


class Generator(nn.Module):
    """Noise (n, latent_dim) -> images (n, 3, size, size) in [-1, 1]: transposed convolutions with batch norm."""

    def __init__(self, *, size: int = DEFAULT_SIZE, width: int = WIDTH, latent_dim: int = LATENT_DIM) -> None:
        super().__init__()
        self.size, self.width, self.latent_dim = check_size(size), width, latent_dim
        doublings = int(math.log2(size)) - 3  # 4x4 up to size/2; the last layer makes size
        channels = width * 2**doublings
        layers: list[nn.Module] = [
            nn.ConvTranspose2d(latent_dim, channels, 4, 1, 0, bias=False),
            nn.BatchNorm2d(channels),
            nn.ReLU(),
        ]
        for _ in range(doublings):
            layers += [nn.ConvTranspose2d(channels, channels // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(channels // 2),
                       nn.ReLU()]
            channels //= 2
        layers += [nn.ConvTranspose2d(channels, 3, 4, 2, 1, bias=False), nn.Tanh()]
        self.layers = nn.Sequential(*(_init(layer) for layer in layers))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.layers(z[:, :, None, None])


class Discriminator(nn.Module):
    """Images -> one realness score each: strided 4x4 convolutions down to 4x4, then a 4x4 convolution.

    With `spectral` (training), every convolution is spectrally normalised; a trained
    discriminator is saved with the normalisation folded into plain weights (`fold`).
    """

    def __init__(self, *, size: int = DEFAULT_SIZE, width: int = WIDTH, spectral: bool = True) -> None:
        super().__init__()
        self.size, self.width = check_size(size), width
        wrap = spectral_norm if spectral else (lambda module: module)
        blocks = []
        channels_in, channels = 3, width
        for _ in range(int(math.log2(size)) - 2):
            blocks.append(nn.Sequential(wrap(_init(nn.Conv2d(channels_in, channels, 4, 2, 1))), nn.LeakyReLU(LEAK)))
            channels_in, channels = channels, channels * 2
        self.blocks = nn.ModuleList(blocks)
        self.head = wrap(_init(nn.Conv2d(channels_in, 1, 4, 1, 0)))

    def feature_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Return every block's output, finest first."""
        maps = []
        for block in self.blocks:
            x = block(x)
            maps.append(x)
        return maps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.feature_maps(x)[-1]).flatten(1).mean(1)

    def fold(self) -> Discriminator:
        """Return a copy on the CPU without parametrisations: each weight divided by its spectral norm estimate."""
        plain = Discriminator(size=self.size, width=self.width, spectral=False)
        training = self.training
        self.eval()  # reading a weight in training mode would run another power iteration
        with torch.no_grad():
            state = {
                f"{name}.{tensor}": getattr(module, tensor).detach().cpu().clone()
                for name, module in self.named_modules()
                if isinstance(module, nn.Conv2d)
                for tensor in ("weight", "bias")
            }
        self.train(training)
        plain.load_state_dict(state)
        return plain.eval()


def feature_dim(size: int, width: int = WIDTH) -> int:
    """Return the length of the discriminator descriptor: the channels of every block, added up."""
    return width * (2 ** (int(math.log2(check_size(size))) - 2) - 1)


def _features(trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return torch.cat([fmap.mean(dim=(2, 3)) for fmap in trunk.feature_maps(x)], dim=1)  # type: ignore[operator]


def _feature_map(trunk: nn.Module, x: torch.Tensor) -> torch.Tensor:
    maps = trunk.feature_maps(x)  # type: ignore[operator]
    # Every block pooled onto the last block's grid: its global average is then `_features` exactly.
    grid = maps[-1].shape[2:]
    return torch.cat([nn.functional.adaptive_avg_pool2d(fmap, grid) for fmap in maps], dim=1)


def _build_features(size: int, width: int) -> FeatureModel:
    return FeatureModel(Discriminator(size=size, width=width, spectral=False), _features, None, _feature_map)


def _preprocessing(size: int) -> BackboneSpec:
    """The spec both training and the backbone feed images with: centre square, `size` px, [-1, 1]."""
    # Centre squares: the generator makes squares; the discriminator learnt squares.
    return preprocessing_spec("dcgan", input_size=check_size(size), mean=MEAN, std=STD, resize="center_crop")


# --- checkpoints ----------------------------------------------------------------------------


def _save(path: Path, model: nn.Module, meta: dict[str, object]) -> Path:
    partial = path.with_suffix(".partial")
    torch.save({"state_dict": model.state_dict(), "meta": meta}, partial)
    partial.replace(path)
    return path


def read_meta(path: Path, architecture: str) -> dict:
    """Return the metadata of a checkpoint written by `train_dcgan`, checking its architecture."""
    checkpoint = torch.load(Path(path), map_location="cpu", weights_only=True)
    meta = checkpoint.get("meta", {}) if isinstance(checkpoint, dict) else {}
    if meta.get("architecture") != architecture:
        raise ValueError(f"{path}: expected a {architecture} checkpoint written by retrieval.gan")
    return meta


def load_generator(path: Path) -> Generator:
    """Load a generator written by `train_dcgan`, in eval mode (batch norm uses its running statistics)."""
    meta = read_meta(path, "dcgan_generator")
    model = Generator(size=meta["size"], width=meta["width"], latent_dim=meta["latent_dim"])
    model.load_state_dict(torch.load(Path(path), map_location="cpu", weights_only=True)["state_dict"])
    return model.eval()


def discriminator_backbone(path: Path, *, name: str | None = None) -> BackboneSpec:
    """Return a backbone spec for a discriminator written by `train_dcgan`.

    Args:
        path: the discriminator.pt file.
        name: the registry name; default "gan:<source>", the collection or folder it learnt from.

    Returns:
        A spec whose vectors are every block's output, average-pooled and concatenated; its
        version is the file's content hash, so a retrained discriminator gets a new key.
    """
    path = Path(path).resolve()
    if not path.is_file():
        raise WeightsNotFound(f"no DCGAN discriminator at {path}: train one with `python -m retrieval.train "
                              "FOLDER --method dcgan` or `manage.py train_gan` first")
    meta = read_meta(path, "dcgan_discriminator")
    size, width = int(meta["size"]), int(meta["width"])
    return dataclasses.replace(
        _preprocessing(size),
        name=name or f"gan:{meta['source']}",
        version=hashlib.sha256(path.read_bytes()).hexdigest()[:12],
        build=functools.partial(_build_features, size, width),
        weights=lambda: path,
        embedding_dim=feature_dim(size, width),
        notes=f"DCGAN discriminator trained without labels on {meta['images']} images of "
        f"{meta['description']} for {meta['epoch']} epochs; every block average-pooled and concatenated.",
    )


def register_discriminator(path: Path, *, name: str | None = None) -> BackboneSpec:
    """Register a discriminator checkpoint so that `get_backbone(name)` and `Extractor` use it."""
    return register_backbone(discriminator_backbone(path, name=name))


# --- training -------------------------------------------------------------------------------


@dataclass
class GanHistory:
    """Per-epoch means: hinge losses, and the discriminator's raw scores on real and generated images."""

    columns: dict[str, list[float]] = field(default_factory=dict)

    def add(self, **values: float) -> None:
        for name, value in values.items():
            self.columns.setdefault(name, []).append(float(value))


@dataclass(frozen=True)
class GanRun:
    out_dir: Path
    generator: Path
    discriminator: Path
    samples: Path
    history: GanHistory
    seconds: float


@contextlib.contextmanager
def _deterministic() -> Iterator[None]:
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


def load_images(paths: Sequence[Path], size: int, *, progress: bool = False) -> torch.Tensor:
    """Return the images as one (n, 3, size, size) tensor in [-1, 1], centre squares."""
    spec = _preprocessing(size)
    files = tqdm(paths, desc="loading images", unit="img", disable=not progress)
    return torch.stack([to_tensor(spec, open_rgb(path)) for path in files])


def save_grid(images: torch.Tensor, path: Path) -> Path:
    """Write images in [-1, 1] as one PNG grid, GRID_ROWS per row, written atomically."""
    from torchvision.utils import save_image

    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    save_image(images.float().cpu(), partial, format="png", nrow=GRID_ROWS, padding=GRID_PADDING, normalize=True,
               value_range=(-1.0, 1.0))
    partial.replace(path)
    return path


def grid_side(size: int, count: int = GRID_ROWS * GRID_ROWS) -> tuple[int, int]:
    """Return the (width, height) in pixels of the sample grid of `count` images of `size` px."""
    columns = min(GRID_ROWS, count)
    rows = math.ceil(count / columns)
    return columns * (size + GRID_PADDING) + GRID_PADDING, rows * (size + GRID_PADDING) + GRID_PADDING


def train_dcgan(
    paths: Sequence[Path],
    out_dir: Path,
    *,
    size: int = DEFAULT_SIZE,
    width: int = WIDTH,
    latent_dim: int = LATENT_DIM,
    epochs: int = EPOCHS,
    batch_size: int = BATCH_SIZE,
    learning_rate: float = LEARNING_RATE,
    seed: int = 0,
    source: str = "",
    description: str = "",
    images: torch.Tensor | None = None,
    device: str = "cpu",
    progress: bool = True,
) -> GanRun:
    """Train a DCGAN with the hinge loss and a spectrally normalised discriminator; no labels.

    Args:
        paths: the training images (also recorded in the checkpoints, so that a later run can
            check what a GAN has seen).
        out_dir: receives generator.pt, discriminator.pt, history.json, samples.png (the latest
            grid) and samples/epoch-NNN.png; all rewritten after every epoch.
        size: square side, a power of two from 16 to 256.
        width: channels of the discriminator's first block.
        latent_dim: length of the noise vector.
        epochs: passes over the images; 0 saves the untrained networks (a baseline).
        batch_size: images per step.
        learning_rate: Adam's step size for both networks.
        seed: seeds initialisation, shuffles, flips and noise; on the CPU, the same seed gives
            the same losses and weights.
        source: a short name for what it learnt from (a collection key, a folder name); the
            discriminator backbone's default name is "gan:<source>".
        description: what it learnt from, for people (a collection's name).
        images: the images already loaded by `load_images(paths, size)`, to skip reading them.
        device: "cpu", "cuda" or "cuda:N".
        progress: show progress bars.

    Returns:
        The written paths and the per-epoch history.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    (out_dir / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
    if not paths:
        raise ValueError("expected at least one image to train a GAN on")
    with _deterministic():
        torch.manual_seed(seed)
        data = load_images(paths, size, progress=progress) if images is None else images
        if len(data) != len(paths):
            raise ValueError(f"expected {len(paths)} loaded images, got {len(data)}")
        target = torch.device(device)
        generator = Generator(size=size, width=width, latent_dim=latent_dim).to(target)
        discriminator = Discriminator(size=size, width=width, spectral=True).to(target)
        optimise_g = torch.optim.Adam(generator.parameters(), lr=learning_rate, betas=BETAS)
        optimise_d = torch.optim.Adam(discriminator.parameters(), lr=learning_rate, betas=BETAS)
        rng = torch.Generator().manual_seed(seed)
        fixed_noise = torch.randn(GRID_ROWS * GRID_ROWS, latent_dim, generator=torch.Generator().manual_seed(seed + 1))
        history = GanHistory()
        meta = {
            "size": size, "width": width, "latent_dim": latent_dim, "epochs": epochs, "batch_size": batch_size,
            "learning_rate": learning_rate, "seed": seed, "images": len(paths), "source": source or "images",
            "description": description or source or f"{len(paths)} images",
            "trained_on": sorted(str(Path(path).resolve()) for path in paths),
        }
        bar = tqdm(range(1, epochs + 1), desc=f"DCGAN {size}px", unit="epoch", disable=not progress)
        for epoch in bar:
            sums = dict.fromkeys(("d_loss", "g_loss", "d_real", "d_fake"), 0.0)
            order = torch.randperm(len(data), generator=rng)
            steps = 0
            for start in range(0, len(order), batch_size):
                real = data[order[start : start + batch_size]]
                flip = torch.rand(len(real), generator=rng) < 0.5  # a mirrored photo is as real as the photo
                real = torch.where(flip[:, None, None, None], real.flip(3), real).to(target)
                noise = torch.randn(len(real), latent_dim, generator=rng).to(target)
                fake = generator(noise)
                real_scores, fake_scores = discriminator(real), discriminator(fake.detach())
                d_loss = nn.functional.relu(1.0 - real_scores).mean() + nn.functional.relu(1.0 + fake_scores).mean()
                optimise_d.zero_grad(set_to_none=True)
                d_loss.backward()
                optimise_d.step()
                g_loss = -discriminator(fake).mean()
                optimise_g.zero_grad(set_to_none=True)
                g_loss.backward()
                optimise_g.step()
                for name, value in (("d_loss", d_loss), ("g_loss", g_loss), ("d_real", real_scores.mean()),
                                    ("d_fake", fake_scores.mean())):
                    sums[name] += float(value.detach())
                steps += 1
            means = {name: total / steps for name, total in sums.items()}
            history.add(epoch=epoch, **means)
            bar.set_postfix(d=f"{means['d_loss']:.3f}", g=f"{means['g_loss']:.3f}")
            _checkpoint(out_dir, epoch, generator, discriminator, fixed_noise, history, meta)
        if epochs == 0:  # the untrained networks: the baseline a trained discriminator must beat
            _checkpoint(out_dir, 0, generator, discriminator, fixed_noise, history, meta)
    return GanRun(out_dir, out_dir / GENERATOR_FILE, out_dir / DISCRIMINATOR_FILE, out_dir / SAMPLES_FILE, history,
                  time.perf_counter() - started)


def _checkpoint(
    out_dir: Path, epoch: int, generator: Generator, discriminator: Discriminator, fixed_noise: torch.Tensor,
    history: GanHistory, meta: dict[str, object],
) -> None:
    _save(out_dir / GENERATOR_FILE, generator, {**meta, "architecture": "dcgan_generator", "epoch": epoch})
    _save(out_dir / DISCRIMINATOR_FILE, discriminator.fold(),
          {**meta, "architecture": "dcgan_discriminator", "epoch": epoch})
    generator.eval()
    with torch.inference_mode():
        grid = generator(fixed_noise.to(next(generator.parameters()).device))
    generator.train()
    save_grid(grid, out_dir / SAMPLES_DIR / f"epoch-{epoch:03d}.png")
    save_grid(grid, out_dir / SAMPLES_FILE)
    _write_history(out_dir / HISTORY_FILE, history, meta)


def _write_history(path: Path, history: GanHistory, meta: dict[str, object]) -> None:
    shown = {key: value for key, value in meta.items() if key != "trained_on"}
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps({"config": shown, "history": history.columns}, indent=1))
    partial.replace(path)


def read_history(out_dir: Path) -> dict | None:
    """Return the config and per-epoch history a training run left in `out_dir`, or None if it has none."""
    try:
        return json.loads((Path(out_dir) / HISTORY_FILE).read_text())
    except FileNotFoundError:
        return None


# --- generated images for training ----------------------------------------------------------


def generate(path: Path, n: int, *, seed: int, batch_size: int = 256) -> list[Image.Image]:
    """Return `n` RGB images made by a generator checkpoint from noise seeded by `seed`.

    Args:
        path: a generator.pt written by `train_dcgan`.
        n: how many images.
        seed: seeds the noise; the same seed gives the same images.
        batch_size: images per forward pass.

    Returns:
        `size` x `size` PIL images.
    """
    model = load_generator(path)
    noise = torch.randn(n, model.latent_dim, generator=torch.Generator().manual_seed(seed))
    images: list[Image.Image] = []
    with torch.inference_mode():
        for start in range(0, n, batch_size):
            batch = model(noise[start : start + batch_size])
            pixels = ((batch.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            images.extend(Image.fromarray(array) for array in pixels)
    return images


def generated_counts(labels: np.ndarray, ratio: float) -> dict[int, int]:
    """Return how many images to generate for each class: `ratio` times its real training images, rounded.

    Args:
        labels: the class of every real training image.
        ratio: generated / real, at least 0.

    Returns:
        {class index: count}, for every class present in `labels`.
    """
    if ratio < 0:
        raise ValueError(f"expected a ratio of at least 0, got {ratio}")
    classes, counts = np.unique(np.asarray(labels), return_counts=True)
    return {int(label): round(ratio * int(count)) for label, count in zip(classes, counts, strict=True)}


def train_class_gans(
    paths: Sequence[Path],
    labels: np.ndarray,
    classes: Sequence[str],
    out_dir: Path,
    *,
    seed: int = 0,
    progress: bool = True,
    **options: int,
) -> dict[int, Path]:
    """Train one DCGAN per class on that class's images only, so that what it generates has that label.

    Args:
        paths: the training images (never the test images).
        labels: their class indices.
        classes: the class names; class i goes to out_dir/<classes[i]>/.
        out_dir: the parent folder.
        seed: the seed of class i is seed + i.
        progress: show progress bars.
        **options: size, width, epochs, batch_size, as `train_dcgan` takes them.

    Returns:
        {class index: generator path}.
    """
    generators = {}
    for label in np.unique(labels):
        members = [paths[int(i)] for i in np.flatnonzero(labels == label)]
        name = classes[int(label)]
        run = train_dcgan(members, Path(out_dir) / name, seed=seed + int(label), source=name,
                          description=f"class {name}", progress=progress, **options)  # type: ignore[arg-type]
        logger.info("class %s: DCGAN on %d images in %.0f s", name, len(members), run.seconds)
        generators[int(label)] = run.generator
    return generators


def find_class_gans(out_dir: Path, classes: Sequence[str], train_paths: Sequence[Path]) -> dict[int, Path]:
    """Return the per-class generators in `out_dir`, refusing any that learnt from an image outside `train_paths`.

    Args:
        out_dir: a folder written by `train_class_gans`.
        classes: the class names.
        train_paths: the images a GAN may have seen (this run's training split).

    Returns:
        {class index: generator path}.
    """
    allowed = {str(Path(path).resolve()) for path in train_paths}
    generators = {}
    for label, name in enumerate(classes):
        path = Path(out_dir) / name / GENERATOR_FILE
        if not path.is_file():
            raise FileNotFoundError(f"expected a generator for class {name!r} at {path}")
        seen = set(read_meta(path, "dcgan_generator")["trained_on"])
        if not seen <= allowed:
            raise ValueError(f"{path} learnt from {len(seen - allowed)} image(s) outside this run's training split")
        generators[label] = path
    return generators


def generate_labelled(generators: dict[int, Path], counts: dict[int, int], *, seed: int) -> tuple[
    list[Image.Image], np.ndarray
]:
    """Return counts[c] images from the generator of each class c, with their labels."""
    images: list[Image.Image] = []
    labels: list[int] = []
    for label, count in sorted(counts.items()):
        if count:
            images.extend(generate(generators[label], count, seed=seed + label))
            labels.extend([label] * count)
    return images, np.asarray(labels, dtype=np.int64)
