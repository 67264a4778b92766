"""The plugin API of diffusion-harness.

These docstrings are the reference for plugin authors: each hook says every attribute and
call the harness makes on a component of its kind, and a component needs nothing beyond
that. The base classes and protocols of :mod:`harness.kinds` (``harness.Metric``,
``harness.Loss``, ``harness.Criterion``...) restate them in code; subclassing is optional.
A plugin is any importable module or object with functions decorated by
:data:`harness.hookimpl`, announced by an entry point in the group ``harness``::

    [project.entry-points.harness]
    my_models = "my_package.harness_plugin"

Every component hook takes no arguments and returns a mapping ``{component name:
factory}``. The name is the registry's: a suite refers to it, records are keyed by it, and
the component is never asked for it. Names are global: two plugins that declare the same
name of the same kind are an error that names both. The first line of a factory's
docstring is its description in ``harness ls``. Factories are called with keyword
arguments only; their signature is the list of options a suite may give, so unknown
options are rejected before any work starts (a factory that takes ``**options`` accepts
anything and checks for itself). ``validate_options(options: dict)`` (a static method of
the factory, any kind) may check option values and raise :class:`harness.UserError`; it
runs when the suite is validated.

What a component must declare is checked when its plugin's component is loaded (a suite's
validation, ``harness.create``; see :mod:`harness.contracts`): a factory that is a class
is checked at once, what only the built object shows is checked when it is built. A
violation is refused in one line naming the plugin, the component and what is missing.

Plugins import from the core only what ``harness.__all__`` lists (``from harness import
...``). The built-in components are plugins shaped exactly like this (``plugins/harness_*``),
and ``harness new-plugin NAME`` writes a package with one component of each kind.

**Declaring by reference (lazy).** Any value of these mappings may instead be a reference,
``"package.module:attr"``, or :class:`harness.Lazy` ``(target, description)``: the harness
imports it the first time the component is used, and lists and describes it without
importing it. ``attr`` may be a dotted path; a step into a mapping is by key
(``"my_plugin.stages:STAGES.quantize"``). Without a description, ``harness ls`` reads the
docstring of the ``def`` or ``class`` that ``attr`` names from the module's source; a
stage, a command or anything assigned rather than defined gives its line through
:class:`harness.Lazy`. ``harness --help`` and ``harness ls`` then import the entry-point
module alone, so keep that module free of torch and of your implementation::

    # my_plugin/__init__.py: imports harness only
    import harness

    @harness.hookimpl
    def harness_mixers():
        return {"my-mixer": "my_plugin.mixer:my_mixer"}   # docstring of my_mixer: its description

    @harness.hookimpl
    def harness_commands():
        return {"report": harness.Lazy("my_plugin.cli:REPORT", "summarise a results folder")}

A command's module is imported for its own ``harness NAME --help`` (to add its arguments):
import torch inside its ``run``. Factories given directly (``{"my-mixer": my_mixer}``) work
as before. A plugin that fails to import, a hook that raises, a reference that cannot be
imported, and a name another plugin already declares are reported in one line naming the
plugin and its distribution; only what needs that plugin fails.

**Kinds and hooks.** ``harness ls KIND [NAME]``, :func:`harness.create` and the suite use
these kind names; ``harness ls KIND NAME`` shows a component's options (its factory's
signature, or for a stage its block's keys) and description.

============  ============================  =============================================
kind          hook                          a suite names it in
============  ============================  =============================================
backbone      harness_backbones             ``backbone: {name: ...}``
mixer         harness_mixers                a backbone's ``mixer:`` option
metric        harness_metrics               ``metrics: [...]``
dataset       harness_datasets              ``data: {name: ...}``
criterion     harness_pruning_criteria      ``prune: {criterion: ...}``
loss          harness_distill_losses        ``distill: {losses: [...]}``
executor      harness_executors             ``executor: {name: ...}``, ``--executor``
stage         harness_stages                a top-level block (``train:``, ``prune:``)
command       harness_commands              ``harness NAME`` on the command line
(none)        harness_flop_handles          (operators, by TorchScript or aten name)
============  ============================  =============================================
"""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("harness")


