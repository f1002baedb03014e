"""The one redaction function: what it removes from URLs and messages, and what it keeps."""

from __future__ import annotations

import pytest

from armlab.store.redact import redact


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("https://bob:pw-123@host/pool/", "https://***@host/pool/"),
        ("http://h/p/?token=abc123&page=2", "http://h/p/?token=***&page=2"),
        (
            "https://a.blob.core.windows.net/c/b?sv=2024-11-04&sp=rl&sig=AbC%2Fd%3D",
            "https://a.blob.core.windows.net/c/b?sv=2024-11-04&sp=rl&sig=***",
        ),
        (
            "s3://b/k?X-Amz-Signature=f00&X-Amz-Credential=AKIA/x",
            "s3://b/k?X-Amz-Signature=***&X-Amz-Credential=***",
        ),
        ("x?api_key=k1&password=p2&access_token=t3", "x?api_key=***&password=***&access_token=***"),
        (
            "AccountName=a;AccountKey=c2VjcmV0==;BlobEndpoint=http://h",
            "AccountName=a;AccountKey=***;BlobEndpoint=http://h",
        ),
        ("Authorization: Bearer eyJhbGciOi.x.y", "Authorization: Bearer ***"),
        # a named secret is kept: it is not one, and the request reads its value
        ("https://h/pool/?token=${POOL_TOKEN}", "https://h/pool/?token=${POOL_TOKEN}"),
        ("https://${USER}:${PASS}@h/", "https://${USER}:${PASS}@h/"),
        ("hf://datasets/owner/name/data/*.parquet", "hf://datasets/owner/name/data/*.parquet"),
    ],
)
def test_redact(text: str, shown: str) -> None:
    assert redact(text) == shown


def test_secrets_from_the_environment_are_removed_wherever_they_appear() -> None:
    env = {"HF_TOKEN": "hf_abcdefghijklmnop", "AZURE_STORAGE_KEY": "k3y+with/slashes=="}
    out = redact("token hf_abcdefghijklmnop in k3y%2Bwith%2Fslashes%3D%3D and k3y+with/slashes==", env)
    assert "hf_abcdefghijklmnop" not in out and "k3y" not in out
