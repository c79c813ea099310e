"""The similar-image query: pgvector's answer equals an exact numpy reference, on an HNSW index."""

from __future__ import annotations

import numpy as np
import pytest
from django.db import connection

from tests.factories import CollectionFactory, ImageFactory, default_version, embed, half, unit_vector
from webapp import similarity as sim
from webapp.models import Visibility

pytestmark = pytest.mark.django_db



def test_top_k_equals_exact_numpy_ranking_with_distances(admin_user) -> None:
    version = default_version()
    collection = CollectionFactory()
    vectors = np.stack([unit_vector(seed) for seed in range(60)])
    images = [ImageFactory(collection=collection) for _ in range(60)]
    for image, vector in zip(images, vectors, strict=True):
        embed(image, vector, version)
    query = unit_vector(1000)

    results = sim.vector_similar(vector=query.tolist(), version=version, viewer=admin_user, k=10, expand=0)

    similarity = half(vectors) @ half(query)
    expected = np.argsort(-similarity)[:10]
    assert [r.image.pk for r in results] == [images[i].pk for i in expected]
    np.testing.assert_allclose([r.similarity for r in results], similarity[expected], atol=1e-4)


@pytest.mark.parametrize(("viewer", "exact_below", "plan", "pool_factor"), [
    ("admin", 20000, "hnsw", sim.QE_POOL_FACTOR),  # an unfiltered walk
    ("owner", 20000, "exact", sim.QE_POOL_FACTOR),  # a scan over few rows
    ("owner", 0, "hnsw", 1),  # a filtered walk: its pool is what one pass yields
])
def test_query_expansion_re_ranks_one_searchs_pool_as_the_numpy_reference_does(
    admin_user, owner, settings, monkeypatch, viewer, exact_below, plan, pool_factor
) -> None:
    from retrieval.reranking import expand_query

    settings.EXACT_SEARCH_MAX_ROWS = exact_below
    viewer = admin_user if viewer == "admin" else owner
    version = default_version()
    collection = CollectionFactory(owner=owner)
    CollectionFactory(owner=admin_user, visibility=Visibility.PRIVATE)  # not the owner's: their search is filtered
    centre = unit_vector(5)
    vectors = np.stack([centre + 0.9 * unit_vector(seed) for seed in range(120)])  # more rows than the pool
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    images = [ImageFactory(collection=collection) for _ in range(120)]
    for image, vector in zip(images, vectors, strict=True):
        embed(image, vector, version)
    query = unit_vector(77) + centre
    query /= np.linalg.norm(query)
    assert sim.choose_plan(sim.search_scope(version=version, viewer=viewer)) == plan
    walks: list[int] = []
    real = sim.nearest_hits
    monkeypatch.setattr(sim, "nearest_hits", lambda **kwargs: walks.append(kwargs["k"]) or real(**kwargs))

    results = sim.vector_similar(vector=query, version=version, viewer=viewer, k=8, expand=5)

    pool_size = pool_factor * (8 + sim.COLLAPSE_MARGIN)
    assert walks == [pool_size]  # one search: the expanded query re-ranks its pool
    pool = np.argsort(-(half(vectors) @ half(query)))[:pool_size]
    expanded = expand_query(query, half(vectors[pool[:5]]), n=5, alpha=3.0)
    similarity = half(vectors) @ half(expanded)
    expected = pool[np.argsort(-similarity[pool], kind="stable")][:8]
    assert [r.image.pk for r in results] == [images[i].pk for i in expected]
    # Distances as PostgreSQL gives them for a search with the expanded vector itself.
    walked = {r.image.pk: r.similarity for r in real_similar(expanded, version, viewer, k=40)}
    np.testing.assert_allclose([r.similarity for r in results], [walked[r.image.pk] for r in results], atol=1e-4)
    plain = real_similar(query, version, viewer, k=8)
    assert [r.image.pk for r in plain] != [r.image.pk for r in results]


def real_similar(vector: np.ndarray, version, viewer, *, k: int) -> list[sim.SimilarImage]:
    """A search without query expansion, the nearest rows exactly as PostgreSQL orders them."""
    return sim.vector_similar(vector=vector, version=version, viewer=viewer, k=k, expand=0)


def test_the_similar_query_itself_is_answered_by_the_hnsw_index(admin_user) -> None:
    """The app's own SQL, explained: the version's HNSW index serves the ORDER BY."""
    version = default_version()
    collection = CollectionFactory()
    for seed in range(5):
        embed(ImageFactory(collection=collection), unit_vector(seed), version)
    scope = sim.search_scope(version=version, viewer=admin_user)
    assert sim.choose_plan(scope) == "hnsw"
    sql, params = sim.nearest_sql(scope=scope, k=3)
    params["query"] = "[" + ",".join(str(x) for x in unit_vector(3)) + "]"
    with connection.cursor() as cursor:
        for knob in ("enable_seqscan", "enable_bitmapscan", "enable_sort"):
            cursor.execute(f"SET LOCAL {knob} = off")
        cursor.execute("EXPLAIN " + sql, params)
        plan = "\n".join(row[0] for row in cursor.fetchall())
    assert version.index_name in plan


def test_an_image_is_never_its_own_similar_result_and_re_embedding_hides_it_until_done(admin_user) -> None:
    from webapp import services

    version = default_version()
    collection = CollectionFactory()
    me, twin, other = (ImageFactory(collection=collection) for _ in range(3))
    embed(me, unit_vector(1), version)
    embed(twin, half(unit_vector(1) + 0.6 * unit_vector(2)), version)
    embed(other, unit_vector(3), version)

    results = sim.image_similar(image=me, viewer=admin_user, k=5)
    assert [r.image.pk for r in results][0] == twin.pk
    assert me.pk not in [r.image.pk for r in results]

    services.image_reembed(image_ids=[twin.pk])  # pending again: no vector until the worker stores one
    assert [r.image.pk for r in sim.image_similar(image=me, viewer=admin_user, k=5)] == [other.pk]