@hookspec
def harness_backbones():
    """Denoising networks.

    ``factory(*, input_size: int, in_channels: int, num_classes: int, context_dim: int = 0,
    **options) -> torch.nn.Module``. The harness always passes ``input_size``,
    ``in_channels`` and ``num_classes``: the suite's backbone option when given, else the
    shape of the cell's data set, else the factory's own default when it declares one, else
    the documented default, the 32x32x4 latent of a 256x256 image and 1000 classes
    (:data:`harness.DEFAULT_INPUTS`). A factory whose default is ``None`` lets the
    built model decide (a preset's native size) and reports it through the model attribute
    of the same name. ``context_dim`` is passed when the data set serves captions.

    The module's ``forward(x, t, y=None)`` takes ``x`` of shape (B, in_channels, H, W) with
    H = W = input_size, ``t`` of shape (B,), and ``y``: class labels (B,) (long), a context
    (B, S, context_dim) for text-conditioned backbones, or None. It returns
    (B, in_channels or 2 * in_channels, H, W): noise, optionally followed by the learned
    variance.

    What the harness asks the model, when present:

    - ``example_inputs(batch_size, device=None, generator=None) -> dict`` of forward keyword
      arguments (for backbones whose forward needs more than x, t, y);
    - ``learn_sigma: bool``: whether the second half of the output channels is a variance;
    - ``context_dim: int``: the width of the text context it takes (0 or absent: none), and
      ``num_classes``: the class labels it takes (0: unconditional or text);
    - ``input_size``, ``in_channels``: read back when the factory's default was ``None``;
    - ``null_class: int | None``: the label that stands for "no class", fed when training
      drops labels for classifier-free guidance (DiT: ``num_classes``); ``None`` when the
      model was built without one. Absent: ``num_classes``, the convention of DiT and ADM.

    Otherwise the harness uses it as any ``torch.nn.Module``: ``parameters()``,
    ``named_modules()`` (pruning finds its units there, see :class:`harness.Unit`),
    ``state_dict()``, ``to()``, ``train()``/``eval()``. It may be built on the meta device
    (parameter and FLOP counts need shapes only), so a factory should not read weights'
    values while it builds unless it loads them (then the harness builds it for real).

    Transformer-style backbones take a ``mixer`` option (a mixer name, or a mapping with
    ``name`` and options) and build their token mixers with
    ``harness.create("mixer", name, dim=..., **options)``.
    """


@hookspec
def harness_mixers():
    """Token mixers: ``factory(dim: int, **options) -> torch.nn.Module``.

    ``forward(x, hw)`` maps x of shape (B, L, dim) to (B, L, dim), with ``hw = (H, W)`` and
    H * W == L (tokens in raster order). A backbone builds its mixers with
    :func:`harness.build_mixer`, which also passes what the backbone knows (``num_heads``,
    ``block_index``...) to a factory whose signature takes it; the suite's own options win.
    The harness asks a mixer nothing else: its FLOPs are counted from the operations it runs.

    A mixer whose operator has several implementations (a fused CUDA kernel, a compiled CPU
    loop, a PyTorch fallback) calls ``harness.kernels.note(kernel, impl)`` each time it
    dispatches: the record then says, under ``env.kernels`` and in the latency entry's
    ``kernels``, which implementation ran (the selective scan notes ``selective_scan``).
    """


