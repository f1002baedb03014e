"""publish / pull / prepare-from-published against a real Azurite, on arms made by the real
`armlab prepare`; plus the CLI's one-line errors and exit codes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from armlab.data.blob import publish, pull
from armlab.data.prepare import PrepareOptions, prepare
from armlab.data.shards import read_manifest
from armlab.errors import ArmlabError
from armlab.spec import load_experiment
from armlab.workdir import acquire_lease, open_workdir, release_lease
from azurite_util import KEY, RANDOM_ARM, armlab, azurite_env, fast_retries
from data_util import experiment_toml, make_pool


@pytest.fixture
def azurite(tmp_path, monkeypatch):
    yield from azurite_env(tmp_path, monkeypatch)


FAST = fast_retries()


def write_exp(tmp_path: Path, name: str, pool: Path, arms: str) -> Path:
    path = tmp_path / f"{name}.toml"
    # no id column: documents are identified by text hash, as they are in raw prebuilt shards
    path.write_text(
        experiment_toml(tmp_path / f"wd-{name}", str(pool), arms=arms).replace('id_column = "id"\n', "")
    )
    return path


def shard_hashes(data_dir: Path) -> list[tuple[str, str]]:
    return [(f["name"], f["sha256"]) for f in read_manifest(data_dir)["files"]]


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A prepared experiment (the 'CPU node' of the playbook)."""
    pool = tmp_path / "pool"
    make_pool(pool, n_docs=2400, n_files=3, with_id=False)
    path = write_exp(tmp_path, "src", pool, RANDOM_ARM)
    prepare(load_experiment(path), options=PrepareOptions(workers=1))
    return path


@pytest.mark.e2e
def test_publish_pull_and_prepare_from_published_give_identical_shards(azurite, source, tmp_path):
    src = load_experiment(source)
    src_dir = open_workdir(src, create=False).data_dir("rand")
    want = shard_hashes(src_dir)
    assert len(want) >= 3  # several shards, so order and names matter

    azurite.client().create_container("arms")
    report = publish(src, "rand", "az://arms/fineweb/rand", concurrency=4, retry=FAST)
    assert report.uploaded == len(want) and report.skipped == 0
    cc = azurite.client().get_container_client("arms")
    props = {b.name: b for b in cc.list_blobs(name_starts_with="fineweb/rand/")}
    assert sorted(props) == sorted([f"fineweb/rand/{n}" for n, _ in want] + ["fineweb/rand/manifest.json"])
    assert all(p.content_settings.content_md5 for p in props.values())  # readers can verify MD5
    # manifest last: no shard was written after it
    assert (
        max(p.last_modified for n, p in props.items() if n.endswith(".parquet"))
        <= props["fineweb/rand/manifest.json"].last_modified
    )

    # rerun: nothing to upload (resumable publish)
    again = publish(src, "rand", "az://arms/fineweb/rand", retry=FAST)
    assert again.uploaded == 0 and again.skipped == len(want)

    # another host (same spec, fresh workdir) pulls it: byte-identical manifest and shards
    pool = Path(src.pool.uri)
    dst = load_experiment(write_exp(tmp_path, "dst", pool, RANDOM_ARM))
    data_dir = pull(dst, "rand", "az://arms/fineweb/rand", retry=FAST)
    assert (data_dir / "manifest.json").read_bytes() == (src_dir / "manifest.json").read_bytes()
    for name, _ in want:
        assert (data_dir / name).read_bytes() == (src_dir / name).read_bytes()
    assert pull(dst, "rand", "az://arms/fineweb/rand", retry=FAST) == data_dir  # no-op rerun

    # and a prebuilt arm over the published prefix, prepared through the normal prepare path
    # (eval docs removed, reshuffled, re-sharded): the same documents in the same order
    prebuilt = '\n[[arms]]\nname = "rand-pub"\nkind = "prebuilt"\nuri = "az://arms/fineweb/rand"\nseed = 42\n'
    pb = load_experiment(write_exp(tmp_path, "pb", pool, prebuilt))
    out = prepare(pb, options=PrepareOptions(workers=1))
    assert shard_hashes(out["rand-pub"]) == want


