"""Azure auth resolution from the environment, az:// parsing and secret scrubbing (no server)."""

from __future__ import annotations

import pytest

from armlab.errors import ArmlabError
from armlab.store.azure import parse_az_uri
from armlab.store.azure_auth import auth_from_env
from armlab.store.redact import redact as scrub

KEY = "c2VjcmV0LWtleS1ub3QtYS1yZWFsLW9uZS0xMjM0NTY3ODkwYWJjZGVm+/=="
SAS = "sv=2024-11-04&ss=b&srt=co&sp=rl&se=2030-01-01T00:00:00Z&sig=AbCdEfGhIjKlMnOpQrStUvWxYz0123456789%2B%2F%3D"


def test_connection_string_comes_first_and_names_its_source():
    env = {
        "AZURE_STORAGE_CONNECTION_STRING": f"DefaultEndpointsProtocol=https;AccountName=acct;AccountKey={KEY};EndpointSuffix=core.windows.net",
        "AZURE_STORAGE_ACCOUNT": "other",
        "AZURE_STORAGE_KEY": "ignored-because-connection-string-wins",
    }
    auth = auth_from_env(env)
    assert auth.account_url == "https://acct.blob.core.windows.net"
    assert auth.credential == {"account_name": "acct", "account_key": KEY}
    assert auth.source == "AZURE_STORAGE_CONNECTION_STRING"
    assert KEY not in auth.source


def test_connection_string_blob_endpoint_and_override():
    cs = (
        f"AccountName=devstoreaccount1;AccountKey={KEY};BlobEndpoint=http://127.0.0.1:10000/devstoreaccount1;"
    )
    assert (
        auth_from_env({"AZURE_STORAGE_CONNECTION_STRING": cs}).account_url
        == "http://127.0.0.1:10000/devstoreaccount1"
    )
    env = {
        "AZURE_STORAGE_CONNECTION_STRING": cs,
        "AZURE_STORAGE_BLOB_ENDPOINT": "http://127.0.0.1:9999/devstoreaccount1/",
    }
    auth = auth_from_env(env)
    assert auth.account_url == "http://127.0.0.1:9999/devstoreaccount1"
    assert "AZURE_STORAGE_BLOB_ENDPOINT" in auth.source


def test_account_key_then_sas_then_anonymous_order():
    auth = auth_from_env(
        {"AZURE_STORAGE_ACCOUNT": "acct", "AZURE_STORAGE_KEY": KEY, "AZURE_STORAGE_SAS_TOKEN": SAS}
    )
    assert auth.credential == {"account_name": "acct", "account_key": KEY}
    assert auth.account_url == "https://acct.blob.core.windows.net"

    auth = auth_from_env({"AZURE_STORAGE_ACCOUNT": "acct", "AZURE_STORAGE_SAS_TOKEN": "?" + SAS})
    assert auth.credential == SAS and auth.source == "AZURE_STORAGE_SAS_TOKEN"

    auth = auth_from_env(
        {"AZURE_STORAGE_ACCOUNT_URL": "https://acct.blob.core.windows.net", "AZURE_STORAGE_SAS_TOKEN": SAS}
    )
    assert auth.account_url == "https://acct.blob.core.windows.net" and auth.credential == SAS

    # azure-identity is not installed here: a known account without a secret is anonymous access
    auth = auth_from_env({"AZURE_STORAGE_ACCOUNT": "acct"})
    assert auth.credential is None and "anonymous" in auth.source


def test_missing_or_partial_configuration_is_one_clear_line():
    with pytest.raises(ArmlabError, match="AZURE_STORAGE_CONNECTION_STRING"):
        auth_from_env({})
    with pytest.raises(ArmlabError, match="AZURE_STORAGE_ACCOUNT is not"):
        auth_from_env({"AZURE_STORAGE_KEY": KEY})
    with pytest.raises(ArmlabError, match="UseDevelopmentStorage"):
        auth_from_env({"AZURE_STORAGE_CONNECTION_STRING": "UseDevelopmentStorage=true"})


def test_a_key_that_is_not_base64_fails_at_once_without_echoing_it():
    bad = "not-a-key!" * 5
    with pytest.raises(ArmlabError, match="AZURE_STORAGE_KEY is not a valid account key") as e:
        auth_from_env({"AZURE_STORAGE_ACCOUNT": "acct", "AZURE_STORAGE_KEY": bad})
    assert bad not in str(e.value)
    cs = f"AccountName=acct;AccountKey={bad};BlobEndpoint=http://127.0.0.1:1/acct"
    with pytest.raises(ArmlabError, match="AccountKey is not a valid account key") as e:
        auth_from_env({"AZURE_STORAGE_CONNECTION_STRING": cs})
    assert bad not in str(e.value)