@hookspec
def harness_metrics():
    """Measurements of a cell: ``factory(**options) -> Metric`` (see :class:`harness.Metric`).

    A Metric is called as ``metric(ctx: harness.CellContext) -> float | dict`` after the
    cell's stages ran. A dict must hold ``value`` and may add details (spread, batch size,
    dtype...). Raise :class:`harness.MetricUnavailable` with a reason when the figure cannot
    be computed here (missing weights offline, say): the record then says so, and no number
    is made up. Any other exception fails the cell with its error. The record keys the entry
    by the metric's registered name.

    It must declare ``direction`` (checked at load): ``"lower"`` or ``"higher"`` is better,
    or ``None`` when neither is. ``unit`` (str, default "") is printed beside the value.

    ``role`` is ``"cost"`` for what a method pays (parameters, FLOPs, time, memory) and
    ``"quality"`` (the default) for what it delivers; the record keeps it beside the figure,
    and leaderboards rank by quality and plot quality against cost from it.

    ``path_options`` (a class attribute, ``{option name: what it is}``) names the options
    that are paths to files the metric reads (``{"prompts": "prompt file"}``): a suite whose
    path does not exist is refused when it is validated, not after hours of work.
    ``validate_options(options)`` may check option values likewise (``gflops`` refuses an
    unknown ``convention`` this way).

    A metric whose figure depends on having the machine to itself (latency) sets the class
    attribute ``timing_sensitive = True``. The runner then measures it inside the executor's
    ``alone`` context and adds to its entry ``ran_alone`` (True: no other cell of the run ran
    meanwhile; False: some did; None: the executor cannot tell) and ``interval`` (ISO start
    and end of the measurement).

    A metric that runs the cell's sampler or scores the images it made (sample latency,
    throughput, FID, CLIP score) sets ``samples = True``. A stage that changes how a sampling
    step is computed without changing the weights (DeepCache's feature reuse, token merging)
    says so with ``ctx.change_sampling(stage, what)``, and the runner adds to the entry of
    every such metric ``sampling_changed_by: {stage: what}``, so that a figure measured on an
    accelerated sampler never reads as the plain model's.
    """


@hookspec
def harness_datasets():
    """Data sets: ``factory(*, resolution: int, split: str = "train", seed: int, **options)``.

    ``split`` is ``"train"`` (what training and calibration draw from) or ``"val"`` (held-out
    figures); ``seed`` is shared by every cell of a suite, for a data set that draws. Returns an
    object (see :class:`harness.Dataset`) with ``num_classes`` (0 when unlabelled),
    ``channels``, ``resolution``, ``__len__`` and ``__getitem__(i) -> (image tensor in
    [-1, 1] of shape (C, H, W), label)``; the label is a class index, or a caption (str).
    The cell's backbone is built for its ``resolution``, ``channels`` and ``num_classes``
    unless the suite says otherwise.

    What the harness reads when present:

    - captioned data: ``context_dim`` (the text context's width, passed to the backbone),
      ``encode_labels(captions) -> tensor or dict`` (a batch's conditioning) and
      ``null_context`` (the empty prompt's conditioning, fed when training drops captions);
    - latent data: ``decode(latents) -> images in [-1, 1]``, applied before samples are saved.

    The built-in quality metrics (``fid``...) also read ``uint8_images()`` (the reference
    images, uint8 (N, 3, H, W)), ``content_hash`` (keys their caches) and ``name`` (shown as
    the reference in the record); a data set without them is not scored by those metrics.
    """


@hookspec
def harness_pruning_criteria():
    """Layer-pruning criteria: ``factory(**options) -> Criterion`` (see :class:`harness.Criterion`).

    ``criterion.score(model, units, ctx) -> {unit.name: float}`` scores every unit of
    ``units``: the higher the score, the more the unit matters (units with the lowest summed
    scores are removed until the budget is met). ``model`` is the unpruned model in eval
    mode (a criterion that changes it must restore it); ``ctx`` is the cell's
    :class:`harness.CellContext`.

    ``units`` are :class:`harness.Unit` objects, the removable units
    :func:`harness.discover_units` finds: DiT and LaMamba blocks, U-Net ResNets and attention
    layers, and on U-Nets skip pairs named ``a+b`` (a down ResNet with the up ResNet that
    consumed its skip). The unit-to-module mapping is ``unit.modules`` (module names; two or
    more for a pair) and ``unit.submodules(model)`` (the modules, for forward hooks);
    ``unit.parameters(model)`` gives their weights. ``harness.remove_units(model, units)`` is
    a context manager with those units removed, to measure what removing them does.

    Calibration data: ``harness.calibration_inputs(ctx, model)`` returns the set the pruning
    stage asks for (its ``calibration_batch`` images of the cell's training data, noised at
    ``calibration_timesteps`` steps, text models conditioned as the stage says), one
    ``{"inputs": forward kwargs, "noise": tensor}`` per timestep. Every criterion of a suite
    gets the same draw. ``harness.predict_noise(model, batch, harness.noise_channels(ctx))``
    is a model's noise prediction on one of them.
    """