@pytest.mark.e2e
def test_publish_and_pull_refusals(azurite, source, tmp_path):
    src = load_experiment(source)
    cc = azurite.client().get_container_client("arms")
    cc.create_container()
    cc.upload_blob("taken/other.parquet", b"someone else's")
    with pytest.raises(
        ArmlabError, match=r"already holds 1 blob that is not this arm's \(other\.parquet\).*--replace"
    ):
        publish(src, "rand", "az://arms/taken", retry=FAST)
    publish(src, "rand", "az://arms/taken", replace=True, retry=FAST)
    assert "taken/other.parquet" not in {b.name for b in cc.list_blobs()}

    # a shard modified after prepare is never published
    data_dir = open_workdir(src, create=False).data_dir("rand")
    shard = data_dir / "shard_00000.parquet"
    original = shard.read_bytes()
    shard.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
    with pytest.raises(ArmlabError, match=r"shard_00000\.parquet: sha256 differs from manifest\.json"):
        publish(src, "rand", "az://arms/fresh", retry=FAST)
    shard.write_bytes(original)

    # an arm of another spec is refused: another selection, or another eval set (whose docs the
    # published arm may hold)
    other = load_experiment(
        write_exp(tmp_path, "other", Path(src.pool.uri), RANDOM_ARM.replace("0.5", "0.4"))
    )
    with pytest.raises(ArmlabError, match=r"published from a different spec \(selection\.ratio differ\)"):
        pull(other, "rand", "az://arms/taken", retry=FAST)
    moved_eval = write_exp(tmp_path, "moved", Path(src.pool.uri), RANDOM_ARM)
    moved_eval.write_text(
        moved_eval.read_text().replace("[eval]\ndocs = 50\nseed = 0", "[eval]\ndocs = 50\nseed = 1")
    )
    moved = load_experiment(moved_eval)
    prepare(moved, arms=["rand"], options=PrepareOptions(workers=1))  # prepares its own eval set (seed 1) too
    with pytest.raises(ArmlabError, match=r"published from a different spec \(eval_cut differ\)"):
        pull(moved, "rand", "az://arms/taken", retry=FAST, force=True)

    dst = load_experiment(write_exp(tmp_path, "dst", Path(src.pool.uri), RANDOM_ARM))
    with pytest.raises(ArmlabError, match=r"no manifest\.json, so this is not a published arm"):
        pull(dst, "rand", "az://arms/nothing-here", retry=FAST)

    # a live run's lease blocks pull (no data moves under a live run)
    target = open_workdir(dst).data_dir("rand")
    assert not target.exists()  # the failed pull created nothing
    target.mkdir(parents=True)
    lease = acquire_lease(target, "rand-s0")
    try:
        with pytest.raises(ArmlabError, match="refusing to pull into it: leased by live run 'rand-s0'"):
            pull(dst, "rand", "az://arms/taken", retry=FAST)
    finally:
        release_lease(target, lease)
    pull(dst, "rand", "az://arms/taken", retry=FAST)

    # a published shard changed on the server after its manifest: caught by sha256, not kept
    bc = cc.get_blob_client("taken/shard_00001.parquet")
    bc.upload_blob(original, overwrite=True)  # a valid shard, but not the one the manifest lists
    (target / "manifest.json").unlink()
    with pytest.raises(
        ArmlabError,
        match=r"1 shard differs from the published manifest's sha256 \(shard_00001\.parquet\)",
    ):
        pull(dst, "rand", "az://arms/taken", retry=FAST)
    assert not (target / "shard_00001.parquet").exists() and not (target / "manifest.json").exists()


@pytest.mark.e2e
def test_cli_publish_pull_exit_codes_and_one_line_errors(azurite, source, tmp_path):
    env = azurite.env()
    ok = armlab(
        "publish", str(source), "--arm", "rand", "--container", "clitest", "--prefix", "arms/rand", env=env
    )
    assert ok.returncode == 2 and "container not found" in ok.stderr  # containers are not created implicitly
    azurite.client().create_container("clitest")
    ok = armlab("publish", str(source), "--arm", "rand", "--to", "az://clitest/arms/rand", env=env)
    assert ok.returncode == 0, ok.stderr
    assert "published rand to az://clitest/arms/rand/" in ok.stderr

    dst = write_exp(tmp_path, "dst", Path(load_experiment(source).pool.uri), RANDOM_ARM)
    ok = armlab(
        "pull",
        str(dst),
        "--arm",
        "rand",
        "--from",
        "az://clitest/arms/rand",
        "--download-mode",
        "sequential",
        env=env,
    )
    assert ok.returncode == 0, ok.stderr
    assert "pulled rand" in ok.stderr

    bad_key = "QmFkS2V5QmFkS2V5QmFkS2V5QmFkS2V5QmFkS2V5QmFkS2V5QmFkS2V5QmFkS2V5QmFkS2V5"
    cases = [
        (["pull", str(dst), "--arm", "rand", "--from", "az://nosuch/x"], env, "container not found"),
        (["pull", str(dst), "--arm", "rand", "--from", "s3://bucket/x"], env, "protocol s3:// is not available"),
        (["pull", str(dst), "--arm", "rand"], env, "has no az:// uri"),
        (["pull", str(dst), "--arm", "nope", "--from", "az://clitest/arms/rand"], env, "no arm named 'nope'"),
        (
            [
                "pull",
                str(dst),
                "--arm",
                "rand",
                "--from",
                "az://clitest/arms/rand",
                "--download-mode",
                "fast",
            ],
            env,
            "expected 'bulk' or 'sequential'",
        ),
        (["publish", str(dst), "--arm", "rand"], env, "give --to"),
        (
            ["pull", str(dst), "--arm", "rand", "--from", "az://clitest/arms/rand"],
            {"AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string.replace(KEY, bad_key)},
            "access denied",
        ),
    ]
    for args, case_env, expect in cases:
        r = armlab(*args, env=case_env)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, (args, r.stderr)
        assert len(lines) == 1 and lines[0].startswith("armlab: error:") and expect in lines[0], (
            args,
            r.stderr,
        )
        assert KEY not in r.stderr and bad_key not in r.stderr
    manifest = json.loads(
        (open_workdir(load_experiment(dst), create=False).data_dir("rand") / "manifest.json").read_text()
    )
    assert manifest["complete"] is True  # failed pulls left the pulled arm intact
