"""Text-to-image in BK-SDM's and LAPTOP-Diff's protocol, on a tiny pipeline built from configs:
prompt sets (text files, MS-COCO captions JSON), the ``sample`` stage (diffusers' own pipeline,
sharded over ranks, resumable), and the quality metrics on its images with the teacher beside."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml

from harness.errors import UserError
from harness_t2i import read_prompt_set
from harness_t2i.sample import sample_images

# fixtures: a tiny CLIP and SD pipeline saved to disk (test_pickscore), a random Inception (test_adm)
from test_pickscore import tiny_clip, tiny_pipeline  # noqa: F401

@pytest.fixture(scope="module")
def sd_pipeline(tiny_pipeline, tmp_path_factory):
    """The tiny pipeline with SD-1.5's own scheduler: PNDM as its scheduler_config.json sets it."""
    from diffusers import PNDMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_pipeline)
    pipe.scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                   skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False)
    folder = tmp_path_factory.mktemp("sd")
    pipe.save_pretrained(folder)
    return str(folder)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models on a shared machine: one thread runs their small ops 10-20x faster than two
    threads contending for busy cores (OpenMP spin-waits), which is what makes these tests seconds."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


PROMPTS = ["a red circle", "a blue square", "two green dots", "a yellow star", "one black line"]


def _coco(path, annotations):
    path.write_text(json.dumps({"info": {}, "images": [], "annotations": annotations}))
    return path


# -- prompt sets --------------------------------------------------------------------------------
def test_coco_captions_one_per_image_and_a_seeded_subset(tmp_path):
    anns = [{"image_id": 7, "id": 1, "caption": "A dog  on a\nbeach."}, {"image_id": 3, "id": 2, "caption": "a cat"},
            {"image_id": 7, "id": 3, "caption": "a second caption of image 7"},
            {"image_id": 9, "id": 4, "caption": "a bus"}, {"image_id": 3, "id": 5, "caption": "another cat"}]
    f = _coco(tmp_path / "captions_val2014.json", anns)
    assert read_prompt_set(f) == ["A dog on a beach.", "a cat", "a second caption of image 7", "a bus", "another cat"]
    assert read_prompt_set(f, one_per_image=True) == ["A dog on a beach.", "a cat", "a bus"]  # first of each, in order
    sub = read_prompt_set(f, subset=3, seed=1)
    assert len(sub) == 3 and sub == read_prompt_set(f, subset=3, seed=1)  # seeded: the same draw again
    everything = read_prompt_set(f)
    assert sub == [p for p in everything if p in sub]  # kept in file order
    assert {tuple(read_prompt_set(f, subset=3, seed=s)) for s in range(6)} != {tuple(sub)}  # the seed matters
    txt = tmp_path / "p.txt"
    txt.write_text("# a comment\n\na cat\n  a dog \n")
    assert read_prompt_set(txt) == ["a cat", "a dog"]


@pytest.mark.parametrize("content, message", [
    ("", "holds no prompt"),
    ("# only a comment\n", "holds no prompt"),
])
def test_empty_text_prompt_sets_are_refused(tmp_path, content, message):
    f = tmp_path / "p.txt"
    f.write_text(content)
    with pytest.raises(UserError, match=message):
        read_prompt_set(f)


@pytest.mark.parametrize("doc, message", [
    ({"images": []}, "expected an MS-COCO captions JSON with an 'annotations' list"),
    ([1, 2], "expected an MS-COCO captions JSON with an 'annotations' list"),
    ({"annotations": []}, "holds no prompt"),
    ({"annotations": [{"image_id": 1}]}, r"annotations\[0\] has no 'caption' string"),
])
def test_bad_coco_files_are_one_line_errors(tmp_path, doc, message):
    f = tmp_path / "c.json"
    f.write_text(json.dumps(doc))
    with pytest.raises(UserError, match=message) as exc:
        read_prompt_set(f)
    assert "\n" not in str(exc.value) and "c.json" in str(exc.value)
    (tmp_path / "junk.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        read_prompt_set(tmp_path / "junk.json")
    with pytest.raises(UserError, match="subset 9 is larger than its 2 prompts"):
        read_prompt_set(_coco(tmp_path / "two.json", [{"image_id": i, "caption": c} for i, c in ((1, "a"), (2, "b"))]),
                        subset=9)


def _suite(tmp_path, base, name="t2i"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"suite": name, "seed": 0, "base": base}, sort_keys=False))
    return path


