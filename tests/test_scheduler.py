"""The schedule-fair ASHA: its rule on synthetic one-cycle curves, its rung records across a resume, and
a real Ray Tune run against Ray's stock ASHA. No fastai: the curves are made up, the scheduler is real."""

from __future__ import annotations

import pickle
import sys

import pytest
import ray
from ray import tune

from tune_sota.schedule import rung_shares
from tune_sota.scheduler import ScheduleASHA, make_scheduler

# (epochs, quality): longer schedules end better, the 0.5-quality run is simply worse.
RUNS = [{"epochs": 2, "q": 1.0}, {"epochs": 4, "q": 1.0}, {"epochs": 8, "q": 1.0}, {"epochs": 8, "q": 0.5}]


def accuracy(epochs: int, q: float, epoch: int) -> float:
    """A one-cycle-like curve: poor while the learning rate is high, rising as it anneals; its end
    grows with the schedule's length. Mid-way, a long run is worse than a short one that has finished."""
    final = q * (0.5 + 0.05 * epochs)
    return final * (0.3 + 0.7 * (epoch / epochs) ** 2)


def synthetic(config):
    run = config["run"]
    for e in range(1, run["epochs"] + 1):
        tune.report({"epoch": e, "epochs": run["epochs"], "accuracy": accuracy(run["epochs"], run["q"], e)})


def test_rung_shares():
    assert rung_shares(0.5, 2) == [0.5]
    assert rung_shares(0.25, 2) == [0.25, 0.5]
    assert rung_shares(0.1, 3) == pytest.approx([1 / 9, 1 / 3])
    assert rung_shares(0.6, 2) == [0.6] and rung_shares(0.75, 2) == [0.75]  # above 1/rf: one rung at grace


def test_rule_compares_trials_at_the_same_share_of_their_schedules(tmp_path):
    s = ScheduleASHA(shares=[0.5], reduction_factor=2, metric="accuracy", mode="max",
                     state_file=str(tmp_path / "rungs.json"))
    for i, run in enumerate(RUNS):
        decisions = [s.decide(str(i), e, run["epochs"], accuracy(run["epochs"], run["q"], e))
                     for e in range(1, run["epochs"] + 1)]
        # judged once, at the first epoch at or past half its schedule
        assert decisions.count("STOP") == (1 if run["q"] < 1 else 0), (run, decisions)
    assert sorted(s.records[0.5]) == ["0", "1", "2", "3"]
    assert s.records[0.5]["2"] == pytest.approx(accuracy(8, 1.0, 4))


def test_rung_records_survive_a_resume(tmp_path):
    state = str(tmp_path / "rungs.json")
    first = ScheduleASHA(shares=[0.25, 0.5], reduction_factor=2, metric="accuracy", mode="max", state_file=state)
    assert first.decide("a", 2, 4, 0.8) == "CONTINUE"  # alone at both rungs
    restored = pickle.loads(pickle.dumps(first))  # as Tuner.restore brings it back
    restored.records = {s: {} for s in restored.shares}
    restored.__setstate__(restored.__dict__)  # what unpickling does: read the saved records
    assert restored.records == {0.25: {"a": 0.8}, 0.5: {"a": 0.8}}
    # "b" is below "a" at the 25% rung: stopped there, as the uninterrupted scheduler would have done
    assert restored.decide("b", 1, 4, 0.5) == "STOP"
    fresh = ScheduleASHA(shares=[0.25, 0.5], reduction_factor=2, metric="accuracy", mode="max")
    assert fresh.decide("b", 1, 4, 0.5) == "CONTINUE", "an empty rung would have let it through"


def flat_cos(epochs: int, q: float, epoch: int) -> float:
    """A flat-then-cosine curve: at its peak learning rate until 75% of the schedule, so poor at half-way,
    and the best at the end."""
    final = q * (0.6 + 0.05 * epochs)
    return final * (0.2 if epoch / epochs <= 0.75 else 0.2 + 0.8 * (epoch / epochs - 0.75) / 0.25)


