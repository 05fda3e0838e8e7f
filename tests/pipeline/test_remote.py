"""Versioned remote storage end to end: `dvc push` to a real S3 server (moto's, on loopback), a
fresh `git clone` + `dvc pull` that gets identical files, the same for an experiment with
`dvc exp push` / `dvc exp pull`, an unreachable remote, and no credentials in git."""

from __future__ import annotations

import hashlib
import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from dvc_repo import (
    PROJECT,
    UP_TO_DATE,
    cached_outs,
    copy_repo,
    dvc,
    git,
    lock_outs,
    reproduced_template,
    stages_run,
)
from s3 import S3Server, point_local_config, s3_server, use_remote

pytestmark = pytest.mark.pipeline

BUCKET = "rosmap-geneformer-test"
EXP = "exc-oli"


# --------------------------------------------------------------------------------------------
# Helpers


def file_hashes(repo: Path, paths: Iterator[str] | list[str]) -> dict[str, str]:
    """md5 of every file under each of ``paths`` (files or folders), keyed by relative path."""
    hashes = {}
    for rel in paths:
        top = repo / rel
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        assert files, f"{top}: missing or empty"
        for file in files:
            hashes[file.relative_to(repo).as_posix()] = hashlib.md5(file.read_bytes()).hexdigest()
    return hashes


def cache_snapshot(repo: Path) -> dict[str, int]:
    """Relative path -> size of every object in the repo's DVC cache."""
    cache = repo / ".dvc/cache"
    return {
        p.relative_to(cache).as_posix(): p.stat().st_size for p in cache.rglob("*") if p.is_file()
    }


def clone(origin: Path, target: Path, server: S3Server) -> Path:
    """`git clone` plus the user's own .dvc/config.local (endpoint and credentials)."""
    git("clone", "-q", str(origin), str(target), cwd=origin.parent)
    point_local_config(target, server)
    return target


def timed(*args: str, cwd: Path) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.perf_counter()
    proc = dvc(*args, cwd=cwd)
    return proc, time.perf_counter() - started


# --------------------------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="module")
def server() -> Iterator[S3Server]:
    with s3_server() as srv:
        srv.create_bucket(BUCKET)
        yield srv


@pytest.fixture(scope="module")
def published(
    tmp_path_factory: pytest.TempPathFactory, server: S3Server
) -> dict[str, Path | float]:
    """The reproduced tiny repo with the project's remote set-up, committed *before* any
    experiment (pitfall: an experiment based on a commit without the remote cannot be pushed),
    pushed to a bare git `origin` (branch main) and with `dvc push` to the S3 server."""
    work = copy_repo(
        reproduced_template(tmp_path_factory), tmp_path_factory.mktemp("remote") / "work"
    )
    use_remote(work, server, f"s3://{BUCKET}/tiny")
    git("add", ".dvc/config", cwd=work)
    git("commit", "-q", "-m", "Default DVC remote: storage (S3)", cwd=work)
    origin = work.parent / "origin.git"
    # `git init --bare` would default to master on older git configurations.
    git("init", "-q", "--bare", "--initial-branch=main", str(origin), cwd=work.parent)
    git("remote", "add", "origin", str(origin), cwd=work)
    git("push", "-q", "origin", "main", cwd=work)
    proc, seconds = timed("push", cwd=work)
    assert "pushed" in proc.stdout, proc.stdout
    return {"work": work, "origin": origin, "push_seconds": seconds}


# --------------------------------------------------------------------------------------------
# Tests


