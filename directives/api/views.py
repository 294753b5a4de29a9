"""Viewsets of the directives API, mounted under ``/api/v1/``.

Every queryset starts from a selector for ``request.user`` (another owner's
objects are 404). A task token is further held to its own directive by
``TaskTokenScope`` (same owner, other directive: 403) and sees only its
directive in lists. Views parse input, call one service and render the result.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

from django import forms
from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import transaction
from django.db.models import Prefetch, QuerySet
from django.shortcuts import get_object_or_404
from django_filters import rest_framework as filters
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import (
    OpenApiParameter,
    OpenApiResponse,
    extend_schema,
    extend_schema_field,
    extend_schema_view,
)
from rest_framework import mixins, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import PermissionDenied, ValidationError
from rest_framework.request import Request
from rest_framework.response import Response

from directives.api.serializers import (
    ApprovalAnswerSerializer,
    ApprovalSerializer,
    ChainSerializer,
    DirectiveCreateSerializer,
    DirectiveEventSerializer,
    DirectiveReasonSerializer,
    DirectiveSerializer,
    DirectivesErrorSerializer,
    DirectiveUpdateSerializer,
    EvaluationSerializer,
    EventQuerySerializer,
    OrderLinkSerializer,
    OrderSerializer,
    OrderWriteSerializer,
    StepBatchResultSerializer,
    StepBatchSerializer,
    StepCreateSerializer,
    StepInputSerializer,
    StepSerializer,
)
from directives.models import (
    ApprovalRequest,
    Chain,
    Directive,
    DirectiveEvent,
    Evaluation,
    Order,
    Step,
    StepDependency,
)
from directives.selectors import (
    approvals_visible_to,
    chains_visible_to,
    directives_visible_to,
    evaluations_visible_to,
    events_visible_to,
    live_step_counts,
    orders_visible_to,
    steps_visible_to,
)
from directives.services import (
    StepSpec,
    approval_approve,
    approval_deny,
    directive_archive,
    directive_create,
    directive_pause,
    directive_record_pr,
    directive_regenerate,
    directive_replan,
    directive_resume,
    directive_start,
    directive_stop,
    directive_transition,
    directive_update,
    events_pushed_at_the_end,
    order_cancel,
    order_create,
    order_delete,
    order_link,
    order_unlink,
    order_update,
    step_remove,
    step_request_evaluation,
    step_retry,
    step_skip,
    step_spec_from_mapping,
    step_update,
    steps_add,
)
from makima.api import TaskTokenScope, actor_for, django_validation_detail, task_token
from makima.errors import OutOfScope

UUID_RE = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"

DIRECTIVE_PK = OpenApiParameter(
    "directive_pk", OpenApiTypes.UUID, OpenApiParameter.PATH, description="The directive's id."
)
ERROR = OpenApiResponse(DirectivesErrorSerializer, description="JSON error with a `detail` text.")
BAD_INPUT = OpenApiResponse(DirectivesErrorSerializer, description="Bad input: `detail` plus field `errors`.")
REFUSED = OpenApiResponse(DirectivesErrorSerializer, description="Refused in the object's current state.")
OUT_OF_SCOPE = OpenApiResponse(DirectivesErrorSerializer, description="A task token acting outside its directive.")


# --------------------------------------------------------------------------- scoping


def check_directive_scope(request: Request, directive: Directive) -> None:
    """A task token may only act on its own directive (403 otherwise)."""
    token = task_token(request)
    if token is not None and directive.pk != token.directive_id:
        raise OutOfScope("This task token may only act on its own directive and contract.")


class ScopedViewSetMixin(TaskTokenScope):
    """``TaskTokenScope`` for detail routes, plus lists narrowed to a task token's directive."""

    list_scope_field = "directive_id"

    def narrow_to_token(self, queryset: QuerySet) -> QuerySet:
        token = task_token(self.request)  # type: ignore[attr-defined]
        if token is None:
            return queryset
        return queryset.filter(**{self.list_scope_field: token.directive_id})


