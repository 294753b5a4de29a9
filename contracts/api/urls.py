"""``/api/v1/contracts/``, ``/api/v1/contracts/{contract_pk}/files/`` and ``/api/v1/tasks/``."""

from __future__ import annotations

from rest_framework.routers import SimpleRouter

from contracts.api.views import ContractFileViewSet, ContractViewSet, TaskViewSet
from makima.api import UUID_RE

router = SimpleRouter()
router.register("contracts", ContractViewSet, basename="contract")
router.register(rf"contracts/(?P<contract_pk>{UUID_RE})/files", ContractFileViewSet, basename="contract-file")
router.register("tasks", TaskViewSet, basename="task")

urlpatterns = router.urls
