"""TinyFusion's learnable depth pruning (Fang, Li, Ma & Wang, "TinyFusion: Diffusion
Transformers Learned Shallow", arXiv 2412.01199; code github.com/VainF/TinyFusion).

TinyFusion does not score layers one by one. It splits the stack of blocks into groups of
``M`` consecutive blocks and, for each group, learns a categorical distribution over the
``C(M, N)`` masks that keep ``N`` of them. Training samples one mask per group and per image
with the straight-through Gumbel-softmax, runs the model with the masked blocks bypassed
(``x <- m * block(x) + (1 - m) * x``), and minimises the denoising loss jointly over the mask
logits and LoRA adapters on every linear layer: the adapters let the loss measure how well a
candidate *recovers* after fine-tuning, not how good it is before (the paper's
"recoverability"). The final model keeps, in each group, the mask of highest (EMA) logit.

What is read from the official code (``prune_by_learning.py``, ``models_with_layer_pruning.py``):
logits start at 0.02 for every mask, are multiplied by ``scaling = 100`` before the Gumbel
softmax, the temperature falls linearly from 4 to 0.1 over the run, one mask is drawn per
image (``hard=True``); LoRA of rank 8 and alpha 16 (torchtune's ``LoRALinear``: A Kaiming-uniform,
B zero) on every ``nn.Linear``; AdamW without weight decay at lr 1e-4 for the adapters and 10x
for the logits, gradients clipped at 1.0; the decision is read from an EMA (0.999) of the
logits. Their DiT-XL/2 -> D14 command uses 1:2 groups (``DiT-XL-1-2``), one epoch of ImageNet
at batch 128. Differences here: the loss is the noise MSE (no learned-variance VLB term), the
adapters are forward hooks rather than replaced modules (so the model is never modified),
and the EMA warms up as :func:`harness.train_model`'s does so that short runs are not stuck at
the initial logits. The adapters are discarded after the search.
"""
from __future__ import annotations

import itertools
import logging
import math
from typing import Optional

import torch
from torch import nn

import harness
from harness import UserError, alphas_cumprod, evaluating, noise_channels, stack_labels

log = logging.getLogger(__name__)


# -- groups and their candidate masks -----------------------------------------------------------
def stack_groups(names: list[str], size: int) -> list[list[str]]:
    """Consecutive units of one container (``blocks``; a LaMamba-Diff stage's ``encoder.1.blocks``)
    in groups of ``size``; a container whose length ``size`` does not divide ends on a shorter group."""
    runs: list[list[str]] = []
    for name in names:
        parent = name.rpartition(".")[0]
        if runs and runs[-1][0].rpartition(".")[0] == parent:
            runs[-1].append(name)
        else:
            runs.append([name])
    return [run[i:i + size] for run in runs for i in range(0, len(run), size)]


def spread_keep(sizes: list[int], keep: int) -> list[int]:
    """How many units each group keeps so that ``keep`` are kept in all, as evenly as the group
    sizes allow (largest remainders; earlier groups first on ties): N of every M when it divides."""
    total = sum(sizes)
    if not 0 < keep <= total:
        raise UserError(f"criterion 'tinyfusion': cannot keep {keep} of {total} blocks")
    exact = [keep * s / total for s in sizes]
    out = [math.floor(e) for e in exact]
    order = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - out[i]), i))
    for i in order[:keep - sum(out)]:
        out[i] += 1
    return out


def candidate_masks(size: int, keep: int) -> torch.Tensor:
    """Every 0/1 mask of ``size`` with ``keep`` ones, one per row (TinyFusion's ``options``)."""
    combos = list(itertools.combinations(range(size), keep))
    masks = torch.zeros(len(combos), size)
    for row, idx in enumerate(combos):
        masks[row, list(idx)] = 1.0
    return masks


def gumbel_softmax(logits: torch.Tensor, tau: float, generator: torch.Generator) -> torch.Tensor:
    """Straight-through Gumbel-softmax (``torch.nn.functional.gumbel_softmax(hard=True)``), its
    Gumbel noise drawn from ``generator`` so that a search is reproducible from the cell's seed."""
    gumbels = -torch.empty(logits.shape).exponential_(generator=generator).log().to(logits.device)
    soft = ((logits + gumbels) / tau).softmax(-1)
    hard = torch.zeros_like(soft).scatter_(-1, soft.argmax(-1, keepdim=True), 1.0)
    return hard - soft.detach() + soft


