"""Captioned images for text-conditioned U-Nets: each distinct caption is encoded once by a
pipeline's own text encoder, and an item's label is its context tensor (S, D) instead of a
class index. ``null_context`` (the empty prompt) is what label dropout feeds for
classifier-free guidance, as Stable Diffusion is trained."""
from __future__ import annotations

import os

import torch

from harness.errors import UserError


MEMORY_ENV = "HARNESS_CAPTION_MEMORY_GB"


class CaptionedDataset(torch.utils.data.Dataset):
    def __init__(self, source, captions: list[str], pipeline: str):
        from harness_t2i.scoring import context_bytes, encode_prompts

        if len(captions) != len(source):
            raise ValueError(f"{len(captions)} captions for {len(source)} images")
        self.source, self.captions, self.pipeline = source, list(captions), pipeline
        distinct = list(dict.fromkeys(self.captions))
        # Every distinct caption's context is held in memory (SD-1.5: 77 x 768 floats, 236 KB
        # each); refuse a set that would not fit before spending the time to encode it.
        need, limit = context_bytes(pipeline, len(distinct) + 1), float(os.environ.get(MEMORY_ENV, 8)) * 2 ** 30
        if need > limit:
            raise UserError(f"data: {len(distinct)} distinct captions would take {need / 2 ** 30:.1f} GiB as encoded "
                            f"contexts (limit {limit / 2 ** 30:.0f} GiB, ${MEMORY_ENV}); encoding per batch is not "
                            "implemented: use fewer captions")
        table, pooled = encode_prompts(pipeline, [""] + distinct)
        if pooled is not None:
            raise UserError(f"data.text_encoder {pipeline!r} is an SDXL-style pipeline (pooled embedding, size "
                            "ids): training with it is not supported yet; use an SD-1.x/2.x pipeline")
        self.null_context, self.table = table[0], table[1:]
        where = {c: i for i, c in enumerate(distinct)}
        self.index = torch.tensor([where[c] for c in self.captions])
        self.num_classes, self.context_dim = 0, int(table.shape[-1])
        self.channels, self.resolution = source.channels, source.resolution
        self.name = f"{source.name}-captioned"

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i):
        return self.source[i][0], self.table[self.index[i]]

    def __getattr__(self, name):  # uint8_images, content_hash, decode (latents): the source's
        if name == "source":
            raise AttributeError(name)
        return getattr(self.source, name)


def maybe_captioned(ds, captions: list[str] | None, text_encoder: str | None, name: str):
    """Wrap ``ds`` when the data block asks for captions; both options or neither."""
    if captions is None and text_encoder is None:
        return ds
    if captions is None or not text_encoder:
        raise UserError(f"{name}: captions and text_encoder go together (captions: true, and the hub id or "
                        "folder of a pipeline whose text encoder encodes them)")
    return CaptionedDataset(ds, captions, text_encoder)
