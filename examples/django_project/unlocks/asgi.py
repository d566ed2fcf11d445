"""The example project as an ASGI app, for an ASGI server (uvicorn, daphne, hypercorn)::

    cd examples/django_project
    LENSMOR_BASE_URL=http://127.0.0.1:8787 LENSMOR_API_KEY=test-key \\
        uvicorn unlocks.asgi:application

The async views and the creditguard middleware run without a thread hop.
"""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "unlocks.settings")

application = get_asgi_application()
