"""ASE calculator for Crystalformer energy models: relaxations (``ase.optimize``, with
``ase.filters.FrechetCellFilter`` for the cell) and molecular dynamics (``ase.md``).

    from ase.filters import FrechetCellFilter
    from ase.optimize import BFGS
    from cfdist.calculator import CrystalformerCalculator

    atoms.calc = CrystalformerCalculator("model.pt")            # float64 on the CPU by default
    BFGS(FrechetCellFilter(atoms)).run(fmax=0.02)

Units are ASE's: energy eV, forces eV/A, stress eV/A^3 as a Voigt 6-vector
(xx, yy, zz, yz, xz, xy) in ASE's sign convention, sigma = (1/V) dE/d(strain) (a compressed cell
has negative diagonal stress; ``stress / ase.units.GPa`` is in GPa).

Image tables and the skin
-------------------------
A table lists every image within ``model.cutoff + skin`` of every atom. It stays valid while no
image that was outside ``cutoff + skin`` at the build can have come inside ``cutoff``: with the
cell deformed by F since the build (L = L_0 F, lattice vectors as rows) and every atom displaced by
at most u_max beyond that affine deformation, an image vector v_0 becomes v = v_0 F + (u_j - u_i),
so |v| >= s_min(F) |v_0| - 2 u_max. The calculator rebuilds the table as soon as
``s_min(F) (cutoff + skin) - 2 u_max < cutoff`` (without a cell change: as soon as any atom has
moved more than skin / 2, the rule of ASE's and vesin's neighbour lists), or when the atoms' count
or species change. Displacements are measured modulo lattice translations, so wrapping atoms back
into the cell (``atoms.wrap()``) does not force a rebuild. Images beyond the cutoff carry weight
exactly zero under the model's smooth cutoff envelope (by default the polynomial one, whose value,
first and second derivatives vanish at the cutoff, so forces and their derivatives are continuous
for MD and finite-displacement phonons; docs/model.md, Cutoff envelope), so a table with a skin
gives the same energies and forces as a fresh one (``tests/test_calculator.py`` checks this while atoms cross the
cutoff). A model without an envelope (``CrystalformerConfig(energy=True, envelope=False)``) is not
smooth at the cutoff and extra images would change it: the calculator then uses no skin and
rebuilds on every change.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import replace as dataclass_replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase.calculators.calculator import Calculator, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from cfdist.batch import collate
from cfdist.checkpoint import load
from cfdist.crystal import Crystal, validate
from cfdist.geometry import image_table
from cfdist.model import Crystalformer

_DTYPES = {"float64": torch.float64, "double": torch.float64, "float32": torch.float32, "float": torch.float32}


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[str(dtype)]
    except KeyError:
        raise ValueError(f"dtype must be 'float64' or 'float32', got {dtype!r}") from None


class CrystalformerCalculator(Calculator):
    """ASE calculator backed by a Crystalformer energy model (``CrystalformerConfig(energy=True)``).

    Args:
        model_or_checkpoint_path: a :class:`cfdist.Crystalformer` energy model (multi-task models
            work too) or the path of a portable checkpoint (:func:`cfdist.load`). A model whose
            dtype or device differ from ``dtype`` / ``device`` is copied, never changed in place.
        device: torch device to run on ("cpu", "cuda", ...).
        dtype: "float64" (default: forces and stress exact to ~1e-12, energy conserved in MD) or
            "float32". Energies are summed in float64 either way.
        skin: extra radius (A) of the image tables beyond ``model.cutoff``; tables are rebuilt
            only when atoms (or the cell) have moved enough to matter (see the module docstring).
            0 rebuilds on every change of positions or cell.
        validate: check every structure a table is built for with :func:`cfdist.crystal.validate`
            (elements, finite values, volume; overlaps are not checked).
        head: a model pretrained on a dataset mixture: the dataset whose energy head computes.
        **kwargs: passed to :class:`ase.calculators.calculator.Calculator`.

    Results: ``energy`` and ``free_energy`` (eV, the same value), ``forces`` (N, 3) eV/A,
    ``stress`` (6,) eV/A^3 in ASE's Voigt order and sign convention. All four are computed by one
    forward and backward pass. ``n_table_builds`` counts the image-table builds so far.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(self, model_or_checkpoint_path: Any, device: str | torch.device = "cpu",
                 dtype: str | torch.dtype = "float64", skin: float = 1.0, validate: bool = True,
                 head: str | None = None, **kwargs):
        super().__init__(**kwargs)

        if isinstance(model_or_checkpoint_path, Crystalformer):
            model = model_or_checkpoint_path
        elif isinstance(model_or_checkpoint_path, (str, Path)):
            model = load(model_or_checkpoint_path)
        else:
            raise TypeError(f"CrystalformerCalculator needs a cfdist.Crystalformer or a checkpoint path, got "
                            f"{type(model_or_checkpoint_path).__name__}")
        if model.config.heads:  # pretrained on a mixture: one dataset's energy head computes
            if head is None:
                raise ValueError(f"the model has a head per dataset: pass head= one of its energy heads "
                                 f"{[h.name for h in model.config.heads if h.energy]}")
            model = model.for_dataset(head)
        elif head is not None:
            raise ValueError(f"head={head!r}: the model has no per-dataset heads")
        if not model.config.energy:
            raise ValueError("CrystalformerCalculator needs an energy model (CrystalformerConfig(energy=True)); "
                             f"this is a property-only model predicting {model.config.target_names}, which has "
                             "no energy, forces or stress")
        device, torch_dtype = torch.device(device), _torch_dtype(dtype)
        weight = model.embedding.weight
        if weight.dtype != torch_dtype or weight.device != device:
            model = copy.deepcopy(model).to(device=device, dtype=torch_dtype)
        self.model = model
        self.device = device
        self.dtype = torch_dtype
        if not (math.isfinite(skin) and skin >= 0):
            raise ValueError(f"skin must be finite and >= 0, got {skin}")
        if not model.config.envelope and skin > 0:
            warnings.warn("the model has no cutoff envelope (envelope=False): images in a skin beyond the cutoff "
                          "would change its energy, so the calculator uses skin=0 and rebuilds tables on every "
                          "change", stacklevel=2)
            skin = 0.0
        self.skin = float(skin)
        self.validate = bool(validate)
        self.n_table_builds = 0
        self._table: dict[str, Any] | None = None

    @property
    def cutoff(self) -> float:
        """The model's cutoff (A); tables reach ``cutoff + skin``."""
        return float(self.model.cutoff)

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        if not np.asarray(atoms.pbc, dtype=bool).all():
            raise ValueError(f"CrystalformerCalculator models periodic crystals: the atoms must be periodic "
                             f"along all three axes (pbc={tuple(bool(p) for p in atoms.pbc)})")
        numbers = np.asarray(atoms.numbers, dtype=np.int64)
        lattice = np.array(atoms.cell.array, dtype=np.float64)
        positions = np.array(atoms.positions, dtype=np.float64)
        model_positions = self._positions_for_table(numbers, lattice, positions)
        if model_positions is None:
            self._build_table(atoms, numbers, lattice, positions)
            model_positions = positions
        batch = dataclass_replace(
            self._table["batch"],
            positions=torch.as_tensor(model_positions, dtype=torch.float64, device=self.device),
            lattice=torch.as_tensor(lattice[None], dtype=torch.float64, device=self.device))
        model = self.model
        was_training = model.training
        model.eval()
        try:
            out = model.energy_forward(batch, forces=True, stress=True, create_graph=False)
        finally:
            model.train(was_training)
        energy = float(out.energy.detach()[0])
        stress = out.stress.detach()[0].to("cpu", torch.float64).numpy()
        self.results = {
            "energy": energy,
            "free_energy": energy,
            "forces": out.forces.detach().to("cpu", torch.float64).numpy(),
            "stress": full_3x3_to_voigt_6_stress(stress),
        }

    def _positions_for_table(self, numbers: np.ndarray, lattice: np.ndarray,
                             positions: np.ndarray) -> np.ndarray | None:
        """Positions to use with the current table (each atom moved by the lattice translation that
        brings it next to its position at the build), or None when the table must be rebuilt."""
        table = self._table
        if table is None or not np.array_equal(numbers, table["numbers"]):
            return None
        if np.array_equal(lattice, table["lattice"]):
            inverse, smallest_stretch = table["inverse"], 1.0
        else:
            if abs(np.linalg.det(lattice)) < 1e-12:
                return None
            inverse = np.linalg.inv(lattice)
            # L = L_0 F: the deformation since the build and its smallest singular value
            smallest_stretch = float(np.linalg.svd(table["inverse"] @ lattice, compute_uv=False)[-1])
        frac = positions @ inverse
        moved = frac - table["frac"]
        translation = np.round(moved)
        moved -= translation  # displacement modulo lattice translations, fractional
        displacement = moved @ lattice  # beyond the affine deformation of the cell (A)
        u_max = math.sqrt(float(np.einsum("ix,ix->i", displacement, displacement).max(initial=0.0)))
        reach = self.cutoff + self.skin
        if not smallest_stretch * reach - 2.0 * u_max >= self.cutoff:  # also catches NaN
            return None
        if not translation.any():
            return positions
        return positions - translation @ lattice

    def _build_table(self, atoms, numbers: np.ndarray, lattice: np.ndarray, positions: np.ndarray) -> None:
        crystal = Crystal(str(atoms.info.get("id", "atoms")) if atoms.info else "atoms", numbers, lattice, positions)
        if self.validate:
            validate(crystal, check_overlap=False)
        table = image_table(lattice, positions, self.cutoff + self.skin)
        batch = collate([crystal], [table]).to(self.device)
        self._table = {"numbers": numbers.copy(), "lattice": lattice.copy(), "inverse": np.linalg.inv(lattice),
                       "frac": positions @ np.linalg.inv(lattice), "batch": batch}
        self.n_table_builds += 1
