"""ASGI entry point: HTTP (Django) and the websocket routes, served by daphne.

``python -m daphne makima.asgi:application`` serves everything.
"""

from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "makima.settings")
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402

from daemons.consumers import allow_rfc_close_codes_in_daphne  # noqa: E402
from makima.body_limit import RequestBodyLimit  # noqa: E402
from makima.routing import websocket_urlpatterns  # noqa: E402

# The daemon protocol closes with 1009 after `too_large`; unpatched, daphne turns it into 1011.
allow_rfc_close_codes_in_daphne()

application = ProtocolTypeRouter(
    {
        # Bodies without a Content-Length are measured here; Django checks the declared one.
        "http": RequestBodyLimit(django_asgi_app),
        "websocket": URLRouter(websocket_urlpatterns),
    }
)
