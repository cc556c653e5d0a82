"""`prunefusion models build transfusion`: the directory it writes, and resuming a killed training run."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from prunefusion.cli import main as cli_main
from prunefusion.transfusion.build import RECIPES, train
from prunefusion.transfusion.sampling import ImageRequest, TransfusionSampler


def test_resumed_training_equals_an_uninterrupted_run(tmp_path):
    recipe = replace(RECIPES["pico"], steps=30, checkpoint_seconds=0.0)  # a checkpoint at every loss flush (25)
    straight, _, history = train(recipe, tmp_path, progress=False)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)  # plain data: torch's safe unpickler reads it
    assert state["step"] == 25  # the run left a checkpoint behind, as a killed run would
    resumed, _, resumed_history = train(recipe, tmp_path, progress=False)  # picks it up: steps 26..30 only
    assert resumed_history["step"] == history["step"]
    for (name, a), b in zip(straight.state_dict().items(), resumed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)
    other = replace(recipe, seed=1)  # a different recipe does not resume from this checkpoint
    _, _, fresh = train(other, tmp_path, progress=False)
    assert fresh["lm"][0] != history["lm"][0]


class Payload:
    """What a hostile checkpoint carries: unpickling it calls open(marker, "w")."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_a_checkpoint_that_runs_code_when_unpickled_is_refused(tmp_path):
    marker = tmp_path / "ran"
    torch.save({"recipe": {}, "step": Payload(marker)}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="refusing to load it"):
        train(replace(RECIPES["pico"], steps=1), tmp_path, progress=False)
    assert not marker.exists()
    torch.load(tmp_path / "checkpoint.pt", weights_only=False)  # what loading it used to do
    assert marker.exists()


@pytest.mark.slow
def test_cli_builds_a_servable_directory_with_report(tmp_path, capsys):
    out = tmp_path / "tf"
    assert cli_main(["models", "build", "transfusion", "--recipe", "pico", "--out", str(out)]) == 0
    assert "caption exact match" in capsys.readouterr().out
    for name in ("config.json", "model.safetensors", "vocab.json", "scheduler/scheduler_config.json",
                 "manifest.json", "report.md", "loss_curve.png", "samples.png", "history.json"):
        assert (out / name).is_file(), name
    assert not (tmp_path / "tf.partial").exists() and not (out / "checkpoint.pt").exists()
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["kind"] == "prunefusion.transfusion" and manifest["training"]["steps"] == 20
    assert set(manifest["evaluation"]["splits"]) == {"seen", "held_out"}
    assert len(manifest["data"]["held_out_scenes"]) == 16
    history = json.loads((out / "history.json").read_text())
    assert [e["step"] for e in history["evals"]] == [10, 20]  # the learning curve's accuracy checks
    assert "| 20 |" in (out / "report.md").read_text()
    sampler = TransfusionSampler.load(out)
    (image,) = sampler.generate_images([ImageRequest("a red circle on the left", steps=2)])
    assert image.shape == (32, 32, 3) and image.dtype == np.uint8
    assert cli_main(["transfusion", "evaluate", "--model", str(out), "--out", str(tmp_path / "ev"), "--steps", "2",
                     "--max-seen-scenes", "4"]) == 0
    evaluation = json.loads((tmp_path / "ev" / "evaluation.json").read_text())
    assert evaluation["splits"]["seen"]["scenes"] == 4 and evaluation["splits"]["held_out"]["scenes"] == 16
    assert (tmp_path / "ev" / "samples.png").is_file()
    assert cli_main(["transfusion", "sample", "a red circle on the left", "--model", str(out), "-o",
                     str(tmp_path / "s.png"), "--steps", "2"]) == 0
    assert cli_main(["transfusion", "sample", "a red blob", "--model", str(out), "-o", str(tmp_path / "t.png")]) == 2
    assert cli_main(["models", "build", "transfusion", "--recipe", "pico", "--out", str(out)]) == 2  # exists
    assert cli_main(["models", "build", "transfusion", "--recipe", "large"]) == 2  # an LM recipe, not Transfusion
