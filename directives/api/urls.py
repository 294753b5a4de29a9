"""Routes of the directives API (included under ``/api/v1/``)."""

from __future__ import annotations

from rest_framework.routers import SimpleRouter

from directives.api import views

DIRECTIVE = rf"directives/(?P<directive_pk>{views.UUID_RE})"

router = SimpleRouter()
router.register("directives", views.DirectiveViewSet, basename="directive")
router.register(rf"{DIRECTIVE}/steps", views.StepViewSet, basename="directive-step")
router.register(rf"{DIRECTIVE}/events", views.DirectiveEventViewSet, basename="directive-event")
router.register("chains", views.ChainViewSet, basename="chain")
router.register("evaluations", views.EvaluationViewSet, basename="evaluation")
router.register("approvals", views.ApprovalViewSet, basename="approval")
router.register("orders", views.OrderViewSet, basename="order")

urlpatterns = router.urls
