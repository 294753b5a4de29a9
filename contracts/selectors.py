"""What a user may see of contracts, tasks and their output."""

from __future__ import annotations

from typing import Any

from django.db.models import Q, QuerySet

from contracts.models import Contract, ContractFile, Task, TaskOutput


def _owned_or_shared(user: Any, *, prefix: str = "") -> Q:
    if not user.is_authenticated:
        return Q(pk__in=[])
    return Q(**{f"{prefix}owner": user}) | Q(**{f"{prefix}directive__team__in": user.groups.all()})


def contracts_visible_to(user: Any) -> QuerySet[Contract]:
    return Contract.objects.filter(_owned_or_shared(user))


def contract_files_visible_to(user: Any) -> QuerySet[ContractFile]:
    return ContractFile.objects.filter(_owned_or_shared(user, prefix="contract__"))


def tasks_visible_to(user: Any) -> QuerySet[Task]:
    return Task.objects.filter(_owned_or_shared(user))


def task_output_visible_to(user: Any) -> QuerySet[TaskOutput]:
    return TaskOutput.objects.filter(_owned_or_shared(user, prefix="task__"))
