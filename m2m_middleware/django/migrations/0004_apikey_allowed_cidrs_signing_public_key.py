from django.db import migrations, models


class Migration(migrations.Migration):
    dependencies = [
        ("m2m_middleware", "0003_signingkey"),
    ]

    operations = [
        migrations.AddField(
            model_name="apikey",
            name="allowed_cidrs",
            field=models.TextField(
                blank=True,
                default="",
                help_text=(
                    "CIDRs (IPv4 or IPv6) the key may be used from, one per line; empty: anywhere."
                ),
                verbose_name="allowed networks",
            ),
        ),
        migrations.AddField(
            model_name="apikey",
            name="signing_public_key",
            field=models.TextField(
                blank=True,
                help_text="The client's Ed25519 or P-256 public key (PEM) for RFC 9421 signatures.",
                null=True,
                verbose_name="request-signing public key",
            ),
        ),
    ]
