"""CLIP-family scoring and text-to-image sampling, from a hub id or a local folder alike.

PickScore (Kirstain et al.) is a CLIP-H fine-tuned on human preferences; its score is
``logit_scale.exp() * cosine(text, image)`` (yuvalkirstain/PickScore_v1 usage). CLIP score is
``100 * max(cosine, 0)`` (torchmetrics' definition). Both come from the same two embeddings,
so one function serves both.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch

from harness import MetricUnavailable, UserError

PICKSCORE_MODEL = "yuvalkirstain/PickScore_v1"
PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"
CLIP_MODEL = "openai/clip-vit-large-patch14"


def read_prompts(path: str | Path, limit: int | None = None) -> list[str]:
    """One prompt per line; blank lines and lines starting with '#' are skipped. A ``.json``
    file is an MS-COCO captions file (every caption, :func:`harness_t2i.read_prompt_set`)."""
    if str(path).endswith(".json"):
        from .prompts import read_prompt_set

        prompts = read_prompt_set(path)
        return prompts[:limit] if limit else prompts
    path = Path(path)
    if not path.is_file():
        raise UserError(f"prompts file {str(path)!r} not found")
    prompts = [line.strip() for line in path.read_text().splitlines()]
    prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise UserError(f"prompts file {str(path)!r} holds no prompt")
    return prompts[:limit] if limit else prompts


def load_pretrained(what: str, loader, source: str):
    """``loader(source)`` (a ``from_pretrained``), or MetricUnavailable naming ``what``, ``source`` and
    the loader's first line when the files cannot be had (offline without them, a wrong id): how
    every hub-model metric reports a model it cannot load."""
    try:
        return loader(source)
    except (OSError, ValueError) as exc:  # offline without the files, or a wrong id
        raise MetricUnavailable(f"cannot load {what} {source!r}: {str(exc).splitlines()[0]}") from None


def load_clip(model: str, processor: str | None = None, device="cpu"):
    """``(CLIPModel, processor)`` from hub ids or local folders (the processor defaults to the model's)."""
    from transformers import AutoProcessor, CLIPModel

    clip = load_pretrained("CLIP model", CLIPModel.from_pretrained, model).eval().to(device)
    proc = load_pretrained("processor", AutoProcessor.from_pretrained, processor or model)
    return clip, proc


def _features(out) -> torch.Tensor:
    """transformers 5 returns output objects from get_*_features; older versions tensors."""
    if isinstance(out, torch.Tensor):
        return out
    return out.pooler_output if getattr(out, "pooler_output", None) is not None else out[0]


@torch.no_grad()
def cosines(clip, processor, prompts: list[str], images: list, batch_size: int = 16) -> torch.Tensor:
    """Cosine between each prompt and its image (pairwise, not all against all)."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images")
    device = next(clip.parameters()).device
    out = []
    for i in range(0, len(prompts), batch_size):
        inputs = processor(text=prompts[i:i + batch_size], images=images[i:i + batch_size], padding=True,
                           truncation=True, return_tensors="pt")
        text = _features(clip.get_text_features(input_ids=inputs["input_ids"].to(device),
                                                attention_mask=inputs["attention_mask"].to(device)))
        image = _features(clip.get_image_features(pixel_values=inputs["pixel_values"].to(device)))
        out.append(torch.nn.functional.cosine_similarity(text.float(), image.float(), dim=-1).cpu())
    return torch.cat(out)


def pickscores(clip, processor, prompts, images, batch_size: int = 16) -> torch.Tensor:
    return clip.logit_scale.exp().float().cpu() * cosines(clip, processor, prompts, images, batch_size)


def clip_scores(clip, processor, prompts, images, batch_size: int = 16) -> torch.Tensor:
    return 100 * cosines(clip, processor, prompts, images, batch_size).clamp(min=0)


# -- text encoding ------------------------------------------------------------------------------
@lru_cache(maxsize=2)
def text_pipeline(source: str):
    """A pipeline's tokenizer(s) and text encoder(s) only: its U-Net and VAE are not loaded."""
    from diffusers import DiffusionPipeline

    try:
        pipe = DiffusionPipeline.from_pretrained(source, unet=None, vae=None)
    except (OSError, ValueError) as exc:  # offline without the files, or a wrong id
        raise UserError(f"text pipeline {source!r}: cannot load its text encoder: {str(exc).splitlines()[0]}") from None
    return pipe.to(_encode_device())


def _encode_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"  # encoding is inference: the fastest device here


@torch.no_grad()
def encode_prompts(source: str, prompts: list[str], batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The pipeline's own ``encode_prompt`` without guidance: the context (N, S, D), and the
    pooled embedding (N, P) of SDXL-style pipelines (None for SD-1.x/2.x)."""
    pipe, device = text_pipeline(source), _encode_device()
    embeds, pooled = [], []
    for i in range(0, len(prompts), batch_size):
        out = pipe.encode_prompt(prompt=prompts[i:i + batch_size], device=device, num_images_per_prompt=1,
                                 do_classifier_free_guidance=False)
        embeds.append(out[0].float().cpu())
        if len(out) > 2 and out[2] is not None:  # SDXL: (embeds, negative, pooled, negative pooled)
            pooled.append(out[2].float().cpu())
    return torch.cat(embeds), (torch.cat(pooled) if pooled else None)


def context_bytes(source: str, count: int) -> int:
    """Memory that ``count`` encoded prompts take as float32 contexts (tokens x width each)."""
    pipe = text_pipeline(source)
    tokens = int(getattr(pipe.tokenizer, "model_max_length", 77))
    width = sum(int(enc.config.hidden_size) for enc in (getattr(pipe, "text_encoder", None),
                                                          getattr(pipe, "text_encoder_2", None)) if enc is not None)
    return count * tokens * width * 4


# -- sampling -----------------------------------------------------------------------------------
def load_pipeline(source: str, device="cpu", dtype=torch.float32):
    from diffusers import DiffusionPipeline

    pipe = load_pretrained("pipeline", lambda s: DiffusionPipeline.from_pretrained(s, dtype=dtype), source)
    if getattr(pipe, "safety_checker", None) is not None:  # it blanks images; scores must see them
        pipe.safety_checker = None
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def find_unet(model: torch.nn.Module):
    """The diffusers conditional U-Net inside a cell's backbone (the unet backbone keeps it at ``.unet``)."""
    for module in model.modules():
        if type(module).__name__ == "UNet2DConditionModel":
            return module
    return None


@torch.no_grad()
def generate(pipe, prompts: list[str], steps: int = 25, guidance_scale: float = 7.5, seed: int = 0,
             batch_size: int = 4, resolution: int | None = None) -> list:
    """PIL images, one per prompt; prompt i's noise is seeded by (seed, i), so a subset or a
    different batch size draws the same image for it."""
    images = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        gens = [torch.Generator().manual_seed(seed + i + j) for j in range(len(chunk))]
        kwargs = {"height": resolution, "width": resolution} if resolution else {}
        out = pipe(prompt=chunk, num_inference_steps=steps, guidance_scale=guidance_scale, generator=gens,
                   output_type="pil", **kwargs)
        images.extend(out.images)
    return images