@hookspec
def harness_distill_losses():
    """Distillation losses: ``factory(**options) -> Loss`` (see :class:`harness.Loss`).

    ``loss(student_out, teacher_out, noise, student_feats, teacher_feats) -> torch.Tensor``,
    a scalar. ``student_out``/``teacher_out`` are the noise predictions (B, C, H, W) (a
    learned variance's channels dropped), ``noise`` the target of the task loss. Features
    are dicts ``{teacher module name: output tensor}`` (by default the output of every stage:
    U-Net down/mid/up blocks, every DiT block; a suite's ``distill.features`` names others),
    matched between student and teacher by the teacher's module names even after pruning.

    Declarations (checked at load):

    - ``needs_features = True`` on a loss that reads features: only then are the forward
      hooks installed; otherwise both feature dicts are empty;
    - ``needs_teacher = False`` on a loss that reads neither ``teacher_out`` nor teacher
      features (the task loss); any other loss fails without a teacher;
    - optional ``terms(student_feats, teacher_feats) -> {feature: tensor}``: each feature's
      term, whose shares the record keeps (a loss that defines it must need features).

    The stage weighs each loss by its ``weight`` and records each term's share under the
    loss's registered name.
    """


@hookspec
def harness_executors():
    """Where cells run: ``factory(**options) -> Executor`` (see :class:`harness.Executor`).

    ``Executor.run(jobs, on_done, on_start=None)`` executes every :class:`harness.CellJob`
    (each picklable; ``harness.execute_cell(job)`` runs one and writes its record) and
    calls ``on_start(job)`` as each starts and ``on_done(job, record)`` as each finishes. It
    must not let one job's failure stop the others. ``jobs`` is an iterator: the runner
    claims each cell as it is taken (see :mod:`harness.claims`), so take one when a slot is
    free, or all at once (``list(jobs)``) to submit a batch.

    An executor that can keep other cells off the machine while a timing-sensitive metric
    runs passes ``execute_cell(job, alone=factory)``: ``factory()`` is a context manager,
    entered around that metric, whose value (True or False) becomes the entry's
    ``ran_alone``. Without it the record says None: unknown.
    """


@hookspec
def harness_flop_handles():
    """FLOP rules for ops the built-in rules do not count: ``{op name: formula}``.

    The count (harness.flops) listens at PyTorch's dispatcher, under inference mode, where
    every op arrives whole as the model called it. An op name is ``"namespace::op"`` as the
    dispatcher calls it (``"aten::scaled_dot_product_attention"``, a custom op's
    ``"harness_mixers::selective_scan"``), and covers all its overloads (``aten::add.Tensor``
    and ``aten::add.Scalar`` are ``aten::add``); ``torch.ops.aten.baddbmm`` is taken too.
    A name the count cannot place shows in the record's ``uncounted_ops``, which is the
    name to give a rule.

    A formula has ``torch.utils.flop_counter``'s form: shapes in, a number out.
    ``formula(*args, out_shape=..., **kwargs)`` receives the op's arguments with each tensor
    replaced by its shape (a tuple; a list of tensors by a list of shapes; anything else as
    passed, None included) and ``out_shape`` the output's shape (a tuple of shapes for several
    outputs). It returns multiply-adds, one counted as one FLOP (``FlopCounterMode``'s own
    formulas count two), and never reads values: the count runs on the meta device. A formula
    of None counts the op as nothing and reports nothing.

    Work done outside the dispatcher (a C extension called through ctypes) is invisible to
    the count: register it with ``torch.library.custom_op`` and a fake (meta) implementation,
    as ``harness_mixers.scan.scan_op`` does, and give the op a rule. A model that cannot run
    on meta tensors is counted on real ones instead, and the record's ``flops_method`` says so.
    """


