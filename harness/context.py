"""What a metric (or the trainer) sees of the cell it measures."""
from __future__ import annotations

import contextlib
import functools
import hashlib
from pathlib import Path
from typing import Any

import torch

from .errors import UserError
from .plugins import Registry, registry
from .suite import CellConfig

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# Conditioning inputs the backbone factory contract names; the rest are backbone options.
INPUT_KEYS = ("input_size", "in_channels", "num_classes", "context_dim")
# What a backbone is built for when neither the suite nor a data set says: the 32x32x4
# latent of a 256x256 image under the Stable Diffusion VAE, and ImageNet's 1000 classes
# (DiT's and LaMamba-Diff's setting).
DEFAULT_INPUTS = {"input_size": 32, "in_channels": 4, "num_classes": 1000}


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from the suite seed and any labels (cell id, purpose)."""
    digest = hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


class CellContext:
    """One cell's configuration, model, inputs and seeds.

    Seeds: ``seed(purpose)`` depends on the suite seed, the cell id and the purpose, so a
    rerun reproduces every draw. ``seed(purpose, shared=True)`` leaves the cell out: every
    candidate in a suite then sees the same data order and the same noise.
    """

    def __init__(self, suite: str, cell_id: str, seed: int, config: CellConfig,
                 workdir: Path | None = None, reg: Registry | None = None):
        self.suite = suite
        self.cell_id = cell_id
        self.suite_seed = seed
        self.config = config
        self.workdir = Path(workdir) if workdir else None
        self.registry = reg or registry()
        self.device = resolve_device(config.device)
        self.dtype = DTYPES[config.dtype]
        self.extra: dict[str, Any] = {}  # extra record fields (loss curve, pruning plan...)
        self.teacher: torch.nn.Module | None = None  # a stage's reference model (the unpruned one)
        # a stage's generated images, which the quality metrics score instead of sampling their own:
        # an object with ``folder`` (one PNG per sample, {i:06d}.png), ``teacher`` (the teacher's
        # folder, or None) and ``prompts`` (the text of each, or None); see harness.hookspecs.harness_stages
        self.samples: Any = None
        # the calibration set a stage asks units to be scored on (a harness.Calibration, read by
        # harness.calibration_inputs); None: the defaults
        self.calibration: Any = None
        # stage name -> how it changed what a sampling step computes (see change_sampling)
        self.sampling_changes: dict[str, str] = {}
        self._model: torch.nn.Module | None = None
        self._meta_model: torch.nn.Module | None = None

    # -- seeds ---------------------------------------------------------------------------
    def seed(self, purpose: str, shared: bool = False) -> int:
        parts = (self.suite_seed, purpose) if shared else (self.suite_seed, self.cell_id, purpose)
        return derive_seed(*parts)

    def generator(self, purpose: str, shared: bool = False, device: str | torch.device = "cpu") -> torch.Generator:
        return torch.Generator(device=device).manual_seed(self.seed(purpose, shared))

    # -- stages ------------------------------------------------------------------------------
    def change_sampling(self, stage: str, what: str) -> None:
        """Say that ``stage`` changed how a sampling step is computed (``what``: one sentence,
        e.g. "deep features reused on 2 of every 3 steps"). The entry of every metric that
        samples (``Metric.samples``) then carries ``sampling_changed_by: {stage: what}``."""
        self.sampling_changes[stage] = what

    @functools.cached_property
    def specs(self) -> dict[str, Any]:
        """The cell's stage blocks, validated by the schemas of the stages that own them."""
        from .suite import stage_specs

        return stage_specs(self.config, self.registry.stages())

    @property
    def train(self):
        """The cell's training settings (a :class:`harness.TrainSpec`): how the backbone is
        trained, and the noise schedule the cell's measurements use. They are the block of
        whichever stage validates its block as a ``TrainSpec`` (the core asks the schema, not
        the block's name); the defaults when the cell has none."""
        from .training import TrainSpec

        return next((spec for spec in self.specs.values() if isinstance(spec, TrainSpec)), None) or TrainSpec()

    # -- data and inputs ---------------------------------------------------------------------
    @functools.cached_property
    def dataset(self):
        """The training split of the cell's data set, or None without a ``data`` block."""
        return self.make_dataset("train")

    def make_dataset(self, split: str):
        spec = self.config.data
        if spec is None:
            return None
        return self.registry.create("dataset", spec.name, split=split, seed=self.seed("data", shared=True),
                                    **spec.options)

    @functools.cached_property
    def _given_inputs(self) -> dict[str, Any]:
        """Factory options from the suite, with the input shape the data set implies. A suite
        that states the shape itself (input_size, in_channels, num_classes, and context_dim
        unless the labels are classes) has no data set built for it: validating a paper suite
        must not load and encode ImageNet."""
        opts = self.config.backbone.options
        stated = all(opts.get(k) is not None for k in ("input_size", "in_channels", "num_classes")) and (
            opts["num_classes"] > 0 or opts.get("context_dim") is not None)
        if self.config.data is not None and not stated:
            ds = self.dataset
            derived = {"input_size": ds.resolution, "in_channels": ds.channels, "num_classes": ds.num_classes}
            if getattr(ds, "context_dim", 0):  # captioned data: the text encoder's width
                derived["context_dim"] = ds.context_dim
            for k, v in derived.items():
                opts.setdefault(k, v)
        return opts

    @functools.cached_property
    def backbone_options(self) -> dict[str, Any]:
        """What the factory is called with. The contract's inputs are always passed: the
        suite's option, else the data set's shape, else the factory's own default, else
        :data:`DEFAULT_INPUTS`."""
        comp = self.registry.get("backbone", self.config.backbone.name)
        opts = dict(self._given_inputs)
        defaults = comp.defaults()
        for k, v in DEFAULT_INPUTS.items():
            opts.setdefault(k, defaults.get(k, v))
        comp.check_options(opts)
        return opts

    @functools.cached_property
    def input_spec(self) -> dict[str, int]:
        spec = {k: self.backbone_options.get(k) for k in INPUT_KEYS}
        # A factory default of None means "the model decides" (e.g. a preset's native size):
        # read it back from the built model's attribute of the same name (structure only: a
        # model not built yet is read on the meta device, without weights).
        model = self.abstract_model()
        for k in ("input_size", "in_channels", "num_classes"):
            if spec[k] is None:
                spec[k] = getattr(model, k, None)
        # A text-conditioned model takes no class label whatever the factory's default says
        # (its num_classes attribute is 0); an explicit option still wins.
        if "num_classes" not in self._given_inputs and getattr(model, "num_classes", None) == 0:
            spec["num_classes"] = 0
        # 0 is "no text context" unless the built model says it takes one (an SD preset's
        # cross-attention width comes from its config, not from an option)
        spec["context_dim"] = spec["context_dim"] or getattr(model, "context_dim", 0) or 0
        missing = [k for k in ("input_size", "in_channels", "num_classes") if spec[k] is None]
        if missing:
            raise ValueError(f"backbone {self.config.backbone.name!r} gives no default for {missing}; "
                             "set them as backbone options or add a data block")
        return spec

    def build_backbone(self, device: str | torch.device | None = None) -> torch.nn.Module:
        device = torch.device(device) if device is not None else self.device
        if device.type == "meta":  # no values drawn on any device: the CPU generator is enough
            torch.default_generator.manual_seed(self.seed("init"))
            placement = _meta_building()
        else:
            torch.manual_seed(self.seed("init"))
            # on the default device the context would only add a hook to every torch call
            placement = contextlib.nullcontext() if device == torch.get_default_device() else torch.device(device)
        options = self.backbone_options  # outside the device context: it may build the data set
        with placement:
            model = self.registry.create("backbone", self.config.backbone.name, **options)
        return model

    def abstract_model(self) -> torch.nn.Module:
        """The cell's model as it stands, or the backbone on the meta device (no weights, the
        global RNG untouched) while nothing has built it: what parameter and FLOP counts need."""
        if self._model is not None:
            return self._model
        if self._meta_model is None:
            try:
                with torch.random.fork_rng(devices=[]):
                    self._meta_model = self.build_backbone(device="meta")
            except UserError:  # bad input (a checkpoint that is not there, a stalled URL): a real build
                raise          # would fail the same way, after waiting as long again
            except Exception:  # a factory that needs real tensors (weights loaded as it builds)
                return self.model
        return self._meta_model

    @property
    def model(self) -> torch.nn.Module:
        """The cell's model: built on first use, or whatever training/pruning left here."""
        if self._model is None:
            self._model = self.build_backbone()
        return self._model

    @model.setter
    def model(self, module: torch.nn.Module) -> None:
        self._model = module

    def example_inputs(self, batch_size: int = 1, model: torch.nn.Module | None = None,
                       device: torch.device | None = None, generator: torch.Generator | None = None) -> dict:
        model = model if model is not None else self.model
        device = device or next(iter(model.parameters()), torch.empty(0)).device
        return example_inputs(model, self.input_spec, batch_size, device, generator)


