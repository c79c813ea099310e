"""Embeddings: a copy of the collection id, halfvec search vectors kept inline, HNSW with settings."""

from django.conf import settings
from django.db import migrations, models
import django.db.models.deletion
import pgvector.django


def drop_indexes(apps, schema_editor):
    from webapp import vector_index

    with schema_editor.connection.cursor() as cursor:
        for version_id in apps.get_model("simili", "EmbeddingModel").objects.values_list("pk", flat=True):
            vector_index.drop(cursor, version_id=version_id)


def build_indexes(apps, schema_editor):
    from webapp import vector_index

    with schema_editor.connection.cursor() as cursor:
        for version_id, dimensions in apps.get_model("simili", "EmbeddingModel").objects.values_list(
            "pk", "dimensions"
        ):
            vector_index.build(
                cursor, version_id=version_id, dimensions=dimensions, m=settings.HNSW_M,
                ef_construction=settings.HNSW_EF_CONSTRUCTION, memory=settings.HNSW_BUILD_MEMORY,
            )


class Migration(migrations.Migration):

    dependencies = [
        ('simili', '0006_longer_model_version_names'),
    ]

    operations = [
        migrations.RunPython(drop_indexes, migrations.RunPython.noop),
        migrations.AddField(
            model_name='embedding',
            name='collection',
            field=models.ForeignKey(db_index=False, null=True, on_delete=django.db.models.deletion.CASCADE,
                                    related_name='+', to='simili.collection'),
        ),
        migrations.RunSQL(
            "UPDATE simili_embedding e SET collection_id = i.collection_id FROM simili_image i WHERE i.id = e.image_id",
            migrations.RunSQL.noop,
        ),
        # Embeddings of images that are not ready are no longer kept (the query skips no rows).
        migrations.RunSQL(
            "DELETE FROM simili_embedding e USING simili_image i WHERE i.id = e.image_id AND i.status <> 'ready'",
            migrations.RunSQL.noop,
        ),
        migrations.AlterField(
            model_name='embedding',
            name='collection',
            field=models.ForeignKey(db_index=False, on_delete=django.db.models.deletion.CASCADE,
                                    related_name='+', to='simili.collection'),
        ),
        migrations.AlterField(
            model_name='embedding',
            name='augmented',
            field=pgvector.django.HalfVectorField(),
        ),
        migrations.RunSQL(
            "ALTER TABLE simili_embedding ALTER COLUMN vector SET STORAGE EXTERNAL, "
            "ALTER COLUMN augmented SET STORAGE MAIN",
            "ALTER TABLE simili_embedding ALTER COLUMN vector SET STORAGE EXTERNAL, "
            "ALTER COLUMN augmented SET STORAGE EXTERNAL",
        ),
        migrations.AddIndex(
            model_name='embedding',
            index=models.Index(fields=['model_version', 'collection'], name='embedding_version_collection'),
        ),
        migrations.RunPython(build_indexes, migrations.RunPython.noop),
    ]
