"""REST API of contracts, their files and tasks.

Querysets start from ``contracts.selectors`` for the requesting user; a task
token is further held to its own directive and contract (``TaskTokenScope``):
objects of the same owner outside that scope answer 403, lists are narrowed.
"""

from __future__ import annotations

from typing import Any

import django_filters
from django.db.models import Func, IntegerField, Q, QuerySet
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema, extend_schema_view
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.generics import get_object_or_404
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.serializers import BaseSerializer

from contracts import selectors, services
from contracts.api.serializers import (
    ContractFileCreateSerializer,
    ContractFileDetailSerializer,
    ContractFileSerializer,
    ContractSerializer,
    TaskMessageSerializer,
    TaskOutputPageSerializer,
    TaskOutputQuerySerializer,
    TaskOutputSerializer,
    TaskSerializer,
)
from contracts.models import Contract, ContractFile, Task
from makima.api import TaskTokenScope, actor_for, task_token
from makima.errors import OutOfScope


class OctetLength(Func):
    """Size in bytes of a text column, computed by the database."""

    function = "OCTET_LENGTH"
    output_field = IntegerField()

    def as_sqlite(self, compiler: Any, connection: Any, **extra_context: Any) -> Any:
        # SQLite has no OCTET_LENGTH; LENGTH() of a BLOB counts bytes.
        return self.as_sql(compiler, connection, template="LENGTH(CAST(%(expressions)s AS BLOB))", **extra_context)


def narrow_to_task_token(
    queryset: QuerySet, request: Request, *, directive_field: str, contract_field: str
) -> QuerySet:
    """Lists seen through a task token hold only its directive's and its contract's rows."""
    token = task_token(request)
    if token is None:
        return queryset
    scope = Q(pk__in=[])
    if token.directive_id is not None:
        scope |= Q(**{directive_field: token.directive_id})
    if token.contract_id is not None:
        scope |= Q(**{contract_field: token.contract_id})
    return queryset.filter(scope)


# --------------------------------------------------------------------------- contracts


class ContractFilter(django_filters.FilterSet):
    directive = django_filters.UUIDFilter(field_name="directive_id", help_text="Only this directive's contracts.")
    status = django_filters.ChoiceFilter(choices=Contract.Status.choices)
    contract_type = django_filters.ChoiceFilter(choices=Contract.ContractType.choices)

    class Meta:
        model = Contract
        fields = ["directive", "status", "contract_type"]


@extend_schema(tags=["contracts"])
@extend_schema_view(
    list=extend_schema(summary="List contracts", description="Contracts you own or that belong to a team directive."),
    retrieve=extend_schema(summary="Show a contract", description="A contract with its repositories."),
)
class ContractViewSet(TaskTokenScope, viewsets.ReadOnlyModelViewSet):
    serializer_class = ContractSerializer
    filterset_class = ContractFilter
    scope_directive_field = "directive_id"
    scope_contract_field = "pk"

    def get_queryset(self) -> QuerySet[Contract]:
        queryset = selectors.contracts_visible_to(self.request.user).prefetch_related("repositories")
        if self.action == "list":
            queryset = narrow_to_task_token(queryset, self.request, directive_field="directive_id", contract_field="pk")
        return queryset


class ContractFileFilter(django_filters.FilterSet):
    name = django_filters.CharFilter(help_text="Only files with exactly this name (e.g. chain-plan).")

    class Meta:
        model = ContractFile
        fields = ["name"]


@extend_schema(
    tags=["contracts"],
    parameters=[OpenApiParameter("contract_pk", OpenApiTypes.UUID, OpenApiParameter.PATH, description="The contract.")],
)
@extend_schema_view(
    list=extend_schema(summary="List a contract's files", description="Oldest first, without their content."),
    retrieve=extend_schema(summary="Show a contract file", description="The file with its content and body."),
    create=extend_schema(
        summary="Add a file to a contract",
        description="`name` is a plain file name (no path); `content` is text within the configured size limit.",
        request=ContractFileCreateSerializer,
        responses={
            201: ContractFileDetailSerializer,
            409: OpenApiResponse(description="The contract is archived."),
        },
    ),
)
class ContractFileViewSet(TaskTokenScope, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """``/contracts/{contract_pk}/files/``. A file is in a task token's scope when its
    contract is, so the scope paths below are relative to the parent contract."""

    filterset_class = ContractFileFilter
    scope_directive_field = "directive_id"
    scope_contract_field = "pk"
    contract: Contract

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)
        # The parent first: an unseen contract is 404, one outside a task token's scope 403.
        self.contract = get_object_or_404(selectors.contracts_visible_to(request.user), pk=self.kwargs["contract_pk"])
        self.check_task_token_scope(self.contract)

    def check_task_token_scope(self, obj: Any) -> None:
        super().check_task_token_scope(obj.contract if isinstance(obj, ContractFile) else obj)

    def get_queryset(self) -> QuerySet[ContractFile]:
        if getattr(self, "swagger_fake_view", False):
            return ContractFile.objects.none()
        queryset = (
            selectors.contract_files_visible_to(self.request.user)
            .filter(contract=self.contract)
            .select_related("contract")
            .annotate(size=OctetLength("content"))
        )
        if self.action == "list":
            queryset = queryset.defer("content", "body")
        return queryset

    def get_serializer_class(self) -> type[BaseSerializer]:
        if self.action == "list":
            return ContractFileSerializer
        if self.action == "create":
            return ContractFileCreateSerializer
        return ContractFileDetailSerializer

    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        file = services.contract_file_create(
            contract=self.contract, actor=actor_for(request), **serializer.validated_data
        )
        output = ContractFileDetailSerializer(file, context=self.get_serializer_context())
        return Response(output.data, status=status.HTTP_201_CREATED)


