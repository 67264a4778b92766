"""Sampling from a trained backbone: DDPM / DDIM (diffusers), classifier-free guidance,
PNG folders and the ADM evaluation ``.npz``, sharded over torch.distributed ranks.

Sample identity does not depend on how the work is split. Sample ``i`` gets its initial
noise, its class label and its per-step DDPM noise from a generator seeded by
``(seed, i)``; samples are grouped into fixed batches ``[b * B, (b + 1) * B)`` and batch
``b`` goes to rank ``b % world_size``, so every batch is computed with the same inputs and
the same shapes on 1 or N processes. A restarted sampling skips batches whose PNGs exist.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from .context import derive_seed
from .training import make_scheduler, model_learns_sigma

SAMPLERS = ("ddpm", "ddim")


def make_sampler(name: str, schedule: str = "linear", timesteps: int = 1000, learn_sigma: bool = False):
    """A diffusers scheduler for sampling with the training schedule's betas."""
    from diffusers import DDIMScheduler

    from .errors import UserError, suggest

    if name not in SAMPLERS:
        raise UserError(f"sampler {name!r} is not known{suggest(name, SAMPLERS)}")
    ddpm = make_scheduler(schedule, timesteps, learn_sigma)
    if name == "ddpm":
        return ddpm
    return DDIMScheduler.from_config(ddpm.config, set_alpha_to_one=False)


def guided_eps(model, x, t, y, cfg_scale: float, guided_channels: Optional[int] = 3, null=None) -> torch.Tensor:
    """Model output with classifier-free guidance on the noise channels.

    ``guided_channels``: DiT guides only the first 3 of the 4 latent channels (its reference
    sampler's choice); None guides them all. The learned-variance half comes from the
    conditional pass. ``null``: the unconditional input (None: the model's null class; a
    text U-Net's is the empty prompt's context)."""
    out = model(x, t, y)
    if cfg_scale == 1.0 or y is None:
        return out
    uncond = model(x, t, null)
    c = x.shape[1]
    n = c if guided_channels is None else min(guided_channels, c)
    guided = uncond[:, :n] + cfg_scale * (out[:, :n] - uncond[:, :n])
    return torch.cat([guided, out[:, n:]], dim=1)


@torch.no_grad()
def sample_batch(model, indices: list[int], *, shape: tuple[int, int, int], num_classes: int = 0, seed: int = 0,
                 sampler: str = "ddim", steps: int = 50, cfg_scale: float = 1.0, guided_channels: Optional[int] = 3,
                 schedule: str = "linear", timesteps: int = 1000, labels: Optional[list[int]] = None,
                 learn_sigma: Optional[bool] = None, cond=None, null_cond=None,
                 device: str | torch.device = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """Samples (B, C, H, W) and their labels for global ``indices``; deterministic per index.

    ``learn_sigma``: whether DDPM uses the model's variance channels. Give False for a
    model whose variance half was never trained (train.learn_sigma off); None trusts the
    model's own ``learn_sigma`` attribute. ``cond`` replaces the class labels with a
    conditioning of the model's own (a text context (B, S, D), or a dict for SDXL-style
    U-Nets), and ``null_cond`` is its unconditional twin for guidance; the labels returned
    are then zeros."""
    device = torch.device(device)
    learn_sigma = model_learns_sigma(model) if learn_sigma is None else learn_sigma and model_learns_sigma(model)
    sched = make_sampler(sampler, schedule, timesteps, learn_sigma)
    sched.set_timesteps(steps)
    gens = [torch.Generator().manual_seed(derive_seed(seed, "sample", i)) for i in indices]
    x = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(device)
    y = cond
    if cond is None and num_classes:
        y = torch.tensor(labels if labels is not None else
                         [int(torch.randint(0, num_classes, (), generator=g)) for g in gens], device=device)
    c = shape[0]
    for t in sched.timesteps:
        tt = torch.full((len(x),), int(t), device=device, dtype=torch.long)
        out = guided_eps(model, x, tt, y, cfg_scale, guided_channels, null=null_cond)
        if sampler == "ddim":
            out = out[:, :c]  # DDIM's variance is fixed by eta; drop a learned one
        elif out.shape[1] == 2 * c and not learn_sigma:
            out = out[:, :c]
        kwargs = {"generator": gens} if sampler == "ddpm" else {}
        x = sched.step(out, t, x, **kwargs).prev_sample
    labelled = cond is None and y is not None
    return x, (y if labelled else torch.zeros(len(x), dtype=torch.long))


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """(B, C, H, W) in [-1, 1] -> (B, H, W, 3) uint8, the ADM/DiT rounding."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    if x.shape[1] == 1:
        x = x.expand(-1, 3, -1, -1)
    return x[:, :3].permute(0, 2, 3, 1).cpu().numpy()


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the running torch.distributed group; (0, 1) outside one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def sample_to_folder(model, folder: str | Path, num_samples: int, *, batch_size: int = 16,
                     decode: Optional[Callable[[torch.Tensor], torch.Tensor]] = None, **sample_kwargs) -> Path:
    """Write samples ``000000.png ...`` to ``folder``, sharded across torch.distributed ranks.

    Batches whose PNGs all exist are skipped, so a killed sampling resumes. ``decode`` maps
    latents to images in [-1, 1] (a VAE) before saving. Returns the folder; every rank
    returns after all ranks have finished (a barrier), when a process group is running."""
    from PIL import Image

    rank, world = rank_world()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    device = sample_kwargs.get("device", "cpu")
    was_training = model.training
    model.eval()
    try:
        for b in range(rank, (num_samples + batch_size - 1) // batch_size, world):
            idx = list(range(b * batch_size, min((b + 1) * batch_size, num_samples)))
            paths = [folder / f"{i:06d}.png" for i in idx]
            if all(image_intact(p) for p in paths):
                continue
            x, _ = sample_batch(model, idx, **sample_kwargs)
            if decode is not None:
                x = decode(x.to(device))
            for p, arr in zip(paths, to_uint8(x)):
                save_png(Image.fromarray(arr), p)
    finally:
        model.train(was_training)
    if world > 1:
        import torch.distributed as dist

        dist.barrier()
    return folder


def image_intact(path: Path) -> bool:
    """Whether ``path`` is a whole image: a resumed sampling keeps it, else draws it again.

    Our own writes are atomic, but a shared folder can still hold a torn copy or a changed
    file; PIL's ``verify`` reads every chunk and checks its CRC, so one is never used silently."""
    from PIL import Image

    if not path.is_file():
        return False
    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:  # PIL raises many kinds for a torn file (SyntaxError, OSError, struct.error...)
        import sys

        print(f"harness: warning: {path}: not a whole image; drawing it again", file=sys.stderr, flush=True)
        return False


def save_png(image, path: Path) -> None:
    """``image`` (PIL) as ``path``, atomically: a kill never leaves half a PNG behind, a full
    disk is one line naming the folder (:func:`harness.files.atomic_path`)."""
    from .files import atomic_path

    with atomic_path(path, what=f"the image {path.name}", needed=len(image.tobytes())) as tmp:
        image.save(tmp, format="PNG")


def export_npz(folder: str | Path, path: str | Path, num_samples: Optional[int] = None) -> Path:
    """The ADM evaluation suite's input: ``arr_0`` of shape (N, H, W, 3) uint8."""
    from PIL import Image

    files = sorted(p for p in Path(folder).glob("[0-9]*.png") if ".tmp" not in p.name)[:num_samples]
    arr = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in files])
    np.savez(path, arr_0=arr)
    return Path(path)