def test_push_then_pull_in_a_fresh_clone_gives_identical_files(
    published: dict[str, Path | float],
    server: S3Server,
    tmp_path_factory: pytest.TempPathFactory,
    record_property: pytest.RecordProperty,
) -> None:
    work, origin = Path(published["work"]), Path(published["origin"])
    outs = lock_outs(work)
    keys = server.keys(BUCKET, "tiny/")
    assert keys, "dvc push stored nothing in the bucket"
    assert all(k.startswith("tiny/files/md5/") for k in keys)
    # Every cached out (data and models) is on the remote; a folder also as its .dir listing.
    cached = cached_outs(work)
    assert {"data/interim/ensembl.h5ad", "models/base", "models/finetuned/disease"} <= cached
    for out in cached:
        md5 = outs[out]
        assert f"tiny/files/md5/{md5[:2]}/{md5[2:]}" in keys, f"{out} ({md5}) not pushed"
    assert "in sync" in dvc("status", "--cloud", cwd=work).stdout

    reviewer = clone(origin, tmp_path_factory.mktemp("clone") / "repo", server)
    assert not (reviewer / "models/finetuned/disease").exists()
    proc, pull_seconds = timed("pull", cwd=reviewer)
    assert "added" in proc.stdout or "fetched" in proc.stdout, proc.stdout
    assert file_hashes(reviewer, list(outs)) == file_hashes(work, list(outs))
    assert lock_outs(reviewer) == outs
    assert dvc("status", cwd=reviewer).stdout.strip() == UP_TO_DATE
    # The credentials stay in the clone's git-ignored .dvc/config.local.
    assert git("status", "--porcelain", cwd=reviewer).stdout.strip() == ""

    record_property("push_seconds", round(float(published["push_seconds"]), 2))
    record_property("pull_seconds", round(pull_seconds, 2))
    print(  # shown with `pytest -s`: the round trip on the tiny pipeline
        f"\ntiny pipeline: {len(keys)} objects, dvc push {published['push_seconds']:.1f} s, "
        f"clone + dvc pull {pull_seconds:.1f} s"
    )


