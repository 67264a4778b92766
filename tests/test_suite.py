"""Suite loading and validation: every bad input is one clear line, exit 2, nothing written."""
from __future__ import annotations

import textwrap
import time

import pytest

from harness import UserError
from harness.cli import main
from harness.suite import load_suite

GOOD = """\
suite: demo
seed: 3
base:
  backbone: {name: dit, size: tiny, patch: 4, input_size: 8}
  metrics: [params]
  device: cpu
matrix:
  backbone.patch: [2, 4]
  backbone.mixer: [attention]
"""


def write(tmp_path, text: str, name: str = "suite.yaml"):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def run_cli(args, capsys):
    code = main(args)
    out = capsys.readouterr()
    return code, out.out, out.err


def test_matrix_expands_to_cells_with_stable_ids(tmp_path):
    suite = load_suite(write(tmp_path, GOOD))
    cells = suite.cells()
    assert [c.config["backbone"]["patch"] for c in cells] == [2, 4]
    assert cells[0].label == "backbone.patch=2,backbone.mixer=attention"
    assert len({c.id for c in cells}) == 2
    again = load_suite(write(tmp_path, GOOD, "copy.yaml")).cells()
    assert [c.id for c in again] == [c.id for c in cells]  # the id is the resolved config, not the file


def test_include_and_exclude(tmp_path):
    text = GOOD + "include:\n  - {backbone.patch: 8}\nexclude:\n  - {backbone.patch: 4}\n"
    cells = load_suite(write(tmp_path, text)).cells()
    assert sorted(c.config["backbone"]["patch"] for c in cells) == [2, 8]


def test_seed_changes_cell_id(tmp_path):
    a = load_suite(write(tmp_path, GOOD)).cells()[0].id
    b = load_suite(write(tmp_path, GOOD.replace("seed: 3", "seed: 4"), "b.yaml")).cells()[0].id
    assert a != b


BAD = {
    "malformed": ("suite: demo\nbase: {backbone: [\n", r"suite\.yaml:\d+: invalid YAML"),
    "missing key": ("suite: demo\nmatrix: {}\n", r"suite\.yaml:1: base: missing required key"),
    "unknown key": (GOOD.replace("seed: 3", "seeds: 3"), r"suite\.yaml:2: seeds: unknown key"),
    "unknown cell key": (GOOD.replace("  device: cpu", "  devcie: cpu"), r"suite\.yaml:6: devcie: unknown key"),
    "wrong type": (GOOD.replace("seed: 3", "seed: three"), r"suite\.yaml:2: seed: .*integer.*'three'"),
    "negative count": (GOOD.replace("  device: cpu", "  device: cpu\n  train: {steps: -5}"),
                       r"suite\.yaml:7: train\.steps: .*greater than or equal to 0"),
    "empty axis": (GOOD.replace("[attention]", "[]"), r"suite\.yaml:\d+: .*matrix axis 'backbone.mixer' is empty"),
    "unknown backbone": (GOOD.replace("name: dit", "name: ditt"),
                         r"suite\.yaml:4: backbone: unknown backbone 'ditt'; did you mean 'dit'"),
    "unknown mixer": (GOOD.replace("[attention]", "[atention]"),
                      r"suite\.yaml:9: backbone: unknown mixer 'atention'; did you mean 'attention'"),
    "unknown metric": (GOOD.replace("[params]", "[params, gflop]"),
                       r"suite\.yaml:5: metrics\.1: unknown metric 'gflop'; did you mean 'gflops'"),
    # a record keeps one entry per metric: a second gflops (thop beside fvcore) would replace the first
    "metric twice": (GOOD.replace("[params]", "[params, gflops, {name: gflops, convention: thop}]"),
                     r"suite\.yaml:5: metrics\[2\]: metric 'gflops' is already metrics\[1\]"),
    "unknown option": (GOOD.replace("size: tiny", "sise: tiny"), r"has no option 'sise'; did you mean 'size'"),
    "yaml tag": (GOOD.replace("seed: 3", "seed: !!python/object/apply:os.system ['true']"),
                 r"suite\.yaml:2: invalid YAML: YAML tag not allowed"),
    "duplicate key": (GOOD.replace("seed: 3", "seed: 3\nseed: 4"), r"suite\.yaml:3: duplicate key 'seed'"),
    "not a mapping": ("- a\n- b\n", r"suite\.yaml:1: a suite is a mapping"),
    "bad build": (GOOD.replace("input_size: 8", "input_size: 6"), r"patch 4 does not divide input_size 6"),
    # results/<suite>/ must stay a valid folder name (255 bytes), so a long name fails here, not at run
    "long suite name": (GOOD.replace("suite: demo", "suite: " + "a" * 300),
                        r"suite\.yaml:1: suite: String should have at most 100 characters \(got 'a{50,70}\.\.\.\)$"),
    "recursive alias": ("suite: demo\nloop: &a [*a]\n" + GOOD.split("\n", 1)[1],
                        r"suite\.yaml:2: a YAML alias refers to a value that contains it"),
    "deep nesting": (GOOD.replace("seed: 3", "seed: " + "[" * 80 + "]" * 80),
                     r"suite\.yaml:2: YAML nested more than 64 levels deep"),
    "mapping as key": (GOOD.replace("seed: 3", "? [a, b]\n: 3"), r"suite\.yaml:2: a key must be a plain name"),
}


