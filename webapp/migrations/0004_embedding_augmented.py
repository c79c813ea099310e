"""Searches move from `vector` to `augmented` (database-side augmentation); one index per version."""

from django.db import migrations

import pgvector.django.vector


def forwards(apps, schema_editor):
    EmbeddingModel = apps.get_model("simili", "EmbeddingModel")
    with schema_editor.connection.cursor() as cursor:
        cursor.execute("UPDATE simili_embedding SET augmented = vector WHERE augmented IS NULL")
        for version in EmbeddingModel.objects.all():
            cursor.execute(f"DROP INDEX IF EXISTS embedding_hnsw_v{int(version.pk)}")
            cursor.execute(
                f"CREATE INDEX IF NOT EXISTS embedding_augmented_hnsw_v{int(version.pk)} ON simili_embedding "
                f"USING hnsw ((augmented::vector({int(version.dimensions)})) vector_cosine_ops) "
                f"WHERE model_version_id = {int(version.pk)}"
            )


class Migration(migrations.Migration):
    dependencies = [("simili", "0003_image_enqueued_at_attempts")]

    operations = [
        migrations.AddField(
            model_name="embedding", name="augmented", field=pgvector.django.vector.VectorField(null=True),
        ),
        migrations.RunPython(forwards, migrations.RunPython.noop),
        migrations.AlterField(
            model_name="embedding", name="augmented", field=pgvector.django.vector.VectorField(),
        ),
    ]
