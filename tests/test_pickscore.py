"""PickScore / CLIP score: a tiny CLIP and a tiny text-to-image pipeline built from configs,
saved to disk and loaded back through the same code path a hub model takes."""
from __future__ import annotations

import re
import string

import pytest
import torch

from harness.errors import UserError
from harness_t2i import scoring

PROMPTS = ["a red circle", "a blue square", "two green dots"]


def _tokenizer():
    from transformers import CLIPTokenizer

    chars = list(string.ascii_lowercase)
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>", "<unk>"] + chars + [c + "</w>" for c in chars])}
    return CLIPTokenizer(vocab=vocab, merges=[], unk_token="<unk>", bos_token="<|startoftext|>",
                         eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=77)


def _text_config(**kw):
    return {**dict(vocab_size=55, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                   max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1), **kw}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    torch.manual_seed(0)
    cfg = CLIPConfig(text_config=_text_config(),
                     vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=37,
                                        num_hidden_layers=2, num_attention_heads=4),
                     projection_dim=16, logit_scale_init_value=2.6592)
    folder = tmp_path_factory.mktemp("clip")
    CLIPModel(cfg).save_pretrained(folder)
    proc = CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32},
                                                            crop_size={"height": 32, "width": 32}),
                         tokenizer=_tokenizer())
    proc.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tiny_pipeline(tmp_path_factory):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                block_out_channels=(16, 32), norm_num_groups=8, cross_attention_dim=32,
                                attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))
    vae = AutoencoderKL(block_out_channels=(8, 16), norm_num_groups=8, latent_channels=4, sample_size=32,
                        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=CLIPTextModel(CLIPTextConfig(**_text_config())),
                                   tokenizer=_tokenizer(), unet=unet, scheduler=DDIMScheduler(clip_sample=False),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    folder = tmp_path_factory.mktemp("pipe")
    pipe.save_pretrained(folder)
    return str(folder)


def _images(n, seed=0):
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return [Image.fromarray((torch.rand(32, 32, 3, generator=g) * 255).byte().numpy()) for _ in range(n)]


def test_pickscore_is_clips_own_logit(tiny_clip):
    """Loaded from disk by path, the score equals CLIPModel's own logits_per_text diagonal."""
    clip, proc = scoring.load_clip(tiny_clip)
    images = _images(3)
    ours = scoring.pickscores(clip, proc, PROMPTS, images)
    inputs = proc(text=PROMPTS, images=images, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = clip(**inputs).logits_per_text.diagonal()
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5)
    cos = ours / clip.logit_scale.exp()
    torch.testing.assert_close(scoring.clip_scores(clip, proc, PROMPTS, images), 100 * cos.clamp(min=0),
                               rtol=1e-4, atol=1e-4)


def test_missing_model_is_unavailable_not_a_crash(tmp_path):
    from harness.errors import MetricUnavailable

    with pytest.raises(MetricUnavailable, match="cannot load"):
        scoring.load_clip(str(tmp_path / "nope"))


def test_prompts_file(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("# comment\n\na cat\n  a dog \n")
    assert scoring.read_prompts(f) == ["a cat", "a dog"]
    assert scoring.read_prompts(f, limit=1) == ["a cat"]


def test_metric_samples_through_the_pipeline_with_the_cells_unet(tiny_clip, tiny_pipeline, tmp_path):
    """The metric loads the saved pipeline, swaps in the cell's U-Net, samples and scores;
    with a teacher it also reports the relative drop."""
    import harness
    from harness_t2i.metrics import PickScore

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    pipe = scoring.load_pipeline(tiny_pipeline)
    student = torch.nn.Module()
    student.unet = pipe.unet

    class Ctx:
        device, dtype = torch.device("cpu"), torch.float32
        model, teacher = student, student

    metric = harness.create("metric", "pickscore", prompts=str(prompts), pipeline=tiny_pipeline, model=tiny_clip,
                            steps=2, guidance_scale=1.0, batch_size=2)
    assert isinstance(metric, PickScore)
    out = metric(Ctx())
    assert out["prompts"] == 3 and torch.isfinite(torch.tensor(out["value"]))
    # the teacher is the same U-Net with the same seeds: no drop
    assert out["teacher"] == pytest.approx(out["value"]) and out["drop_percent"] == pytest.approx(0, abs=1e-6)
    images = scoring.generate(pipe, PROMPTS[:2], steps=2, guidance_scale=1.0, seed=0, batch_size=1)
    assert len(images) == 2 and images[0].size == (32, 32)


# -- calibration on prompts (text U-Nets) -------------------------------------------------------
def _text_cell(preset, prompts, pipeline, backbone=None):
    from harness.context import CellContext
    from harness.suite import CellConfig

    config = CellConfig.model_validate({
        "backbone": backbone or {"name": "unet", "preset": preset},
        "prune": {"criterion": "laptop", "ratio": 0.3, "calibration_prompts": str(prompts),
                  "calibration_pipeline": pipeline},
        "metrics": ["params"], "device": "cpu"})
    return CellContext("t", "c", 0, config)


def _encoded(pipe, prompts):
    return pipe.encode_prompt(prompt=prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)


def test_text_unets_calibrate_on_the_pipelines_prompt_embeddings(tiny_pipeline, tmp_path):
    import harness
    from harness_compress.calibration import calibration_inputs
    from harness_compress.units import discover

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    ctx = _text_cell("sd-tiny", prompts, tiny_pipeline)
    batches = calibration_inputs(ctx, ctx.model, 4, 2)
    held = calibration_inputs(ctx, ctx.model, 4, 2, split="val", purpose="output-loss",
                              prompts=(str(prompts), tiny_pipeline))
    pipe = scoring.load_pipeline(tiny_pipeline)
    table = _encoded(pipe, PROMPTS)[0]
    for y in (batches[0]["inputs"]["y"], held[0]["inputs"]["y"]):
        assert y.shape == (4, 77, 32)
        assert all(any(torch.allclose(row, ref, atol=1e-6) for ref in table) for row in y)  # each row: a prompt
    assert torch.equal(batches[0]["inputs"]["y"], batches[1]["inputs"]["y"])  # same prompts at every timestep
    scores = harness.create("criterion", "laptop", batch_size=2, timesteps=2).score(
        ctx.model.eval(), [u for u in discover(ctx.model) if u.removable][:3], ctx)
    assert len(scores) == 3 and all(v >= 0 for v in scores.values())
    # the metric conditions its held-out set on its own prompt file
    from harness_compress.metrics import OutputLoss

    ctx.teacher = ctx.model
    out = OutputLoss(2, 1, prompts=str(prompts), pipeline=tiny_pipeline)(ctx)
    assert out["value"] == 0 and out["prompts"] == str(prompts)  # the teacher against itself
    with pytest.raises(UserError, match="prompts and pipeline go together"):
        OutputLoss(2, 1, prompts=str(prompts))


@pytest.fixture(scope="module")
def tiny_sdxl_pipeline(tmp_path_factory):
    """SDXL's text side at toy width: two encoders (16 + 16 = the sdxl-tiny context width 32)
    and a 32-wide pooled projection."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    pipe = StableDiffusionXLPipeline(
        vae=None, unet=None, scheduler=EulerDiscreteScheduler(),
        text_encoder=CLIPTextModel(CLIPTextConfig(**_text_config(hidden_size=16, num_attention_heads=2))),
        text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**_text_config(hidden_size=16, num_attention_heads=2,
                                                                                 projection_dim=32))),
        tokenizer=_tokenizer(), tokenizer_2=_tokenizer())
    folder = tmp_path_factory.mktemp("sdxl")
    pipe.save_pretrained(folder)
    return str(folder)


def test_sdxl_calibration_takes_both_encoders_and_the_pooled_embedding(tiny_sdxl_pipeline, tmp_path):
    from harness_compress.calibration import calibration_inputs

    pipe = scoring.text_pipeline(tiny_sdxl_pipeline)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    ctx = _text_cell("sdxl-tiny", prompts, tiny_sdxl_pipeline)
    inputs = calibration_inputs(ctx, ctx.model, 3, 1)[0]["inputs"]
    embeds, _, pooled, _ = _encoded(pipe, PROMPTS)
    assert inputs["y"].shape == (3, 77, 32) and inputs["text_embeds"].shape == (3, 32)
    for y, p in zip(inputs["y"], inputs["text_embeds"]):
        i = next(i for i in range(3) if torch.allclose(y, embeds[i], atol=1e-6))
        torch.testing.assert_close(p, pooled[i])
    with torch.no_grad():
        assert torch.isfinite(ctx.model.eval()(**inputs)).all()


def test_prompt_calibration_errors(tmp_path, tiny_pipeline, capsys):
    from harness.cli import main
    from harness_compress.calibration import calibration_inputs

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS))
    ctx = _text_cell(None, prompts, tiny_pipeline, backbone={"name": "dit", "size": "tiny", "input_size": 8})
    with pytest.raises(UserError, match="DiT is not conditioned on text"):
        calibration_inputs(ctx, ctx.model, 2, 1)
    ctx = _text_cell("sd-tiny", prompts, str(tmp_path / "no-such-pipeline"))
    with pytest.raises(UserError, match="no-such-pipeline'?: cannot load its text encoder"):
        calibration_inputs(ctx, ctx.model, 2, 1)
    ctx = _text_cell("sd15", prompts, tiny_pipeline)
    with pytest.raises(UserError, match="encodes y of width 32; the U-Net takes 768"):
        calibration_inputs(ctx, ctx.build_backbone("meta"), 1, 1)
    suite = tmp_path / "s.yaml"
    suite.write_text("suite: s\nbase:\n  backbone: {name: unet, preset: sd-tiny}\n"
                     "  prune: {criterion: laptop, ratio: 0.3, calibration_pipeline: x,\n"
                     "          calibration_prompts: nowhere.txt}\n  metrics: [params]\n")
    assert main(["validate", str(suite)]) == 2
    err = capsys.readouterr().err
    assert "s.yaml:5" in err and "prune.calibration_prompts" in err and "'nowhere.txt' not found" in err
    suite.write_text("suite: s\nbase:\n  backbone: {name: unet, preset: sd-tiny}\n"
                     "  prune: {criterion: laptop, ratio: 0.3, calibration_prompts: p.txt}\n  metrics: [params]\n")
    assert main(["validate", str(suite)]) == 2
    assert "calibration_prompts and calibration_pipeline go together" in capsys.readouterr().err


def test_validate_checks_metric_prompt_files(tmp_path, capsys):
    from harness.cli import main

    suite = tmp_path / "s.yaml"
    suite.write_text("suite: s\nbase:\n  backbone: {name: unet, preset: sd-tiny}\n  metrics:\n    - params\n"
                     "    - {name: pickscore, prompts: missing.txt, pipeline: x}\n")
    assert main(["validate", str(suite)]) == 2
    err = capsys.readouterr().err
    assert "s.yaml:6" in err and "metrics.1.prompts" in err and "'missing.txt' not found" in err


# -- captioned data: text U-Nets train, prune and distil ---------------------------------------
def test_captioned_shapes_serve_encoded_captions(tiny_pipeline):
    from harness_data.datasets import shape_caption, shapes

    ds = shapes(resolution=16, size=6, captions=True, text_encoder=tiny_pipeline)
    assert ds.num_classes == 0 and ds.context_dim == 32 and ds.resolution == 16 and len(ds) == 6
    pipe = scoring.load_pipeline(tiny_pipeline)
    x, caption = ds[0]
    assert x.shape == (3, 16, 16) and caption == ds.captions[0]
    contexts = ds.encode_labels(ds.captions[:3])  # what training stacks for a batch
    assert contexts.shape == (3, 77, 32)
    torch.testing.assert_close(contexts, _encoded(pipe, ds.captions[:3])[0])
    torch.testing.assert_close(ds.null_context, _encoded(pipe, [""])[0][0])
    assert ds.captions[0] == shape_caption(int(ds.source.labels[0])) and ds.uint8_images().shape[0] == 6
    with pytest.raises(UserError, match="captions and text_encoder go together"):
        shapes(resolution=16, size=2, captions=True)


def test_image_folder_captions_come_from_the_text_file_beside_each_image(tiny_pipeline, tmp_path):
    from PIL import Image

    from harness_data.datasets import image_folder

    for name, caption in (("a", "a red circle"), ("b", "two green dots"), ("c", "a blue square")):
        Image.new("RGB", (20, 20), (10, 200, 30)).save(tmp_path / f"{name}.png")
        (tmp_path / f"{name}.txt").write_text(caption + "\n")
    splits = {split: image_folder(root=str(tmp_path), resolution=16, val_fraction=0.34, split=split, captions=True,
                                  text_encoder=tiny_pipeline) for split in ("train", "val")}
    assert len(splits["train"]) == 2 and len(splits["val"]) == 1
    assert sorted(splits["train"].captions + splits["val"].captions) == ["a blue square", "a red circle",
                                                                         "two green dots"]
    (tmp_path / "b.txt").unlink()
    with pytest.raises(UserError, match=r"b.txt \(the caption of b.png\) is missing"):
        image_folder(root=str(tmp_path), resolution=16, val_fraction=0.34, captions=True, text_encoder=tiny_pipeline)


def _captioned_cell(preset, pipeline):
    """Teacher trained on captioned shapes, pruned by laptop, distilled, measured: the whole path."""
    data = {"name": "shapes", "resolution": 16, "size": 16, "captions": True, "text_encoder": pipeline}
    return {"backbone": {"name": "unet", "preset": preset}, "data": data,
            "train": {"steps": 3, "batch_size": 4, "label_dropout": 0.5},
            "prune": {"criterion": "laptop", "ratio": 0.3, "calibration_batch": 2, "calibration_timesteps": 2},
            "distill": {"losses": ["task", "output-kd", "normalized-feature-kd"], "steps": 2, "batch_size": 4},
            "metrics": ["params", {"name": "val_loss", "num_timesteps": 2, "max_samples": 4},
                        {"name": "output_loss", "batch_size": 4, "timesteps": 2}], "device": "cpu"}


def test_a_text_unet_trains_prunes_and_distils_on_captioned_data(tiny_pipeline, tmp_path):
    import harness
    from harness.runner import CellJob, execute_cell

    config = _captioned_cell("sd-tiny", tiny_pipeline)
    record = execute_cell(CellJob("t", "t.yaml", "c1", "base", 0, config, str(tmp_path / "t")))
    assert record["status"] == "ok", record.get("traceback")
    assert record["metrics"]["val_loss"]["value"] > 0 and record["metrics"]["output_loss"]["value"] >= 0
    assert record["prune"]["removed_params_ratio"] >= 0.3
    assert set(record["distill"]["shares"]["losses"]) == {"task", "output-kd", "normalized-feature-kd"}
    from harness_quality.metrics import FID

    class Ctx:
        dataset = type("Captioned", (), {"null_context": torch.zeros(77, 32)})()

    with pytest.raises(harness.MetricUnavailable, match="a text U-Net is sampled from a prompt set by the sample stage"):
        FID(weights=None)(Ctx())
    # backbones that take no text say so before any training
    for n, backbone in enumerate(({"name": "unet", "preset": "adm-tiny"}, {"name": "dit", "size": "tiny"})):
        bad = dict(config, backbone=backbone, prune=None, distill=None, metrics=["params"])
        record = execute_cell(CellJob("t", "t.yaml", f"bad{n}", "base", 0, bad, str(tmp_path / "t")))
        assert record["status"] == "failed", backbone
        assert re.search("context_dim must be 0|text context .* is not supported", record["error"]), record["error"]


def test_caption_encodings_are_cached_within_the_memory_bound(tiny_pipeline, monkeypatch):
    from harness_data.datasets import shapes
    from harness_t2i.scoring import context_bytes

    assert context_bytes(tiny_pipeline, 10) == 10 * 77 * 32 * 4
    full = shapes(resolution=16, size=12, captions=True, text_encoder=tiny_pipeline)
    reference = full.encode_labels(full.captions)
    monkeypatch.setenv("HARNESS_CAPTION_MEMORY_GB", str(2 * 77 * 32 * 4 / 2 ** 30))  # room for two contexts
    small = shapes(resolution=16, size=12, captions=True, text_encoder=tiny_pipeline)
    assert small.cache_capacity == 2 and len(set(small.captions)) > 2
    for start in range(0, 12, 4):  # batches: every caption encodes right though the cache keeps two
        torch.testing.assert_close(small.encode_labels(small.captions[start:start + 4]), reference[start:start + 4])
        assert len(small._cache) <= 2


def test_an_sdxl_unet_trains_and_distils_on_captioned_data(tiny_sdxl_pipeline, tmp_path):
    from harness.runner import CellJob, execute_cell
    from harness_data.datasets import shapes

    ds = shapes(resolution=16, size=4, captions=True, text_encoder=tiny_sdxl_pipeline)
    batch = ds.encode_labels(ds.captions[:2])
    assert set(batch) == {"y", "text_embeds", "time_ids"} and batch["y"].shape == (2, 77, 32)
    assert batch["text_embeds"].shape == (2, 32) and batch["time_ids"].tolist()[0] == [16, 16, 0, 0, 16, 16]
    assert set(ds.null_context) == {"y", "text_embeds", "time_ids"}
    config = _captioned_cell("sdxl-tiny", tiny_sdxl_pipeline)
    record = execute_cell(CellJob("t", "t.yaml", "xl", "base", 0, config, str(tmp_path / "t")))
    assert record["status"] == "ok", record.get("traceback")
    assert record["metrics"]["val_loss"]["value"] > 0 and record["prune"]["removed_params_ratio"] >= 0.3
