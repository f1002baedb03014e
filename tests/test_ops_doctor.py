"""`armlab doctor`'s workdir check tries a real write (a read-only mount is "ready" by its mode
bits for root), and its table shows details such as `[[hosts]]` literally."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from armlab.ops.doctor import DoctorReport, check_workdir, render
from armlab.spec import Experiment, parse_experiment


def experiment(workdir: Path) -> Experiment:
    return parse_experiment(
        {"name": "doc", "workdir": str(workdir), "pool": {"uri": "p"},
         "arms": [{"name": "a", "kind": "random", "ratio": 0.5}]}  # fmt: skip
    )


@contextlib.contextmanager
def read_only(d: Path) -> Iterator[None]:
    """Make `d` refuse writes for this process: a read-only tmpfs mounted on it as root (mode
    bits do not stop root), mode 0555 otherwise."""
    d.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        d.chmod(0o555)
        try:
            yield
        finally:
            d.chmod(0o755)
        return
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(d)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here ({r.stderr.strip()}); run as non-root or where mount is allowed")
    try:
        yield
    finally:
        subprocess.run(["umount", str(d)], check=True)


def workdir_check(exp: Experiment) -> tuple[bool, dict]:
    r = DoctorReport(host="here", info={})
    usable = check_workdir(r, exp, ["a"])
    (c,) = r.checks
    return usable, {"status": c.status, "detail": c.detail, "fix": c.fix}


def test_writable_workdir_is_ok(tmp_path: Path) -> None:
    usable, c = workdir_check(experiment(tmp_path / "wd"))  # not there yet: its parent takes the write
    assert usable and c["status"] == "ok" and str(tmp_path / "wd") in c["detail"]
    assert list(tmp_path.iterdir()) == []  # the probe leaves nothing behind


def test_read_only_workdir_fails(tmp_path: Path) -> None:
    wd = tmp_path / "wd"
    with read_only(wd):
        usable, c = workdir_check(experiment(wd))
    assert usable and c["status"] == "fail", c  # 0.1 said "ready" here
    assert f"cannot write in {wd} (Read-only file system)" in c["detail"] or f"cannot write in {wd}" in c["detail"]
    assert "make it writable" in c["fix"]


def test_read_only_run_dir_fails(tmp_path: Path) -> None:
    wd = tmp_path / "wd"
    runs = wd / "arms" / "a" / "runs"
    with read_only(runs):
        _, c = workdir_check(experiment(wd))
    assert c["status"] == "fail" and f"cannot write in {runs}" in c["detail"], c
    assert f"cannot write in {wd} " not in c["detail"]  # the workdir itself is fine


def test_workdir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "wd").write_text("")
    usable, c = workdir_check(experiment(tmp_path / "wd"))
    assert not usable and c["status"] == "fail" and "is a file, not a directory" in c["detail"]


def test_output_shows_brackets_literally(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "wd").write_text("")
    r = DoctorReport(host="here", info={})
    check_workdir(r, experiment(tmp_path / "wd"), ["a"])
    r.add("odd", "warn", "a [bold]detail[/bold] in brackets", "see [[hosts]]")
    render([r])  # captured: not a terminal, so one plain line per check
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"workdir: fail: {tmp_path / 'wd'} is a file") and "(or [[hosts]] workdir)" in lines[0]
    assert lines[1] == "odd: warn: a [bold]detail[/bold] in brackets (fix: see [[hosts]])"
    assert lines[2] == "doctor: 1 failed, 1 warning"
    # on a terminal: the table, with the same text (0.1's table swallowed "[[hosts]]" as markup)
    monkeypatch.setenv("FORCE_COLOR", "1")
    monkeypatch.setenv("COLUMNS", "250")
    render([r])
    table = re.sub(r"\x1b\[[0-9;]*m", "", capsys.readouterr().out)
    assert "┃" in table and "see [[hosts]]" in table and "a [bold]detail[/bold] in brackets" in table, table


def bundle_check(exp: Experiment) -> dict:
    from armlab.ops.doctor import check_bundle

    r = DoctorReport(host="here", info={})
    check_bundle(r, exp)
    (c,) = r.checks
    return {"status": c.status, "detail": c.detail, "fix": c.fix}


def test_core_bundle_offline_fails_with_the_fix_and_cached_or_reachable_is_ok(tmp_path, monkeypatch) -> None:
    """0.2's doctor said "ready" and `armlab run` then stopped at the bundle download. Now: a URL
    that does not answer and is not cached fails, naming the URL and `core_bundle = "none"`; the
    same URL is ok while its server answers (a HEAD, nothing downloaded), and once cached it is ok
    even with the server gone. Off and local bundles need no network."""
    from armlab.evaluate.bundle import load_bundle
    from armlab.spec import EvaluateSpec
    from test_evaluate_bundle import Server, zipped

    monkeypatch.setenv("ARMLAB_CACHE", str(tmp_path / "cache"))
    server = Server(zipped(tmp_path))
    url = server.url("eval_bundle.zip")
    try:
        exp = experiment(tmp_path / "wd").model_copy(update={"evaluate": EvaluateSpec(core_bundle=url)})
        up = bundle_check(exp)
        assert up["status"] == "ok" and "answers" in up["detail"] and server.gets["/eval_bundle.zip"] == 0, up
        load_bundle(url)  # `armlab run` downloads it: cached from now on
    finally:
        server.close()
    cached = bundle_check(exp)
    assert cached["status"] == "ok" and cached["detail"].startswith("cached: "), cached
    gone = url.replace("eval_bundle.zip", "other.zip")  # same dead server, nothing cached
    offline = bundle_check(exp.model_copy(update={"evaluate": EvaluateSpec(core_bundle=gone)}))
    assert offline["status"] == "fail" and gone in offline["detail"] and "unreachable" in offline["detail"], offline
    assert 'core_bundle = "none"' in offline["fix"] and "--bundle none" in offline["fix"]
    off = bundle_check(exp.model_copy(update={"evaluate": EvaluateSpec(core_bundle="none")}))
    assert off["status"] == "ok" and "CORE off" in off["detail"]
    local = bundle_check(exp.model_copy(update={"evaluate": EvaluateSpec(core_bundle=str(tmp_path / "src"))}))
    assert local["status"] == "ok", local  # src/eval_bundle/core.yaml: a zip's one wrapping dir is found
    missing = bundle_check(exp.model_copy(update={"evaluate": EvaluateSpec(core_bundle=str(tmp_path / "nope"))}))
    assert missing["status"] == "fail" and "no core.yaml" in missing["detail"]


def test_a_prebuilt_arm_in_a_store_is_probed_through_the_storage_seam(tmp_path: Path, monkeypatch) -> None:
    """Not downloaded yet: reachable is a warning (launch pulls it), unreachable a failure saying
    why, from the same seam prepare uses (0.2 special-cased az:// and never looked)."""
    from armlab.ops.doctor import check_data
    from azurite_util import azurite_env

    server = next(gen := azurite_env(tmp_path, monkeypatch))
    monkeypatch.setenv("ARMLAB_NET_ATTEMPTS", "1")
    server.client().create_container("prebuilt").upload_blob("top/shard_00000.parquet", b"PAR1")
    exp = parse_experiment(
        {"name": "doc", "workdir": str(tmp_path / "wd"), "pool": {"uri": "p"},
         "arms": [{"name": "top", "kind": "prebuilt", "uri": "az://prebuilt/top"}]}  # fmt: skip
    )
    r = DoctorReport(host="here", info={})
    check_data(r, exp, "top", 1, expect_data=True)
    server.kill()
    check_data(r, exp, "top", 1, expect_data=True)
    gen.close()
    (up, down) = r.checks
    assert up.status == "warn" and "not downloaded yet" in up.detail and "armlab pull" in up.fix
    assert down.status == "fail" and f"cannot reach http://127.0.0.1:{server.port}/devstoreaccount1" in down.detail