def test_rungs_compare_a_trial_only_with_trials_of_its_schedule_shape(tmp_path):
    state = str(tmp_path / "rungs.json")
    s = ScheduleASHA(shares=[0.5], reduction_factor=2, metric="accuracy", mode="max", state_file=state)
    for i in range(3):  # one_cycle trials set a high bar at half-way
        assert {s.decide(f"oc{i}", e, 4, accuracy(4, 1.0, e)) for e in range(1, 5)} == {"CONTINUE"}
    assert flat_cos(4, 1.0, 2) < min(s.records[0.5].values())  # below every one_cycle trial at the rung...
    good = [s.decide("fc0", e, 4, flat_cos(4, 1.0, e), group="flat_cos") for e in range(1, 5)]
    assert good == ["CONTINUE"] * 4 and flat_cos(4, 1.0, 4) > accuracy(4, 1.0, 4)  # ...and the best at the end
    # among flat_cos trials the rule is ASHA's: the weaker one is stopped at the rung
    weak = [s.decide("fc1", e, 4, flat_cos(4, 0.5, e), group="flat_cos") for e in range(1, 3)]
    assert weak == ["CONTINUE", "STOP"]
    # a one_cycle trial is still judged against one_cycle trials only (the flat_cos values are lower)
    assert s.decide("oc9", 2, 4, accuracy(4, 0.5, 2)) == "STOP"
    # the shapes come back on resume; a state file from before `sched` has none (all one_cycle)
    again = ScheduleASHA(shares=[0.5], reduction_factor=2, metric="accuracy", mode="max", state_file=state)
    assert again.groups == {"fc0": "flat_cos", "fc1": "flat_cos"}
    assert again.decide("fc2", 2, 4, flat_cos(4, 0.9, 2), group="flat_cos") == "CONTINUE"


class _Trial:
    def __init__(self, trial_id, config):
        self.trial_id, self.config = trial_id, config


def test_on_trial_result_takes_the_shape_from_the_result_or_the_config():
    s = ScheduleASHA(shares=[0.5], reduction_factor=2, metric="accuracy", mode="max")
    s.on_trial_result(None, _Trial("a", {}), {"epoch": 2, "epochs": 4, "accuracy": 0.9})
    s.on_trial_result(None, _Trial("b", {"sched": "flat_cos"}), {"epoch": 2, "epochs": 4, "accuracy": 0.2})
    assert s.groups == {"b": "flat_cos"}
    assert s.on_trial_result(None, _Trial("c", {}), {"epoch": 2, "epochs": 4, "accuracy": 0.3,
                                                     "sched": "flat_cos"}) == "CONTINUE"  # above b, below a
    assert s.on_trial_result(None, _Trial("d", {}), {"epoch": 2, "epochs": 4, "accuracy": 0.3}) == "STOP"


def _best_completed(scheduler) -> tuple[float, list[dict]]:
    tuner = tune.Tuner(synthetic, param_space={"run": tune.grid_search(RUNS)},
                       tune_config=tune.TuneConfig(metric="accuracy", mode="max", scheduler=scheduler,
                                                   max_concurrent_trials=1, reuse_actors=True),
                       run_config=tune.RunConfig(verbose=0, storage_path=str(_tmp / "ray")))
    done = [r for r in tuner.fit() if r.metrics["epoch"] == r.metrics["epochs"]]
    return max(r.metrics["accuracy"] for r in done), [r.config["run"] for r in done]


_tmp = None


def test_fair_asha_keeps_the_long_schedule_that_stock_asha_stops(tmp_path):
    global _tmp
    _tmp = tmp_path
    # Ray's workers cannot import a test module: send the synthetic trainable by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        stock, stock_done = _best_completed(make_scheduler("ray-asha", grace=1 / 8, reduction_factor=2, max_epochs=8))
        fair, fair_done = _best_completed(make_scheduler("asha", grace=0.5, reduction_factor=2, max_epochs=8,
                                                         state_file=str(tmp_path / "rungs.json")))
    finally:
        ray.shutdown()
    best_final = accuracy(8, 1.0, 8)
    assert {"epochs": 8, "q": 1.0} not in stock_done and stock < best_final, "stock ASHA stops the long run mid-way"
    assert fair == pytest.approx(best_final) and {"epochs": 8, "q": 0.5} not in fair_done


