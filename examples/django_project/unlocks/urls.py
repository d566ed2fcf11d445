"""The example's views: a free balance, two paid unlocks."""

from __future__ import annotations

import os

import httpx
from django.http import HttpRequest, JsonResponse
from django.urls import path
from django.views.decorators.csrf import csrf_exempt

from creditguard.django import current_spend, guard_from_settings, requires_credits


async def paid_call(credits: int) -> None:
    """Stands in for a paid Lensmor request: the sandbox spends ``credits``."""
    async with httpx.AsyncClient() as client:
        response = await client.post(
            os.environ["LENSMOR_BASE_URL"] + "/sandbox/charge",
            params={"credits": credits},
            headers={"Authorization": "Bearer " + os.environ["LENSMOR_API_KEY"]},
        )
    response.raise_for_status()


def balance(request: HttpRequest) -> JsonResponse:
    """Free: no credits needed."""
    return JsonResponse({"total_balance": guard_from_settings().balance().total_balance})


@csrf_exempt
async def unlock_event(request: HttpRequest, event_id: str) -> JsonResponse:
    """Priced by the middleware (settings.CREDITGUARD["COSTS"])."""
    await paid_call(10)
    return JsonResponse({"event": event_id, "status": "unlocked"})


@csrf_exempt
@requires_credits(lambda request: 5 * len(request.GET.getlist("id")))
async def unlock_contacts(request: HttpRequest) -> JsonResponse:
    """Priced by the decorator: 5 credits per contact id."""
    spend = current_spend(request)
    assert spend is not None  # requires_credits set it
    await paid_call(spend.cost)
    return JsonResponse({"cost": spend.cost})


urlpatterns = [
    path("balance", balance),
    path("events/<str:event_id>/unlock", unlock_event),
    path("contacts/unlock", unlock_contacts),
]