def test_each_model_version_has_a_partial_hnsw_cosine_index(admin_user) -> None:
    version = default_version()
    collection = CollectionFactory()
    for seed in range(5):
        embed(ImageFactory(collection=collection), unit_vector(seed), version)
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexdef FROM pg_indexes WHERE indexname = %s", [version.index_name])
        (indexdef,) = cursor.fetchone()
        assert "USING hnsw" in indexdef
        assert "halfvec_cosine_ops" in indexdef
        assert f"model_version_id = {version.pk}" in indexdef


def test_result_rows_load_as_the_orm_would_load_them(django_assert_num_queries) -> None:
    """`images_with_collections` skips the queryset, not a field: every value equals the ORM's."""
    from django.forms.models import model_to_dict

    from webapp.models import Image

    first, second = CollectionFactory(description="one"), CollectionFactory(name="two")
    images = [ImageFactory(collection=first), ImageFactory(collection=second, original_name="b.png")]
    images[1].error = "a reason"
    images[1].save()
    wanted = [image.pk for image in images] + [10**12]  # an id with no row is simply absent

    loaded = sim.images_with_collections(wanted)

    expected = Image.objects.select_related("collection").in_bulk(wanted)
    assert sorted(loaded) == sorted(expected) == sorted(image.pk for image in images)
    for pk, image in expected.items():
        fields = [f.attname for f in Image._meta.concrete_fields]
        assert [getattr(loaded[pk], name) for name in fields] == [getattr(image, name) for name in fields]
        assert model_to_dict(loaded[pk].collection) == model_to_dict(image.collection)
        assert loaded[pk].collection.created_at == image.collection.created_at
        assert not loaded[pk]._state.adding and loaded[pk]._state.db == "default"
    with django_assert_num_queries(0):
        assert loaded[images[1].pk].collection.name == "two"  # cached: no query to read it



@pytest.mark.django_db(transaction=True)
def test_two_workers_building_a_new_versions_index_at_once_both_succeed(monkeypatch) -> None:
    """Two bulk workers store their first batches on a fresh database at the same moment."""
    import threading

    from webapp import embeddings, vector_index
    from webapp.models import EmbeddingModel

    exists = vector_index.exists
    checked = threading.Barrier(2)

    def exists_then_meet(*args, **kwargs):
        found = exists(*args, **kwargs)
        try:  # both have looked for the index before either builds it, unless one must wait its turn
            checked.wait(1)
        except threading.BrokenBarrierError:
            pass
        return found

    monkeypatch.setattr(vector_index, "exists", exists_then_meet)
    for attempt in range(3):
        version = EmbeddingModel.objects.create(key=f"race@{attempt}", backbone="race", dimensions=8)
        checked.reset()
        barrier, errors = threading.Barrier(2), []

        def build(version: EmbeddingModel, barrier: threading.Barrier, errors: list[Exception]) -> None:
            try:
                barrier.wait(10)
                embeddings.embedding_index_build(version=version)
            except Exception as exc:  # noqa: BLE001 - the test reports it
                errors.append(exc)
            finally:
                connection.close()

        threads = [threading.Thread(target=build, args=(version, barrier, errors)) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert errors == []
        assert embeddings.embedding_index_exists(version=version)


def test_an_image_page_loads_image_collection_and_uploader_as_the_orm_would(
    owner, outsider, django_assert_num_queries
) -> None:
    """`selectors.image_for_viewer` skips the queryset too: the same objects, nothing left to fetch."""
    from django.forms.models import model_to_dict
    from django.http import Http404

    from webapp import selectors
    from webapp.models import Image

    collection = CollectionFactory(owner=owner, visibility=Visibility.PRIVATE, description="mine")
    uploaded, anonymous = ImageFactory(collection=collection, uploaded_by=owner), ImageFactory(collection=collection)
    for image in (uploaded, anonymous):
        loaded = selectors.image_for_viewer(key=image.key, viewer=owner)
        expected = Image.objects.select_related("collection", "uploaded_by").get(pk=image.pk)
        fields = [f.attname for f in Image._meta.concrete_fields]
        assert [getattr(loaded, name) for name in fields] == [getattr(expected, name) for name in fields]
        assert model_to_dict(loaded.collection) == model_to_dict(expected.collection)
        with django_assert_num_queries(0):  # cached: reading them asks nothing
            assert loaded.collection.description == "mine"
            uploader = loaded.uploaded_by
        assert (uploader and model_to_dict(uploader)) == (expected.uploaded_by and model_to_dict(expected.uploaded_by))
    assert selectors.image_for_viewer(key=uploaded.key, viewer=owner).uploaded_by == owner
    assert selectors.image_for_viewer(key=anonymous.key, viewer=owner).uploaded_by is None
    with pytest.raises(Http404):
        selectors.image_for_viewer(key=uploaded.key, viewer=outsider)  # private: as if it did not exist
    with pytest.raises(Http404):
        selectors.image_for_viewer(key="no-such-key", viewer=owner)


def test_the_active_version_loads_as_the_orm_would() -> None:
    from django.forms.models import model_to_dict

    from webapp import selectors
    from webapp.models import EmbeddingModel

    assert selectors.active_model_version() is None
    version = default_version()
    EmbeddingModel.objects.create(key="inactive@1", backbone="other", dimensions=8)
    loaded = selectors.active_model_version()
    assert loaded == version and model_to_dict(loaded) == model_to_dict(EmbeddingModel.objects.get(is_active=True))
    assert loaded.is_active and not loaded._state.adding
