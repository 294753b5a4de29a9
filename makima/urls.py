"""makima URL configuration: the dashboard, admin, the REST API and its schema, /healthz and /metrics."""

from __future__ import annotations

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path, re_path
from drf_spectacular.views import SpectacularAPIView, SpectacularRedocView, SpectacularSwaggerView

from makima.api import not_found
from makima.health import healthz
from makima.metrics import metrics

api_v1 = [
    path("", include("directives.api.urls")),
    path("", include("contracts.api.urls")),
    path("", include("daemons.api.urls")),
    # Last: a path no API route matched (an unknown endpoint, an id that is not a
    # UUID) answers a JSON 404 rather than Django's HTML page. Only paths ending
    # in "/": a known route without its slash still gets the redirect.
    re_path(r"^(?P<path>(?:.*/)?)$", not_found),
]

urlpatterns = [
    path("accounts/login/", auth_views.LoginView.as_view(redirect_authenticated_user=True), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("admin/", admin.site.urls),
    path("healthz", healthz, name="healthz"),
    path("metrics", metrics, name="metrics"),
    path("api/v1/", include(api_v1)),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
    path("api/redoc/", SpectacularRedocView.as_view(url_name="schema"), name="api-redoc"),
    path("", include("directives.urls")),
    path("", include("daemons.urls")),
]