class InDirectiveMixin(ScopedViewSetMixin):
    """Routes nested under ``directives/{directive_pk}/``: the directive must be
    visible (else 404) and within a task token's scope (else 403), checked
    before anything else, for lists and creates as well as details."""

    directive: Directive

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)  # type: ignore[misc]
        directive = get_object_or_404(directives_visible_to(request.user), pk=self.kwargs["directive_pk"])  # type: ignore[attr-defined]
        check_directive_scope(request, directive)
        self.directive = directive


def _is_schema_generation(view: Any) -> bool:
    return getattr(view, "swagger_fake_view", False)


# --------------------------------------------------------------------------- directives


@extend_schema_field({"type": "integer", "minimum": 1, "maximum": 2**31 - 1})
class IdFilter(filters.NumberFilter):
    """An integer id within the column's range: a ``NumberFilter`` (a decimal) let
    ``team=-3.6e+99`` through to the database, a 500 (found by schemathesis)."""

    field_class = forms.IntegerField

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("min_value", 1)
        kwargs.setdefault("max_value", 2**31 - 1)
        super().__init__(*args, **kwargs)


class DirectiveFilter(filters.FilterSet):
    status = filters.MultipleChoiceFilter(choices=Directive.Status.choices, help_text="Repeat for several statuses.")
    team = IdFilter(field_name="team_id", help_text="A team (group) id.")

    class Meta:
        model = Directive
        fields = ["status", "team"]


