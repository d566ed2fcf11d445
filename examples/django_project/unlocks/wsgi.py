"""The example project as a WSGI app, for a WSGI server (gunicorn, uWSGI, mod_wsgi)::

    cd examples/django_project
    LENSMOR_BASE_URL=http://127.0.0.1:8787 LENSMOR_API_KEY=test-key \\
        gunicorn unlocks.wsgi:application

Paid responses settle when the server closes them, after the last byte.
"""

from __future__ import annotations

import os

from django.core.wsgi import get_wsgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "unlocks.settings")

application = get_wsgi_application()
