"""Suite errors that say what was meant: unknown keys of any stage block or of the suite get
the closest known ones, and an error caused by a matrix override points at the matrix's line."""
from __future__ import annotations

import textwrap

import pytest

from harness.errors import UserError
from harness.runner import plan
from harness.suite import load_suite

BASE = """\
suite: hints
base:
  backbone: {name: dit, size: tiny, depth: 1, hidden_size: 32}
  metrics: [params]
"""


def refused(tmp_path, text: str) -> str:
    path = tmp_path / "s.yaml"
    path.write_text(textwrap.dedent(text))
    with pytest.raises(UserError) as err:
        suite = load_suite(path)
        plan(suite, tmp_path / "results")
    return str(err.value).replace(str(path), "s.yaml")


@pytest.mark.parametrize("extra, message", [
    ("  train: {step: 10}\n", "s.yaml:5: train.step: unknown key; did you mean 'steps'"),
    ("  prune: {criterion: laptop, ratio: 0.3, calibraton_batch: 4}\n",
     "s.yaml:5: prune.calibraton_batch: unknown key; did you mean 'calibration_batch'"),
])
def test_unknown_key_of_a_stage_block_suggests(tmp_path, extra, message):
    assert refused(tmp_path, BASE + extra).startswith(message)


def test_unknown_top_level_key_suggests(tmp_path):
    assert refused(tmp_path, "sed: 1\n" + BASE).startswith("s.yaml:1: sed: unknown key; did you mean 'seed'")


@pytest.mark.parametrize("matrix, message", [
    # an option the factory does not take, beside another axis of the same block
    ("  backbone.mixer: [attention]\n  backbone.sise: [S]\n",
     "s.yaml:7: backbone: backbone 'dit' has no option 'sise'; did you mean 'size'"),
    ("  train.step: [1, 2]\n", "s.yaml:6: train.step: unknown key; did you mean 'steps'"),
    ("  train: [{steps: 1}, {stepz: 2}]\n", "s.yaml:6: train.stepz: unknown key; did you mean 'steps'"),
    # a block that only the axis sets: the axis's line, not base's
    ("  trian.steps: [1]\n", "s.yaml:6: trian: unknown key; did you mean 'train'"),
    ("  dtype: [float32, float8]\n", "s.yaml:6: dtype: Input should be"),
])
def test_an_override_error_carries_the_matrix_line(tmp_path, matrix, message):
    assert refused(tmp_path, BASE + "matrix:\n" + matrix).startswith(message)
