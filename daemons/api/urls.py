"""``/api/v1/daemons/`` and ``/api/v1/tokens/``."""

from __future__ import annotations

from rest_framework.routers import SimpleRouter

from daemons.api.views import DaemonViewSet, TokenViewSet

router = SimpleRouter()
router.register("daemons", DaemonViewSet, basename="daemon")
router.register("tokens", TokenViewSet, basename="token")

urlpatterns = router.urls