@pytest.mark.parametrize("epochs", [3, 7, 12, 40])
def test_trials_checkpoint_where_asha_judges_them_at_the_end_and_every_n(epochs):
    """A checkpoint every epoch (283 MB for xresnet50 with Adam) is only needed at the rungs, at the end, and
    every `search.checkpoint_every` epochs for faults: those are the epochs a trial checkpoints."""
    from tune_sota.trainable import checkpoint_epochs

    shares = rung_shares(0.25, 2)
    asha = ScheduleASHA(shares=shares, reduction_factor=2, metric="accuracy", mode="max")
    judged = set()
    for epoch in range(1, epochs + 1):
        before = sum(len(r) for r in asha.records.values())
        asha.decide("t", epoch, epochs, 0.5)
        if sum(len(r) for r in asha.records.values()) > before:
            judged.add(epoch)
    assert checkpoint_epochs(epochs, shares, 0) == judged | {epochs}
    assert checkpoint_epochs(epochs, shares, 5) == judged | {epochs} | set(range(5, epochs + 1, 5))
    assert checkpoint_epochs(epochs, (), 1) == set(range(1, epochs + 1)), "every 1: each epoch, as before"


def test_a_rung_can_wait_for_the_final_size_of_progressive_resizing():
    """issue 16: a 16>32 trial of 8 epochs sat at 16 px when the 50% rung judged it (epoch 4) and was cut on a
    holdout validated at 32 px. With `final_size` its rung waits for its first epoch at the final size, where
    it is judged against the same records; off, it is judged where it stands, as before."""
    for final_size, expect in ((True, ["CONTINUE", "STOP"]), (False, ["STOP"])):
        s = ScheduleASHA(shares=[0.5], reduction_factor=2, metric="accuracy", mode="max", final_size=final_size)
        for i, v in enumerate([0.6, 0.5, 0.55]):  # three plain trials recorded at the rung
            assert s.decide(f"p{i}", 4, 8, v) == ("STOP" if v < 0.55 and i else "CONTINUE")
        got = [s.decide("prog", 4, 8, 0.30, at_final_size=False)]
        if final_size:
            assert "prog" not in s.records[0.5], "judged while still at 16 px"
            got.append(s.decide("prog", 5, 8, 0.40, at_final_size=True))
        assert got == expect
        assert s.records[0.5]["prog"] == (0.40 if final_size else 0.30)


def test_on_trial_result_reads_the_stage_from_the_reported_size():
    from types import SimpleNamespace

    s = ScheduleASHA(shares=[0.5], reduction_factor=2, metric="accuracy", mode="max", final_size=True)
    s.decide("p0", 2, 4, 0.9)
    trial = SimpleNamespace(trial_id="prog", config={"size": 32, "sched": "one_cycle"})
    low = {"accuracy": 0.1, "epoch": 2, "epochs": 4}
    assert s.on_trial_result(None, trial, {**low, "size": 16}) == "CONTINUE"  # at 16 px: not judged yet
    assert s.on_trial_result(None, trial, {**low, "epoch": 3, "size": 32}) == "STOP"


def test_a_scheduler_pickled_before_final_size_existed_still_decides():
    """Ray keeps the scheduler in tuner.pkl: a search started by an older tune_sota is resumed by this one."""
    s = ScheduleASHA(shares=[0.5], reduction_factor=2, metric="accuracy", mode="max")
    state = s.__dict__.copy()
    del state["final_size"]
    old = ScheduleASHA.__new__(ScheduleASHA)
    old.__setstate__(state)
    assert old.decide("a", 2, 4, 0.5, at_final_size=False) == "CONTINUE" and "a" in old.records[0.5]


def test_a_scheduler_pickled_with_its_file_at_the_top_moves_it_into_state(tmp_path):
    """Ray's restore copies the top's *.json into its staging folder and writes them back over the originals at
    each sync, so the rung records live in state/; a scheduler pickled by an older search, its file at the top,
    takes it there and goes on from it."""
    from tune_sota import runstate

    s = ScheduleASHA(shares=[0.5], reduction_factor=2, metric="accuracy", mode="max",
                     state_file=str(tmp_path / "scheduler.json"))
    s.decide("a", 2, 4, 0.8)
    assert (tmp_path / "scheduler.json").is_file()
    again = pickle.loads(pickle.dumps(s))
    assert again.state_file == runstate.state_file(tmp_path, "scheduler.json") == str(tmp_path / "state" /
                                                                                    "scheduler.json")
    assert again.records[0.5] == {"a": 0.8} and not (tmp_path / "scheduler.json").exists()
    again.decide("b", 2, 4, 0.9)
    assert set(pickle.loads(pickle.dumps(again)).records[0.5]) == {"a", "b"}


