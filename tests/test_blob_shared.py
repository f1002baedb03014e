"""publish / pull of an experiment's shared assets (eval set + tokenizer) against a real Azurite,
on a workdir made by the real `armlab prepare` and a tokenizer trained by `armlab.tokenizer`:
the playbook's CPU node publishes, a GPU node (a fresh workdir of the same experiment) pulls."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from armlab.data.blob import publish_shared, pull_shared
from armlab.data.prepare import PrepareOptions, prepare
from armlab.errors import ArmlabError
from armlab.spec import load_experiment
from armlab.tokenizer import Tokenizer, load_experiment_tokenizer, train_experiment_tokenizer
from armlab.workdir import acquire_lease, open_workdir, release_lease
from azurite_util import RANDOM_ARM, armlab, azurite_env, fast_retries
from data_util import experiment_toml, make_pool


@pytest.fixture
def azurite(tmp_path, monkeypatch):
    yield from azurite_env(tmp_path, monkeypatch)


FAST = fast_retries()
TOKENIZER_FILES = ["manifest.json", "token_bytes.npy", "token_bytes.pt", "tokenizer.pkl"]


def write_exp(tmp_path: Path, workdir: str, pool: Path) -> Path:
    """The same experiment (same name and spec) in the workdir `wd-<workdir>`, as on another host."""
    path = tmp_path / f"{workdir}.toml"
    # 700 eval docs at 300 rows per shard: an eval set of several shards
    text = experiment_toml(tmp_path / f"wd-{workdir}", str(pool), arms=RANDOM_ARM, eval_docs=700)
    path.write_text(text.replace('id_column = "id"\n', ""))
    return path


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """The CPU node: pool prepared (eval set, tokenizer sample, arm) and the tokenizer trained."""
    pool = tmp_path / "pool"
    make_pool(pool, n_docs=2400, n_files=3, with_id=False)
    path = write_exp(tmp_path, "cpu", pool)
    exp = load_experiment(path)
    prepare(exp, options=PrepareOptions(workers=1))
    train_experiment_tokenizer(exp)
    return path


def files_of(directory: Path) -> dict[str, bytes]:
    """Top-level visible files of a dir (the download record and temp files are hidden)."""
    return {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file() and not p.name.startswith(".")}


@pytest.mark.e2e
def test_publish_shared_and_arm_then_pull_both_into_a_fresh_workdir(azurite, source, tmp_path):
    env = azurite.env()
    src = open_workdir(load_experiment(source), create=False)
    azurite.client().create_container("exps")
    r = armlab("publish", str(source), "--arm", "rand", "--shared", "--to", "az://exps/datatest", env=env)
    assert r.returncode == 0, r.stderr

    # layout: eval + tokenizer under _shared/ (no tokenizer training sample), the arm beside them
    cc = azurite.client().get_container_client("exps")
    props = {b.name: b for b in cc.list_blobs()}
    eval_names = sorted(files_of(src.eval_dir))
    assert len([n for n in eval_names if n.endswith(".parquet")]) >= 2
    arm_names = sorted(files_of(src.data_dir("rand")))
    assert sorted(props) == sorted(
        [f"datatest/_shared/eval/{n}" for n in eval_names]
        + [f"datatest/_shared/tokenizer/{n}" for n in TOKENIZER_FILES]
        + [f"datatest/rand/{n}" for n in arm_names]
    )
    assert all(p.content_settings.content_md5 for p in props.values())
    for folder in ("datatest/_shared/eval/", "datatest/_shared/tokenizer/", "datatest/rand/"):
        mine = {n: p for n, p in props.items() if n.startswith(folder)}
        manifest = mine.pop(folder + "manifest.json")
        assert max(p.last_modified for p in mine.values()) <= manifest.last_modified  # manifest last

    # the GPU node: a fresh workdir of the same experiment pulls the arm and the shared assets
    dst_path = write_exp(tmp_path, "gpu", Path(load_experiment(source).pool.uri))
    dst = open_workdir(load_experiment(dst_path), create=False)
    assert not dst.root.exists()
    r = armlab("pull", str(dst_path), "--arm", "rand", "--shared", "--from", "az://exps/datatest", env=env)
    assert r.returncode == 0, r.stderr
    assert files_of(dst.eval_dir) == files_of(src.eval_dir)
    assert files_of(dst.tokenizer_dir) == {n: (src.tokenizer_dir / n).read_bytes() for n in TOKENIZER_FILES}
    assert files_of(dst.data_dir("rand")) == files_of(src.data_dir("rand"))
    assert not dst.tokenizer_sample_dir.exists()  # the sample stays on the CPU node

    # the pulled tokenizer is usable, is this experiment's, and tokenizes like the original
    pulled = Tokenizer.load(dst.tokenizer_dir)
    original = Tokenizer.load(src.tokenizer_dir)
    assert (
        pulled.fingerprint
        == original.fingerprint
        == load_experiment_tokenizer(load_experiment(dst_path)).fingerprint
    )
    text = "the school research model learns energy #42"
    ids = pulled.encode([text])[0]
    assert ids == original.encode([text])[0] and ids[0] == pulled.bos_id
    assert pulled.decode(ids[1:]) == text
    assert np.array_equal(pulled.token_bytes, np.load(dst.tokenizer_dir / "token_bytes.npy"))

    # reruns move nothing: publish finds every blob there, pull finds the same assets here
    again = publish_shared(load_experiment(source), "az://exps/datatest", retry=FAST)
    assert [(rep.uploaded, rep.skipped) for rep in again] == [(0, len(eval_names) - 1), (0, len(TOKENIZER_FILES) - 1)]
    r = armlab("pull", str(dst_path), "--shared", "--from", "az://exps/datatest", env=env)
    assert r.returncode == 0, r.stderr
    assert r.stderr.count("nothing to pull") == 2


@pytest.mark.e2e
def test_shared_refusals_incomplete_different_corrupt_and_leased(azurite, source, tmp_path):
    exp = load_experiment(source)
    src = open_workdir(exp, create=False)
    cc = azurite.client().get_container_client("exps")
    cc.create_container()

    # publish refuses incomplete or modified assets before uploading anything
    token_bytes = src.tokenizer_dir / "token_bytes.npy"
    good = token_bytes.read_bytes()
    np.save(token_bytes, np.zeros(512, dtype=np.int32))
    with pytest.raises(ArmlabError, match=r"token_bytes\.npy: does not match tokenizer\.pkl"):
        publish_shared(exp, "az://exps/e", retry=FAST)
    token_bytes.write_bytes(good)
    shard = src.eval_dir / "shard_00001.parquet"
    good_shard = shard.read_bytes()
    shard.write_bytes(good_shard[:-1] + bytes([good_shard[-1] ^ 1]))
    with pytest.raises(ArmlabError, match=r"eval/shard_00001\.parquet: sha256 differs from manifest\.json"):
        publish_shared(exp, "az://exps/e", retry=FAST)
    shard.write_bytes(good_shard)
    (src.tokenizer_dir / "manifest.json").rename(src.tokenizer_dir / "manifest.json.bak")
    with pytest.raises(ArmlabError, match=r"tokenizer: no manifest\.json; run `armlab tokenizer EXP` first"):
        publish_shared(exp, "az://exps/e", retry=FAST)
    (src.tokenizer_dir / "manifest.json.bak").rename(src.tokenizer_dir / "manifest.json")
    assert list(cc.list_blobs()) == []
    publish_shared(exp, "az://exps/e", retry=FAST)

    pool = Path(exp.pool.uri)
    dst_path = write_exp(tmp_path, "gpu", pool)
    dst_exp = load_experiment(dst_path)
    dst = open_workdir(dst_exp)
    with pytest.raises(ArmlabError, match=r"no manifest\.json, so this is not a published eval set"):
        pull_shared(dst_exp, "az://exps/nothing", retry=FAST)

    # a different eval set already here (this host prepared from a pool that has since changed):
    # refused, and nothing of it is touched
    make_pool(pool, n_docs=2400, n_files=3, with_id=False, seed=1)
    prepare(dst_exp, options=PrepareOptions(workers=1))
    mine = files_of(dst.eval_dir)
    assert mine != files_of(src.eval_dir)
    with pytest.raises(
        ArmlabError, match=r"eval: holds a different eval set than az://exps/e/_shared/eval/.*--force"
    ):
        pull_shared(dst_exp, "az://exps/e", retry=FAST)
    assert files_of(dst.eval_dir) == mine and not dst.tokenizer_dir.joinpath("manifest.json").exists()

    # --force replaces it, but never under a live run of the experiment
    lease = acquire_lease(dst.data_dir("rand"), "rand-s0")
    try:
        with pytest.raises(
            ArmlabError,
            match=r"refusing to write the experiment's eval set and tokenizer: live run 'rand-s0'",
        ):
            pull_shared(dst_exp, "az://exps/e", force=True, retry=FAST)
    finally:
        release_lease(dst.data_dir("rand"), lease)
    assert files_of(dst.eval_dir) == mine
    pull_shared(dst_exp, "az://exps/e", force=True, retry=FAST)
    assert files_of(dst.eval_dir) == files_of(src.eval_dir)
    assert Tokenizer.load(dst.tokenizer_dir).fingerprint == Tokenizer.load(src.tokenizer_dir).fingerprint

    # a tokenizer file replaced on the server after publishing (valid blob, wrong content): the
    # pulled tokenizer never gets its manifest
    other = tmp_path / "other.npy"
    np.save(other, np.ones(512, dtype=np.int32))
    cc.get_blob_client("e/_shared/tokenizer/token_bytes.npy").upload_blob(other.read_bytes(), overwrite=True)
    fresh_path = write_exp(tmp_path, "gpu2", pool)
    fresh = open_workdir(load_experiment(fresh_path))
    with pytest.raises(ArmlabError, match=r"token_bytes\.npy: does not match tokenizer\.pkl"):
        pull_shared(load_experiment(fresh_path), "az://exps/e", retry=FAST)
    assert not (fresh.tokenizer_dir / "manifest.json").exists()
    assert (fresh.eval_dir / "manifest.json").exists()  # the eval set was fine and is complete

    # an eval set published for another spec (other eval seed) is refused before any download
    other_spec = write_exp(tmp_path, "seed1", pool)
    other_spec.write_text(
        other_spec.read_text().replace("[eval]\ndocs = 700\nseed = 0", "[eval]\ndocs = 700\nseed = 1")
    )
    with pytest.raises(ArmlabError, match=r"eval set of a different spec \(selection\.seed differ\)"):
        pull_shared(load_experiment(other_spec), "az://exps/e", retry=FAST)
    assert not open_workdir(load_experiment(other_spec), create=False).eval_dir.exists()


@pytest.mark.e2e
def test_cli_shared_flags_one_line_errors(azurite, source):
    env = azurite.env()
    azurite.client().create_container("exps")
    cases = [
        (["publish", str(source), "--to", "az://exps/x"], "give --arm A, --shared"),
        (["pull", str(source), "--shared"], "pull --shared: give --from"),
        (["pull", str(source), "--shared", "--from", "az://exps/none"], "not a published eval set"),
    ]
    for args, expect in cases:
        r = armlab(*args, env=env)
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2, (args, r.stderr)
        assert len(lines) == 1 and lines[0].startswith("armlab: error:") and expect in lines[0], (
            args,
            r.stderr,
        )
