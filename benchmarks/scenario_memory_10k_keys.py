"""``memory_10k_keys``: bytes of guard state per account, many API keys in one process."""

from __future__ import annotations

import gc
import tracemalloc
from typing import Any

import cachetools
import httpx
from _harness import API_KEY, BALANCE_PATH, BASE_URL, GUARDS, Recorder, Settings, flavours
from _variants import BalanceReader, StaticUpstream, auth_headers

SCENARIO = "memory_10k_keys"


def run(settings: Settings, rec: Recorder) -> None:
    upstream = StaticUpstream()
    n = settings.memory_keys
    keys = [f"bench-key-{i:06d}" for i in range(n)]
    for _ in range(settings.rounds):
        for name in flavours():
            factory = GUARDS[name]
            guard = factory(
                api_key=API_KEY, base_url=BASE_URL, transport=upstream.transport, ttl=3600
            )
            guard.balance()  # the shared HTTP client exists before measuring
            gc.collect()
            tracemalloc.start()
            try:
                views = [guard.for_key(key) for key in keys]
                for view in views:
                    view.balance()
                gc.collect()
                with_views = tracemalloc.get_traced_memory()[0]
                del views
                gc.collect()
                state_only = tracemalloc.get_traced_memory()[0]
            finally:
                tracemalloc.stop()
                guard.close()
            # A view object (key headers + account) held per tenant, plus the state...
            rec.add("memory_10k_keys", name, with_views / n, "bytes/key", keys=n)
            # ...and what the guard alone retains per account once the views are dropped.
            rec.add("memory_10k_keys", f"{name}_state", state_only / n, "bytes/key", keys=n)

        # Reference point: one TTLCache entry per key holding the parsed balance JSON.
        with httpx.Client(transport=upstream.transport) as client:
            BalanceReader(client, BASE_URL).read()
            cache: cachetools.TTLCache[str, Any] = cachetools.TTLCache(maxsize=n, ttl=3600)
            gc.collect()
            tracemalloc.start()
            try:
                for key in keys:
                    response = client.get(BASE_URL + BALANCE_PATH, headers=auth_headers(key))
                    cache[key] = response.json()
                del response
                gc.collect()
                used = tracemalloc.get_traced_memory()[0]
            finally:
                tracemalloc.stop()
            rec.add("memory_10k_keys", "cachetools", used / n, "bytes/key", keys=n)
            del cache