@hookspec
def harness_stages():
    """Methods applied to a cell's model before it is measured: ``{block name: Stage}``.

    A :class:`harness.Stage` owns the top-level block of a cell's configuration that
    bears its name (``train:``, ``prune:``, ``distill:``, a third party's ``quantize:``). Its
    ``schema`` (a pydantic model) validates the block when the suite is validated, and its
    errors carry the suite's file and line. The runner builds the
    :class:`harness.CellContext`, runs every stage whose block the cell has (each
    after those it names in ``after``; one named in another's ``replaces`` is skipped), then
    the metrics. ``run(ctx, spec)`` leaves its model in ``ctx.model`` and what the record
    should keep under ``ctx.extra[<block name>]``; a stage that keeps a reference model for
    the metrics (the unpruned teacher) sets ``ctx.teacher``; one that generates the images the
    quality metrics score (a text-to-image ``sample`` stage) sets ``ctx.samples`` to an object
    with ``folder`` (PNGs ``{i:06d}.png``), ``teacher`` (the teacher's folder or None) and
    ``prompts`` (the text of image i, or None). Draws are seeded through
    ``ctx.seed(purpose)`` (or ``ctx.generator(purpose)``) so that a rerun repeats them.

    What else the context offers a stage (and a metric): ``ctx.model`` (built on first use),
    ``ctx.dataset`` (the cell's training data, or None), ``ctx.make_dataset(split)``,
    ``ctx.device``, ``ctx.dtype``, ``ctx.config`` (the validated :class:`harness.CellConfig`),
    ``ctx.input_spec`` (``input_size``, ``in_channels``, ``num_classes``, ``context_dim``),
    ``ctx.backbone_options``, ``ctx.build_backbone(device=None)`` (a fresh model from the
    cell's seed), ``ctx.abstract_model()`` (the model, or a meta-device copy when none was
    built), ``ctx.example_inputs(batch_size, model=None, device=None, generator=None)``,
    ``ctx.workdir`` (a folder of the cell's own for checkpoints, which a resumed cell finds
    again; None outside a suite), ``ctx.registry`` (``create(kind, name, **options)``,
    ``stages()``, ``flop_handles()``), ``ctx.train`` (the cell's training settings, a
    :class:`harness.TrainSpec`: the block of whichever stage validates its block as one, else
    the defaults; its schedule is what the cell's measurements use), ``ctx.specs`` (every
    validated block of the cell, by stage name) and ``ctx.calibration`` (a
    :class:`harness.Calibration` a stage that scores units sets, which
    :func:`harness.calibration_inputs` then draws). ``harness.train_model`` is the training
    loop stages share.

    ``active(spec) -> bool`` (optional) says whether a block asks for any work (``train:
    {steps: 0}`` does not: the stage is then skipped); ``description`` is its line in
    ``harness ls stage``. ``apply(model, value) -> dict`` (optional) applies the stage's result outside a suite:
    ``harness flops BACKBONE --STAGE VALUE`` calls it (``--prune bk-sdm-small``); a
    ``"summary"`` entry of the dict is printed, the rest joins the JSON output.
    ``check(config, spec)`` (optional) is called when the suite is validated and raises
    :class:`harness.UserError` when the block cannot apply to the cell's backbone, so a suite
    fails at that line before any work (the ``prune`` stage asks its criterion's ``check``).

    Example, a post-training quantisation::

        class QuantizeSpec(pydantic.BaseModel):
            model_config = {"extra": "forbid"}
            dtype: Literal["qint8"] = "qint8"

        def quantize(ctx, spec):
            ctx.model = torch.ao.quantization.quantize_dynamic(ctx.model.cpu(), {nn.Linear}, torch.qint8)
            ctx.extra["quantize"] = {"dtype": spec.dtype}

        @harness.hookimpl
        def harness_stages():
            return {"quantize": Stage(schema=QuantizeSpec, run=quantize, after=("train", "prune", "distill"))}
    """


@hookspec
def harness_commands():
    """Subcommands of the ``harness`` command line: ``{name: Command}``.

    A :class:`harness.Command` gives a one-line ``help``, ``arguments(parser)``
    adding its options to an argparse parser, and ``run(args) -> int`` returning the exit
    status. Raise :class:`harness.UserError` for bad input: the command line prints its one
    line and exits 2. A command with ``backbone_options=True`` also receives the
    ``--name value`` pairs after its own arguments as ``args.options`` (a backbone's
    factory options, see :func:`harness.backbone_context`). ``description`` (optional) is
    the longer text of ``harness COMMAND --help``. Names must not shadow
    the core's commands (run, validate, ls, plugins, table, leaderboard, plot, flops, new-plugin).
    """
