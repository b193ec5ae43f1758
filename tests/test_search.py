"""Hyperparameter search on a tiny random BERT: >= 8 trials, SIGKILL then resume without losing
finished trials, two worker processes sharing one study, the evaluation hook that prunes, bad input."""

import json
import signal
import subprocess
import time

import optuna
import pandas as pd
import pytest
import yaml

import tunesmith
from conftest import TUNESMITH, sentiment_rows, sigint_as_at_a_terminal, tiny_config
from tunesmith.cli import main
from tunesmith.config import load_config

FINISHED = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED)
SPACE = {"train.lr": {"low": 1e-4, "high": 5e-3, "log": True},
         "train.batch_size": {"choices": [16, 32]},
         "strategy.name": {"choices": ["full", "lora"]},
         "strategy.lora.r": {"type": "int", "low": 2, "high": 8}}


def _config(tmp_path, model_dir, trials=8, **search) -> dict:
    train = tmp_path / "train.csv"
    pd.DataFrame(sentiment_rows(120, seed=7)).to_csv(train, index=False)
    pd.DataFrame(sentiment_rows(30, seed=8)).to_csv(tmp_path / "test.csv", index=False)
    cfg = tiny_config(model_dir, train, tmp_path / "test.csv", tmp_path / "runs", epochs=1, eval_every_steps=2)
    cfg["search"] = {"trials": trials, "startup_trials": 3, "space": SPACE, **search}
    cfg["output"]["name"] = "s"
    return cfg


def _study(search_dir, url=None):
    return optuna.load_study(study_name=search_dir.name, storage=url or f"sqlite:///{search_dir / 'study.db'}")


def test_on_evaluate_sees_every_evaluation_and_can_stop_the_run(tiny_model_dir, tmp_path):
    seen = []
    cfg = _config(tmp_path, tiny_model_dir)
    del cfg["search"]
    cfg["train"]["epochs"] = 2  # 12 steps: the callback stops it at 6
    result = tunesmith.train(cfg, on_evaluate=lambda step, scores: seen.append((step, scores)) or step >= 6)
    assert [s for s, _ in seen] == [2, 4, 6] and all("macro_f1" in x and "loss" in x for _, x in seen)
    assert json.loads((result.run_dir / "metrics.json").read_text())["train"]["steps"] == 6