def test_experiment_round_trip_through_git_and_s3(
    published: dict[str, Path | float],
    server: S3Server,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    work, origin = Path(published["work"]), Path(published["origin"])
    baseline = lock_outs(work)
    # A two-class cell-type model: a new model, and the disease task and data stay as they are.
    proc = dvc("exp", "run", "-n", EXP, "-S", "+tasks.cell_type.cell_types=[Exc,Oli]", cwd=work)
    ran = stages_run(proc.stdout)
    assert {"train@cell_type", "evaluate@cell_type"} <= ran
    assert not ran & {"base_model", "train@disease", "evaluate@disease"}, ran
    exp_outs = lock_outs(work)
    changed = {p for p in exp_outs if exp_outs[p] != baseline[p]}
    assert "models/finetuned/cell_type" in changed
    assert "data/predictions/cell_type.tsv" in changed
    exp_files = file_hashes(work, list(exp_outs))
    before = set(server.keys(BUCKET, "tiny/"))

    dvc("exp", "push", "origin", EXP, cwd=work)
    model = exp_outs["models/finetuned/cell_type"]
    assert f"tiny/files/md5/{model[:2]}/{model[2:]}" in set(server.keys(BUCKET, "tiny/")) - before

    # A reviewer: fresh clone, fetch the experiment (git refs + data), apply it, pull.
    reviewer = clone(origin, tmp_path_factory.mktemp("exp-clone") / "repo", server)
    dvc("exp", "pull", "origin", EXP, cwd=reviewer)
    assert EXP in dvc("exp", "list", cwd=reviewer).stdout
    dvc("exp", "apply", EXP, cwd=reviewer)
    dvc("pull", cwd=reviewer)
    params = yaml.safe_load((reviewer / "params.yaml").read_text())
    assert params["tasks"]["cell_type"]["cell_types"] == ["Exc", "Oli"]
    assert lock_outs(reviewer) == exp_outs
    assert file_hashes(reviewer, list(exp_outs)) == exp_files
    assert dvc("status", cwd=reviewer).stdout.strip() == UP_TO_DATE


def test_unreachable_remote_fails_clearly_keeps_the_cache_and_recovers(
    published: dict[str, Path | float], server: S3Server
) -> None:
    work = Path(published["work"])
    # A second, empty location on the same server (local config only), so there is data to push.
    dvc("remote", "add", "--local", "outage", f"s3://{BUCKET}/outage", cwd=work)
    point_local_config(work, server, name="outage")
    cache_before = cache_snapshot(work)
    assert cache_before

    server.stop()
    try:
        proc = dvc("push", "-r", "outage", cwd=work, check=False)
    finally:
        server.start()  # same port, same in-memory buckets: the outage ends
    assert proc.returncode != 0
    error = proc.stderr
    assert "ERROR" in error and "Could not connect to the endpoint URL" in error, error
    assert server.endpoint in error, "the error should name the endpoint that failed"
    assert cache_snapshot(work) == cache_before, "a failed push must not touch the local cache"
    assert dvc("status", cwd=work).stdout.strip() == UP_TO_DATE

    proc = dvc("push", "-r", "outage", cwd=work)
    assert "pushed" in proc.stdout, proc.stdout
    assert "in sync" in dvc("status", "--cloud", "-r", "outage", cwd=work).stdout
    assert server.keys(BUCKET, "outage/")


# --------------------------------------------------------------------------------------------
# No credentials in git

_PLACEHOLDER = r"(?![<$]|\.\.\.)"  # `<your key>`, `$AWS_SECRET_ACCESS_KEY`, `...` are examples
CREDENTIAL_PATTERNS = {
    "AWS access key id": re.compile(r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"),
    "AWS secret access key": re.compile(
        r"(?i)aws_?secret_?access_?key['\"]?\s*[=:]\s*['\"]?" + _PLACEHOLDER + r"[A-Za-z0-9/+]{40}"
    ),
    # Credential options of DVC remotes, as they appear in .dvc/config(.local).
    "DVC remote credential": re.compile(
        r"(?im)^\s*(?:access_key_id|secret_access_key|session_token|password|account_key|"
        r"sas_token|connection_string|gdrive_client_secret)\s*=\s*" + _PLACEHOLDER + r"\S"
    ),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
}


def find_credentials(text: str) -> list[str]:
    """Names of the credential patterns found in ``text``."""
    return [name for name, pattern in CREDENTIAL_PATTERNS.items() if pattern.search(text)]


def committable_files(repo: Path) -> list[Path]:
    """Tracked files plus untracked files that are not git-ignored (`git add -A` would add them)."""
    out = git("ls-files", "-z", "--cached", "--others", "--exclude-standard", cwd=repo).stdout
    return [repo / name for name in sorted(set(out.split("\0"))) if name]


def test_the_scanner_finds_planted_credentials(tmp_path: Path) -> None:
    key_id = "AKIA" + "ABCDEFGHIJKLMNOP"  # built here so that this file holds no key
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCY" + "EXAMPLEKEY"
    assert find_credentials(f"key = {key_id}\n") == ["AWS access key id"]
    assert find_credentials(f"AWS_SECRET_ACCESS_KEY={secret}\n") == ["AWS secret access key"]
    assert find_credentials(f"['remote \"s\"']\n    secret_access_key = {secret}\n") == [
        "DVC remote credential"
    ]
    assert find_credentials("    access_key_id = <your key id>\n") == []
    assert find_credentials("export AWS_SECRET_ACCESS_KEY=$SECRET\n") == []


def test_no_credentials_in_any_tracked_file() -> None:
    if not (PROJECT / ".git").exists():
        pytest.skip("not a git checkout")
    found = {}
    for path in committable_files(PROJECT):
        if not path.is_file() or path.stat().st_size > 5_000_000:
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue  # binary
        names = find_credentials(data.decode("utf-8", errors="replace"))
        if names:
            found[path.relative_to(PROJECT).as_posix()] = names
    assert not found, f"credentials in files git would track: {found}"


def test_project_remote_is_s3_and_secrets_go_to_the_ignored_local_config() -> None:
    config = (PROJECT / ".dvc/config").read_text()
    assert re.search(r"(?m)^\s*remote\s*=\s*storage\s*$", config), "no default remote 'storage'"
    assert re.search(r"(?m)^\s*url\s*=\s*s3://\S+", config), "remote 'storage' is not on S3"
    for option in ("endpointurl", "access_key_id", "secret_access_key", "session_token"):
        assert option not in config, f".dvc/config sets {option}: it belongs in config.local"
    if (PROJECT / ".git").exists():
        git("check-ignore", "-q", ".dvc/config.local", cwd=PROJECT)


def test_a_configured_clone_tracks_no_credentials(published: dict[str, Path | float]) -> None:
    work = Path(published["work"])
    local = (work / ".dvc/config.local").read_text()
    assert find_credentials(local) == ["DVC remote credential"]  # the scanner would see them
    tracked = committable_files(work)
    assert work / ".dvc/config.local" not in tracked
    assert not [
        p for p in tracked if p.is_file() and find_credentials(p.read_text(errors="replace"))
    ]
