"""Captioned images for text-conditioned U-Nets. An item's label is its caption; a batch's
captions are encoded by the pipeline's own text encoder when the batch is assembled
(``encode_labels``), so a caption set of any size trains, and encodings are kept in a cache
bounded by HARNESS_CAPTION_MEMORY_GB. SD-1.x/2.x encoders give a context tensor; SDXL-style
ones a dict (context, pooled embedding, size ids) that the text U-Net unpacks.
``null_context`` (the empty prompt) is what label dropout feeds for classifier-free guidance,
as Stable Diffusion is trained."""
from __future__ import annotations

import os
from collections import OrderedDict

import torch

from harness import UserError

MEMORY_ENV = "HARNESS_CAPTION_MEMORY_GB"


class CaptionedDataset(torch.utils.data.Dataset):
    def __init__(self, source, captions: list[str], pipeline: str):
        from harness_t2i import context_bytes, encode_prompts

        if len(captions) != len(source):
            raise ValueError(f"{len(captions)} captions for {len(source)} images")
        self.source, self.captions, self.pipeline = source, list(captions), pipeline
        self.channels, self.resolution = source.channels, source.resolution
        null, pooled = encode_prompts(pipeline, [""])
        # SDXL-style encoders also give a pooled embedding; the U-Net then takes it with the six
        # size/crop ids (original size, top-left crop, target size, in pixels: 8x the latents)
        self.pooled = pooled is not None
        size = float(8 * self.resolution if getattr(source, "vae_name", None) else self.resolution)
        self.time_ids = torch.tensor([size, size, 0.0, 0.0, size, size])
        self.null_context, self.context_dim = self._conditioning(null, pooled, 0), int(null.shape[-1])
        limit = float(os.environ.get(MEMORY_ENV, 8)) * 2 ** 30
        self.cache_capacity = max(1, int(limit // context_bytes(pipeline, 1)))
        self._cache: OrderedDict = OrderedDict()  # caption -> its conditioning (tensor or SDXL dict)
        self.num_classes = 0
        self.name = f"{source.name}-captioned"

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, i):
        return self.source[i][0], self.captions[i]

    def _conditioning(self, embeds: torch.Tensor, pooled: torch.Tensor | None, i: int):
        if pooled is None:
            return embeds[i]
        return {"y": embeds[i], "text_embeds": pooled[i], "time_ids": self.time_ids}

    def encode_labels(self, captions: list[str]):
        """A batch's conditioning: (N, tokens, width) contexts, or for SDXL-style encoders a dict
        with the pooled embeddings and size ids too. Only captions not cached are encoded."""
        from harness_t2i import encode_prompts

        found = {c: self._cache[c] for c in dict.fromkeys(captions) if c in self._cache}
        missing = [c for c in dict.fromkeys(captions) if c not in found]
        if missing:
            embeds, pooled = encode_prompts(self.pipeline, missing)
            found.update((c, self._conditioning(embeds, pooled, i)) for i, c in enumerate(missing))
        for caption in found:  # most recently used last; the oldest go first when full
            self._cache[caption] = found[caption]
            self._cache.move_to_end(caption)
        while len(self._cache) > self.cache_capacity:
            self._cache.popitem(last=False)
        rows = [found[c] for c in captions]
        if self.pooled:
            return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
        return torch.stack(rows)

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
