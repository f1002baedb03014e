"""The retry layer's settings and lines, without a network (the stores' tests exercise them live)."""

from __future__ import annotations

import pytest

from armlab.errors import ArmlabError
from armlab.store.net import Retry, network_error


def test_retry_settings_come_from_the_environment_and_bad_ones_are_one_line(monkeypatch) -> None:
    monkeypatch.setenv("ARMLAB_NET_ATTEMPTS", "3")
    monkeypatch.setenv("ARMLAB_NET_BACKOFF", "0.5")
    monkeypatch.setenv("ARMLAB_NET_TIMEOUT", "7")
    assert Retry.from_env() == Retry(attempts=3, backoff=0.5, timeout=7.0)
    for name, value in (
        ("ARMLAB_NET_TIMEOUT", "0"),
        ("ARMLAB_NET_TIMEOUT", "soon"),
        ("ARMLAB_NET_ATTEMPTS", "2.5"),
    ):
        monkeypatch.setenv(name, value)
        with pytest.raises(ArmlabError, match=f"{name}='{value}': not a valid"):
            Retry.from_env()
        monkeypatch.delenv(name)


def test_a_timeout_is_said_as_no_answer_with_the_wait_and_the_knob() -> None:
    from fsspec.exceptions import FSTimeoutError

    msg = str(network_error(FSTimeoutError(), "https://u:pw@h.example/pool/?token=s", 5, Retry(timeout=30)))
    assert msg == (
        "https://***@h.example/pool/?token=***: no answer from h.example in 30 s (after 5 attempts); check the "
        "server and the network (ARMLAB_NET_TIMEOUT sets the wait), then rerun the same command to resume"
    )
