"""What a component of each kind is: base classes and protocols for plugin authors.

Each class here states, in one place, every attribute and call the harness makes on a
component of its kind (the hookspecs in :mod:`harness.hookspecs` say how they are
registered). A component needs nothing beyond it; subclassing is optional for the classes
(the harness reads attributes, it never checks ``isinstance``) and gives the defaults.
What a component must *declare* (a metric's ``direction``; ``needs_features`` on a loss that
reads features) is checked by :mod:`harness.contracts` when the plugin's component is loaded,
so a mistake is one line before any training, never a failed cell after it.

A component never needs to know the name it is registered under: the registry knows it.

This module imports no torch: annotations name its types as strings.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar, Iterator, Optional, Protocol, runtime_checkable

if TYPE_CHECKING:  # pragma: no cover
    import torch

    from .context import CellContext
    from .runner import CellJob
    from .units import Unit

__all__ = ["Backbone", "Mixer", "Metric", "Dataset", "Criterion", "Loss", "Executor"]


@runtime_checkable
class Backbone(Protocol):
    """A denoising network (a ``torch.nn.Module``): see :func:`harness.hookspecs.harness_backbones`.

    ``forward(x, t, y=None)``: ``x`` (B, in_channels, H, W), ``t`` (B,), ``y`` class labels
    (B,) long, a text context (B, S, context_dim), or None; returns (B, in_channels or
    2 * in_channels, H, W). Optional attributes the harness reads when present:
    ``example_inputs(batch_size, device=None, generator=None) -> dict``, ``learn_sigma``,
    ``context_dim``, ``num_classes``, ``null_class``, and ``input_size``/``in_channels``
    when the factory let the model decide them.
    """

    def forward(self, x: "torch.Tensor", t: "torch.Tensor", y: Any = None) -> "torch.Tensor": ...


@runtime_checkable
class Mixer(Protocol):
    """A token mixer (a ``torch.nn.Module``): see :func:`harness.hookspecs.harness_mixers`.

    ``forward(x, hw)`` maps (B, L, dim) to (B, L, dim), ``hw = (H, W)``, tokens in raster order.
    """

    def forward(self, x: "torch.Tensor", hw: tuple[int, int]) -> "torch.Tensor": ...


class Metric:
    """One measurement of a cell: see :func:`harness.hookspecs.harness_metrics`.

    Declare ``direction`` (required, checked at load): ``"lower"`` or ``"higher"`` is
    better, or ``None`` for a figure with no better side. ``unit`` is printed beside the
    value; ``role`` is ``"cost"`` (what a method pays) or ``"quality"`` (what it delivers).
    """

    direction: ClassVar[Optional[str]]
    unit: ClassVar[str] = ""
    role: ClassVar[str] = "quality"
    timing_sensitive: ClassVar[bool] = False  # measured with the machine to itself (latency)
    path_options: ClassVar[dict[str, str]] = {}  # options that name files: checked at validation
    samples: ClassVar[bool] = False  # runs the sampler or scores its images: see CellContext.change_sampling

    def __call__(self, ctx: "CellContext") -> float | dict:
        """The figure: a number, or a dict holding ``value`` and any details. Raise
        :class:`harness.MetricUnavailable` when it cannot be computed here."""
        raise NotImplementedError


class Dataset:
    """A data set: see :func:`harness.hookspecs.harness_datasets`.

    Required: ``num_classes`` (0 when unlabelled), ``channels``, ``resolution``,
    ``__len__`` and ``__getitem__(i) -> (image tensor (C, H, W) in [-1, 1], label)``; the
    label is a class index, or a caption (str) for captioned data.
    """

    num_classes: int = 0
    channels: int
    resolution: int
    # Captioned data: the width of the text context and the empty prompt's conditioning, which
    # training feeds when it drops captions for classifier-free guidance.
    context_dim: int = 0
    null_context: Any = None
    # Latent data: ``decode(latents) -> images in [-1, 1]``, applied before samples are saved.
    decode: Optional[Callable[["torch.Tensor"], "torch.Tensor"]] = None

    def encode_labels(self, captions: list[str]) -> Any:
        """Captioned data: a batch of captions as the backbone's conditioning (a context
        tensor (B, S, context_dim), or a dict of tensors for SDXL-style U-Nets)."""
        raise NotImplementedError(f"{type(self).__name__} serves no captions")

    def __len__(self) -> int:
        raise NotImplementedError

    def __getitem__(self, i: int) -> tuple["torch.Tensor", Any]:
        raise NotImplementedError


class Criterion:
    """A layer-pruning criterion: see :func:`harness.hookspecs.harness_pruning_criteria`.

    ``score(model, units, ctx)`` returns ``{unit.name: importance}`` for every unit of
    ``units`` (:class:`harness.Unit`), the higher the more the unit matters (units with the
    lowest summed scores are removed first). A unit the criterion's definition does not
    cover (block influence on a U-Net's skip pair, which has no single input and output) is
    left out of the mapping rather than given a made-up score: it is then never removed, and
    the criterion says why in the record (``ctx.extra``). ``unit.modules`` names the modules a unit
    covers (two or more for a U-Net's skip pair), ``unit.submodules(model)`` returns them.
    A data-driven criterion scores on :meth:`calibration` (the set the pruning stage asks
    for: the same images, noise and timesteps for every criterion of a suite).

    Optional ``check(config)``, a static or class method of the factory: called when a
    suite is validated, with the cell's :class:`harness.CellConfig`; it raises
    :class:`harness.UserError` with one line when the criterion's definition cannot apply to
    the cell (BK-SDM's order on a backbone without U-Net stages), so that the suite fails
    before any work and not after its teacher has trained.
    """

    def score(self, model: "torch.nn.Module", units: list["Unit"], ctx: "CellContext") -> dict[str, float]:
        raise NotImplementedError

    def calibration(self, ctx: "CellContext", model: "torch.nn.Module") -> list[dict]:
        """The cell's calibration set (:func:`harness.calibration_inputs`): one
        ``{"inputs": forward kwargs, "noise": tensor}`` per timestep."""
        from .calibration import calibration_inputs

        return calibration_inputs(ctx, model)


class Loss:
    """A distillation loss: see :func:`harness.hookspecs.harness_distill_losses`.

    ``__call__(student_out, teacher_out, noise, student_feats, teacher_feats)`` returns a
    scalar tensor. Outputs are the noise predictions (B, C, H, W); ``teacher_out`` is the
    teacher's. Features are ``{teacher module name: output}`` dicts, filled only when the
    loss declares ``needs_features = True`` (else they are empty: hooking costs time).
    ``needs_teacher = False`` marks a loss that reads neither teacher output nor features
    (the task loss), which may then run without a teacher.
    Optional ``terms(student_feats, teacher_feats) -> {feature: tensor}``: one value per
    feature, which the record keeps as each feature's share of the loss.
    """

    needs_features: ClassVar[bool] = False
    needs_teacher: ClassVar[bool] = True

    def __call__(self, student_out, teacher_out, noise, student_feats: dict, teacher_feats: dict):
        raise NotImplementedError


class Executor:
    """Where cells run: see :func:`harness.hookspecs.harness_executors`."""

    def run(self, jobs: Iterator["CellJob"], on_done: Callable[["CellJob", dict], None],
            on_start: Optional[Callable[["CellJob"], None]] = None) -> None:
        raise NotImplementedError
