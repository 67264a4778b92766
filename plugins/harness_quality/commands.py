"""``harness fid SAMPLES REFERENCE --metrics ...``: quality figures of two image sets.

Plain FID of two folders stays torch-fidelity's own figure; any other metric, or an ``.npz``
input, goes through the ADM evaluator's protocol (:mod:`harness_quality.evaluate`), as does
fd_dinov2 (EDM2's Fréchet distance of DINOv2 ViT-L/14 features)."""
from __future__ import annotations

import argparse
import json
from contextlib import contextmanager
from pathlib import Path

from harness import Command, MetricUnavailable, UserError


def _arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("dir1", metavar="SAMPLES", help="image folder or ADM .npz (arr_0: N x H x W x 3 uint8)")
    p.add_argument("dir2", metavar="REFERENCE", help="image folder or .npz; its mu/sigma (mu_s/sigma_s) are "
                                                     "used for fid (sfid) when present")
    p.add_argument("--metrics", default="fid", help="comma-separated: fid, sfid, isc, precision, recall, kid, "
                                                    "density, coverage, fd_dinov2 (DINOv2 ViT-L/14 via torch.hub; "
                                                    "default: fid)")
    p.add_argument("--weights", help="local Inception weights (default: $HARNESS_FID_WEIGHTS, else download); "
                                     "not for fd_dinov2")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--nearest-k", type=int, default=5, metavar="K",
                   help="k of density and coverage (Naeem et al. 2020; default 5)")
    p.add_argument("--cpu", action="store_true", help="do not use CUDA even when present")
    p.add_argument("--json", action="store_true")


def _run(args) -> int:
    from .evaluate import evaluate, parse_metrics
    from .fidelity import WeightsUnavailable, fid_of_folders  # torch: not for `harness fid --help`

    metrics = parse_metrics(args.metrics)
    folders = Path(args.dir1).is_dir() and Path(args.dir2).is_dir()
    try:
        if metrics == ["fid"] and folders:
            result = fid_of_folders(args.dir1, args.dir2, weights=args.weights, batch_size=args.batch_size,
                                    cuda=False if args.cpu else None)
        else:
            with _feature_progress() as progress:
                result = evaluate(args.dir1, args.dir2, metrics, weights=args.weights, batch_size=args.batch_size,
                                  cuda=False if args.cpu else None, progress=progress, nearest_k=args.nearest_k)
    except WeightsUnavailable as exc:  # on the command line, missing weights is the user's to fix
        raise UserError(f"fid: {exc} (or pass --weights PATH)") from None
    except MetricUnavailable as exc:  # DINOv2: torch.hub's cache or a network, no file of the user's
        raise UserError(f"fid: {exc}") from None
    if args.json:
        print(json.dumps(result))
    elif "samples" not in result:  # torch-fidelity's FID of two folders
        print(f"FID {result['fid']:.6g}  ({result['extractor']})")
    else:
        for m in metrics:
            print(f"{m:<10} {result[m]:.6g}")
        used = ", ".join(result[k] for k in ("extractor", "dinov2_extractor") if k in result)
        print(f"({result.get('samples', '?')} samples, {result.get('reference_images', '?')} reference images; "
              f"{used})")
    return 0


@contextmanager
def _feature_progress():
    """A progress bar on stderr for feature extraction: which network and input, how far, how long."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    tasks: dict[str, int] = {}
    console = Console(stderr=True, highlight=False, markup=False)  # paths are printed verbatim
    with Progress(TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        def update(what: str, done: int, total: int) -> None:
            if what not in tasks:
                tasks[what] = bar.add_task(what, total=total)
            bar.update(tasks[what], completed=done)

        yield update


COMMANDS = {
    "fid": Command(help="FID, sFID, IS, precision, recall (the ADM evaluator's protocol), density, coverage, "
                        "FD_DINOv2 of image folders or .npz batches", arguments=_arguments, run=_run),
}
