"""Accounts through the site: sign up, log out, log in."""

from __future__ import annotations

import pytest
from django.contrib.auth import get_user_model
from django.test import Client

pytestmark = pytest.mark.django_db


def test_a_visitor_signs_up_logs_out_and_logs_in_again() -> None:
    client = Client()
    response = client.post("/signup/", {"username": "nora", "password1": "a-long-Passphrase-9",
                                        "password2": "a-long-Passphrase-9"})
    assert response.status_code == 302
    assert get_user_model().objects.filter(username="nora").exists()
    assert "Log out nora" in client.get("/").content.decode()

    assert client.post("/logout/").status_code == 302
    assert "Log out nora" not in client.get("/").content.decode()
    assert client.get("/collections/new/").status_code == 302  # back to the login page

    wrong = client.post("/login/", {"username": "nora", "password": "nope"})
    assert wrong.status_code == 200 and "Log out nora" not in wrong.content.decode()
    assert client.post("/login/", {"username": "nora", "password": "a-long-Passphrase-9"}).status_code == 302
    assert "Log out nora" in client.get("/").content.decode()


def test_a_weak_password_is_refused_with_the_reason() -> None:
    response = Client().post("/signup/", {"username": "olaf", "password1": "123", "password2": "123"})
    assert response.status_code == 200
    assert "too short" in response.content.decode()
    assert not get_user_model().objects.filter(username="olaf").exists()
