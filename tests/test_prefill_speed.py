"""The prefill speed behind the guard and `kvshelf advise`: a median of runs, re-measured when old or
when observed prefills disagree with it."""

import json
import time

from kvshelf.advice.cost import CostModel, prefill_file
from kvshelf.model.runner import ModelRunner


def test_saved_speed_is_a_median_of_runs_with_its_time(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("KVSHELF_CACHE_DIR", str(tmp_path))
    runner = ModelRunner(tiny_models("llama"))
    before = time.time()
    cost = CostModel.for_runner(runner, calibration_tokens=32, show_progress=False)
    saved = json.loads(prefill_file(runner).read_text())
    assert len(saved["runs"]) >= 3 and sorted(saved["runs"])[len(saved["runs"]) // 2] == cost.prefill_tokens_per_s
    assert saved["measured_at"] >= before  # dated by this measurement


def test_old_or_undated_measurements_are_measured_again(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("KVSHELF_CACHE_DIR", str(tmp_path))
    runner = ModelRunner(tiny_models("llama"))
    path = prefill_file(runner)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"prefill_tokens_per_s": 1.0}))  # an old file: no date
    assert CostModel.for_runner(runner, calibration_tokens=32, show_progress=False).prefill_tokens_per_s != 1.0
    path.write_text(json.dumps({"prefill_tokens_per_s": 1.0, "measured_at": time.time() - 3600}))
    assert CostModel.for_runner(runner, show_progress=False).prefill_tokens_per_s == 1.0  # fresh enough: kept
    cost = CostModel.for_runner(runner, calibration_tokens=32, max_age_s=60, show_progress=False)
    assert cost.prefill_tokens_per_s != 1.0  # older than the limit


def test_observed_prefills_that_disagree_by_more_than_30_percent_are_flagged(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("KVSHELF_CACHE_DIR", str(tmp_path))
    cost = CostModel(prefill_tokens_per_s=100.0, kv_bytes_per_token=1024)
    for _ in range(3):
        cost.observe_prefill(1000, 8.0)  # 125 tok/s: within 30%
    assert cost.prefill_disagrees() is None
    cost.observed_prefill.clear()
    cost.observe_prefill(1000, 2.0)
    assert cost.prefill_disagrees() is None  # one observation is not enough
    cost.observe_prefill(1000, 2.5)
    cost.observe_prefill(1000, 3.0)
    assert cost.prefill_disagrees() == 400.0  # the median of 500, 400, 333 tok/s
    runner = ModelRunner(tiny_models("llama"))
    cost.remeasure_prefill(runner, calibration_tokens=32, show_progress=False)
    assert cost.prefill_tokens_per_s != 100.0 and cost.observed_prefill == []
    assert json.loads(prefill_file(runner).read_text())["prefill_tokens_per_s"] == cost.prefill_tokens_per_s
