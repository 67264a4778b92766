"""Distillation losses and the objective that combines them with weights.

A loss (:class:`harness.Loss`, hook ``harness_distill_losses``) is called as
``loss(student_out, teacher_out, noise, student_feats, teacher_feats) -> scalar``; features
are dicts keyed by the teacher's module names, collected for losses that declare
``needs_features``. Feature losses also give ``terms(...)``: one value per feature, which is
where LAPTOP-Diff sees a few large terms dominate.
"""
from __future__ import annotations

import re
from collections import defaultdict

import torch
import torch.nn.functional as F
from torch import nn

import harness
from harness import UserError, origin_names, tag_origins


class TaskLoss(harness.Loss):
    """Denoising loss: MSE(student, noise)."""

    needs_teacher = False

    def __call__(self, student_out, teacher_out, noise, student_feats, teacher_feats):
        return F.mse_loss(student_out, noise)


class OutputKD(harness.Loss):
    """Output distillation: MSE(student, teacher)."""

    def __call__(self, student_out, teacher_out, noise, student_feats, teacher_feats):
        return F.mse_loss(student_out, teacher_out)


class FeatureKD(harness.Loss):
    """BK-SDM feature distillation: sum over hooked features of MSE(student, teacher)."""

    needs_features = True

    def term(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(s, t)

    def terms(self, student_feats, teacher_feats) -> dict[str, torch.Tensor]:
        return {k: self.term(student_feats[k], teacher_feats[k]) for k in teacher_feats if k in student_feats}

    def __call__(self, student_out, teacher_out, noise, student_feats, teacher_feats):
        terms = self.terms(student_feats, teacher_feats)
        if not terms:
            return student_out.new_zeros(())
        return torch.stack(list(terms.values())).sum()


class NormalizedFeatureKD(FeatureKD):
    """LAPTOP-Diff: each feature term ||F_T - F_S||^2 / ||F_T||^2 (norm reconstructed)."""

    def __init__(self, eps: float = 1e-8):
        self.eps = eps

    def term(self, s, t):
        return (t - s).pow(2).sum() / (t.pow(2).sum() + self.eps)


def massive_mask(f: torch.Tensor, threshold: float) -> torch.Tensor:
    """TinyFusion's mask of ordinary activations: True where ``|f - mean| < threshold * std``,
    mean and std taken per sample over all its other dimensions (tokens and channels)."""
    dims = list(range(1, f.dim()))
    var, mean = torch.var_mean(f, dim=dims, keepdim=True)  # unbiased, as their torch.var_mean
    return (f - mean).abs() < threshold * var.sqrt()


class MaskedKD(harness.Loss):
    """TinyFusion's masked knowledge distillation (arXiv 2412.01199; ``training_losses_kd_rep`` in
    VainF/TinyFusion's ``diffusion/gaussian_diffusion.py``):

    ``alpha * MSE(student, teacher) + (1 - alpha) * MSE(student, noise) + beta * feature term``,

    the feature term the mean over paired hidden states of ``mean((m_s * F_s - m_t * F_t)^2)``,
    where ``m`` masks out each model's *massive activations* (Sun et al. 2024, arXiv 2402.17762): the entries
    farther than ``threshold`` standard deviations from the sample's mean (their code: 2). Their
    defaults: alpha 0.9, beta 1e-2 (decayed linearly to 0 over the epochs there; constant here).

    ``stride``: distil every ``stride``-th feature point only, the ``(j + 1) * stride - 1``-th in
    the teacher's order (their D14-from-XL run pairs student block j with teacher block 2j + 1:
    ``stride: 2``; in the harness a pruned student's removed block passes its input on under its
    own name, so the student's hidden state at teacher block 2j + 1 is the output of the block
    it kept of the pair). None: every point.
    """

    needs_features = True

    def __init__(self, alpha: float = 0.9, beta: float = 1e-2, threshold: float = 2.0, stride: int | None = None):
        if not 0 <= alpha <= 1 or beta < 0 or threshold <= 0 or (stride is not None and stride < 1):
            raise UserError(f"loss 'masked-kd': expected 0 <= alpha <= 1, beta >= 0, threshold > 0 and stride >= 1 "
                            f"(got alpha={alpha}, beta={beta}, threshold={threshold}, stride={stride})")
        self.alpha, self.beta, self.threshold, self.stride = alpha, beta, threshold, stride

    def pairs(self, student_feats, teacher_feats) -> list[str]:
        names = [k for k in teacher_feats if k in student_feats]
        return names if self.stride is None else names[self.stride - 1::self.stride]

    def term(self, s: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s, t = s.float(), t.float()
        return ((massive_mask(s, self.threshold) * s - massive_mask(t, self.threshold) * t) ** 2).mean()

    def terms(self, student_feats, teacher_feats) -> dict[str, torch.Tensor]:
        return {k: self.term(student_feats[k], teacher_feats[k]) for k in self.pairs(student_feats, teacher_feats)}

    def __call__(self, student_out, teacher_out, noise, student_feats, teacher_feats):
        loss = (self.alpha * F.mse_loss(student_out.float(), teacher_out.float())
                + (1 - self.alpha) * F.mse_loss(student_out.float(), noise.float()))
        terms = self.terms(student_feats, teacher_feats)
        if terms and self.beta:
            loss = loss + self.beta * torch.stack(list(terms.values())).mean()
        return loss


LOSSES = {"task": TaskLoss, "output-kd": OutputKD, "feature-kd": FeatureKD,
          "normalized-feature-kd": NormalizedFeatureKD, "masked-kd": MaskedKD}


# -- features -----------------------------------------------------------------------------------
_STAGE = re.compile(r"(^|\.)((down_blocks|up_blocks|blocks|encoder|decoder)\.\d+|mid_block|mid)$")


def feature_points(model: nn.Module) -> list[str]:
    """BK-SDM's feature points: the output of every down and up stage (and the mid block) of a
    U-Net; every block of a DiT; every stage of LaMamba-Diff (encoder, bottleneck, decoder).

    One point per stage: a name nested in a point already taken is not a point (a LaMamba
    stage holds ``blocks.0``, ...; hooking both would count the same features twice)."""
    points: list[str] = []
    for name, _ in model.named_modules():  # parents come before their children
        if name and _STAGE.search(name) and not any(name.startswith(p + ".") for p in points):
            points.append(name)
    return points


class FeatureTap:
    """Forward hooks that keep the outputs of named modules, keyed by their teacher names."""

    def __init__(self, model: nn.Module, teacher_names: list[str]):
        tag_origins(model)
        wanted = set(teacher_names)
        self.feats: dict[str, torch.Tensor] = {}
        self.handles = []
        modules = dict(model.named_modules())
        for name, origin in origin_names(model).items():
            if origin in wanted:
                self.handles.append(modules[name].register_forward_hook(self._hook(origin)))

    def _hook(self, key):
        def fn(module, args, output):
            out = getattr(output, "sample", output)
            if isinstance(out, (tuple, list)):  # diffusers down blocks return (hidden, skips)
                out = out[0]
            self.feats[key] = out
        return fn

    def pop(self) -> dict[str, torch.Tensor]:
        feats, self.feats = self.feats, {}
        return feats

    def close(self):
        for h in self.handles:
            h.remove()


class DistillObjective:
    """Weighted sum of losses, as ``loss_fn(model, x0, t, y, noise, x_t, teacher)`` for
    :func:`harness.train_model`. It runs the teacher (no grad) and the student with feature
    hooks when a loss declares ``needs_features``, and accumulates each term's magnitude so the
    record can show its share. ``losses`` are ``(registered name, loss, weight)``: the name
    keys the record's shares (a loss never has to know it)."""

    def __init__(self, losses: list[tuple[str, object, float]], channels: int, teacher: nn.Module | None = None,
                 features: list[str] | None = None):
        self.losses = losses
        self.channels = channels
        self.features = features
        self.needs_features = any(getattr(l, "needs_features", False) for _, l, _ in losses)
        self.sums: dict[str, float] = defaultdict(float)
        self.steps = 0
        self._taps: dict[int, FeatureTap] = {}
        self.teacher = teacher

    def _tap(self, model: nn.Module) -> FeatureTap:
        tap = self._taps.get(id(model))
        if tap is None:
            names = self.features if self.features is not None else feature_points(self.teacher or model)
            tap = self._taps[id(model)] = FeatureTap(model, names)
        return tap

    def _out(self, model, x_t, t, y):
        out = model(x=x_t, t=t, y=y)
        out = getattr(out, "sample", out)
        return out[:, :self.channels]

    def __call__(self, model, x0, t, y, noise, x_t, teacher=None):
        teacher = teacher if teacher is not None else self.teacher
        if self.teacher is None:
            self.teacher = teacher
        s_feats = t_feats = {}
        t_out = None
        if teacher is not None:
            with torch.no_grad():
                t_tap = self._tap(teacher) if self.needs_features else None
                t_out = self._out(teacher, x_t, t, y)
                t_feats = t_tap.pop() if t_tap else {}
        s_tap = self._tap(model) if self.needs_features else None
        s_out = self._out(model, x_t, t, y)
        s_feats = s_tap.pop() if s_tap else {}
        total = s_out.new_zeros(())
        terms: dict[str, torch.Tensor] = {}
        for name, loss, weight in self.losses:
            if t_out is None and getattr(loss, "needs_teacher", True):
                raise ValueError(f"distillation loss {name!r} needs a teacher")
            value = loss(s_out, t_out, noise, s_feats, t_feats)
            total = total + weight * value
            terms[name] = weight * value.detach()
            self.sums[name] += float(terms[name])
            if hasattr(loss, "terms"):
                with torch.no_grad():
                    for k, v in loss.terms(s_feats, t_feats).items():
                        self.sums[f"{name}/{k}"] += float(weight * v)
        self.steps += 1
        return total, terms

    def shares(self) -> dict:
        """Each loss's share of the summed total over training, and each feature term's share
        within its feature loss (the imbalance LAPTOP-Diff describes)."""
        top = {k: v for k, v in self.sums.items() if "/" not in k}
        total = sum(top.values()) or 1.0
        out = {"steps": self.steps, "losses": {k: v / total for k, v in top.items()}, "features": {}}
        for name, value in top.items():
            parts = {k.split("/", 1)[1]: v for k, v in self.sums.items() if k.startswith(name + "/")}
            if parts:
                s = sum(parts.values()) or 1.0
                out["features"][name] = {k: v / s for k, v in parts.items()}
        return out

    def close(self):
        for tap in self._taps.values():
            tap.close()
        self._taps.clear()