@pytest.mark.parametrize("sample, where, message", [
    ({"prompts": "EMPTY"}, "sample.prompts", "holds no prompt"),
    ({"prompts": "NOANN"}, "sample.prompts", "'annotations' list"),
    ({"prompts": "nowhere.txt"}, "sample.prompts", "'nowhere.txt' not found"),
    ({"resolution": 500}, "sample.resolution", "not a multiple of 8"),
    ({"scheduler": "pdnm"}, "sample.scheduler", "did you mean 'pndm'"),
])
def test_validate_refuses_bad_sample_blocks_in_one_line(tmp_path, capsys, sample, where, message):
    from harness.cli import main

    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "noann.json").write_text(json.dumps({"images": []}))
    (tmp_path / "ok.txt").write_text("a cat\n")
    block = {"prompts": str(tmp_path / "ok.txt"), "pipeline": "x", **sample}
    block["prompts"] = {"EMPTY": str(tmp_path / "empty.txt"), "NOANN": str(tmp_path / "noann.json")}.get(
        block["prompts"], block["prompts"])
    path = _suite(tmp_path, {"backbone": {"name": "unet", "preset": "sd-tiny"}, "sample": block,
                             "metrics": ["params"]})
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and where in err and message in err and "t2i.yaml:" in err, err


# -- sampling -----------------------------------------------------------------------------------
def _files(folder):
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.png"))}


def test_sharded_sampling_gives_the_images_of_one_process_and_resumes(sd_pipeline, tmp_path):
    """Ranks 0 and 1 of 2 together write exactly the PNGs one process writes, through the
    pipeline's own __call__; a rerun skips what exists and redoes only a missing batch."""
    from harness_t2i.sample import load_pipeline

    assert type(load_pipeline(sd_pipeline, scheduler="ddim").scheduler).__name__ == "DDIMScheduler"
    pipe = load_pipeline(sd_pipeline)
    assert type(pipe).__name__ == "StableDiffusionPipeline" and type(pipe.scheduler).__name__ == "PNDMScheduler"
    calls = []
    real = type(pipe).__call__
    type(pipe).__call__ = lambda self, **kw: calls.append(len(kw["prompt"])) or real(self, **kw)
    try:
        opts = dict(steps=2, guidance_scale=7.5, batch_size=2, seed=3)
        assert sample_images(pipe, PROMPTS, tmp_path / "one", rank=0, world=1, **opts) == 5
        assert calls == [2, 2, 1]
        made = [sample_images(pipe, PROMPTS, tmp_path / "two", rank=r, world=2, **opts) for r in (1, 0)]
        assert made == [2, 3]  # rank 1 took batch 1, rank 0 batches 0 and 2
        one = _files(tmp_path / "one")
        assert list(one) == [f"{i:06d}.png" for i in range(5)] and one == _files(tmp_path / "two")
        assert len(set(one.values())) == 5  # each prompt and seed its own image
        # image i depends on (seed + i) only: alone in a batch of 1, prompt 3 draws the same image
        sample_images(pipe, PROMPTS, tmp_path / "solo", rank=0, world=1, **{**opts, "batch_size": 1})
        solo = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(tmp_path / "solo" / "000003.png"),
                          dtype=np.int16)
        batched = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(tmp_path / "one" / "000003.png"),
                             dtype=np.int16)
        assert np.abs(solo - batched).max() <= 1  # float reassociation across batch shapes, at most one level
        calls.clear()
        (tmp_path / "one" / "000002.png").unlink()
        assert sample_images(pipe, PROMPTS, tmp_path / "one", rank=0, world=1, **opts) == 2
        assert calls == [2] and _files(tmp_path / "one") == one  # only batch 1 again, the same bytes
    finally:
        type(pipe).__call__ = real
    with pytest.raises(UserError, match="not a multiple of this pipeline's VAE factor"):
        sample_images(pipe, PROMPTS, tmp_path / "odd", resolution=33, rank=0, world=1)


def _cell(tmp_path, pipeline, clip, inception, reference, **sample):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS[:4]))
    quality = {"weights": inception, "reference": str(reference), "resize": 16, "batch_size": 4}
    return {"backbone": {"name": "unet", "preset": "sd-tiny", "pretrained": pipeline},
            "prune": {"criterion": "magnitude", "ratio": 0.3, "calibration_batch": 2, "calibration_timesteps": 1},
            "sample": {"prompts": str(prompts), "pipeline": pipeline, "scheduler": "pndm", "steps": 2,
                       "guidance_scale": 7.5, "resolution": 32, "batch_size": 2, "seed": 0, **sample},
            "metrics": ["params", {"name": "pickscore", "model": clip}, {"name": "clip_score", "model": clip},
                        {"name": "fid", **quality}, {"name": "isc", **quality}, {"name": "kid", **quality}],
            "device": "cpu", "threads": 1}