@pytest.mark.parametrize("case", sorted(BAD))
@pytest.mark.parametrize("command", ["run", "validate"])
def test_bad_suites_fail_cleanly(tmp_path, capsys, case, command):
    text, pattern = BAD[case]
    path = write(tmp_path, text)
    results = tmp_path / "results"
    code, out, err = run_cli([command, str(path), "--results", str(results)], capsys)
    assert code == 2, err
    assert err.startswith("harness: error: ") and err.count("\n") == 1, err
    assert "Traceback" not in err + out
    import re

    assert re.search(pattern, err), err
    assert not results.exists() or not any(results.rglob("*.json"))


def _one_clean_line(code, out, err):
    assert code == 2, err
    assert err.startswith("harness: error: ") and err.count("\n") == 1 and "Traceback" not in out + err, err
    return err


def _laughs(levels: int, width: int) -> str:
    """A "billion laughs": each anchor is a list of ``width`` aliases to the previous one."""
    lines = ["suite: laughs", "lol0: &l0 lol"]
    for i in range(1, levels + 1):
        lines.append(f"lol{i}: &l{i} [{', '.join([f'*l{i - 1}'] * width)}]")
    return "\n".join(lines) + "\n" + GOOD.split("\n", 1)[1]


@pytest.mark.parametrize("command", [["validate"], ["run", "--dry-run"]])
def test_alias_bomb_is_refused_at_once(tmp_path, capsys, command):
    text = _laughs(6, 10)  # a few hundred bytes that expand to a million nodes
    assert len(text) < 600
    path = write(tmp_path, text)
    t0 = time.perf_counter()
    err = _one_clean_line(*run_cli([command[0], str(path), *command[1:]], capsys))
    assert time.perf_counter() - t0 < 5  # bounded, not proportional to the expansion (about 0.2 s idle)
    assert f"{path}: YAML aliases expand to more than 100,000 nodes" in err


@pytest.mark.parametrize("case", ["malformed", "yaml tag", "duplicate key", "recursive alias", "deep nesting",
                                  "mapping as key"])
def test_pure_python_loader_gives_the_same_errors(tmp_path, monkeypatch, case):
    """Without libyaml, PyYAML's own parser is used, with the same checks and messages."""
    import yaml

    import harness.suite

    monkeypatch.setattr(harness.suite, "_Loader", yaml.SafeLoader)
    text, pattern = BAD[case]
    with pytest.raises(UserError, match=pattern.replace(r"suite\.yaml", r".*suite\.yaml")):
        load_suite(write(tmp_path, text))
    with pytest.raises(UserError, match="YAML aliases expand to more than 100,000 nodes"):
        load_suite(write(tmp_path, _laughs(6, 10)))


def test_aliases_within_the_limit_still_load(tmp_path):
    text = GOOD.replace("  backbone.mixer: [attention]", "  backbone.mixer: &m [attention]\n"
                                                             "include: [{backbone.mixer: *m}]")
    assert load_suite(write(tmp_path, text)).spec.include == [{"backbone.mixer": ["attention"]}]


HUGE = GOOD.replace("  backbone.mixer: [attention]\n", "".join(
    f"  train.x{i}: [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]\n" for i in range(7)))


@pytest.mark.parametrize("command", [["validate"], ["run", "--dry-run"]])
def test_matrix_of_ten_million_cells_is_refused_at_once(tmp_path, capsys, command):
    path = write(tmp_path, HUGE)
    t0 = time.perf_counter()
    err = _one_clean_line(*run_cli([command[0], str(path), *command[1:], "--results", str(tmp_path / "r")], capsys))
    assert time.perf_counter() - t0 < 5  # counted, never expanded (about 0.01 s idle)
    assert (f"{path}:7: matrix: 2 x 10 x 10 x 10 x 10 x 10 x 10 x 10 = 20,000,000 cells, more than the limit "
            f"of 10,000; raise it with --max-cells N or HARNESS_MAX_CELLS=N") in err
    assert not (tmp_path / "r").exists()