def test_search_killed_then_resumed_keeps_finished_trials(tiny_model_dir, tmp_path, cli_env):
    cfg_path = tmp_path / "search.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(tmp_path, tiny_model_dir)))
    search_dir = tmp_path / "runs" / "s"
    log = open(tmp_path / "killed.log", "w")
    proc = subprocess.Popen(TUNESMITH + ["search", str(cfg_path)], env=cli_env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=log)
    deadline = time.time() + 180
    while time.time() < deadline and proc.poll() is None:  # kill while trial 3 runs (0-2 are finished)
        if (search_dir / "trial-0003" / "config.yaml").is_file():
            proc.send_signal(signal.SIGKILL)
            break
        time.sleep(0.05)
    assert proc.wait() == -signal.SIGKILL, (tmp_path / "killed.log").read_text()[-3000:]
    before = {t.number: (t.state, t.value, t.params) for t in _study(search_dir).trials}
    finished_before = {n: v for n, v in before.items() if v[0] in FINISHED}
    assert len(finished_before) >= 3
    cut_off = [n for n, v in before.items() if v[0] == optuna.trial.TrialState.RUNNING]
    assert cut_off, before

    resumed = subprocess.run(TUNESMITH + ["search", "--resume", str(search_dir)], capture_output=True,
                             text=True, env=cli_env, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert f"trial {cut_off[0]} was cut off" in resumed.stderr
    assert not (search_dir / f"trial-{cut_off[0]:04d}").exists(), "the killed trial's folder is removed"
    trials = _study(search_dir).trials
    after = {t.number: (t.state, t.value, t.params) for t in trials}
    assert all(after[n] == v for n, v in finished_before.items()), "a finished trial changed or was lost"
    assert after[cut_off[0]][0] == optuna.trial.TrialState.FAIL
    retry = [t for t in trials if t.system_attrs.get("failed_trial") == cut_off[0]]
    assert retry and retry[0].params == before[cut_off[0]][2] and retry[0].state in FINISHED
    assert sum(t.state in FINISHED for t in trials) == 8
    for t in trials:  # strategy.lora.r is sampled only for lora trials
        assert ("strategy.lora.r" in t.params) == (t.params.get("strategy.name") == "lora"), t.params

    # the summary: a trials table, the best config ready for `tunesmith train`, importance
    table = resumed.stdout
    assert table.splitlines()[0].split()[:4] == ["trial", "state", "value", "seconds"]
    assert len(pd.read_csv(search_dir / "trials.csv")) == len(trials)
    best = load_config(search_dir / "best_config.yaml")
    study = _study(search_dir)
    assert best.train.lr == study.best_params["train.lr"] and best.strategy.name == study.best_params["strategy.name"]
    assert best.output.name == "s-best" and "tunesmith train" in (search_dir / "best_config.yaml").read_text()
    assert "parameter importance" in table
    for t in trials:  # each trial folder keeps its logs, not its weights
        folder = search_dir / f"trial-{t.number:04d}"
        if t.state in FINISHED:
            assert (folder / "metrics.json").is_file() and not (folder / "model").exists()
            assert not (folder / "checkpoints").exists()
            assert yaml.safe_load((folder / "config.yaml").read_text())["train"]["lr"] == t.params["train.lr"]


def test_two_workers_share_one_study(tiny_model_dir, tmp_path, cli_env):
    cfg_path = tmp_path / "search.yaml"
    cfg_path.write_text(yaml.safe_dump(_config(tmp_path, tiny_model_dir, trials=8)))
    url = f"sqlite:///{tmp_path / 'shared.db'}"
    cmd = TUNESMITH + ["search", str(cfg_path), "--storage", url]
    first = subprocess.Popen(cmd, env=cli_env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                             text=True)
    second = subprocess.Popen(cmd, env=cli_env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True)
    errors = [p.communicate(timeout=300)[1] for p in (first, second)]
    assert first.returncode == 0 and second.returncode == 0, errors
    trials = _study(tmp_path / "runs" / "s", url).trials
    assert sum(t.state in FINISHED for t in trials) >= 8
    assert not (tmp_path / "runs" / "s" / "study.db").exists()
    workers = {t.user_attrs["worker"]["pid"] for t in trials if t.state in FINISHED}
    assert workers == {first.pid, second.pid}, "both workers should have finished trials"


def test_search_with_cross_validated_objective(tiny_model_dir, tmp_path):
    cfg = _config(tmp_path, tiny_model_dir, trials=2, objective="cv", space={"train.lr": SPACE["train.lr"]})
    cfg["cv"] = {"folds": 2}
    result = tunesmith.search(cfg)
    assert [t["state"] for t in result.trials] == ["complete", "complete"]
    for t in result.trials:
        info = json.loads((result.search_dir / f"trial-{t['number']:04d}" / "cv.json").read_text())
        assert info["folds_run"] == 2 and t["value"] == pytest.approx(info["mean"]["macro_f1"])
        assert info["test_ensemble"] is None  # the test split takes no part in the search
    assert result.best_value == max(t["value"] for t in result.trials)


def test_a_bad_trial_is_pruned_at_an_intermediate_evaluation(tiny_model_dir, sentiment_csv, tmp_path):
    train, test = sentiment_csv  # 400 rows that lr 2e-3 learns (test_train_e2e); lr 1e-7 learns nothing
    cfg = tiny_config(tiny_model_dir, train, test, tmp_path / "runs", epochs=3, eval_every_steps=5)
    # seed 4: TPE tries 2e-3, 2e-3, then 1e-7, which falls below the median of the first two
    cfg["search"] = {"trials": 3, "startup_trials": 1, "seed": 4, "space": {"train.lr": {"choices": [2e-3, 1e-7]}}}
    result = tunesmith.search(cfg)
    study = _study(result.search_dir)
    pruned = [t for t in study.trials if t.state == optuna.trial.TrialState.PRUNED]
    assert pruned and all(t.params["train.lr"] == 1e-7 for t in pruned), [(t.state, t.params) for t in study.trials]
    for t in pruned:  # stopped at an evaluation before the end of its run (3 epochs of 20 steps)
        assert max(t.intermediate_values) < 60
        steps = json.loads((result.search_dir / f"trial-{t.number:04d}" / "metrics.json").read_text())["train"]["steps"]
        assert steps == max(t.intermediate_values)
    assert result.best_params == {"train.lr": 2e-3} and result.best_value > 0.8


def test_search_stops_when_every_trial_fails(tiny_model_dir, tmp_path, capsys):
    # a constant regression target: Spearman's rho is undefined, so no trial can give a value
    rows = pd.DataFrame({"text": [r["text"] for r in sentiment_rows(10)], "label": [1.0] * 10})
    rows.to_csv(tmp_path / "reg.csv", index=False)
    cfg = tiny_config(tiny_model_dir, tmp_path / "reg.csv", None, tmp_path / "runs", epochs=1, metric="spearman")
    cfg["data"].update(problem_type="regression")
    cfg["search"] = {"trials": 5, "space": {"train.lr": SPACE["train.lr"]}}
    path = tmp_path / "reg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, line = run_cli(capsys, ["search", path])
    assert code == 2 and "search stopped: 3 trials in a row failed (validation spearman is undefined)" in line
    trials = pd.read_csv(tmp_path / "runs" / "reg-search" / "trials.csv")
    assert trials["state"].tolist() == ["fail"] * 3


def run_cli(capsys, args):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    lines = [x for x in err.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return code, lines[0]


@pytest.mark.parametrize("space,expected", [
    ({"train.lrr": {"low": 1e-5, "high": 1e-4}},
     "search.yaml, line {line}: search.space.train.lrr: unknown search parameter 'train.lrr' (did you mean 'train.lr'?)"),
    ({"train.lr": {"low": 1e-4, "high": 1e-5}},
     "search.yaml, line {line}: search.space.train.lr: empty range: low (0.0001) must be below high (1e-05)"),
    ({"train.batch_size": {"choices": []}},
     "search.yaml, line {line}: search.space.train.batch_size: empty choices: list at least one value"),
    ({"train.lr": {"low": 0, "high": 1e-4, "log": True}}, "search.space.train.lr: log: true needs low > 0"),
    ({"train.batch_size": {"type": "int", "low": 0, "high": 8}},
     "search.space.train.batch_size: 0 does not make a valid config (train.batch_size: Input should be greater"),
    ({"output.dir": {"choices": ["a"]}}, "search.space.output.dir: 'output.dir' cannot be searched"),
])
def test_bad_search_space(space, expected, tiny_model_dir, tmp_path, capsys):
    cfg = _config(tmp_path, tiny_model_dir)
    cfg["search"] = {"space": space}
    path = tmp_path / "search.yaml"
    text = yaml.safe_dump(cfg)
    path.write_text(text)
    key_line = next((i for i, x in enumerate(text.splitlines(), 1) for k in space if x.strip().startswith(k + ":")),
                    None)
    code, line = run_cli(capsys, ["search", path])
    assert code == 2 and expected.format(line=key_line) in line, line
    assert not (tmp_path / "runs").exists(), "a failed search must not leave a folder behind"


def test_bad_search_settings(tiny_model_dir, tmp_path, capsys):
    cfg = _config(tmp_path, tiny_model_dir, objective="cv")
    cfg["cv"] = {"folds": 100}
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, line = run_cli(capsys, ["search", path])
    assert code == 2 and "class 'neg' has only 60 example(s), too few for 100 folds" in line
    code, line = run_cli(capsys, ["search", path, "--train.metric", "f2", "--cv.folds", "3"])
    assert code == 2 and "train.metric: unknown metric 'f2'" in line
    code, line = run_cli(capsys, ["search", path, "--data.validation_fraction", "0", "--search.objective",
                                  "validation"])
    assert code == 2 and "needs a validation split" in line
    code, line = run_cli(capsys, ["search", "--resume", tmp_path])
    assert code == 2 and "not a tunesmith search folder" in line
    assert not (tmp_path / "runs").exists()


def test_a_worker_starting_as_another_creates_the_folder_joins_the_search(tiny_model_dir, tmp_path, monkeypatch):
    """Two workers starting together both find no search folder, then both create it: the second
    mkdir used to fail with FileExistsError (a worker exited 1 under load in the full suite).
    Here the other worker wins the race: the folder appears between the check and the mkdir."""
    import pathlib

    cfg = _config(tmp_path, tiny_model_dir, trials=1)
    search_dir = tmp_path / "runs" / "s"
    real_exists = pathlib.Path.exists

    def exists_as_before_the_other_worker(self):
        if self == search_dir and not real_exists(self):
            search_dir.mkdir(parents=True)  # the other worker creates it just now
            return False
        return real_exists(self)

    monkeypatch.setattr(pathlib.Path, "exists", exists_as_before_the_other_worker)
    result = tunesmith.search(cfg)
    assert [t["state"] for t in result.trials] == ["complete"]


def test_a_search_whose_storage_fails_leaves_no_folder(tiny_model_dir, tmp_path, capsys):
    """A storage that cannot be opened (a missing folder) or written (a read-only SQLite file, new study or
    existing one): one error line naming the storage; no folder is left, so the same command with a good
    storage runs (it used to be refused as 'a different config')."""
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(_config(tmp_path, tiny_model_dir, trials=1)))
    search_dir = tmp_path / "runs" / "s"
    code, line = run_cli(capsys, ["search", path, "--storage", f"sqlite:///{tmp_path / 'no' / 'such' / 'x.db'}"])
    assert code == 2 and line.startswith("error: search.storage: cannot open sqlite:///") \
        and "unable to open database file" in line, line
    assert not (tmp_path / "runs").exists()

    db = tmp_path / "ro.db"
    optuna.create_study(study_name="other", storage=f"sqlite:///{db}")  # a database with the tables
    read_only = f"sqlite:///file:{db}?mode=ro&uri=true"  # read-only even for root, unlike chmod
    code, line = run_cli(capsys, ["search", path, "--storage", read_only])
    assert code == 2 and "the study database failed (attempt to write a readonly database)" in line, line
    assert not (tmp_path / "runs").exists()
    optuna.create_study(study_name="s", storage=f"sqlite:///{db}")  # the study exists: the first trial's write fails
    code, line = run_cli(capsys, ["search", path, "--storage", read_only])
    assert code == 2 and "the study database failed (attempt to write a readonly database)" in line, line
    assert not (tmp_path / "runs").exists()

    code = main(["search", str(path), "--storage", f"sqlite:///{tmp_path / 'good.db'}"])
    assert code == 0, capsys.readouterr().err
    assert (search_dir / "best_config.yaml").is_file()


def test_ctrl_c_during_a_search_says_search_resume_and_requeues_the_trial(tiny_model_dir, tmp_path, cli_env):
    """SIGINT while a trial trains: exit 130, one line naming `tunesmith search --resume` (not the trial's
    `train --resume`); the trial's parameters are queued again, its folder removed; the resumed search
    runs them and ends with search.trials finished trials, the stopped one shown as 'interrupted'."""
    cfg = _config(tmp_path, tiny_model_dir, trials=3)
    # 90-180 steps a trial (about a second or two): long enough to be caught training. At 3 epochs a trial of
    # batch 32 trained 9 steps in 0.1 s and a CI run on a loaded machine missed trials 1 and 2 (exit 0, no SIGINT)
    cfg["train"]["epochs"] = 30
    cfg_path = tmp_path / "search.yaml"
    cfg_path.write_text(yaml.safe_dump(cfg))
    search_dir = tmp_path / "runs" / "s"
    with open(tmp_path / "stopped.log", "w") as err_file:
        proc = subprocess.Popen(TUNESMITH + ["search", str(cfg_path)], env=cli_env, cwd=tmp_path,
                                stdout=subprocess.DEVNULL, stderr=err_file, preexec_fn=sigint_as_at_a_terminal)
        deadline = time.time() + 180
        while time.time() < deadline and proc.poll() is None:
            if (search_dir / "trial-0001" / "metrics.jsonl").is_file():
                proc.send_signal(signal.SIGINT)
                break
            time.sleep(0.02)
        assert proc.wait(timeout=120) == 130, (tmp_path / "stopped.log").read_text()[-3000:]
    err = (tmp_path / "stopped.log").read_text()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith("error: interrupted (SIGINT)")
    assert errors[0].endswith(f"continue with: tunesmith search --resume {search_dir}") and "train" not in errors[0]

    trials = _study(search_dir).trials
    stopped = [t for t in trials if t.user_attrs.get("interrupted")]
    assert len(stopped) == 1, [(t.number, t.state) for t in trials]
    queued = [t for t in trials if t.state == optuna.trial.TrialState.WAITING]
    assert [t.user_attrs.get("requeued_from") for t in queued] == [stopped[0].number]
    assert queued[0].system_attrs["fixed_params"] == stopped[0].params
    assert not (search_dir / f"trial-{stopped[0].number:04d}").exists()

    resumed = subprocess.run(TUNESMITH + ["search", "--resume", str(search_dir)], capture_output=True, text=True,
                             env=cli_env, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    trials = _study(search_dir).trials
    assert sum(t.state in FINISHED for t in trials) == 3
    rerun = [t for t in trials if t.user_attrs.get("requeued_from") == stopped[0].number]
    assert rerun[0].state in FINISHED and rerun[0].params == stopped[0].params
    table = pd.read_csv(search_dir / "trials.csv")
    assert table.set_index("number").loc[stopped[0].number, "state"] == "interrupted"


def test_a_dead_workers_trial_is_requeued_but_a_live_workers_copy_of_its_attributes_is_not(tmp_path):
    """Optuna's retry gives the re-queued trial the dead trial's user attributes (worker host and pid);
    a worker that has just taken it runs it before writing its own. Another worker starting then must
    not take that for a dead trial and fail it under the live one ("Cannot tell a FAIL trial")."""
    import socket

    from tunesmith.search import _requeue_dead_trials, _storage

    gone = subprocess.Popen(["true"])
    gone.wait()
    store = _storage(f"sqlite:///{tmp_path / 'study.db'}")
    study = optuna.create_study(storage=store, study_name="s")
    dead = {"host": socket.gethostname(), "pid": gone.pid}
    cut_off = study.ask({"train.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
    cut_off.set_user_attr("worker", {**dead, "trial": cut_off.number})
    taken = study.ask()  # the re-queued copy, just taken by a live worker: attributes still the dead trial's
    taken.set_user_attr("worker", {**dead, "trial": cut_off.number})
    (tmp_path / "trial-0000").mkdir()

    _requeue_dead_trials(study, store, "s", tmp_path)

    states = {t.number: t.state for t in study.get_trials(deepcopy=False)}
    assert states[cut_off.number] == optuna.trial.TrialState.FAIL
    assert states[taken.number] == optuna.trial.TrialState.RUNNING
    queued = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.WAITING,))
    assert [t.system_attrs["failed_trial"] for t in queued] == [cut_off.number]
    assert queued[0].params == cut_off.params
    assert not (tmp_path / "trial-0000").exists()
