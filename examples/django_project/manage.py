#!/usr/bin/env python
"""A Django project whose paid views are guarded by creditguard, spending sandbox credits.

Start the sandbox (``creditguard sandbox``: key ``test-key`` on port 8787), then, from the
repository root::

    LENSMOR_BASE_URL=http://127.0.0.1:8787 LENSMOR_API_KEY=test-key \\
        python examples/django_project/manage.py runserver 8000

and try ``curl -X POST localhost:8000/events/ev-1/unlock`` until the credits run out.
The middleware prices routes by the ``CREDITGUARD`` setting (``unlocks/settings.py``);
``/contacts/unlock`` uses the view decorator instead.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "unlocks.settings")
    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)
