from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("m2m_middleware", "0002_keychange_storemeta"),
    ]

    operations = [
        migrations.CreateModel(
            name="SigningKey",
            fields=[
                (
                    "kid",
                    models.CharField(
                        max_length=64, primary_key=True, serialize=False, verbose_name="key id"
                    ),
                ),
                ("algorithm", models.CharField(max_length=16, verbose_name="algorithm")),
                ("public_jwk", models.TextField(verbose_name="public JWK")),
                ("private_key", models.TextField(verbose_name="sealed private key")),
                ("created_at", models.DateTimeField(verbose_name="created at")),
                ("publish_from", models.DateTimeField(verbose_name="published from")),
                ("signs_from", models.DateTimeField(verbose_name="signs from")),
                (
                    "retire_after",
                    models.DateTimeField(blank=True, null=True, verbose_name="retired after"),
                ),
            ],
            options={
                "verbose_name": "signing key",
                "verbose_name_plural": "signing keys",
            },
        ),
    ]