def _reference(folder, n, size):
    from PIL import Image

    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_a_pruned_cell_samples_once_and_every_metric_scores_its_images_beside_the_teacher(
        sd_pipeline, tiny_clip, inception_file, tmp_path, capsys, monkeypatch):
    """The LAPTOP/BK-SDM protocol end to end on a tiny pipeline: prune, sample the student and
    the teacher through StableDiffusionPipeline, then fid/isc/kid (resized to 16, against a
    reference folder) and pickscore/clip_score on those images, each with the teacher's figure."""
    from harness.cli import main
    from harness_quality import adm

    # scipy's sqrtm of a 2048x2048 matrix takes a minute on this machine; the formula is pinned in
    # test_adm. Here: the first term of the Frechet distance, which says which features it was given.
    seen = []
    monkeypatch.setattr(adm, "frechet_distance", lambda a, b: seen.append((a, b)) or float(((a.mu - b.mu) ** 2).sum()))

    reference = _reference(tmp_path / "ref", 4, 16)
    path = _suite(tmp_path, _cell(tmp_path, sd_pipeline, tiny_clip, inception_file, reference))
    assert main(["run", str(path), "--results", str(tmp_path / "results")]) == 0, capsys.readouterr()
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "results" / "t2i").glob("*.json")]
    assert record["status"] == "ok", record.get("traceback")
    s = record["sample"]
    assert s["pipeline_class"] == "StableDiffusionPipeline" and s["scheduler"] == "PNDMScheduler"
    assert s["generated"] == {"cell": 4, "teacher": 4} and s["resolution"] == 32 and s["prompts"]["count"] == 4
    assert "/teachers/" in s["teacher_folder"]  # shared by every cell of the suite
    m = record["metrics"]
    for name in ("pickscore", "clip_score", "fid", "isc", "kid"):
        e = m[name]
        assert e.get("status") != "unavailable" and np.isfinite(e["value"]) and np.isfinite(e["teacher"]), (name, e)
        if e["teacher"]:  # kid of 4 images can be exactly 0
            assert e["change"] == pytest.approx((e["value"] - e["teacher"]) / e["teacher"]), name
    assert m["pickscore"]["images"] == "sample stage" and m["pickscore"]["prompts"] == 4
    assert m["fid"]["samples"] == 4 and m["fid"]["reference_images"] == 4 and m["fid"]["resize"] == 16
    assert len(seen) == 2 and all(a.mu.shape == (2048,) for a, _ in seen)  # the cell's images, then the teacher's
    assert m["fid"]["value"] == pytest.approx(
        float(((seen[0][0].mu - seen[0][1].mu) ** 2).sum()))
    assert m["fid"]["teacher"] == pytest.approx(float(((seen[1][0].mu - seen[1][1].mu) ** 2).sum()))
    # pruning changed the images: the student's differ from the teacher's
    student, teacher = (_files(__import__("pathlib").Path(s[k])) for k in ("folder", "teacher_folder"))
    assert len(student) == len(teacher) == 4 and student != teacher
    # pickscore scored exactly those files: recompute one image's score by hand
    from harness_t2i import scoring
    from PIL import Image

    clip, proc = scoring.load_clip(tiny_clip)
    images = [Image.open(__import__("pathlib").Path(s["folder"]) / f"{i:06d}.png").convert("RGB") for i in range(4)]
    by_hand = scoring.pickscores(clip, proc, PROMPTS[:4], images)
    assert m["pickscore"]["value"] == pytest.approx(float(by_hand.mean()), rel=1e-5)
    # a rerun is a skip: nothing is sampled again
    assert main(["run", str(path), "--results", str(tmp_path / "results")]) == 0