def test_cell_limit_counts_includes_and_can_be_raised(tmp_path, capsys, monkeypatch):
    text = GOOD.replace("  backbone.mixer: [attention]", "  train.lr: [0.1, 0.2, 0.3]") + \
        "include: [{train.lr: 0.5}]\n"  # 2 x 3 + 1 = 7 cells, one backbone to build
    path = write(tmp_path, text)
    monkeypatch.setenv("HARNESS_MAX_CELLS", "6")
    err = _one_clean_line(*run_cli(["validate", str(path)], capsys))
    assert "matrix: 2 x 3 + 1 included = 7 cells, more than the limit of 6" in err
    code, out, err = run_cli(["validate", str(path), "--max-cells", "7"], capsys)  # the flag wins
    assert code == 0 and "7 cell(s)" in out, err
    monkeypatch.setenv("HARNESS_MAX_CELLS", "7")
    code, out, err = run_cli(["validate", str(path)], capsys)
    assert code == 0 and "7 cell(s)" in out, err
    monkeypatch.setenv("HARNESS_MAX_CELLS", "lots")
    assert "HARNESS_MAX_CELLS='lots': expected an integer >= 1" in _one_clean_line(
        *run_cli(["validate", str(path)], capsys))
    monkeypatch.delenv("HARNESS_MAX_CELLS")
    assert "--max-cells 0: expected an integer >= 1" in _one_clean_line(
        *run_cli(["validate", str(path), "--max-cells", "0"], capsys))


def test_suite_that_is_a_directory(tmp_path, capsys):
    err = _one_clean_line(*run_cli(["validate", str(tmp_path)], capsys))
    assert f"{tmp_path}: is a directory, expected a YAML suite file" in err


def test_missing_suite_file(tmp_path, capsys):
    code, _, err = run_cli(["run", str(tmp_path / "nope.yaml")], capsys)
    assert code == 2 and "nope.yaml: suite file not found" in err


def test_only_that_matches_nothing(tmp_path, capsys):
    code, _, err = run_cli(["run", str(write(tmp_path, GOOD)), "--only", "zzz*", "--results", str(tmp_path)], capsys)
    assert code == 2 and "--only 'zzz*' matches no cell" in err


def test_results_dir_not_writable(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("keep me")
    code, _, err = run_cli(["run", str(write(tmp_path, GOOD)), "--results", str(blocker)], capsys)
    assert code == 2 and "results directory is not writable" in err
    assert blocker.read_text() == "keep me"


def test_validate_ok(tmp_path, capsys):
    code, out, _ = run_cli(["validate", str(write(tmp_path, GOOD))], capsys)
    assert code == 0 and "2 cell(s)" in out


def test_dry_run_lists_cells_and_writes_nothing(tmp_path, capsys):
    code, out, _ = run_cli(["run", str(write(tmp_path, GOOD)), "--dry-run", "--results", str(tmp_path / "r")], capsys)
    ids = [c.id for c in load_suite(tmp_path / "suite.yaml").cells()]
    assert code == 0 and all(i in out for i in ids) and '"patch": 4' in out
    assert not (tmp_path / "r").exists()


def test_a_method_that_cannot_apply_to_the_backbone_fails_validation_at_its_line(tmp_path, capsys):
    # Stage.check: BK-SDM's order needs U-Net stages, so on a DiT the suite stops before any
    # teacher trains, at the criterion's line; on the U-Net it validates.
    text = GOOD.replace("  metrics: [params]\n", "  metrics: [params]\n  prune: {criterion: bk-sdm, ratio: 0.3}\n")
    path = write(tmp_path, text)
    err = _one_clean_line(*run_cli(["validate", str(path)], capsys))
    assert f"{path}:6: prune.criterion: criterion 'bk-sdm': BK-SDM's order is defined on a diffusers U-Net" in err
    unet = text.replace("{name: dit, size: tiny, patch: 4, input_size: 8}", "{name: unet, preset: adm-tiny}")
    unet = unet.replace("  backbone.patch: [2, 4]\n  backbone.mixer: [attention]\n", "  prune.ratio: [0.3]\n")
    code, _, err = run_cli(["validate", str(write(tmp_path, unet, "unet.yaml"))], capsys)
    assert code == 0, err


def _exploding_dataset(**options):
    raise RuntimeError("the data set was built")


def test_a_suite_that_states_the_input_shape_builds_no_data_set_to_validate(tmp_path, capsys):
    # A paper suite's ImageNet (encoded by a VAE) must not be loaded by `harness validate`; the
    # data set is built only when the suite leaves the shape to it.
    import harness

    class Plugin:
        @harness.hookimpl
        def harness_datasets(self):
            return {"exploding-test": _exploding_dataset}

    plugin = Plugin()
    harness.registry().register(plugin, name="exploding-test")
    try:
        text = GOOD.replace("input_size: 8}", "input_size: 8, in_channels: 4, num_classes: 10}")
        text = text.replace("  metrics: [params]\n", "  data: {name: exploding-test}\n  metrics: [params]\n")
        code, out, err = run_cli(["validate", str(write(tmp_path, text))], capsys)
        assert code == 0, err
        shapeless = text.replace(", num_classes: 10}", "}")
        code, out, err = run_cli(["validate", str(write(tmp_path, shapeless, "shapeless.yaml"))], capsys)
        assert code != 0 and "the data set was built" in out + err
    finally:
        harness.registry().unregister(plugin)
