"""Sharma weight calibration: the formula on hand-made NLLs, and the batched NLL pass against a per-line loop."""

from __future__ import annotations

import math

import numpy as np
import pytest

from prunefusion.quality.calibrate import LineNLL, line_nll, weights_from_nll
from prunefusion.quality.sharma import FILTER_NAMES, line_signals

GOOD = "The parser reads the file and returns a list of the names that it found."
SHOUT = "THE PARSER READS THE FILE AND RETURNS A LIST OF THE NAMES THAT IT FOUND."
CODE = "def f(x): { return x }"


def test_weights_follow_the_formula_on_hand_made_nlls():
    lines = [GOOD, SHOUT, CODE]
    assert line_signals(GOOD)["not_all_caps"] and not line_signals(SHOUT)["not_all_caps"]
    # per-token NLL: GOOD 1.0 (10 tokens), SHOUT 3.0 (10 tokens), CODE 2.0 (5 tokens)
    scores = LineNLL(nll=np.array([10.0, 30.0, 10.0]), tokens=np.array([10, 10, 5]))
    weights, details = weights_from_nll(lines, scores)
    ppl_all = math.exp(50.0 / 25)
    assert details["ppl_all"] == pytest.approx(ppl_all)
    # not_all_caps passes GOOD and CODE: exp(20 / 15)
    ppl_caps = math.exp(20.0 / 15)
    assert details["filters"]["not_all_caps"]["ppl"] == pytest.approx(ppl_caps)
    assert weights["not_all_caps"] == pytest.approx((ppl_all - ppl_caps) / ppl_all)
    # no_curly_bracket passes GOOD and SHOUT: exp(40 / 20) = e^2 > PPL_all -> weight 0, never negative
    assert details["filters"]["no_curly_bracket"]["ppl"] == pytest.approx(math.exp(2.0))
    assert weights["no_curly_bracket"] == 0.0
    assert set(weights) == set(FILTER_NAMES)


def test_batched_line_nll_equals_one_line_at_a_time(pico_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(pico_dir).eval()
    tok = AutoTokenizer.from_pretrained(pico_dir)
    lines = [GOOD, "Short one.", CODE, SHOUT, "x"]
    fast = line_nll(model, tok, lines, batch_size=3, progress=False)
    for i, line in enumerate(lines):
        ids = torch.tensor([[tok.bos_token_id, *tok(line, add_special_tokens=False)["input_ids"]]])
        with torch.no_grad():
            mean_loss = model(input_ids=ids, labels=ids).loss.item()
        n = ids.shape[1] - 1
        assert fast.tokens[i] == n
        assert fast.nll[i] == pytest.approx(mean_loss * n, rel=1e-4)


def test_calibrate_cli_writes_weights_with_provenance(pico_dir, tmp_path, capsys):
    import json

    from prunefusion.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text("\n".join(json.dumps({"text": t}) for t in [GOOD, SHOUT, CODE, "menu", "- item"] * 4) + "\n")
    out = tmp_path / "w.json"
    code = main(["score", "calibrate", "--reference-model", str(pico_dir), "--data", str(data), "--out", str(out)])
    if code == 1:  # a random-weight pico LM may find no helpful filter: then no file, and an error that says so
        assert not out.exists() and "every weight would be 0" in capsys.readouterr().err
        return
    assert code == 0
    saved = json.loads(out.read_text())
    assert saved["provenance"]["reference_model"] == str(pico_dir) and saved["provenance"]["lines"] == 20
    assert main(["score", "calibrate", "--reference-model", str(pico_dir), "--out", str(out)]) == 2  # no data
