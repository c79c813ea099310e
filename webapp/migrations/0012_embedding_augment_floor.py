"""Embedding.augment_floor: lets a collection refresh recompute only what new vectors change."""

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ("simili", "0011_image_lane"),
    ]

    operations = [
        migrations.AddField(
            model_name="embedding",
            name="augment_floor",
            field=models.FloatField(null=True),
        ),
    ]
