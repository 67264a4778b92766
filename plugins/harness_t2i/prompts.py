"""Prompt sets: a text file (one prompt per line) or an MS-COCO captions JSON.

The COCO captions files (``captions_val2014.json``...) hold ``annotations``, a list of
``{"image_id", "id", "caption"}``; BK-SDM samples 30,000 val2014 captions, one per image
(Nota-NetsPresso/BK-SDM, its evaluation scripts). ``one_per_image`` keeps the first caption
of each image in file order (which caption BK-SDM kept is not stated; this is our rule), and
``subset: N`` a seeded random choice of N prompts, kept in file order. A prompt's index in
the resulting list is its identity: image ``i`` is seeded by ``i``.

Every error is one line naming the file and what was expected, raised when the suite is
validated (the stage's schema reads the set), so a bad set never reaches sampling.
"""
from __future__ import annotations

import json
import os
import random
from functools import lru_cache
from pathlib import Path
from typing import Optional

from pydantic import BaseModel, ConfigDict, Field, model_validator

from harness import UserError, check_regular, read_regular


class PromptSet(BaseModel):
    """``prompts: PATH`` or ``prompts: {path, one_per_image, subset, seed}``."""

    model_config = ConfigDict(extra="forbid")
    path: str
    one_per_image: bool = False  # COCO JSON: the first caption of each image_id
    subset: Optional[int] = Field(None, gt=0)  # a seeded random choice of N prompts, in file order
    seed: int = Field(0, ge=0)  # the subset's draw

    @model_validator(mode="before")
    @classmethod
    def _from_path(cls, v):
        return {"path": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _readable(self):
        try:
            self.read()  # now, at validation: an empty or malformed set is refused before any work
        except UserError as exc:
            raise ValueError(str(exc)) from None
        return self

    def read(self) -> list[str]:
        st = _stat(self.path)
        return list(_read(self.path, st.st_mtime_ns, st.st_size, self.one_per_image, self.subset, self.seed))

    def describe(self) -> dict:
        return self.model_dump()


def _stat(path: str) -> os.stat_result:
    if not os.path.lexists(path):
        raise UserError(f"prompt set {path!r} not found (paths are relative to the directory harness runs in)")
    return check_regular(path, "prompt set")


def _text(path: str) -> str:
    """The file's text; a FIFO or device is refused unopened, bytes that are not UTF-8 named."""
    raw = read_regular(path, "prompt set")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        raise UserError(f"prompt set {path!r}, line {line}: not UTF-8 text (byte {raw[exc.start]:#04x}); "
                        f"expected UTF-8 text") from None


def read_prompt_set(path: str | Path, one_per_image: bool = False, subset: Optional[int] = None,
                    seed: int = 0) -> list[str]:
    """The prompts of a text file or a COCO captions JSON (see the module's docstring)."""
    st = _stat(str(path))
    return list(_read(str(path), st.st_mtime_ns, st.st_size, one_per_image, subset, seed))


@lru_cache(maxsize=8)  # a suite validates every cell, each reads the same 20 MB JSON: once per content
def _read(path: str, mtime_ns: int, size: int, one_per_image: bool, subset: Optional[int],
          seed: int) -> tuple[str, ...]:
    if path.endswith(".json"):
        prompts = _coco(path, one_per_image)
    else:
        if one_per_image:
            raise UserError(f"prompt set {path!r}: one_per_image needs a COCO captions JSON (.json)")
        prompts = [line.strip() for line in _text(path).splitlines()]
        prompts = [p for p in prompts if p and not p.startswith("#")]
    if not prompts:
        raise UserError(f"prompt set {path!r} holds no prompt")
    if subset is not None:
        if subset > len(prompts):
            raise UserError(f"prompt set {path!r}: subset {subset} is larger than its {len(prompts)} prompts")
        keep = sorted(random.Random(seed).sample(range(len(prompts)), subset))
        prompts = [prompts[i] for i in keep]
    return tuple(prompts)


def _coco(path: str, one_per_image: bool) -> list[str]:
    try:
        doc = json.loads(_text(path))
    except ValueError as exc:
        raise UserError(f"prompt set {path!r}: not valid JSON ({exc})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("annotations"), list):
        raise UserError(f"prompt set {path!r}: expected an MS-COCO captions JSON with an 'annotations' list")
    prompts, seen = [], set()
    for k, ann in enumerate(doc["annotations"]):
        caption = ann.get("caption") if isinstance(ann, dict) else None
        if not isinstance(caption, str):
            raise UserError(f"prompt set {path!r}: annotations[{k}] has no 'caption' string")
        if one_per_image:
            if "image_id" not in ann:
                raise UserError(f"prompt set {path!r}: annotations[{k}] has no 'image_id' (one_per_image)")
            if ann["image_id"] in seen:
                continue
            seen.add(ann["image_id"])
        caption = " ".join(caption.split())  # COCO captions carry stray newlines and double spaces
        if caption:
            prompts.append(caption)
    return prompts