# -- torchrun entry point ------------------------------------------------------------------------
def load_trained(record_path: str | Path, device: str | torch.device = "cpu"):
    """The EMA model and data set of a trained cell, from its record and its checkpoint."""
    import json

    from safetensors.torch import load_file

    from .context import CellContext
    from .errors import UserError
    from .suite import CellConfig

    record_path = Path(record_path)
    if not record_path.is_file():
        raise UserError(f"{record_path}: no such cell record (results/<suite>/<cell>.json)")
    rec = json.loads(record_path.read_text())
    workdir = record_path.with_suffix("")
    ckpt = workdir / "train-checkpoint.safetensors"
    if not ckpt.is_file():
        raise UserError(f"{ckpt}: the cell has no training checkpoint (was train.steps > 0?)")
    ctx = CellContext(rec["suite"], rec["cell"], rec["seed"], CellConfig.model_validate(rec["config"]),
                      workdir=workdir)
    model = ctx.build_backbone(device="cpu")
    model.load_state_dict({k[4:]: v for k, v in load_file(str(ckpt)).items() if k.startswith("ema.")})
    return ctx, model.to(device).eval()


def main(argv: list[str] | None = None) -> int:
    """``torchrun --nproc-per-node N -m harness.sampling results/SUITE/CELL.json --out DIR``"""
    import argparse

    import torch.distributed as dist

    p = argparse.ArgumentParser(prog="python -m harness.sampling", description=main.__doc__)
    p.add_argument("record", help="a trained cell's record, results/<suite>/<cell>.json")
    p.add_argument("--out", required=True, help="folder for 000000.png ...")
    p.add_argument("--num-samples", type=int, default=50_000)
    p.add_argument("--sampler", choices=SAMPLERS, default="ddpm")
    p.add_argument("--steps", type=int, default=250)
    p.add_argument("--cfg-scale", type=float, default=1.0)
    p.add_argument("--guided-channels", type=int, default=3, help="-1: guide every channel")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--npz", help="also write the ADM evaluation .npz here (rank 0)")
    args = p.parse_args(argv)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local}" if torch.cuda.is_available() else "cpu")
    ctx, model = load_trained(args.record, device)
    ds, spec = ctx.dataset, ctx.train
    sample_to_folder(model, args.out, args.num_samples, batch_size=args.batch_size,
                     decode=getattr(ds, "decode", None), shape=(ds.channels, ds.resolution, ds.resolution),
                     num_classes=ds.num_classes, seed=args.seed, sampler=args.sampler, steps=args.steps,
                     cfg_scale=args.cfg_scale,
                     guided_channels=None if args.guided_channels < 0 else args.guided_channels,
                     schedule=spec.schedule, timesteps=spec.timesteps, learn_sigma=spec.learn_sigma, device=device)
    if args.npz and rank_world()[0] == 0:
        export_npz(args.out, args.npz, args.num_samples)
    if world > 1:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
