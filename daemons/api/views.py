"""REST API of daemons and API tokens: a user's own, never anyone else's.

Task tokens (agents) are refused with 403 on every endpoint here: daemons and
tokens never belong to a directive.
"""

from __future__ import annotations

from typing import Any

import django_filters
from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema, extend_schema_view
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.serializers import BaseSerializer

from daemons import selectors
from daemons.api import schema  # noqa: F401  (registers the OpenAPI description of bearer tokens)
from daemons.api.serializers import DaemonSerializer, TokenCreatedSerializer, TokenCreateSerializer, TokenSerializer
from daemons.models import ApiToken, Daemon
from daemons.services import token_create, token_revoke
from makima.api import TaskTokenScope, actor_for, task_token
from makima.errors import OutOfScope


class UserOnly(TaskTokenScope):
    """Closed to task tokens, for lists and actions as well as single objects."""

    scope_directive_field = None

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)
        if task_token(request) is not None:
            raise OutOfScope("A task token cannot use this endpoint.")


class DaemonFilter(django_filters.FilterSet):
    status = django_filters.ChoiceFilter(choices=Daemon.Status.choices)

    class Meta:
        model = Daemon
        fields = ["status"]


@extend_schema(tags=["daemons"])
@extend_schema_view(
    list=extend_schema(summary="List your daemons", description="By name, with how many tasks each is running."),
    retrieve=extend_schema(summary="Show a daemon"),
)
class DaemonViewSet(UserOnly, viewsets.ReadOnlyModelViewSet):
    serializer_class = DaemonSerializer
    filterset_class = DaemonFilter

    def get_queryset(self) -> QuerySet[Daemon]:
        return selectors.daemons_visible_to(self.request.user)


class TokenFilter(django_filters.FilterSet):
    kind = django_filters.ChoiceFilter(choices=[(k, k) for k in (ApiToken.Kind.USER, ApiToken.Kind.DAEMON)])

    class Meta:
        model = ApiToken
        fields = ["kind"]


@extend_schema(tags=["tokens"])
@extend_schema_view(
    list=extend_schema(
        summary="List your API keys and daemon tokens",
        description="Revoked tokens stay listed with `revoked_at`. Token values are never shown here.",
    ),
    retrieve=extend_schema(summary="Show an API key or daemon token"),
    create=extend_schema(
        summary="Create an API key or daemon token",
        description="The answer holds the plain `token`: it is shown this once and cannot be retrieved later.",
        request=TokenCreateSerializer,
        responses={201: TokenCreatedSerializer},
    ),
)
class TokenViewSet(UserOnly, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    filterset_class = TokenFilter

    def get_queryset(self) -> QuerySet[ApiToken]:
        return selectors.tokens_visible_to(self.request.user)

    def get_serializer_class(self) -> type[BaseSerializer]:
        if self.action == "create":
            return TokenCreateSerializer
        return TokenSerializer

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        new = token_create(owner=request.user, actor=actor_for(request), **serializer.validated_data)
        # The plain value lives only in ``new``; it goes into this one answer and nowhere else.
        output = {**TokenSerializer(new.token, context=self.get_serializer_context()).data, "token": new.plain}
        return Response(output, status=status.HTTP_201_CREATED)

    @extend_schema(
        summary="Revoke an API key or daemon token",
        description="It stops working at once. Revoking a revoked token changes nothing.",
        request=None,
        responses={200: TokenSerializer},
    )
    @action(detail=True, methods=["post"])
    def revoke(self, request: Request, pk: str | None = None) -> Response:
        token = token_revoke(token=self.get_object(), actor=actor_for(request))
        return Response(TokenSerializer(token, context=self.get_serializer_context()).data)