def example_inputs(model: torch.nn.Module, spec: dict, batch_size: int, device, generator=None) -> dict:
    """Forward keyword arguments for ``model``: its own ``example_inputs`` when it has one,
    else x, t and (labels or a 77-token context) shaped by ``spec``."""
    if hasattr(model, "example_inputs"):
        return model.example_inputs(batch_size, device=device, generator=generator)
    gen = generator or torch.Generator().manual_seed(0)
    n, c = spec["input_size"], spec["in_channels"]
    x = torch.randn(batch_size, c, n, n, generator=gen).to(device)
    t = torch.randint(0, 1000, (batch_size,), generator=gen).to(device)
    if spec.get("context_dim"):
        y = torch.randn(batch_size, 77, spec["context_dim"], generator=gen).to(device)
    elif spec.get("num_classes"):
        y = torch.randint(0, spec["num_classes"], (batch_size,), generator=gen).to(device)
    else:
        y = None
    return {"x": x, "t": t, "y": y}


def _skip_on_meta(init):
    @functools.wraps(init)
    def maybe(tensor, *args, **kwargs):
        return tensor if isinstance(tensor, torch.Tensor) and tensor.is_meta else init(tensor, *args, **kwargs)

    maybe.__wrapped_init__ = init
    return maybe


@contextlib.contextmanager
def _meta_building():
    """The meta device, with ``torch.nn.init``'s fills skipped for meta tensors: a meta tensor
    holds no values, yet PyTorch runs each fill through its Python reference kernels, which made
    a tiny DiT slower to build on meta (4.6 ms) than for real (3.5 ms). Real tensors, in any
    thread, are filled as usual: only meta ones are passed over."""
    init = torch.nn.init
    names = [n for n in dir(init) if n.endswith("_") and not n.startswith("_") and callable(getattr(init, n))]
    saved = {n: getattr(init, n) for n in names}
    try:
        for n, fn in saved.items():
            if not hasattr(fn, "__wrapped_init__"):  # already wrapped by an enclosing build
                setattr(init, n, _skip_on_meta(fn))
        with torch.device("meta"):
            yield
    finally:
        for n, fn in saved.items():
            setattr(init, n, fn)
