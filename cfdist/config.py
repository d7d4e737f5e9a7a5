"""Typed configuration: the model's hyper-parameters, and the machinery every config uses.

- :class:`CrystalformerConfig`: the defaults reproduce the published Crystalformer
  (``docs/model.md``). The single place where the image-table cutoff is derived from a config
  is :func:`table_cutoff`; preprocessing, batching and prediction all call it.
- :func:`from_mapping` / :func:`build`: dataclasses from YAML mappings; unknown keys are errors
  with a did-you-mean hint; nested dataclass sections recurse.
- :func:`apply_overrides`: ``a.b=value`` command-line overrides (values parsed as YAML).
- :func:`resolve_config`: a config by packaged name (``crystalformer``, ``megnet_slice``, ``zero2``;
  shipped inside the package, so a wheel install finds them) or by path.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from cfdist.crystal import MAX_Z

CONFIG_KINDS = ("model", "pretrain", "finetune", "deepspeed")
ENVELOPE_KINDS = ("polynomial", "cubic")
# run settings that older model configs held, with the values those configs defaulted to
RUN_SETTINGS = {"compile": False, "entry_chunk": 32}
# per-target output transforms (CrystalformerConfig.target_transforms; cfdist.model applies them)
OUTPUT_TRANSFORMS = ("identity", "softplus", "log")


class ConfigError(ValueError):
    """A configuration file or mapping is malformed (unknown key, bad value)."""


@dataclass
class HeadSpec:
    """One output head of a multi-dataset (mixture) model: a dataset's name, whether it predicts
    energies (per-atom energy head on per-element references; forces / stress by autograd) or
    properties (mean-pooled MLP, one output per target), its targets and their output transforms.

    Attributes:
        name: the dataset's name (``data.datasets[i].name``); metrics are ``mae/<name>/<component>``.
        energy: an energy head (its one target is the total-energy label) instead of a property head.
        targets: property targets (a property head), or the one energy label (an energy head).
        transforms: {target: output transform} of a property head (as ``target_transforms``).
    """

    name: str
    energy: bool = False
    targets: list[str] = field(default_factory=list)
    transforms: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        self.targets = list(self.targets)
        self.transforms = {str(k): str(v) for k, v in dict(self.transforms or {}).items()}
        if not self.name or "/" in self.name:
            raise ConfigError(f"head name {self.name!r}: needs a non-empty name without '/' (metric names are "
                              f"mae/<name>/<component>)")
        if self.energy and len(self.targets) != 1:
            raise ConfigError(f"head {self.name!r}: an energy head has one target, the total-energy label; "
                              f"got {self.targets}")
        if not self.energy and not self.targets:
            raise ConfigError(f"head {self.name!r}: a property head needs at least one target")
        if self.energy and self.transforms:
            raise ConfigError(f"head {self.name!r}: an energy head takes no output transforms")
        for name, kind in self.transforms.items():
            if name not in self.targets:
                raise ConfigError(f"head {self.name!r}: transforms names {name!r}, not one of its targets {self.targets}")
            if kind not in OUTPUT_TRANSFORMS:
                raise ConfigError(f"head {self.name!r}: transforms[{name!r}] = {kind!r}; choose one of {OUTPUT_TRANSFORMS}")

    @property
    def property_targets(self) -> list[str]:
        """The targets of a property head ([] for an energy head)."""
        return [] if self.energy else list(self.targets)

    def transform_of(self, target: str) -> str:
        return self.transforms.get(target, "identity")


@dataclass
class CrystalformerConfig:
    """Hyper-parameters of :class:`cfdist.Crystalformer`.

    Attributes:
        n_blocks: number of encoder blocks (paper: 4; "larger model": 7).
        d_model: atom-state width d.
        n_heads: attention heads H (head width d / H).
        d_ff: hidden width of the feed-forward layer.
        n_basis: Gaussian basis functions K of the edge encoding psi; 0 gives the
            "simplified" model without psi / beta.
        r0: distance scale r_0 (A); sigma = r0 / sqrt(rho).
        rho_lower_bound: b, the lower bound of rho; sigma <= r0 / sqrt(b).
        rho_beta: slope beta of the ELU in rho.
        gbf_r_max: largest Gaussian basis centre r_max (A); centres are k*r_max/K, k = 1..K.
        gbf_width_scale: basis width as a multiple of the centre spacing r_max / K.
        cutoff_sigmas: c, the image-table cutoff in units of the largest reachable
            sigma (r_c = c * r0 / sqrt(b)).
        n_elements: size of the one-hot species input (Z = 1..n_elements).
        head_hidden: hidden width of the output MLP.
        target_names: names of the predicted (intensive, mean-pooled) targets; the property
            head has one output per name. May be empty for an energy-only model.
        target_transforms: {target: transform} so that predictions respect the target's domain
            (:data:`OUTPUT_TRANSFORMS`; targets not named are ``identity``). ``softplus``: the
            prediction is std * softplus(h + mean / std) >= 0 (band gaps, moduli), identity far
            above zero; ``log``: the model learns log10 of the target (quantities spanning decades;
            normalisation, loss and MAE in log10 units, non-positive labels count as missing) and
            predicts 10 ** (log10 prediction) > 0. Part of the model, so checkpoints and
            ``predict`` keep it (docs/model.md, "Output transforms").
        energy: add the energy head: per-atom energies summed per crystal on top of per-element
            reference energies (extensive, eV); forces and stress by autograd
            (:meth:`cfdist.Crystalformer.forward` with ``forces`` / ``stress``).
        envelope: multiply the within-pair image weights by a smooth switch f(d) that falls from 1
            at ``cutoff - envelope_width`` to 0 at the cutoff, so energy and forces are continuous
            when atoms cross the cutoff (needed for MD, relaxations and phonons). None: on for
            energy models, off otherwise (the paper's property model is unchanged).
        envelope_width: width of the switching shell (A).
        envelope_kind: the switch's shape (:func:`cfdist.graph.cutoff_envelope`): ``"polynomial"``
            (DimeNet's p = 6 polynomial: f, f' and f'' vanish at the cutoff, so forces have a
            continuous derivative; the default) or ``"cubic"`` (1 - 3x^2 + 2x^3: f and f' only; what
            cfdist 0.1.0 used, and what a saved config without this key gets, see :meth:`from_dict`).
        heads: a multi-dataset (mixture) model's output heads, one per dataset, on the shared
            encoder (:class:`HeadSpec`; docs/model.md, "Dataset mixtures"). Non-empty: the model has
            no head of its own (``target_names`` empty, ``energy`` false) and every forward names
            its dataset. ``envelope`` None then means on if any head is an energy head.
    """

    n_blocks: int = 4
    d_model: int = 128
    n_heads: int = 8
    d_ff: int = 512
    n_basis: int = 64
    r0: float = 1.4
    rho_lower_bound: float = 0.5
    rho_beta: float = 0.1
    gbf_r_max: float = 14.0
    gbf_width_scale: float = 1.0
    cutoff_sigmas: float = 4.5
    n_elements: int = MAX_Z
    head_hidden: int = 128
    target_names: list[str] = field(default_factory=lambda: ["y"])
    target_transforms: dict[str, str] = field(default_factory=dict)
    energy: bool = False
    envelope: bool | None = None
    envelope_width: float = 1.0
    envelope_kind: str = "polynomial"
    heads: list[HeadSpec] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.target_names = list(self.target_names)
        self.heads = [h if isinstance(h, HeadSpec) else from_mapping(HeadSpec, h, source="model config: heads")
                      for h in self.heads]
        if self.heads:
            if self.energy or self.target_names:
                raise ConfigError("CrystalformerConfig: a model with per-dataset heads has no head of its own: "
                                  f"energy must be false and target_names empty (got energy={self.energy}, "
                                  f"target_names={self.target_names})")
            names = [h.name for h in self.heads]
            if len(set(names)) != len(names):
                raise ConfigError(f"CrystalformerConfig: head names must be unique, got {names}")
        if self.envelope is None:
            self.envelope = bool(self.energy) or any(h.energy for h in self.heads)
        checks = [
            (self.n_blocks >= 1, "n_blocks must be >= 1"),
            (self.d_model >= 1 and self.n_heads >= 1, "d_model and n_heads must be >= 1"),
            (self.d_model % self.n_heads == 0, "d_model must be divisible by n_heads"),
            (self.d_ff >= 1, "d_ff must be >= 1"),
            (self.n_basis >= 0, "n_basis must be >= 0 (0 = simplified model)"),
            (self.r0 > 0, "r0 must be > 0"),
            (0 < self.rho_lower_bound < 1, "rho_lower_bound must be in (0, 1)"),
            (self.rho_beta > 0, "rho_beta must be > 0"),
            (self.gbf_r_max > 0 and self.gbf_width_scale > 0, "gbf_r_max and gbf_width_scale must be > 0"),
            (self.cutoff_sigmas > 0, "cutoff_sigmas must be > 0"),
            (1 <= self.n_elements <= 118, "n_elements must be in 1..118"),
            (len(self.target_names) >= 1 or self.energy or bool(self.heads),
             "target_names must name at least one target (or energy=True for an energy-only model)"),
            (self.envelope_width > 0, "envelope_width must be > 0"),
            (not self.envelope or self.envelope_width < self.cutoff_sigmas * self.r0 / math.sqrt(self.rho_lower_bound),
             "envelope_width must be smaller than the cutoff"),
            (self.envelope_kind in ENVELOPE_KINDS,
             f"envelope_kind must be one of {', '.join(ENVELOPE_KINDS)}, got {self.envelope_kind!r}"),
            (len(set(self.target_names)) == len(self.target_names), "target_names must be unique"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(f"CrystalformerConfig: {message}")
        self.check_transforms()

    def check_transforms(self) -> None:
        """:class:`ConfigError` unless every ``target_transforms`` entry names a target and a known transform."""
        if not isinstance(self.target_transforms, Mapping):
            raise ConfigError(f"CrystalformerConfig: target_transforms must be a mapping target -> transform, "
                              f"got {self.target_transforms!r}")
        self.target_transforms = {str(k): str(v) for k, v in self.target_transforms.items()}
        for name, kind in self.target_transforms.items():
            if name not in self.target_names:
                raise ConfigError(f"CrystalformerConfig: target_transforms names {name!r}, which is not a target "
                                  f"(targets: {self.target_names})")
            if kind not in OUTPUT_TRANSFORMS:
                raise ConfigError(f"CrystalformerConfig: target_transforms[{name!r}] = {kind!r}; "
                                  f"choose one of {OUTPUT_TRANSFORMS}")

    def transform_of(self, target: str) -> str:
        """The output transform of ``target`` (``identity`` when none is set)."""
        return self.target_transforms.get(target, "identity")

    def head(self, name: str) -> HeadSpec:
        """The per-dataset head called ``name`` (:class:`ConfigError` naming the heads if none is)."""
        for spec in self.heads:
            if spec.name == name:
                return spec
        raise ConfigError(f"the model has no head {name!r}; its heads: {[h.name for h in self.heads] or 'none'}")

    @property
    def any_energy(self) -> bool:
        """Whether the model predicts energies (its own energy head, or a dataset's)."""
        return bool(self.energy) or any(h.energy for h in self.heads)

    @property
    def n_targets(self) -> int:
        return len(self.target_names)

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def sigma_max(self) -> float:
        """Largest Gaussian width any head can reach: r0 / sqrt(b) (A)."""
        return self.r0 / math.sqrt(self.rho_lower_bound)

    @property
    def cutoff(self) -> float:
        """Image-table cutoff radius r_c in A (see :func:`table_cutoff`)."""
        return table_cutoff(self)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "model config") -> "CrystalformerConfig":
        """From a mapping: a YAML model section, or a config saved in a checkpoint.

        Two kinds of keys of older configs are read, not refused: the run settings ``compile`` and
        ``entry_chunk`` (now :class:`cfdist.run.config.ComputeSection`; dropped here, with a warning
        when set to anything but their old defaults), and a saved energy config without
        ``envelope_kind`` (its ``envelope`` resolved to true by cfdist 0.1.0) keeps the cubic switch
        it was trained with.
        """
        data = dict(data)
        moved = {key: data.pop(key) for key in RUN_SETTINGS if key in data}
        changed = {key: value for key, value in moved.items() if value != RUN_SETTINGS[key]}
        if changed:
            warnings.warn(f"{source}: {', '.join(f'{k}={v!r}' for k, v in changed.items())} in the model config "
                          f"ignored: these are run settings now, set compute.{next(iter(changed))} in the run config "
                          f"(cfdist.run.config.ComputeSection)", UserWarning, stacklevel=2)
        if data.get("envelope") is True and "envelope_kind" not in data:
            data["envelope_kind"] = "cubic"  # what cfdist 0.1.0 recorded as envelope: true
        return from_mapping(cls, data, source=source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "CrystalformerConfig":
        """From a YAML file, or a packaged model config by name (``crystalformer``, ``crystalformer_7blocks``, ...)."""
        path = resolve_config(path, "model")
        return cls.from_dict(load_yaml(path), source=str(path))


def table_cutoff(config: CrystalformerConfig) -> float:
    """The image-table cutoff r_c = c * sigma_max = c * r0 / sqrt(b), in A.

    Every head's Gaussian has sigma <= sigma_max, so a table holding every image
    within r_c truncates sum_n exp(-d^2 / 2 sigma^2) at no less than c sigma.
    """
    return config.cutoff_sigmas * config.sigma_max


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    text = Path(path).read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def from_mapping(cls: type, data: Mapping[str, Any], source: str = "config"):
    """Build dataclass ``cls`` from ``data``, rejecting unknown keys (with a hint)."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        import difflib

        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, sorted(names), n=1)
            hints.append(f"{key!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
        raise ConfigError(f"{source}: unknown key(s) for {cls.__name__}: {', '.join(hints)}; "
                          f"allowed: {', '.join(sorted(names))}")
    try:
        return cls(**dict(data))
    except TypeError as exc:
        raise ConfigError(f"{source}: {exc}") from exc


def _packaged_folder(kind: str):
    """The folder of packaged configs of ``kind``: ``cfdist/configs/<kind>`` inside the installed package.

    In a checkout ``cfdist/configs`` is a symlink to the top-level ``configs/`` (the one copy in git);
    a built wheel holds the files themselves (package data), so the lookup is the same either way.
    """
    if kind not in CONFIG_KINDS:
        raise ConfigError(f"unknown config kind {kind!r}; kinds: {', '.join(CONFIG_KINDS)}")
    return importlib.resources.files("cfdist") / "configs" / kind


def packaged_configs(kind: str) -> list[str]:
    """Names of the configs of ``kind`` shipped with cfdist (``configs/<kind>/*.yaml``)."""
    folder = _packaged_folder(kind)
    return sorted(entry.name[:-5] for entry in folder.iterdir() if entry.name.endswith(".yaml"))


def resolve_config(name_or_path: str | Path, kind: str) -> Path:
    """The YAML file a config argument names: an existing path as is, else a packaged config.

    Packaged configs are found by name (``megnet_slice``) or by ``<kind>/<name>``.
    """
    path = Path(name_or_path)
    if path.is_file():
        return path
    name = path.name[:-5] if path.name.endswith(".yaml") else path.name
    if path.parts[:-1] in ((), (kind,)) and name in packaged_configs(kind):
        return Path(str(_packaged_folder(kind) / f"{name}.yaml"))
    raise ConfigError(f"{kind} config {str(name_or_path)!r}: no such file, and no packaged {kind} config of that "
                      f"name (packaged: {', '.join(packaged_configs(kind))})")


def build(cls: type, data: Mapping[str, Any], source: str):
    """Dataclass ``cls`` from a mapping; nested dataclass fields recurse; unknown keys raise."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{source}: expected a mapping for {cls.__name__}, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    values = dict(data)
    for f in dataclasses.fields(cls):
        kind = hints.get(f.name)
        if dataclasses.is_dataclass(kind) and f.name in values:
            values[f.name] = build(kind, values[f.name] or {}, f"{source}: {f.name}")
        elif typing.get_origin(kind) is list and f.name in values and values[f.name] is not None:
            (item,) = typing.get_args(kind) or (None,)
            if dataclasses.is_dataclass(item):
                if not isinstance(values[f.name], list):
                    raise ConfigError(f"{source}: {f.name} must be a list, got {type(values[f.name]).__name__}")
                values[f.name] = [v if isinstance(v, item) else build(item, v, f"{source}: {f.name}[{i}]")
                                  for i, v in enumerate(values[f.name])]
        elif kind is float and isinstance(values.get(f.name), str):
            # PyYAML (YAML 1.1) reads ``3e-4`` (no dot) as a string; a float field takes it as a number
            try:
                values[f.name] = float(values[f.name])
            except ValueError:
                raise ConfigError(f"{source}: {f.name} must be a number, got {values[f.name]!r}") from None
    return from_mapping(cls, values, source=source)


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """``a.b=value`` strings into a nested mapping; values parsed as YAML (``3e-4``, ``[a, b]``, ``true``)."""
    import yaml

    data = _deep_copy(data)
    loader = _override_loader()
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value (e.g. optim.lr=3e-4)")
        key, raw = item.split("=", 1)
        value = yaml.load(raw, Loader=loader) if raw != "" else ""
        node = data
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = value
    return data


def inline_named_model(data: dict, overrides: list[str], default: str = "crystalformer") -> dict:
    """Before ``model.<key>=value`` overrides of a run config: a ``model`` given by name (or absent:
    ``default``) is replaced by that model config's mapping, so the override edits its settings
    (``model.n_basis=0`` on ``model: crystalformer`` edits that named model config)."""
    model = data.get("model", default)
    if isinstance(model, str) and any(o.strip().startswith("model.") for o in overrides):
        data = {**data, "model": load_yaml(resolve_config(model, "model"))}
    return data


def _override_loader():
    """SafeLoader that also reads YAML 1.2 floats without a dot or exponent sign (``3e-4``, ``1e5``)."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
        list("-+0123456789"))
    return Loader


def _deep_copy(data):
    if isinstance(data, Mapping):
        return {k: _deep_copy(v) for k, v in data.items()}
    if isinstance(data, list):
        return [_deep_copy(v) for v in data]
    return data
