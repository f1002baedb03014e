"""Checkout introspection against real nanochat: interpreter, base_train's flags, exact source."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from armlab.errors import ArmlabError
from armlab.train.engines.nanochat_checkout import inspect_checkout, parse_help, source_identity
from nanochat_util import bare_python, copy_checkout, nanochat_python


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(autouse=True)
def _module_cache(cache_dir, monkeypatch):
    """One --help cache for the module (each --help imports torch + wandb: ~5 s)."""
    monkeypatch.setenv("ARMLAB_CACHE", str(cache_dir))


def test_base_train_flags_of_both_commits(tmp_path):
    py = str(nanochat_python())
    old = inspect_checkout(copy_checkout("48804bf", tmp_path / "a"), python=py)
    new = inspect_checkout(copy_checkout("92d63d4", tmp_path / "b"), python=py)
    assert {"--warmup-ratio", "--adam-beta1", "--adam-beta2"} <= old.flags
    assert "--warmup-steps" not in old.flags
    assert "--warmup-steps" in new.flags
    assert not {"--warmup-ratio", "--adam-beta1", "--adam-beta2"} & new.flags
    shared = {"--depth", "--max-seq-len", "--device-batch-size", "--total-batch-size", "--num-iterations",
              "--eval-every", "--eval-tokens", "--save-every", "--run", "--model-tag", "--device-type",
              "--resume-from-step", "--window-pattern", "--target-param-data-ratio"}  # fmt: skip
    assert shared <= old.flags and shared <= new.flags
    assert old.python_source == "[nanochat] python" and old.torch.version.startswith("2.")
    assert old.source.commit != new.source.commit  # two plain dirs: told apart by content


def test_flags_cache_follows_base_train(tmp_path, cache_dir):
    """The cached --help is keyed by base_train.py's bytes: a patched parser is asked again."""
    py = str(nanochat_python())
    ck = copy_checkout("92d63d4", tmp_path / "nc")
    assert "--armlab-probe" not in inspect_checkout(ck, python=py).flags
    script = ck / "scripts" / "base_train.py"
    text = script.read_text()
    script.write_text(
        text.replace(
            "args = parser.parse_args()",
            'parser.add_argument("--armlab-probe", type=int)\nargs = parser.parse_args()',
            1,
        )
    )
    assert "--armlab-probe" in inspect_checkout(ck, python=py).flags
    assert list((cache_dir / "nanochat").glob("help-*.json"))


def test_plain_dir_is_identified_by_content(tmp_path):
    a = copy_checkout("48804bf", tmp_path / "a")
    b = copy_checkout("48804bf", tmp_path / "b")
    ida, idb = source_identity(a), source_identity(b)
    assert ida.commit.startswith("content:") and not ida.git and ida.dirty is None
    assert ida == idb  # same files, same identity, wherever they are
    (b / ".venv" / "lib").mkdir(parents=True)
    (b / ".venv" / "lib" / "site.py").write_text("x = 1\n")  # not the checkout's source
    (b / "nanochat" / "__pycache__").mkdir(exist_ok=True)
    (b / "nanochat" / "__pycache__" / "gpt.cpython-311.pyc").write_bytes(b"\0")
    assert source_identity(b) == ida
    gpt = b / "nanochat" / "gpt.py"
    gpt.write_text(gpt.read_text() + "\n# patched\n")
    assert source_identity(b).commit != ida.commit


def test_git_checkout_commit_dirty_and_diff(tmp_path):
    ck = copy_checkout("92d63d4", tmp_path / "nc", git=True)
    head = subprocess.run(
        ["git", "-C", str(ck), "rev-parse", "HEAD"], capture_output=True, text=True
    ).stdout.strip()
    clean = source_identity(ck)
    assert (clean.commit, clean.git, clean.dirty, clean.diff_sha256) == (head, True, False, None)
    assert clean.short == head[:7]
    (ck / ".venv" / "bin").mkdir(parents=True)  # ignored by the checkout's .gitignore: still clean
    (ck / ".venv" / "bin" / "python").write_text("")
    assert source_identity(ck).dirty is False

    gpt = ck / "nanochat" / "gpt.py"
    gpt.write_text(gpt.read_text().replace("def ", "def  ", 1))
    patched = source_identity(ck)
    assert patched.commit == head and patched.dirty and patched.diff_sha256
    assert patched.changed == ("nanochat/gpt.py",)
    assert patched.short == f"{head[:7]}+dirty({patched.diff_sha256[:8]})"
    (ck / "nanochat" / "extra.py").write_text("X = 1\n")  # a new file is part of the patch
    more = source_identity(ck)
    assert more.diff_sha256 != patched.diff_sha256 and "nanochat/extra.py" in more.changed
    (ck / "nanochat" / "extra.py").write_text("X = 2\n")
    assert source_identity(ck).diff_sha256 != more.diff_sha256


def test_default_python_is_the_checkouts_venv_else_armlabs(tmp_path):
    ck = copy_checkout("92d63d4", tmp_path / "nc")
    try:  # no .venv: armlab's interpreter, which lacks wandb unless armlab[wandb] is installed
        found = inspect_checkout(ck)
    except ArmlabError as e:
        msg = str(e)
        assert "armlab's interpreter" in msg and sys.executable in msg and "\n" not in msg
        assert "No module named" in msg  # what it lacks, named
    else:
        assert found.python_source == "armlab's interpreter" and found.python == Path(sys.executable)
    os.symlink(nanochat_python().parents[1], ck / ".venv")  # as `uv sync` would leave it
    found = inspect_checkout(ck)
    assert found.python_source == "checkout venv" and found.python == ck / ".venv" / "bin" / "python"


def test_refusals_name_the_problem(tmp_path):
    with pytest.raises(ArmlabError, match=r"no such directory"):
        inspect_checkout(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(
        ArmlabError, match=r"not a nanochat checkout \(no scripts/base_train.py or nanochat\)"
    ):
        inspect_checkout(tmp_path / "empty")
    ck = copy_checkout("48804bf", tmp_path / "nc")
    with pytest.raises(ArmlabError, match=r"\[nanochat\] python .*nope: no such file"):
        inspect_checkout(ck, python=str(tmp_path / "nope"))
    bare = bare_python(tmp_path / "bare")
    with pytest.raises(ArmlabError) as e:
        inspect_checkout(ck, python=str(bare))
    assert f"nanochat python {bare} ([nanochat] python) cannot import torch" in str(e.value)
    assert "No module named 'torch'" in str(e.value)


def test_parse_help_ignores_the_banner():
    text = "  ████ --not-a-flag ████\nusage: base_train.py [-h] [--run RUN]\n\noptions:\n  -h, --help  show\n  --run RUN   wandb\n  --fp8       fp8\n"
    assert parse_help(text) == {"--run", "--fp8"}


def test_probe_leaves_no_nanochat_dir_in_home(tmp_path, monkeypatch):
    """Importing nanochat creates its base dir: the --help probe uses a throwaway one."""
    monkeypatch.setenv("ARMLAB_CACHE", str(tmp_path / "cache"))  # a cache miss: base_train really runs
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("NANOCHAT_BASE_DIR", raising=False)
    inspect_checkout(copy_checkout("48804bf", tmp_path / "nc"), python=str(nanochat_python()))
    assert not (tmp_path / "home" / ".cache" / "nanochat").exists()
