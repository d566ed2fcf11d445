"""Settings of the example project: the creditguard middleware and its CREDITGUARD setting."""

from __future__ import annotations

import os

SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only")
DEBUG = False
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]
ROOT_URLCONF = "unlocks.urls"
INSTALLED_APPS: list[str] = []
DATABASES: dict[str, dict[str, str]] = {}
USE_TZ = True

MIDDLEWARE = [
    "django.middleware.common.CommonMiddleware",
    "creditguard.django.CreditGuardMiddleware",
]

CREDITGUARD = {
    # The guard: built from these (the environment fills in what is missing).
    "API_KEY": os.environ.get("LENSMOR_API_KEY"),
    "BASE_URL": os.environ.get("LENSMOR_BASE_URL"),
    # What each paid route costs; routes not listed are free.
    "COSTS": {"POST /events/{event_id}/unlock": 10},
}
