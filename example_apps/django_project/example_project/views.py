from django.http import HttpRequest, JsonResponse

from m2m_middleware.django import require_scopes


def health(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"status": "ok"})


def whoami(request: HttpRequest) -> JsonResponse:
    client = request.m2m_client  # type: ignore[attr-defined]
    return JsonResponse(
        {
            "client_id": client.client_id,
            "scheme": client.scheme,
            "scopes": sorted(client.scopes),
            "tier": client.tier,
            "key_id": client.key_id,
        }
    )


@require_scopes("orders:read")  # works on async views as well as sync ones
async def orders(request: HttpRequest) -> JsonResponse:
    return JsonResponse(
        {
            "client_id": request.m2m_client.client_id,  # type: ignore[attr-defined]
            "orders": [{"id": 1, "item": "widget", "qty": 3}],
        }
    )
