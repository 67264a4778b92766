"""``output_loss``: how far the cell's (pruned) model strays from its teacher."""
from __future__ import annotations

from harness.errors import MetricUnavailable

from .calibration import calibration_inputs, noise_channels, output_loss, reference_outputs


class OutputLoss:
    """E||eps_student - eps_teacher||^2 on the calibration batch across the schedule."""

    name, direction, unit = "output_loss", "lower", "mse"

    def __init__(self, batch_size: int = 8, timesteps: int = 8):
        self.batch_size, self.timesteps = batch_size, timesteps

    def __call__(self, ctx) -> dict:
        teacher = getattr(ctx, "teacher", None)
        if teacher is None:
            raise MetricUnavailable("no teacher: output_loss needs a prune or distill block")
        student = ctx.model
        modes = (student.training, teacher.training)
        student.eval(), teacher.eval()
        try:
            batches = calibration_inputs(ctx, teacher, self.batch_size, self.timesteps)
            c = noise_channels(ctx)
            value = output_loss(student, batches, reference_outputs(teacher, batches, c), c)
        finally:
            student.train(modes[0]), teacher.train(modes[1])
        return {"value": value, "batch_size": self.batch_size, "timesteps": self.timesteps}