def test_a_reference_of_another_size_is_refused_before_sampling(sd_pipeline, tiny_clip, inception_file,
                                                               tmp_path, capsys):
    """With resize, validation refuses it (one line, exit 2); without, the sample stage refuses
    it once the pipeline says what size it makes, before it samples anything."""
    from harness.cli import main
    from harness.runner import execute_cell, plan
    from harness.suite import load_suite

    reference = _reference(tmp_path / "ref", 4, 24)
    cell = _cell(tmp_path, sd_pipeline, tiny_clip, inception_file, reference)
    del cell["prune"]
    assert main(["validate", str(_suite(tmp_path, cell))]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "t2i.yaml:" in err and "metrics.3" in err, err
    assert "24x24 images; the samples are scored at resize 16x16" in err, err
    for m in cell["metrics"][3:]:
        del m["resize"]
    (job,) = plan(load_suite(_suite(tmp_path, cell)), tmp_path / "results")
    record = execute_cell(job)
    assert record["status"] == "failed"
    assert "metrics.3 (fid): reference" in record["error"], record["error"]
    assert "24x24 images; the samples are scored at 32x32 (set resize:" in record["error"], record["error"]
    assert not list(job.workdir.rglob("*.png"))  # nothing was sampled


# -- the shipped suites -------------------------------------------------------------------------
REPO = __import__("pathlib").Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name", ["sd15-laptop", "sdxl-laptop"])
def test_shipped_suites_declare_the_protocol_and_their_coco_recipe_validates(name, tmp_path, monkeypatch):
    """Each cell validates as shipped; the COCO lines its comments give (prompts and fid against
    val2014 at 256) validate too once those files exist (stand-ins here)."""
    from harness.suite import load_suite, validate_cell

    monkeypatch.chdir(REPO)
    path = REPO / "suites" / f"{name}.yaml"
    suite = load_suite(path)
    for cell in suite.cells():
        validate_cell(suite, cell)
    base = yaml.safe_load(path.read_text())["base"]
    assert {"prompts", "pipeline", "steps", "guidance_scale", "resolution"} <= set(base["sample"])
    names = [m if isinstance(m, str) else m["name"] for m in base["metrics"]]
    assert {"pickscore", "clip_score", "isc"} <= set(names)
    if name == "sd15-laptop":  # BK-SDM's settings
        assert base["sample"] | {"scheduler": "pndm", "steps": 25, "guidance_scale": 7.5, "resolution": 512} == \
            base["sample"]
    # the recipe in the comments, with its data paths pointed at stand-ins
    text = path.read_text()
    recipe = [line.strip()[1:].strip() for line in text.splitlines() if line.strip().startswith("#   ")]
    prompts = [yaml.safe_load(line)["prompts"] for line in recipe if line.startswith("prompts:")]
    fids = [yaml.safe_load(line)[0] for line in recipe if line.startswith("- {name:")]
    assert fids and all(f["resize"] == 256 for f in fids)
    coco = _coco(tmp_path / "captions_val2014.json", [{"image_id": i, "caption": f"caption {i}"} for i in range(3)])
    _reference(tmp_path / "val2014-256", 2, 256)  # val2014 as BK-SDM prepares it: 256x256
    doc = yaml.safe_load(text)
    if prompts:
        assert prompts[0]["one_per_image"] and prompts[0]["subset"] == 30000
        doc["base"]["sample"]["prompts"] = {**prompts[0], "path": str(coco), "subset": 2}
    doc["base"]["metrics"] += [{**f, "reference": str(tmp_path / "val2014-256")} for f in fids]
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(doc))
    suite = load_suite(tmp_path / "s.yaml")
    validate_cell(suite, suite.cells()[0])


@pytest.mark.slow  # two torchrun processes start torch and diffusers
def test_torchrun_two_ranks_of_harness_run_write_the_images_one_process_writes(sd_pipeline, tmp_path):
    import os
    import subprocess
    import sys

    from harness.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    base = {"backbone": {"name": "unet", "preset": "sd-tiny", "pretrained": sd_pipeline},
            "sample": {"prompts": str(prompts), "pipeline": sd_pipeline, "steps": 2, "resolution": 32,
                       "batch_size": 2}, "metrics": ["params"], "device": "cpu", "threads": 1}
    path = _suite(tmp_path, base)
    assert main(["run", str(path), "--results", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    # the documented command: torchrun --nproc-per-node N -m harness run SUITE
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "harness", "run", str(path), "--results", str(tmp_path / "two")], env=env,
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    (rec,) = (json.loads(p.read_text()) for p in (tmp_path / "two" / "t2i").glob("*.json"))
    # batches of 2 prompts: rank 0 made batches 0 and 2 (3 images), rank 1 batch 1 (2 images)
    assert rec["status"] == "ok" and rec["sample"]["world_size"] == 2 and rec["sample"]["generated"]["cell"] == 3
    one, two = (list((tmp_path / r / "t2i").glob("*/t2i-*")) for r in ("one", "two"))
    assert len(one) == len(two) == 1 and one[0].name == two[0].name
    assert _files(one[0]) == _files(two[0]) and len(_files(one[0])) == 5


def _broadcast_worker(rank, world, init, out):
    import torch.distributed as dist

    from harness_t2i.sample import same_weights_on_every_rank

    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        torch.manual_seed(rank)  # as if each rank's training had ended a few bits apart
        module = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
        module[1].running_mean.fill_(float(rank))
        same_weights_on_every_rank(module)
        torch.save({k: v.clone() for k, v in module.state_dict().items()}, f"{out}/{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_every_rank_samples_rank_zeros_weights(tmp_path):
    """Two gloo ranks whose modules differ end up with rank 0's parameters and buffers."""
    import torch.multiprocessing as mp

    from harness_t2i.sample import same_weights_on_every_rank

    same_weights_on_every_rank(torch.nn.Linear(2, 2))  # no process group: nothing to do, no error
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_broadcast_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    zero, one = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1))
    torch.manual_seed(0)
    expected = torch.nn.Linear(3, 3).weight
    assert torch.equal(zero["0.weight"], expected) and torch.equal(one["0.weight"], expected)
    assert all(torch.equal(zero[k], one[k]) for k in zero) and one["1.running_mean"].abs().sum() == 0
