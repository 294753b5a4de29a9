"""Forms of the daemons and API keys pages. They only parse input: tokens are
minted and revoked by ``daemons.services``."""

from __future__ import annotations

from django import forms

from daemons.models import ApiToken

# Task tokens are minted by the server for one task; people create the other two kinds.
CREATABLE_KINDS = [
    (ApiToken.Kind.USER.value, "User API key — for the makima CLI and the REST API"),
    (ApiToken.Kind.DAEMON.value, "Daemon token — lets a worker machine connect with makima daemon run"),
]


class TokenCreateForm(forms.Form):
    name = forms.CharField(
        max_length=200,
        help_text="Something to recognise it by later, e.g. the machine it runs on.",
    )
    kind = forms.ChoiceField(choices=CREATABLE_KINDS, initial=ApiToken.Kind.USER, widget=forms.RadioSelect)

    def clean_name(self) -> str:
        name = self.cleaned_data["name"].strip()
        if not name:
            raise forms.ValidationError("Give the key a name.")
        return name
