"""Long steps report progress: calibration once per layer step, the prefill measurement once per run."""

import torch

from kvshelf.advice.cost import measure_prefill_runs
from kvshelf.model import calibrate as calibrate_mod
from kvshelf.model.runner import ModelRunner


def test_calibration_reports_every_layer(tiny_models):
    runner = ModelRunner(tiny_models("gemma3"))
    steps = []
    ids = torch.randint(3, 250, (120,), generator=torch.Generator().manual_seed(0)).tolist()
    calibrate_mod._calibrate(runner, [ids], None, "mean", steps.append)
    # the prefill, a transform fit per layer, the reference continuation, a sensitivity probe per layer
    assert len(steps) == 2 * runner.num_layers + 2
    assert steps[0] == "transforms of layer 1" and steps[-1] == "done"
    assert sum(s.startswith("sensitivity of layer") for s in steps) == runner.num_layers
    cal = calibrate_mod.calibrate(runner, ids, show_progress=True)  # the rich bar itself runs too
    assert cal.digest


def test_prefill_measurement_shows_its_runs(tiny_models):
    runner = ModelRunner(tiny_models("llama"))
    samples = measure_prefill_runs(runner, 32, runs=3, show_progress=True)
    assert len(samples) == 3 and all(s > 0 for s in samples)