@extend_schema_view(
    list=extend_schema(summary="List directives", description="Directives you own or that are shared with your teams."),
    retrieve=extend_schema(summary="Show a directive", responses={200: DirectiveSerializer, 404: ERROR}),
)
class DirectiveViewSet(ScopedViewSetMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Directives. PUT and DELETE are not offered: edit with PATCH, end with ``stop``/``archive``."""

    serializer_class = DirectiveSerializer
    filterset_class = DirectiveFilter
    scope_directive_field = "pk"
    list_scope_field = "pk"
    lookup_value_regex = UUID_RE
    http_method_names = ["get", "post", "patch", "head", "options"]

    def get_queryset(self) -> QuerySet[Directive]:
        if _is_schema_generation(self):
            return Directive.objects.none()
        queryset = (
            directives_visible_to(self.request.user)
            .select_related("owner", "team")
            .annotate(**live_step_counts("step_count_"))
            .order_by("-created_at", "id")
        )
        if self.action == "list":
            queryset = self.narrow_to_token(queryset)
        return queryset

    def render(self, directive: Directive, *, status_code: int = status.HTTP_200_OK) -> Response:
        """Answer with a fresh copy of the directive (including its step counts)."""
        fresh = self.get_queryset().get(pk=directive.pk)
        return Response(DirectiveSerializer(fresh, context=self.get_serializer_context()).data, status=status_code)

    @extend_schema(
        summary="Create a directive",
        request=DirectiveCreateSerializer,
        responses={201: DirectiveSerializer, 400: BAD_INPUT, 403: OUT_OF_SCOPE},
    )
    def create(self, request: Request) -> Response:
        if task_token(request) is not None:
            raise OutOfScope("A task token cannot create directives.")
        serializer = DirectiveCreateSerializer(data=request.data, context=self.get_serializer_context())
        serializer.is_valid(raise_exception=True)
        directive = directive_create(owner=request.user, actor=actor_for(request), **serializer.validated_data)
        return self.render(directive, status_code=status.HTTP_201_CREATED)

    @extend_schema(
        summary="Edit a directive",
        description=(
            "`goal` edits the goal (recorded in the goal history; a completed directive re-plans); "
            "`pr_url`/`pr_branch` record the pull request; `status` accepts only `completed`, "
            "from `completing`. Only the owner may change `team`."
        ),
        request=DirectiveUpdateSerializer,
        responses={200: DirectiveSerializer, 400: BAD_INPUT, 403: ERROR, 404: ERROR, 409: REFUSED},
    )
    def partial_update(self, request: Request, pk: str | None = None) -> Response:
        directive = self.get_object()
        serializer = DirectiveUpdateSerializer(data=request.data, partial=True, context=self.get_serializer_context())
        serializer.is_valid(raise_exception=True)
        fields = dict(serializer.validated_data)
        new_status = fields.pop("status", None)
        pr = {name: fields.pop(name) for name in ("pr_url", "pr_branch") if name in fields}
        if "team" in fields and (task_token(request) is not None or directive.owner_id != request.user.pk):
            # Sharing decides who else sees the directive: the owner's call alone.
            raise PermissionDenied("Only the directive's owner can change its team.")
        actor = actor_for(request)
        # One request, one outcome: a refused status change undoes the edits made before it.
        with transaction.atomic():
            if fields:
                directive = directive_update(directive=directive, actor=actor, **fields)
            if pr:
                directive = directive_record_pr(directive=directive, actor=actor, **pr)
            if new_status:
                directive_transition(directive=directive, to=new_status, actor=actor)
        return self.render(directive)

    def _transition(self, request: Request, service: Callable[..., Directive], **kwargs: Any) -> Response:
        directive = self.get_object()
        # The commands a transition queues (a start's first spawn_task) go out
        # before the live feed hears of its events.
        with events_pushed_at_the_end():
            service(directive=directive, actor=actor_for(request), **kwargs)
        return self.render(directive)

    def _reason(self, request: Request) -> str:
        serializer = DirectiveReasonSerializer(data=request.data or {})
        serializer.is_valid(raise_exception=True)
        return serializer.validated_data["reason"]

    @extend_schema(
        summary="Start a directive",
        description="A draft with steps becomes `active`; one without steps goes to `planning`.",
        request=None,
        responses={200: DirectiveSerializer, 404: ERROR, 409: REFUSED},
    )
    @action(detail=True, methods=["post"])
    def start(self, request: Request, pk: str | None = None) -> Response:
        return self._transition(request, directive_start)

    @extend_schema(
        summary="Pause a directive",
        description="Stops new dispatches; running tasks finish.",
        request=DirectiveReasonSerializer,
        responses={200: DirectiveSerializer, 400: BAD_INPUT, 404: ERROR, 409: REFUSED},
    )
    @action(detail=True, methods=["post"])
    def pause(self, request: Request, pk: str | None = None) -> Response:
        return self._transition(request, directive_pause, reason=self._reason(request))

    @extend_schema(
        summary="Resume a paused directive",
        request=None,
        responses={200: DirectiveSerializer, 404: ERROR, 409: REFUSED},
    )
    @action(detail=True, methods=["post"])
    def resume(self, request: Request, pk: str | None = None) -> Response:
        return self._transition(request, directive_resume)

    @extend_schema(
        summary="Stop a directive",
        description="Interrupts its running tasks and fails the directive.",
        request=DirectiveReasonSerializer,
        responses={200: DirectiveSerializer, 400: BAD_INPUT, 404: ERROR, 409: REFUSED},
    )
    @action(detail=True, methods=["post"])
    def stop(self, request: Request, pk: str | None = None) -> Response:
        return self._transition(request, directive_stop, reason=self._reason(request))

    @extend_schema(
        summary="Re-plan a directive",
        request=None,
        responses={200: DirectiveSerializer, 404: ERROR, 409: REFUSED},
    )
    @action(detail=True, methods=["post"])
    def replan(self, request: Request, pk: str | None = None) -> Response:
        return self._transition(request, directive_replan)

    @extend_schema(
        summary="Regenerate the chain",
        description="Supersedes the current chain and plans a new one; counts against `max_chain_regenerations`.",
        request=None,
        responses={200: DirectiveSerializer, 404: ERROR, 409: REFUSED},
    )
    @action(detail=True, methods=["post"])
    def regenerate(self, request: Request, pk: str | None = None) -> Response:
        return self._transition(request, directive_regenerate)

    @extend_schema(
        summary="Archive a finished directive",
        request=None,
        responses={200: DirectiveSerializer, 404: ERROR, 409: REFUSED},
    )
    @action(detail=True, methods=["post"])
    def archive(self, request: Request, pk: str | None = None) -> Response:
        return self._transition(request, directive_archive)


# --------------------------------------------------------------------------- steps


def specs_from(items: Iterable[dict[str, Any]]) -> list[StepSpec]:
    """Parse validated step bodies; every problem is reported under ``steps``."""
    specs: list[StepSpec] = []
    messages: list[str] = []
    for index, item in enumerate(items, start=1):
        try:
            specs.append(step_spec_from_mapping(item, index=index))
        except DjangoValidationError as exc:
            detail = django_validation_detail(exc)
            messages.extend(f"{key}: {message}" for key, values in detail.items() for message in values)
    if messages:
        raise ValidationError({"steps": messages})
    return specs


@extend_schema(parameters=[DIRECTIVE_PK])
@extend_schema_view(
    list=extend_schema(summary="List the steps of a directive", responses={200: StepSerializer(many=True), 404: ERROR}),
    retrieve=extend_schema(summary="Show a step", responses={200: StepSerializer, 404: ERROR}),
)
class StepViewSet(InDirectiveMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """The steps (DAG) of one directive; ``depends_on`` lists ids in the order given."""

    serializer_class = StepSerializer
    lookup_value_regex = UUID_RE

    def get_queryset(self) -> QuerySet[Step]:
        if _is_schema_generation(self):
            return Step.objects.none()
        return (
            steps_visible_to(self.request.user)
            .filter(directive_id=self.kwargs["directive_pk"])
            .prefetch_related(Prefetch("dependency_links", queryset=StepDependency.objects.order_by("position")))
        )

    def fresh(self, steps: Sequence[Step]) -> list[Step]:
        """Reload steps (with their ordered dependencies), keeping the given order."""
        by_id = {s.pk: s for s in self.get_queryset().filter(pk__in=[s.pk for s in steps])}
        return [by_id[s.pk] for s in steps]

    def render(self, step: Step) -> Response:
        return Response(StepSerializer(self.fresh([step])[0]).data)

    @extend_schema(
        summary="Add a step",
        description="`depends_on` holds ids of steps of this directive or names of steps of its current plan.",
        request=StepCreateSerializer,
        responses={201: StepSerializer, 400: BAD_INPUT, 403: OUT_OF_SCOPE, 404: ERROR, 409: REFUSED},
    )
    def create(self, request: Request, directive_pk: str | None = None) -> Response:
        serializer = StepCreateSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        steps = steps_add(
            directive=self.directive, specs=specs_from([serializer.validated_data]), actor=actor_for(request)
        )
        return Response(StepSerializer(self.fresh(steps)[0]).data, status=status.HTTP_201_CREATED)

    @extend_schema(
        summary="Add several steps at once",
        description=(
            "All or nothing. `depends_on` names refer to steps in the same batch or already in the directive; "
            "ids to steps of this directive. Cycles, unknown dependencies, duplicate names and steps of "
            "another directive are refused with messages naming the steps (in `errors.steps`)."
        ),
        request=StepBatchSerializer,
        responses={201: StepBatchResultSerializer, 400: BAD_INPUT, 403: OUT_OF_SCOPE, 404: ERROR, 409: REFUSED},
    )
    @action(detail=False, methods=["post"])
    def batch(self, request: Request, directive_pk: str | None = None) -> Response:
        serializer = StepBatchSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        specs = specs_from(serializer.validated_data["steps"])
        steps = steps_add(directive=self.directive, specs=specs, actor=actor_for(request))
        return Response({"steps": StepSerializer(self.fresh(steps), many=True).data}, status=status.HTTP_201_CREATED)

    @extend_schema(
        summary="Replace a step",
        description="Omitted fields take their defaults; `depends_on` replaces the dependency list.",
        request=StepInputSerializer,
        responses={200: StepSerializer, 400: BAD_INPUT, 403: OUT_OF_SCOPE, 404: ERROR, 409: REFUSED},
    )
    def update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        step = self.get_object()
        serializer = StepInputSerializer(data=request.data, partial=kwargs.get("partial", False))
        serializer.is_valid(raise_exception=True)
        fields = dict(serializer.validated_data)
        depends_on = fields.pop("depends_on", None)
        step_update(step=step, actor=actor_for(request), depends_on=depends_on, **fields)
        return self.render(step)

    @extend_schema(
        summary="Edit a step",
        description="`depends_on`, when given, replaces the dependency list (in the order given).",
        request=StepInputSerializer,
        responses={200: StepSerializer, 400: BAD_INPUT, 403: OUT_OF_SCOPE, 404: ERROR, 409: REFUSED},
    )
    def partial_update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return self.update(request, *args, partial=True, **kwargs)

    @extend_schema(
        summary="Remove a step",
        description="Only a step that has not started, and that no other step depends on.",
        request=None,
        responses={204: None, 403: OUT_OF_SCOPE, 404: ERROR, 409: REFUSED},
    )
    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        step_remove(step=self.get_object(), actor=actor_for(request))
        return Response(status=status.HTTP_204_NO_CONTENT)

    def _act(self, request: Request, service: Callable[..., Step]) -> Response:
        step = self.get_object()
        service(step=step, actor=actor_for(request))
        return self.render(step)

    @extend_schema(
        summary="Retry a failed step",
        request=None,
        responses={200: StepSerializer, 404: ERROR, 409: REFUSED},
    )
    @action(detail=True, methods=["post"])
    def retry(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return self._act(request, step_retry)

    @extend_schema(
        summary="Skip a step",
        request=None,
        responses={200: StepSerializer, 404: ERROR, 409: REFUSED},
    )
    @action(detail=True, methods=["post"])
    def skip(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return self._act(request, step_skip)

    @extend_schema(
        summary="Evaluate a step again",
        description="Asks for a fresh evaluation of a step that has been executed.",
        request=None,
        responses={200: StepSerializer, 404: ERROR, 409: REFUSED},
    )
    @action(detail=True, methods=["post"])
    def evaluate(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return self._act(request, step_request_evaluation)


# --------------------------------------------------------------------------- events


@extend_schema(parameters=[DIRECTIVE_PK])
class DirectiveEventViewSet(InDirectiveMixin, viewsets.GenericViewSet):
    """The event log of one directive, oldest first."""

    serializer_class = DirectiveEventSerializer
    pagination_class = None
    filter_backends: list[Any] = []

    def get_queryset(self) -> QuerySet[DirectiveEvent]:
        if _is_schema_generation(self):
            return DirectiveEvent.objects.none()
        return events_visible_to(self.request.user).filter(directive_id=self.kwargs["directive_pk"])

    @extend_schema(
        summary="List the events of a directive",
        description=(
            "Events with an id larger than `after`, oldest first: a plain list (not paginated) of at most "
            "`limit` events. To follow the feed, pass the last id you received as `after`."
        ),
        parameters=[EventQuerySerializer],
        responses={200: DirectiveEventSerializer(many=True), 400: BAD_INPUT, 403: OUT_OF_SCOPE, 404: ERROR},
    )
    def list(self, request: Request, directive_pk: str | None = None) -> Response:
        query = EventQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        params = query.validated_data
        events = self.get_queryset()
        if "after" in params:
            events = events.filter(id__gt=params["after"])
        if "severity" in params:
            events = events.filter(severity=params["severity"])
        events = events.order_by("id")[: params["limit"]]
        return Response(DirectiveEventSerializer(events, many=True).data)


# --------------------------------------------------------------------------- chains and evaluations


class ChainFilter(filters.FilterSet):
    directive = filters.UUIDFilter(field_name="directive_id")
    status = filters.ChoiceFilter(choices=Chain.Status.choices)

    class Meta:
        model = Chain
        fields = ["directive", "status"]


@extend_schema_view(
    list=extend_schema(summary="List chains"),
    retrieve=extend_schema(summary="Show a chain", responses={200: ChainSerializer, 403: OUT_OF_SCOPE, 404: ERROR}),
)
class ChainViewSet(ScopedViewSetMixin, viewsets.ReadOnlyModelViewSet):
    serializer_class = ChainSerializer
    filterset_class = ChainFilter
    lookup_value_regex = UUID_RE

    def get_queryset(self) -> QuerySet[Chain]:
        if _is_schema_generation(self):
            return Chain.objects.none()
        queryset = chains_visible_to(self.request.user)
        return self.narrow_to_token(queryset) if self.action == "list" else queryset


class EvaluationFilter(filters.FilterSet):
    directive = filters.UUIDFilter(field_name="directive_id")
    step = filters.UUIDFilter(field_name="step_id")

    class Meta:
        model = Evaluation
        fields = ["directive", "step"]


@extend_schema_view(
    list=extend_schema(summary="List evaluations"),
    retrieve=extend_schema(
        summary="Show an evaluation", responses={200: EvaluationSerializer, 403: OUT_OF_SCOPE, 404: ERROR}
    ),
)
class EvaluationViewSet(ScopedViewSetMixin, viewsets.ReadOnlyModelViewSet):
    serializer_class = EvaluationSerializer
    filterset_class = EvaluationFilter
    lookup_value_regex = UUID_RE

    def get_queryset(self) -> QuerySet[Evaluation]:
        if _is_schema_generation(self):
            return Evaluation.objects.none()
        queryset = evaluations_visible_to(self.request.user)
        return self.narrow_to_token(queryset) if self.action == "list" else queryset


# --------------------------------------------------------------------------- approvals


class ApprovalFilter(filters.FilterSet):
    status = filters.ChoiceFilter(choices=ApprovalRequest.Status.choices)
    kind = filters.ChoiceFilter(choices=ApprovalRequest.Kind.choices)
    directive = filters.UUIDFilter(field_name="directive_id")
    step = filters.UUIDFilter(field_name="step_id")

    class Meta:
        model = ApprovalRequest
        fields = ["status", "kind", "directive", "step"]


@extend_schema_view(
    list=extend_schema(
        summary="List approval requests", description="Answered requests stay listed with their status."
    ),
    retrieve=extend_schema(
        summary="Show an approval request", responses={200: ApprovalSerializer, 403: OUT_OF_SCOPE, 404: ERROR}
    ),
)
class ApprovalViewSet(ScopedViewSetMixin, viewsets.ReadOnlyModelViewSet):
    """Approval requests. Answering one is a person's decision: task tokens may read but not answer."""

    serializer_class = ApprovalSerializer
    filterset_class = ApprovalFilter
    lookup_value_regex = UUID_RE

    def get_queryset(self) -> QuerySet[ApprovalRequest]:
        if _is_schema_generation(self):
            return ApprovalRequest.objects.none()
        queryset = approvals_visible_to(self.request.user).select_related("responded_by")
        return self.narrow_to_token(queryset) if self.action == "list" else queryset

    def _answer(self, request: Request, service: Callable[..., ApprovalRequest]) -> Response:
        approval = self.get_object()
        if task_token(request) is not None:
            raise OutOfScope("Approval requests are answered by people, not by task tokens.")
        body = ApprovalAnswerSerializer(data=request.data or {})
        body.is_valid(raise_exception=True)
        service(approval=approval, actor=actor_for(request), note=body.validated_data["note"])
        fresh = self.get_queryset().get(pk=approval.pk)
        return Response(ApprovalSerializer(fresh).data)

    @extend_schema(
        summary="Approve",
        description="A reviewed step passes; a reviewed plan becomes the active chain.",
        request=ApprovalAnswerSerializer,
        responses={200: ApprovalSerializer, 400: BAD_INPUT, 403: OUT_OF_SCOPE, 404: ERROR, 409: REFUSED},
    )
    @action(detail=True, methods=["post"])
    def approve(self, request: Request, pk: str | None = None) -> Response:
        return self._answer(request, approval_approve)

    @extend_schema(
        summary="Deny",
        description="A reviewed step goes back for rework, with the note as its instructions.",
        request=ApprovalAnswerSerializer,
        responses={200: ApprovalSerializer, 400: BAD_INPUT, 403: OUT_OF_SCOPE, 404: ERROR, 409: REFUSED},
    )
    @action(detail=True, methods=["post"])
    def deny(self, request: Request, pk: str | None = None) -> Response:
        return self._answer(request, approval_deny)


# --------------------------------------------------------------------------- orders


class OrderFilter(filters.FilterSet):
    status = filters.ChoiceFilter(choices=Order.Status.choices)
    priority = filters.ChoiceFilter(choices=Order.Priority.choices)
    directive = filters.UUIDFilter(field_name="directive_id")

    class Meta:
        model = Order
        fields = ["status", "priority", "directive"]


@extend_schema_view(
    list=extend_schema(summary="List orders", responses={200: OrderSerializer(many=True), 403: OUT_OF_SCOPE}),
    retrieve=extend_schema(summary="Show an order", responses={200: OrderSerializer, 403: OUT_OF_SCOPE, 404: ERROR}),
)
class OrderViewSet(ScopedViewSetMixin, mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    """Orders (work items for the planner). Closed to task tokens: every route answers them 403."""

    serializer_class = OrderSerializer
    filterset_class = OrderFilter
    scope_directive_field = None
    lookup_value_regex = UUID_RE

    def initial(self, request: Request, *args: Any, **kwargs: Any) -> None:
        super().initial(request, *args, **kwargs)
        if task_token(request) is not None:
            raise OutOfScope("A task token cannot use orders.")

    def get_queryset(self) -> QuerySet[Order]:
        if _is_schema_generation(self):
            return Order.objects.none()
        return orders_visible_to(self.request.user).select_related("owner")

    def render(self, order: Order, *, status_code: int = status.HTTP_200_OK) -> Response:
        # A team member who unlinks an order from a shared directive can no longer
        # see it afterwards; answer with the row as the service left it.
        fresh = self.get_queryset().filter(pk=order.pk).first() or order
        return Response(OrderSerializer(fresh).data, status=status_code)

    @extend_schema(
        summary="Create an order",
        request=OrderWriteSerializer,
        responses={201: OrderSerializer, 400: BAD_INPUT, 403: OUT_OF_SCOPE},
    )
    def create(self, request: Request) -> Response:
        serializer = OrderWriteSerializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        order = order_create(owner=request.user, actor=actor_for(request), **serializer.validated_data)
        return self.render(order, status_code=status.HTTP_201_CREATED)

    @extend_schema(
        summary="Replace an order's text and classification",
        request=OrderWriteSerializer,
        responses={200: OrderSerializer, 400: BAD_INPUT, 403: OUT_OF_SCOPE, 404: ERROR},
    )
    def update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        order = self.get_object()
        serializer = OrderWriteSerializer(data=request.data, partial=kwargs.get("partial", False))
        serializer.is_valid(raise_exception=True)
        order_update(order=order, actor=actor_for(request), **serializer.validated_data)
        return self.render(order)

    @extend_schema(
        summary="Edit an order",
        request=OrderWriteSerializer,
        responses={200: OrderSerializer, 400: BAD_INPUT, 403: OUT_OF_SCOPE, 404: ERROR},
    )
    def partial_update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return self.update(request, *args, partial=True, **kwargs)

    @extend_schema(
        summary="Delete an order",
        description="Only open or cancelled orders; unlink or cancel a linked one first.",
        request=None,
        responses={204: None, 403: OUT_OF_SCOPE, 404: ERROR, 409: REFUSED},
    )
    def destroy(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        order_delete(order=self.get_object(), actor=actor_for(request))
        return Response(status=status.HTTP_204_NO_CONTENT)

    @extend_schema(
        summary="Link an order to a directive",
        description="The directive must be one you can see; any other id is a 400 (`Unknown directive`).",
        request=OrderLinkSerializer,
        responses={200: OrderSerializer, 400: BAD_INPUT, 403: OUT_OF_SCOPE, 404: ERROR, 409: REFUSED},
    )
    @action(detail=True, methods=["post"])
    def link(self, request: Request, pk: str | None = None) -> Response:
        order = self.get_object()
        serializer = OrderLinkSerializer(data=request.data, context=self.get_serializer_context())
        serializer.is_valid(raise_exception=True)
        order_link(order=order, directive=serializer.validated_data["directive"], actor=actor_for(request))
        return self.render(order)

    @extend_schema(
        summary="Unlink an order (back to open)",
        request=None,
        responses={200: OrderSerializer, 403: OUT_OF_SCOPE, 404: ERROR, 409: REFUSED},
    )
    @action(detail=True, methods=["post"])
    def unlink(self, request: Request, pk: str | None = None) -> Response:
        order = self.get_object()
        order_unlink(order=order, actor=actor_for(request))
        return self.render(order)

    @extend_schema(
        summary="Cancel an order",
        request=None,
        responses={200: OrderSerializer, 403: OUT_OF_SCOPE, 404: ERROR, 409: REFUSED},
    )
    @action(detail=True, methods=["post"])
    def cancel(self, request: Request, pk: str | None = None) -> Response:
        order = self.get_object()
        order_cancel(order=order, actor=actor_for(request))
        return self.render(order)
