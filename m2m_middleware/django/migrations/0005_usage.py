from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("m2m_middleware", "0004_apikey_allowed_cidrs_signing_public_key"),
    ]

    operations = [
        migrations.CreateModel(
            name="AlertRecord",
            fields=[
                ("id", models.BigAutoField(primary_key=True, serialize=False)),
                ("fired_at", models.DateTimeField(db_index=True, verbose_name="fired at")),
                ("kind", models.CharField(max_length=64, verbose_name="kind")),
                ("subject", models.CharField(max_length=255, verbose_name="subject")),
                ("count", models.BigIntegerField(verbose_name="count")),
                ("window_seconds", models.BigIntegerField(verbose_name="window (seconds)")),
                ("detail", models.TextField(verbose_name="detail")),
            ],
            options={
                "verbose_name": "alert",
                "verbose_name_plural": "alerts",
            },
        ),
        migrations.CreateModel(
            name="UsageCount",
            fields=[
                ("id", models.BigAutoField(primary_key=True, serialize=False)),
                ("client_id", models.CharField(max_length=255, verbose_name="client id")),
                (
                    "key_id",
                    models.CharField(blank=True, default="", max_length=64, verbose_name="key id"),
                ),
                (
                    "span",
                    models.CharField(
                        choices=[("hour", "hour"), ("day", "day")],
                        max_length=4,
                        verbose_name="span",
                    ),
                ),
                ("period_start", models.DateTimeField(db_index=True, verbose_name="period start")),
                ("allowed", models.BigIntegerField(default=0, verbose_name="allowed")),
                ("denied", models.BigIntegerField(default=0, verbose_name="denied")),
                ("rate_limited", models.BigIntegerField(default=0, verbose_name="rate limited")),
                ("units", models.BigIntegerField(default=0, verbose_name="cost units")),
            ],
            options={
                "verbose_name": "usage count",
                "verbose_name_plural": "usage counts",
                "constraints": [
                    models.UniqueConstraint(
                        fields=("client_id", "key_id", "span", "period_start"),
                        name="m2m_usage_one_row_per_period",
                    )
                ],
            },
        ),
    ]
