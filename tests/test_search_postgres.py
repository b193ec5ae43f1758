"""Search workers started separately sharing one study on a real PostgreSQL server (Debian's postgresql,
started here on loopback with a throwaway data folder): a killed worker's trial is queued again, two
workers finish the study together; an unreachable server is one error line."""

from __future__ import annotations

import glob
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import optuna
import pytest
import yaml

from conftest import TUNESMITH
from test_search import FINISHED, _config
from tunesmith.search import _with_driver


def _study(url: str) -> optuna.Study:
    return optuna.load_study(study_name="s", storage=_with_driver(url))  # the driver installed (psycopg2)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_binaries() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


@pytest.fixture(scope="module")
def postgres_url():
    """A PostgreSQL server for this module: initdb + pg_ctl on a free loopback port, data in a temporary
    folder, fsync off. initdb refuses to run as root: as root the server runs as 'nobody' (runuser)."""
    bin_dir = _server_binaries()
    if bin_dir is None:
        pytest.skip("PostgreSQL server not installed (Debian: apt-get install postgresql)")
    as_user: list[str] = []
    folder = Path(tempfile.mkdtemp(prefix="tunesmith-pg-"))  # not under pytest's root-only tmp folder
    if os.geteuid() == 0:
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser: initdb refuses root")
        as_user = ["runuser", "-u", "nobody", "--"]
        shutil.chown(folder, "nobody")
    port = _free_port()
    data = folder / "data"
    try:
        subprocess.run([*as_user, str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
                        "--no-sync", "-E", "UTF8"], check=True, capture_output=True)
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-l", str(folder / "server.log"),
                        "-o", f"-h 127.0.0.1 -p {port} -k {folder} -F", "-w", "start"], check=True,
                       capture_output=True)
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run([*as_user, str(bin_dir / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
                       capture_output=True)
        shutil.rmtree(folder, ignore_errors=True)


def test_two_workers_on_postgresql_and_a_killed_workers_trial_queued_again(tiny_model_dir, tmp_path, cli_env,
                                                                          postgres_url):
    cfg_path = tmp_path / "search.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(tmp_path, tiny_model_dir, trials=4)))
    search_dir = tmp_path / "runs" / "s"
    cmd = TUNESMITH + ["search", str(cfg_path), "--storage", postgres_url]  # a plain postgresql:// URL

    # a first worker, killed while its first trial trains: the trial stays RUNNING in the database
    killed = subprocess.Popen(cmd, env=cli_env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and killed.poll() is None:
        if (search_dir / "trial-0000" / "config.yaml").is_file():
            killed.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    assert killed.wait() == -signal.SIGKILL, killed.stderr.read().decode()[-3000:]
    study = _study(postgres_url)
    cut_off = [t for t in study.trials if t.state == optuna.trial.TrialState.RUNNING]
    assert [t.number for t in cut_off] == [0]

    # two workers started separately (as on two machines), at once: one of them queues the trial again
    workers = [subprocess.Popen(cmd, env=cli_env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
    outs = [w.communicate(timeout=240) for w in workers]
    assert [w.returncode for w in workers] == [0, 0], [err[-3000:] for _, err in outs]
    assert sum("trial 0 was cut off" in err for _, err in outs) == 1, [err[-2000:] for _, err in outs]
    assert not (search_dir / "trial-0000").exists(), "the killed trial's folder is removed"

    trials = _study(postgres_url).trials
    assert trials[0].state == optuna.trial.TrialState.FAIL
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == 0]
    assert len(retry) == 1 and retry[0].params == cut_off[0].params and retry[0].state in FINISHED
    assert sum(t.state in FINISHED for t in trials) >= 4
    assert {t.user_attrs["worker"]["pid"] for t in trials if t.state in FINISHED} == {w.pid for w in workers}, \
        "both workers finish trials of the one study"
    assert not (search_dir / "study.db").exists()  # the study lives in PostgreSQL only


def test_an_unreachable_postgresql_server_is_one_error_line(tiny_model_dir, tmp_path, cli_env):
    cfg_path = tmp_path / "search.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(tmp_path, tiny_model_dir, trials=2)))
    url = f"postgresql://tunesmith:secret@127.0.0.1:{_free_port()}/studies"  # nothing listens there
    done = subprocess.run(TUNESMITH + ["search", str(cfg_path), "--storage", url], env=cli_env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: search.storage: cannot open postgresql://tunesmith:***@127.0.0.1:"), last
    assert "Traceback" not in done.stderr and "secret" not in done.stderr
    assert not (tmp_path / "runs" / "s").exists()
