"""The reproduction suites of suites/paper/: each names its source and carries its published
figures; each validates once its weights and data are named (stand-ins here), and says in one
line which environment variable is missing when they are not."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from harness.cli import main
from harness.runner import check_builds, plan
from harness.suite import load_suite

REPO = Path(__file__).resolve().parent.parent
PAPER = sorted((REPO / "suites" / "paper").glob("*.yaml"))
# what each suite must carry, figure by figure (the sources: docs/protocols/paper-rows.md)
EXPECTED = {
    "dit-table4": [{"fid": 2.27, "sfid": 4.60, "isc": 278.24, "precision": 0.83, "recall": 0.57},
                   {"fid": 9.62, "sfid": 6.85, "isc": 121.50, "precision": 0.67, "recall": 0.67}],
    "lamamba-diff-imagenet256": [{"fid": 2.04}],
    "bk-sdm-coco30k": [{"fid": 13.05, "isc": 36.76, "clip_score": 0.2958},
                       {"fid": 15.76, "isc": 33.79, "clip_score": 0.2878},
                       {"fid": 16.98, "isc": 31.68, "clip_score": 0.2677},
                       {"fid": 17.12, "isc": 30.09, "clip_score": 0.2653}],
    "laptop-diff-pickscore": [{"pickscore.change": -0.040}],
    "tinyfusion-dit-d14": [{"fid": 2.27, "isc": 278.24, "sfid": 4.60, "precision": 0.83, "recall": 0.57},
                           {"fid": 2.86, "isc": 234.50, "sfid": 4.75, "precision": 0.82, "recall": 0.55},
                           {"fid": 22.28, "isc": 66.10, "sfid": 6.20, "precision": 0.63, "recall": 0.56},
                           {"fid": 21.15, "isc": 70.36, "sfid": 6.22, "precision": 0.63, "recall": 0.57},
                           {"fid": 5.73, "isc": 151.88, "sfid": 4.91, "precision": 0.80, "recall": 0.55},
                           {"fid": 3.73, "isc": 207.27, "sfid": 5.04, "precision": 0.81, "recall": 0.54}],
}


@pytest.fixture
def stand_ins(tmp_path, monkeypatch):
    """Every variable the paper suites read, pointed at small files of the right kind."""
    ckpt = tmp_path / "weights.pt"
    ckpt.write_bytes(b"stand-in: validation does not read weights")
    ref = tmp_path / "VIRTUAL_imagenet256_labeled.npz"
    np.savez(ref, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    coco = tmp_path / "captions_val2014.json"
    coco.write_text(json.dumps({"annotations": [{"image_id": i, "caption": f"caption {i}"} for i in range(30000)]}))
    val = tmp_path / "val2014-256"
    val.mkdir()
    for i in range(2):
        Image.fromarray(np.full((256, 256, 3), 40 * i, np.uint8)).save(val / f"{i}.png")
    for name in ("DIT_XL_2_256", "LAMAMBA_DIFF_XL_256", "TINYDIT_D14"):
        monkeypatch.setenv(name, str(ckpt))
    # fine-tuning data: an ImageNet-like folder (a class per sub-folder) encoded by a tiny VAE that
    # downsamples 8x like SD's, its latents cached here
    imagenet = tmp_path / "imagenet-train"
    for i, cls in enumerate(("n01440764", "n01443537")):
        (imagenet / cls).mkdir(parents=True)
        Image.fromarray(np.full((300, 280, 3), 60 * i, np.uint8)).save(imagenet / cls / f"{cls}_1.JPEG")
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=3, out_channels=3, down_block_types=["DownEncoderBlock2D"] * 4,
                  up_block_types=["UpDecoderBlock2D"] * 4, block_out_channels=[4] * 4, layers_per_block=1,
                  latent_channels=4, norm_num_groups=2, sample_size=32).save_pretrained(tmp_path / "vae")
    monkeypatch.setenv("IMAGENET_TRAIN", str(imagenet))
    monkeypatch.setenv("IMAGENET_VAE", str(tmp_path / "vae"))
    monkeypatch.setenv("HARNESS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("ADM_REF_IMAGENET256", str(ref))
    monkeypatch.setenv("COCO_CAPTIONS", str(coco))
    monkeypatch.setenv("COCO_VAL2014_256", str(val))
    monkeypatch.chdir(REPO)  # prompt files are relative to the repository, as `harness run` is started
    return tmp_path


def test_there_is_one_suite_per_table():
    assert sorted(p.stem for p in PAPER) == sorted(EXPECTED)


@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_each_paper_suite_validates_with_stand_ins_and_carries_its_figures(path, stand_ins):
    suite = load_suite(path)
    jobs = plan(suite, stand_ins / "results")
    check_builds(suite, jobs)
    published = [c["published"] for c in (j.config for j in jobs) if "published" in c]
    assert all(p["source"] for p in published)
    figures = [{k: v for k, v in p.items() if k not in ("source", "tolerance")} for p in published]
    assert figures == EXPECTED[path.stem]
    assert "https://" in path.read_text() or "arXiv" in path.read_text()  # where the figures come from


@pytest.mark.parametrize("path", [p for p in PAPER if "${" in p.read_text() and ":?" in p.read_text()],
                         ids=lambda p: p.stem)
def test_a_missing_weight_or_data_variable_is_one_line(path, capsys, monkeypatch):
    for name in ("DIT_XL_2_256", "LAMAMBA_DIFF_XL_256", "TINYDIT_D14", "ADM_REF_IMAGENET256", "COCO_CAPTIONS",
                 "COCO_VAL2014_256", "IMAGENET_TRAIN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(REPO)
    assert main(["validate", str(path.relative_to(REPO))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "environment variable" in err and "is not set: " in err, err
    assert err.startswith(f"harness: error: suites/paper/{path.name}:"), err


def test_env_expansion_forms(tmp_path, monkeypatch, capsys):
    path = tmp_path / "s.yaml"
    path.write_text("suite: s\nbase:\n  backbone: {name: dit, size: tiny, patch: 2, input_size: 8}\n"
                    "  metrics: [params]\n  device: ${DEV:-cpu}\n  description_of_cost: x\n")
    monkeypatch.delenv("DEV", raising=False)
    doc = yaml.safe_load(path.read_text())
    from harness.suite import expand_env

    assert expand_env({"a": "${DEV:-cpu}", "b": "$${DEV}", "c": ["x${DEV:-}y"]}, {}, "f") == \
        {"a": "cpu", "b": "${DEV}", "c": ["xy"]}
    monkeypatch.setenv("DEV", "cuda:1")
    assert expand_env("${DEV}/w.pt", {}, "f") == "cuda:1/w.pt"
    monkeypatch.delenv("DEV")
    with pytest.raises(Exception, match=r"f:3: a.b: environment variable DEV is not set$"):
        expand_env({"a": {"b": "${DEV}"}}, {("a", "b"): 3}, "f")
    assert doc