# --------------------------------------------------------------------------- tasks


class TaskFilter(django_filters.FilterSet):
    directive = django_filters.UUIDFilter(field_name="directive_id", help_text="Only this directive's tasks.")
    contract = django_filters.UUIDFilter(field_name="contract_id", help_text="Only this contract's tasks.")
    step = django_filters.UUIDFilter(field_name="step_id", help_text="Only this step's tasks.")
    status = django_filters.ChoiceFilter(choices=Task.Status.choices)
    kind = django_filters.ChoiceFilter(choices=Task.Kind.choices)

    class Meta:
        model = Task
        fields = ["directive", "contract", "step", "status", "kind"]


@extend_schema(tags=["tasks"])
@extend_schema_view(
    list=extend_schema(summary="List tasks", description="Newest first. Task tokens are never shown."),
    retrieve=extend_schema(summary="Show a task"),
)
class TaskViewSet(TaskTokenScope, viewsets.ReadOnlyModelViewSet):
    serializer_class = TaskSerializer
    filterset_class = TaskFilter
    scope_directive_field = "directive_id"
    scope_contract_field = "contract_id"

    def get_queryset(self) -> QuerySet[Task]:
        queryset = selectors.tasks_visible_to(self.request.user).select_related("daemon")
        if self.action == "list":
            queryset = narrow_to_task_token(
                queryset, self.request, directive_field="directive_id", contract_field="contract_id"
            )
        return queryset

    @extend_schema(
        summary="Read a task's output",
        description=(
            "Output lines of one attempt of the task (`attempt`, by default the current one) with `seq` "
            "greater than `after_seq`, in `seq` order, at most `limit` of them. A task whose daemon was lost "
            "is retried as its next attempt, whose lines are numbered from 1 again; an attempt without "
            "output gives an empty page. To follow a running task, call again with the returned `attempt` "
            "and `after_seq` set to the returned `next_after_seq`; when `has_more` is false and "
            "`task_attempt` is larger than `attempt`, go on with `attempt=task_attempt` and `after_seq=0`."
        ),
        parameters=[TaskOutputQuerySerializer],
        responses=TaskOutputPageSerializer,
        filters=False,
    )
    @action(detail=True, methods=["get"])
    def output(self, request: Request, pk: str | None = None) -> Response:
        task = self.get_object()
        query = TaskOutputQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        attempt: int = query.validated_data.get("attempt", task.attempt)
        after_seq: int = query.validated_data["after_seq"]
        limit: int = query.validated_data["limit"]
        lines = list(
            selectors.task_output_visible_to(request.user)
            .filter(task=task, attempt=attempt, seq__gt=after_seq)
            .order_by("seq")[: limit + 1]
        )
        has_more = len(lines) > limit
        lines = lines[:limit]
        page = {
            "attempt": attempt,
            "items": TaskOutputSerializer(lines, many=True).data,
            "next_after_seq": lines[-1].seq if lines else after_seq,
            "has_more": has_more,
            "task_status": task.status,
            "task_attempt": task.attempt,
        }
        return Response(page)

    @extend_schema(
        summary="Mark a task's work as delivered (`makima supervisor complete`)",
        description=(
            "Completes the task's contract and records the event. The task itself ends when its daemon "
            "reports it finished."
        ),
        request=None,
        responses={200: TaskSerializer, 409: OpenApiResponse(description="The task has already ended.")},
    )
    @action(detail=True, methods=["post"])
    def complete(self, request: Request, pk: str | None = None) -> Response:
        task = services.task_supervisor_complete(task=self.get_object(), actor=actor_for(request))
        return Response(TaskSerializer(task, context=self.get_serializer_context()).data)

    @extend_schema(
        summary="Answer a paused task",
        description=(
            "Hands `message` to the agent of a paused task (its `question` says what it waits for). "
            "The answer is queued for the task's daemon; the task runs again once the daemon has "
            "delivered it. Answers come from people: task tokens are refused."
        ),
        request=TaskMessageSerializer,
        responses={
            200: TaskSerializer,
            400: OpenApiResponse(description="No message, or one that is too long."),
            403: OpenApiResponse(description="A task token cannot answer tasks."),
            404: OpenApiResponse(description="No such task among those you can see."),
            409: OpenApiResponse(
                description="The task is not paused, has no daemon, or an earlier answer is still on its way."
            ),
        },
    )
    @action(detail=True, methods=["post"], url_path="message")
    def message(self, request: Request, pk: str | None = None) -> Response:
        task = self.get_object()
        if task_token(request) is not None:
            raise OutOfScope("Paused tasks are answered by people, not by task tokens.")
        body = TaskMessageSerializer(data=request.data)
        body.is_valid(raise_exception=True)
        services.task_answer(task=task, message=body.validated_data["message"], actor=actor_for(request))
        fresh = self.get_queryset().get(pk=task.pk)
        return Response(TaskSerializer(fresh, context=self.get_serializer_context()).data)