def test_trials_checkpoint_where_a_waiting_rung_judges_them():
    """With `final_size_rungs` a 16>32 trial of 8 epochs is judged at epoch 5 (its first at 32 px), not 4."""
    from tune_sota.config import Config
    from tune_sota.trainable import checkpoint_epochs, first_final_epoch

    cfg = Config(data="digits", size=32, resize="16>32", epochs=8)
    assert first_final_epoch(cfg) == 5 and first_final_epoch(Config(data="digits", size=32, epochs=8)) == 1
    assert checkpoint_epochs(8, [0.5], 0, first_final_epoch(cfg)) == {5, 8}
    asha = ScheduleASHA(shares=[0.5], reduction_factor=2, metric="accuracy", mode="max", final_size=True)
    judged = []
    for e in range(1, 9):
        asha.decide("t", e, 8, 0.5, at_final_size=e >= first_final_epoch(cfg))
        if "t" in asha.records[0.5] and not judged:
            judged.append(e)
    assert judged == [5]


def test_a_space_without_size_waits_for_the_default_final_size():
    """A space that leaves `size` at Config's default has no size in its trials' configs: the final size is the
    default, not the size being trained (which made every epoch count as final)."""
    from tune_sota.config import Config

    s = ScheduleASHA(shares=[0.5], reduction_factor=2, metric="accuracy", mode="max", final_size=True)
    s.decide("p0", 2, 4, 0.9)
    trial = _Trial("prog", {"resize": f"{Config.size // 2}>{Config.size}"})
    low = {"accuracy": 0.1, "epoch": 2, "epochs": 4}
    assert s.on_trial_result(None, trial, {**low, "size": Config.size // 2}) == "CONTINUE"
    assert "prog" not in s.records[0.5], "judged below its final size"
    assert s.on_trial_result(None, trial, {**low, "epoch": 3, "size": Config.size}) == "STOP"
    assert s.judged_at["prog"] == 3


@pytest.mark.slow
def test_a_real_search_waits_for_the_final_size_and_judges_there(tmp_path, image_folder):
    """Real trials of a space without `size` (so 128 px, Config's default) on `64>128`: ASHA's 50% rung falls on
    epoch 2 of 4, at 64 px; each trial is judged at epoch 3, its first at 128 px, where it also checkpointed."""
    import json

    import pandas as pd
    import yaml

    from tests.conftest import cli, tiny, write_space

    values = {k: v for k, v in tiny(image_folder, epochs=4).items() if k not in ("size", "presize")}
    space = write_space(tmp_path / "nosize.yaml", {**values, "resize": "64>128", "lr": {"choice": [2e-3, 4e-3]}},
                        {"num_samples": 2, "max_concurrent": 2, "cpus_per_trial": 1, "grace": 0.5,
                         "final_size_rungs": True, "confirm_top": 0, "keep_checkpoints": "all",
                         "checkpoint_every": 0})
    assert "size" not in yaml.safe_load(space.read_text())
    run = cli("search", "--space", space, "--results", tmp_path / "results")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    folder = tmp_path / "results" / "nosize"
    rungs = json.loads((folder / "state" / "scheduler.json").read_text())
    history = pd.read_csv(folder / "history.csv", dtype={"trial_id": str})
    assert sorted(rungs["judged_at"]) == sorted(history.trial_id.unique()) and len(rungs["judged_at"]) == 2
    for trial_id, epoch in rungs["judged_at"].items():
        h = history[history.trial_id == trial_id].set_index("epoch")
        assert epoch == 3 and h.loc[2, "size"] == 64 and h.loc[3, "size"] == 128, (trial_id, epoch, h)
        assert rungs[repr(0.5)][trial_id] == pytest.approx(h.loc[3, "accuracy"])
        saved = {json.loads((c / "metrics.json").read_text())["epoch"]
                 for c in folder.glob(f"trial_{trial_id}*/checkpoint_*")}
        assert saved == {3, 4}, f"checkpoints where the rung judged it and at the end, not at 2: {saved}"
