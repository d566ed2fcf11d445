"""URLs and views of the Django adapter tests (settings in conftest.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

from django.http import HttpResponse, JsonResponse, StreamingHttpResponse
from django.urls import path

from creditguard import current_spend
from creditguard.django import current_spend as spend_of
from creditguard.django import requires_credits

# What the views saw, for the tests to look at; the sandbox the views charge (and, when a
# test sets ``state["watch"]`` to a guard, that guard, for ``unlock`` to look at).
seen: list[Any] = []
state: dict[str, Any] = {}


def unlock(request: Any, event_id: str) -> JsonResponse:
    seen.append((getattr(request, "creditguard_spend", None), current_spend()))
    if "watch" in state:  # the account as the view runs: (reserved, in flight, settling)
        snap = state["watch"].snapshot()
        seen.append((snap.reserved, snap.in_flight, snap.settling))
    state["fake"].charge(10)
    return JsonResponse({"event": event_id})


async def aunlock(request: Any, event_id: str) -> JsonResponse:
    seen.append((getattr(request, "creditguard_spend", None), current_spend()))
    state["fake"].charge(10)
    return JsonResponse({"event": event_id})


def missing(request: Any) -> HttpResponse:
    return HttpResponse("no such event", status=404)


def boom(request: Any) -> HttpResponse:
    raise RuntimeError("the paid call failed")


def stream(request: Any) -> StreamingHttpResponse:
    def chunks() -> Iterator[bytes]:
        for i in range(3):
            seen.append(f"chunk {i}")
            yield b"x"
        state["fake"].charge(10)

    return StreamingHttpResponse(chunks())


def broken_stream(request: Any) -> StreamingHttpResponse:
    """A stream that fails after its first chunk."""

    def chunks() -> Iterator[bytes]:
        yield b"x"
        raise RuntimeError("the export failed")

    return StreamingHttpResponse(chunks())


async def abroken_stream(request: Any) -> StreamingHttpResponse:
    """An async view streaming an async body that fails after its first chunk."""

    async def chunks() -> AsyncIterator[bytes]:
        yield b"x"
        raise RuntimeError("the export failed")

    return StreamingHttpResponse(chunks())


def free(request: Any) -> HttpResponse:
    seen.append(getattr(request, "creditguard_spend", None))
    return HttpResponse("free")


@requires_credits(10)
def decorated(request: Any) -> HttpResponse:
    seen.append(request.creditguard_spend)
    state["fake"].charge(10)
    return HttpResponse("decorated")


@requires_credits(lambda request: 5 * int(request.GET["n"]))
async def adecorated(request: Any) -> HttpResponse:
    seen.append(current_spend())
    state["fake"].charge(request.creditguard_spend.cost)
    return HttpResponse("adecorated")


def page(request: Any) -> HttpResponse:
    """A priced GET (the tests price it): the same body every time, so an ETag holds."""
    seen.append(spend_of(request))
    state["fake"].charge(10)
    return HttpResponse("the same page")


@requires_credits(10)
def decorated_page(request: Any) -> HttpResponse:
    seen.append(request.creditguard_spend)
    state["fake"].charge(10)
    return HttpResponse("the same decorated page")


def item(request: Any, item_id: int) -> HttpResponse:
    seen.append(getattr(request, "creditguard_spend", None))
    return HttpResponse(f"item {item_id}")


def files(request: Any, rest: str) -> HttpResponse:
    seen.append(getattr(request, "creditguard_spend", None))
    return HttpResponse(f"file {rest}")


def held(request: Any) -> HttpResponse:
    """Held until the test releases it (``state["held"]``)."""
    state["held"].hold()
    return HttpResponse("done")


def other(request: Any, n: int) -> HttpResponse:
    return HttpResponse("ran")


def shadow(request: Any, name: str) -> HttpResponse:
    """Priced; listed before ``shadow/free``, so Django runs it for that path too."""
    seen.append(spend_of(request))
    return HttpResponse(f"shadow {name}")


def shadow_free(request: Any) -> HttpResponse:  # pragma: no cover - shadowed
    seen.append("free view")
    return HttpResponse("free")


def user_of(request: Any) -> str | None:
    """Who a request spends for (the spending policy tests): its ``X-User`` header."""
    value = request.headers.get("X-User")
    return None if value is None else str(value)


@requires_credits(40, subject=user_of)
def policy_decorated(request: Any) -> HttpResponse:
    state["fake"].charge(40)
    return HttpResponse("ok")


def policy_plain(request: Any) -> HttpResponse:
    state["fake"].charge(40)
    return HttpResponse("ok")


urlpatterns = [
    path("policy/decorated", policy_decorated),
    path("policy/plain", policy_plain),
    path("events/<str:event_id>/unlock", unlock),
    path("async/events/<str:event_id>/unlock", aunlock),
    path("missing", missing),
    path("boom", boom),
    path("stream", stream),
    path("broken-stream", broken_stream),
    path("abroken-stream", abroken_stream),
    path("free", free),
    path("decorated", decorated),
    path("adecorated", adecorated),
    path("page", page),
    path("decorated-page", decorated_page),
    path("items/<int:item_id>", item),
    path("files/<path:rest>", files),
    path("held", held),
    path("other/<int:n>", other),
    path("shadow/<str:name>", shadow),
    path("shadow/free", shadow_free),
]
