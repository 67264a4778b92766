"""A pruning criterion and a distillation loss written against the public contract alone
(``harness.Criterion``, ``harness.Loss``; see the hookspecs ``harness_pruning_criteria`` and
``harness_distill_losses``).

``update-norm`` scores a unit by how much it changes what flows through it, measured on the
cell's calibration set with forward hooks on the unit's modules: a unit whose output is
close to its input does little, and removing it (making it the identity) costs little. It
works on any backbone whose units the harness finds: the blocks of a DiT, the ResNets and
attention layers of a U-Net, and its ``a+b`` skip pairs (the mean over the pair's modules).

``cosine-kd`` distils features: one minus the cosine similarity of student and teacher
features, per sample, averaged, summed over the features the stage hooks.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import harness


def _tensor(value):
    """The hidden state of a module's input or output (diffusers wraps it: ``.sample``, tuples)."""
    value = getattr(value, "sample", value)
    return value[0] if isinstance(value, (tuple, list)) else value


class UpdateNorm(harness.Criterion):
    """Relative size of a unit's update, E ||f(x) - x||^2 / ||x||^2, on the calibration set."""

    def score(self, model, units, ctx):
        sums = {u.name: 0.0 for u in units}
        counts = {u.name: 0 for u in units}

        def hook(unit_name):
            def record(module, args, kwargs, output):
                x = _tensor(args[0] if args else kwargs.get("hidden_states", kwargs.get("x")))
                y = _tensor(output)
                if y.shape != x.shape:  # a U-Net up ResNet also takes the skip: no update to compare
                    return
                change = (y.float() - x.float()).pow(2).flatten(1).sum(1) / x.float().pow(2).flatten(1).sum(1)
                sums[unit_name] += change.mean().item()
                counts[unit_name] += 1
            return record

        handles = [module.register_forward_hook(hook(unit.name), with_kwargs=True)
                   for unit in units for module in unit.submodules(model)]
        try:
            with torch.no_grad():
                for batch in self.calibration(ctx, model):  # the stage's set: the cell's own data
                    model(**batch["inputs"])
        finally:
            for handle in handles:
                handle.remove()
        return {name: sums[name] / max(counts[name], 1) for name in sums}


class CosineKD(harness.Loss):
    """Feature distillation: sum over hooked features of 1 - cos(student, teacher), per sample."""

    needs_features = True

    def __init__(self, eps: float = 1e-8):
        self.eps = eps

    def terms(self, student_feats, teacher_feats):
        return {name: 1 - F.cosine_similarity(student_feats[name].flatten(1), teacher.flatten(1), dim=1,
                                              eps=self.eps).mean()
                for name, teacher in teacher_feats.items() if name in student_feats}

    def __call__(self, student_out, teacher_out, noise, student_feats, teacher_feats):
        terms = self.terms(student_feats, teacher_feats)
        return torch.stack(list(terms.values())).sum() if terms else student_out.new_zeros(())
