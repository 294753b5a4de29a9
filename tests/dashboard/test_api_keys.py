"""The API keys page: user API keys and daemon tokens, created once-visible and revoked."""

from __future__ import annotations

import re

from django.urls import reverse

from daemons.models import ApiToken
from daemons.services import token_authenticate, token_digest
from tests.factories import make_daemon, make_directive, make_task, make_token

XSS = "<script>alert(1)</script><img src=x onerror=alert(1)>"
KEYS = reverse("apikey-list")
CREATE = reverse("apikey-create")


def revoke_url(token: ApiToken) -> str:
    return reverse("apikey-revoke", args=[token.pk])


def shown_token(html: str) -> str:
    match = re.search(r'id="new-token-value"[^>]*value="([^"]+)"', html)
    assert match, "the new token is not on the page"
    return match.group(1)


def test_the_page_lists_the_users_keys_and_daemon_tokens_but_not_task_tokens(client_as, alice):
    user_key = make_token(alice, name="laptop CLI").token
    daemon_token = make_token(alice, ApiToken.Kind.DAEMON, name="build box").token
    make_daemon(alice, "build-box-1", token=daemon_token)
    task_token = make_token(alice, ApiToken.Kind.TASK, task=make_task(make_directive(alice)), name="task key").token
    response = client_as(alice).get(KEYS)
    assert response.status_code == 200
    assert response.context["nav"] == "keys"
    html = response.content.decode()
    assert "laptop CLI" in html and "User API key" in html and f"{user_key.prefix}…" in html
    assert "build box" in html and "Daemon token" in html and "used by build-box-1" in html
    assert "task key" not in html and revoke_url(task_token) not in html
    assert "never" in html  # last used


def test_creating_a_key_shows_the_plain_token_once(client_as, alice):
    client = client_as(alice)
    response = client.post(CREATE, {"name": "CI runner", "kind": "user"})
    assert response.status_code == 200
    assert "no-store" in response["Cache-Control"]
    html = response.content.decode()
    plain = shown_token(html)
    assert plain.startswith("mk_u_")
    assert "it will not be shown again" in html
    token = ApiToken.objects.get(owner=alice, name="CI runner")
    assert (token.kind, token.digest, token.prefix) == ("user", token_digest(plain), plain[:12])
    assert token_authenticate(plain) == token
    # Only the hash is kept: not the row, not the session, not the next page.
    assert plain not in str(ApiToken.objects.filter(pk=token.pk).values().get())
    assert plain not in str(dict(client.session))
    later = client.get(KEYS).content.decode()
    assert plain not in later and "CI runner" in later


def test_a_daemon_token_comes_with_the_command_to_start_a_daemon(client_as, alice):
    html = client_as(alice).post(CREATE, {"name": "box", "kind": "daemon"}).content.decode()
    plain = shown_token(html)
    assert plain.startswith("mk_d_")
    assert "makima daemon run --server" in html and f"--token {plain}" in html
    assert ApiToken.objects.get(owner=alice).kind == "daemon"


def test_an_invalid_key_request_is_refused_next_to_the_field(client_as, alice):
    for data, field in (({"name": "  ", "kind": "user"}, "name"), ({"name": "x", "kind": "task"}, "kind")):
        response = client_as(alice).post(CREATE, data)
        assert response.status_code == 400
        assert field in response.context["form"].errors
        assert response.context["new_token"] is None
    assert not ApiToken.objects.exists()


def test_revoking_a_key_stops_it_working(client_as, alice):
    new = make_token(alice, name="old key")
    response = client_as(alice).post(revoke_url(new.token), follow=True)
    assert "is revoked" in response.content.decode()
    new.token.refresh_from_db()
    assert new.token.revoked_at is not None
    assert token_authenticate(new.plain) is None
    assert "revoked" in response.content.decode()
    assert revoke_url(new.token) not in response.content.decode()


def test_revoking_twice_says_so_and_changes_nothing(client_as, alice):
    token = make_token(alice).token
    client_as(alice).post(revoke_url(token))
    token.refresh_from_db()
    first = token.revoked_at
    response = client_as(alice).post(revoke_url(token), follow=True)
    assert "already revoked" in response.content.decode()
    token.refresh_from_db()
    assert token.revoked_at == first


def test_another_users_key_is_a_404(client_as, alice, bob, carol):
    token = make_token(alice, name="alice's key").token
    for user in (bob, carol):
        client = client_as(user)
        assert "alice&#x27;s key" not in client.get(KEYS).content.decode()
        assert client.post(revoke_url(token)).status_code == 404
    token.refresh_from_db()
    assert token.revoked_at is None


def test_a_task_token_cannot_be_revoked_from_the_page(client_as, alice):
    token = make_token(alice, ApiToken.Kind.TASK, task=make_task(make_directive(alice))).token
    assert client_as(alice).post(revoke_url(token)).status_code == 404


def test_anonymous_visitors_are_sent_to_sign_in(client, alice):
    token = make_token(alice).token
    for response in (
        client.get(KEYS),
        client.post(CREATE, {"name": "x", "kind": "user"}),
        client.post(revoke_url(token)),
    ):
        assert response.status_code == 302
        assert response["Location"].startswith(reverse("login"))
    assert ApiToken.objects.count() == 1


def test_key_changes_need_a_post(client_as, alice):
    token = make_token(alice).token
    assert client_as(alice).get(CREATE).status_code == 405
    assert client_as(alice).get(revoke_url(token)).status_code == 405


def test_key_names_are_escaped(client_as, alice):
    make_token(alice, ApiToken.Kind.DAEMON, name=XSS)
    html = client_as(alice).get(KEYS).content.decode()
    created = client_as(alice).post(CREATE, {"name": XSS, "kind": "user"}).content.decode()
    for page in (html, created):
        assert "<script>alert(1)</script>" not in page
        assert "<img src=x" not in page
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_the_list_runs_a_constant_number_of_queries(client_as, alice, django_assert_max_num_queries):
    for i in range(30):
        token = make_token(alice, ApiToken.Kind.DAEMON if i % 2 else ApiToken.Kind.USER, name=f"key {i}").token
        if i % 2:
            make_daemon(alice, f"box-{i}", token=token)
    client = client_as(alice)
    with django_assert_max_num_queries(6):
        response = client.get(KEYS)
    assert len(response.context["tokens"]) == 30
