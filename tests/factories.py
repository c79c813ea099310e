"""Rows for tests that need a known state without going through the worker."""

from __future__ import annotations

import hashlib

import factory
import numpy as np
from django.contrib.auth import get_user_model

from webapp import embeddings
from webapp.models import Collection, Embedding, EmbeddingModel, Image, ImageStatus, Visibility


class UserFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = get_user_model()

    username = factory.Sequence(lambda n: f"user{n}")


class CollectionFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Collection

    owner = factory.SubFactory(UserFactory)
    name = factory.Sequence(lambda n: f"Collection {n}")
    visibility = Visibility.PUBLIC


class ImageFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = Image

    collection = factory.SubFactory(CollectionFactory)
    sha256 = factory.Sequence(lambda n: hashlib.sha256(str(n).encode()).hexdigest())
    file_path = factory.LazyAttribute(lambda o: f"originals/{o.sha256[:2]}/{o.sha256[2:4]}/{o.sha256}.jpg")
    thumbnail_path = factory.LazyAttribute(lambda o: f"thumbnails/{o.sha256[:2]}/{o.sha256[2:4]}/{o.sha256}.jpg")
    original_name = factory.Sequence(lambda n: f"photo{n}.jpg")
    mime_type = "image/jpeg"
    width = 640
    height = 480
    byte_size = 1000
    status = ImageStatus.READY


def default_version() -> EmbeddingModel:
    """The default backbone's model version, created as the worker would (with its index)."""
    return embeddings.embedding_model_ensure(key="efficientnet_lite0@imagenet-1", backbone="efficientnet_lite0",
                                           dimensions=1280)


def half(x: np.ndarray) -> np.ndarray:
    """What a search compares: vectors stored and queried in half precision (halfvec)."""
    return np.asarray(x, dtype=np.float32).astype(np.float16).astype(np.float32)


def unit_vector(seed: int, dim: int = 1280) -> np.ndarray:
    vector = np.random.default_rng(seed).standard_normal(dim).astype(np.float32)
    return vector / np.linalg.norm(vector)


def near(base: np.ndarray, seed: int, spread: float = 0.8) -> np.ndarray:
    """A unit vector similar to `base` (cosine about 0.78) but not a near-duplicate of it."""
    vector = base + spread * unit_vector(seed, len(base))
    return (vector / np.linalg.norm(vector)).astype(np.float32)


def embed(
    image: Image, vector: np.ndarray, version: EmbeddingModel | None = None, augmented: np.ndarray | None = None
) -> Embedding:
    """Store a vector as the worker would with augmentation off (augmented = vector unless given)."""
    return Embedding.objects.create(
        image=image, collection_id=image.collection_id, model_version=version or default_version(), vector=vector,
        augmented=vector if augmented is None else augmented,
    )
