"""The smallest Django project settings the Django how-to page's sample runs in (the page
shows the app's own settings, ``MIDDLEWARE`` and ``CREDITGUARD``, and applies them with
``override_settings``). Used by .ci/check_extras.sh."""

SECRET_KEY = "creditguard-ci"  # noqa: S105 - a throwaway project
DEBUG = False
ALLOWED_HOSTS = ["testserver"]
INSTALLED_APPS: list[str] = []
DATABASES: dict[str, object] = {}
USE_TZ = True