# -- LoRA as hooks ------------------------------------------------------------------------------
class LoRA(nn.Module):
    """The low-rank update ``scale * B A x`` of one linear layer (torchtune's initialisation)."""

    def __init__(self, layer: nn.Linear, rank: int, alpha: float, generator: torch.Generator):
        super().__init__()
        w = layer.weight
        self.a = nn.Parameter(torch.empty(rank, layer.in_features, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.a, a=math.sqrt(5), generator=generator)
        self.b = nn.Parameter(torch.zeros(layer.out_features, rank, dtype=w.dtype))
        self.to(w.device)
        self.scale = alpha / rank

    def hook(self, module, args, output):
        return output + self.scale * nn.functional.linear(nn.functional.linear(args[0], self.a), self.b)


def lora_adapters(model: nn.Module, rank: int, alpha: float, generator: torch.Generator) -> dict[nn.Linear, LoRA]:
    """A LoRA update for every ``nn.Linear`` of ``model`` (TinyFusion's ``convert_to_lora_model``
    with ``exclude=[]``), not yet attached."""
    return {m: LoRA(m, rank, alpha, generator) for m in model.modules() if isinstance(m, nn.Linear)}


class MaskedStack:
    """Forward hooks that bypass units per image: ``m * unit(x) + (1 - m) * x``, with ``m`` the
    current mask column of each unit (set by :meth:`set`); absent: the unit runs as usual."""

    def __init__(self, model: nn.Module, names: list[str]):
        self.masks: dict[str, torch.Tensor] = {}
        self.handles = [model.get_submodule(n).register_forward_hook(self._hook(n), with_kwargs=True) for n in names]

    def _hook(self, name):
        def fn(module, args, kwargs, output):
            m = self.masks.get(name)
            if m is None:
                return output
            x = args[0] if args else kwargs.get("x", kwargs.get("hidden_states"))
            if not isinstance(output, torch.Tensor) or output.shape != x.shape:
                raise UserError(f"criterion 'tinyfusion': unit {name} does not map its input to a tensor of the "
                                "same shape, so it cannot be bypassed by a mask")
            m = m.to(output.dtype).view(-1, *([1] * (output.dim() - 1)))
            return m * output + (1 - m) * x
        return fn

    def set(self, masks: dict[str, torch.Tensor]) -> None:
        self.masks = masks

    def close(self) -> None:
        for h in self.handles:
            h.remove()
        self.masks = {}


# -- the criterion ------------------------------------------------------------------------------
class TinyFusion(harness.Criterion):
    """Learnable depth pruning: N of every M consecutive blocks, learned with a Gumbel-softmax
    over the candidate masks and LoRA as the recoverability estimate.

    Options, defaults as in the official code: ``group`` M (2: their D14 command's 1:2), ``keep``
    N (default: from the prune block's ``depth`` or ``ratio``, spread over the groups), ``steps``
    (10,000: their one ImageNet epoch at batch 128), ``batch_size`` (128), ``lr`` for LoRA (1e-4)
    and ``logit_lr`` for the mask logits (1e-3), ``rank`` (8) and ``alpha`` (16) of LoRA, ``tau``
    [start, end] (4 -> 0.1, linear), ``scaling`` (100), ``ema`` (0.999), ``grad_clip`` (1.0),
    ``log_every`` (100). A CPU study searches far less (e.g. ``steps: 100, batch_size: 8``).

    The scores make the stage remove exactly the learned mask: a kept unit scores 1 + its
    probability of being kept, a dropped one that probability alone (< 1). ``details`` (the
    record's ``criterion_details``) holds the mask, each group's probabilities and the steps.
    """

    def __init__(self, group: int = 2, keep: Optional[int] = None, steps: int = 10_000, batch_size: int = 128,
                 lr: float = 1e-4, logit_lr: float = 1e-3, rank: int = 8, alpha: float = 16.0,
                 tau: tuple[float, float] = (4.0, 0.1), scaling: float = 100.0, ema: float = 0.999,
                 grad_clip: Optional[float] = 1.0, log_every: int = 100):
        tau = tuple(tau)
        problems = [f"{k} must be >= 1 (got {v})" for k, v in
                    (("group", group), ("steps", steps), ("batch_size", batch_size), ("rank", rank),
                     ("log_every", log_every)) if v < 1]
        if keep is not None and not 1 <= keep <= group:
            problems.append(f"keep must be between 1 and group={group} (got {keep})")
        if len(tau) != 2 or min(tau) <= 0:
            problems.append(f"tau must be [start, end], both > 0 (got {list(tau)})")
        if not 0 <= ema < 1:
            problems.append(f"ema must be in [0, 1) (got {ema})")
        if min(lr, logit_lr, scaling, alpha) <= 0:
            problems.append("lr, logit_lr, scaling and alpha must be > 0")
        if problems:
            raise UserError("criterion 'tinyfusion': " + "; ".join(problems))
        self.group, self.keep, self.steps, self.batch_size = group, keep, steps, batch_size
        self.lr, self.logit_lr, self.rank, self.alpha = lr, logit_lr, rank, alpha
        self.tau, self.scaling, self.ema, self.grad_clip, self.log_every = tau, scaling, ema, grad_clip, log_every
        self.details: dict = {}

    @staticmethod
    def check(config) -> None:
        name = config.backbone.name
        if name == "unet":
            raise UserError("TinyFusion learns which N of every M consecutive blocks of a transformer stack to keep; "
                            "a U-Net's units are ResNets, attentions and skip pairs of unequal cost at several "
                            "resolutions, no such stack: use it with 'dit' or 'lamamba'")
        block = config.blocks.get("prune") or {}
        if name == "lamamba" and isinstance(block, dict) and block.get("ratio") is not None:
            raise UserError("on LaMamba-Diff the blocks of different stages differ in size, so prune.ratio does not "
                            "say how many to keep: give prune.depth")

    # -- the pattern ----------------------------------------------------------------------------
    def pattern(self, units: list, target_keep: Optional[int]) -> list[tuple[list[str], int]]:
        """``[(unit names of a group, units it keeps)]`` from ``group``/``keep`` and the stage's target."""
        groups = stack_groups([u.name for u in units], self.group)
        sizes = [len(g) for g in groups]
        if self.keep is not None:
            keeps = [min(self.keep, s) for s in sizes]
            if target_keep is not None and sum(keeps) != target_keep:
                raise UserError(f"criterion 'tinyfusion': keep={self.keep} of every {self.group} keeps {sum(keeps)} "
                                f"blocks, the prune block asks for {target_keep}; drop one of the two")
        elif target_keep is not None:
            keeps = spread_keep(sizes, target_keep)
        else:
            raise UserError("criterion 'tinyfusion' needs the number of blocks to keep: prune.depth, a prune.ratio "
                            "on blocks of equal size, or its own keep option")
        return list(zip(groups, keeps))

    # -- the search -----------------------------------------------------------------------------
    def score(self, model, units, ctx):
        target = getattr(ctx, "prune_keep", None)
        pattern = self.pattern(units, target)
        gen = ctx.generator("tinyfusion-search", shared=True)
        device = next(model.parameters()).device
        masks = [candidate_masks(len(names), k).to(device) for names, k in pattern]
        logits = [torch.full((len(m),), 0.02, device=device, requires_grad=True) for m in masks]
        ema = [l.detach().clone() for l in logits]
        requires = {p: p.requires_grad for p in model.parameters()}
        model.requires_grad_(False)
        lora = lora_adapters(model, self.rank, self.alpha, gen)
        adapters = nn.ModuleList(lora.values())
        handles = [m.register_forward_hook(a.hook) for m, a in lora.items()]
        lora_params = sum(p.numel() for p in adapters.parameters())
        stack = MaskedStack(model, [n for names, _ in pattern for n in names])
        opt = torch.optim.AdamW([{"params": list(adapters.parameters()), "lr": self.lr},
                                 {"params": logits, "lr": self.logit_lr}], weight_decay=0.0)
        curve, window, skipped = [], [], 0
        try:
            with torch.enable_grad(), evaluating(model):
                for step in range(self.steps):
                    frac = step / max(self.steps - 1, 1)
                    tau = self.tau[0] + (self.tau[1] - self.tau[0]) * frac
                    inputs, noise = self._batch(ctx, model, gen, device)
                    n = len(noise)
                    columns = {}
                    for (names, _), opts, logit in zip(pattern, masks, logits):
                        choice = gumbel_softmax(logit.expand(n, -1) * self.scaling, tau, gen)  # one mask per image
                        mask = choice @ opts  # (n, M), differentiable in the logits
                        columns.update({name: mask[:, j] for j, name in enumerate(names)})
                    stack.set(columns)
                    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
                    with autocast:
                        pred = harness.predict_noise(model, {"inputs": inputs}, noise_channels(ctx))
                        loss = torch.mean((pred.float() - noise.float()) ** 2)
                    opt.zero_grad(set_to_none=True)
                    if torch.isfinite(loss):
                        loss.backward()
                        if self.grad_clip:
                            torch.nn.utils.clip_grad_norm_([*adapters.parameters(), *logits], self.grad_clip)
                        opt.step()
                        window.append(loss.item())
                    else:  # as theirs: a non-finite step is skipped, not taken
                        skipped += 1
                    decay = min(self.ema, (1 + step) / (10 + step))
                    for e, l in zip(ema, logits):
                        e.lerp_(l.detach(), 1 - decay)
                    if window and ((step + 1) % self.log_every == 0 or step + 1 == self.steps):
                        curve.append([step + 1, sum(window) / len(window)])
                        window = []
                        log.info("tinyfusion search: step %d/%d, loss %.4f", step + 1, self.steps, curve[-1][1])
        finally:
            stack.close()
            for h in handles:
                h.remove()
            for p, r in requires.items():
                p.requires_grad_(r)
            model.zero_grad(set_to_none=True)
        lora_share = lora_params / sum(p.numel() for p in model.parameters())
        return self._decide(pattern, masks, ema, {
            "steps": self.steps, "skipped_steps": skipped, "batch_size": self.batch_size, "loss_curve": curve,
            "lora": {"rank": self.rank, "alpha": self.alpha, "params": lora_params, "share": lora_share},
            "tau": list(self.tau), "scaling": self.scaling, "ema": self.ema})

    def _batch(self, ctx, model, gen, device) -> tuple[dict, torch.Tensor]:
        """One training batch: data images (standard normal stand-ins without a data block) at
        uniform timesteps, labels dropped to the null class at the train block's rate."""
        spec = ctx.train
        inputs = ctx.example_inputs(self.batch_size, model=model, device=device, generator=gen)
        ds = ctx.dataset
        if ds is not None:
            idx = torch.randint(len(ds), (self.batch_size,), generator=gen).tolist()
            items = [ds[i] for i in idx]
            x0 = torch.stack([torch.as_tensor(x) for x, _ in items]).float()
            labels = stack_labels([y for _, y in items], ds)
            y = inputs.get("y")
            if isinstance(labels, torch.Tensor) and isinstance(y, torch.Tensor) and labels.dtype == y.dtype:
                inputs["y"] = labels.to(device)
            elif isinstance(labels, dict):
                inputs.update({k: v.to(device) for k, v in labels.items() if k in inputs})
        else:
            x0 = torch.randn(inputs["x"].shape, generator=gen)
        y, null = inputs.get("y"), getattr(model, "null_class", None)
        if isinstance(y, torch.Tensor) and y.dtype == torch.long and null is not None and spec.label_dropout > 0:
            drop = (torch.rand(len(y), generator=gen) < spec.label_dropout).to(device)
            inputs["y"] = torch.where(drop, torch.full_like(y, int(null)), y)
        t = torch.randint(0, spec.timesteps, (self.batch_size,), generator=gen)
        noise = torch.randn(x0.shape, generator=gen)
        a = alphas_cumprod(spec.schedule, spec.timesteps)[t].view(-1, *([1] * (x0.dim() - 1)))
        inputs["x"] = (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(device)
        inputs["t"] = t.to(device)
        return inputs, noise.to(device)

    def _decide(self, pattern, masks, ema, search: dict) -> dict[str, float]:
        """Each group's mask of highest EMA logit; scores 1 + P(kept) for its kept units, P(kept) for the others."""
        scores: dict[str, float] = {}
        groups, kept, removed = [], [], []
        for (names, k), opts, logit in zip(pattern, masks, ema):
            probs = (logit * self.scaling).softmax(-1).cpu()
            opts = opts.cpu()
            choice = int(logit.argmax())
            keep_prob = probs @ opts  # each unit's probability of being kept
            for j, name in enumerate(names):
                scores[name] = float(keep_prob[j]) + float(opts[choice, j])
                (kept if opts[choice, j] > 0 else removed).append(name)
            top = probs.argsort(descending=True)[:16].tolist()  # 7:14 has 3,432 masks: the likeliest
            groups.append({"units": names, "keep": k, "kept": [n for n, m in zip(names, opts[choice]) if m > 0],
                           "probability": float(probs[choice]),
                           "masks": {",".join(n for n, m in zip(names, opts[i]) if m > 0) or "none": float(probs[i])
                                     for i in top}})
        self.details = {"method": "tinyfusion", "pattern": [[k, len(names)] for names, k in pattern],
                        "kept": kept, "removed": removed, "groups": groups, **search}
        return scores