def test_scrub_removes_keys_sas_and_signatures():
    env = {"AZURE_STORAGE_KEY": KEY, "AZURE_STORAGE_SAS_TOKEN": SAS}
    text = (
        f"failed: AccountKey={KEY}; url https://acct.blob.core.windows.net/c/b?{SAS} "
        "Authorization: SharedKey acct:ZGVyaXZlZC1zaWduYXR1cmU= "
        "other sig=Zm9vYmFyYmF6cXV4 and SharedAccessSignature=sv=1&sig=abc;"
    )
    out = scrub(text, env)
    for secret in (KEY, SAS, "ZGVyaXZlZC1zaWduYXR1cmU=", "Zm9vYmFyYmF6cXV4", "AbCdEfGhIjKlMnOpQrStUvWxYz"):
        assert secret not in out
    assert "acct.blob.core.windows.net" in out  # the rest stays readable
    # a URL-encoded key (as in a query string) is scrubbed too
    from urllib.parse import quote

    assert quote(KEY, safe="") not in scrub(f"x={quote(KEY, safe='')}", env)


@pytest.mark.parametrize(
    ("uri", "container", "prefix"),
    [
        ("az://quratingfiltered", "quratingfiltered", ""),
        ("az://quratingfiltered/", "quratingfiltered", ""),
        ("az://quratingfiltered/top16", "quratingfiltered", "top16/"),
        ("az://my-data/a/b/", "my-data", "a/b/"),
    ],
)
def test_parse_az_uri(uri, container, prefix):
    az = parse_az_uri(uri)
    assert (az.container, az.prefix) == (container, prefix)
    assert az.uri() == f"az://{container}/{prefix}"


@pytest.mark.parametrize("uri", ["s3://bucket/x", "az://", "az://UPPER/x", "az://ab/x", "az://a--b/x"])
def test_parse_az_uri_rejects(uri):
    with pytest.raises(ArmlabError):
        parse_az_uri(uri)


def test_playbook_prebuilt_example_is_valid(repo_root):
    from armlab.spec import load_experiment

    exp = load_experiment(repo_root / "examples" / "playbook-prebuilt-top.toml")
    top, rand = exp.arm("top16.5"), exp.arm("random16.5")
    assert (top.kind, top.download_mode) == ("prebuilt", "bulk")
    assert parse_az_uri(top.uri).container == "quratingfiltered"
    assert (rand.kind, rand.ratio, rand.seed) == ("random", 0.165, 42)
    assert {h.master_port for h in exp.hosts} == {29500, 29501}


@pytest.mark.parametrize(
    ("env", "where"),
    [
        (
            {"AZURE_STORAGE_CONNECTION_STRING": f"AccountName=a;AccountKey={KEY};BlobEndpoint=http://[::1"},
            "BlobEndpoint",
        ),
        (
            {
                "AZURE_STORAGE_CONNECTION_STRING": f"AccountName=a;AccountKey={KEY};BlobEndpoint=127.0.0.1:10000/a"
            },
            "BlobEndpoint",
        ),
        (
            {"AZURE_STORAGE_ACCOUNT": "acct", "AZURE_STORAGE_BLOB_ENDPOINT": "https://[fe80::1/x"},
            "AZURE_STORAGE_BLOB_ENDPOINT",
        ),
        ({"AZURE_STORAGE_ACCOUNT": "bad[name"}, "AZURE_STORAGE_ACCOUNT"),
    ],
)
def test_a_malformed_endpoint_is_one_line_naming_its_variable(env, where):
    with pytest.raises(ArmlabError, match=where) as e:
        auth_from_env(env)
    assert "not a valid endpoint URL" in str(e.value) and KEY not in str(e.value)


def test_a_malformed_blob_endpoint_through_the_cli(tmp_path, monkeypatch):
    from data_util import experiment_toml
    from test_data_prepare import assert_refused, cli

    exp = tmp_path / "exp.toml"
    exp.write_text(experiment_toml(tmp_path / "wd", str(tmp_path / "pool")))
    cs = f"AccountName=devstoreaccount1;AccountKey={KEY};BlobEndpoint=http://[::1:10000/devstoreaccount1"
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", cs)
    res = cli("pull", exp, "--arm", "rand", "--from", "az://armlab-test/rand")
    assert_refused(res, "AZURE_STORAGE_CONNECTION_STRING's BlobEndpoint", "not a valid endpoint URL")
    assert KEY not in res.stderr


def test_userinfo_in_an_endpoint_never_reaches_a_message():
    from azure.core.exceptions import ServiceRequestError

    from armlab.store.net import network_error

    env = {
        "AZURE_STORAGE_CONNECTION_STRING": f"AccountName=a;AccountKey={KEY};BlobEndpoint=https://u:pa55word-xyz@h.example/a"
    }
    auth = auth_from_env(env)
    msg = str(network_error(ServiceRequestError("Connection refused"), "az://c/x", 3, endpoint=auth.account_url))
    assert "pa55word-xyz" not in msg and "https://***@h.example/a" in msg
    assert scrub("see http://user:pw-secret@host/x and hf://x") == "see http://***@host/x and hf://x"
