"""PickScore / CLIP score: a tiny CLIP and a tiny text-to-image pipeline built from configs,
saved to disk and loaded back through the same code path a hub model takes."""
from __future__ import annotations

import string

import pytest
import torch

from harness_t2i import scoring

PROMPTS = ["a red circle", "a blue square", "two green dots"]


def _tokenizer():
    from transformers import CLIPTokenizer

    chars = list(string.ascii_lowercase)
    vocab = {t: i for i, t in enumerate(["<|startoftext|>", "<|endoftext|>", "<unk>"] + chars + [c + "</w>" for c in chars])}
    return CLIPTokenizer(vocab=vocab, merges=[], unk_token="<unk>", bos_token="<|startoftext|>",
                         eos_token="<|endoftext|>", pad_token="<|endoftext|>", model_max_length=77)


def _text_config(**kw):
    return dict(vocab_size=55, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=0, eos_token_id=1, pad_token_id=1, **kw)


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
