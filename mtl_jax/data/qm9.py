"""QM9 from the raw MoleculeNet files, featurised as PyTorch Geometric's ``QM9`` dataset (which the
Nash-MTL, FAMO and LibMTL QM9 experiments load), with Nash-MTL's 11 targets and split.

Files (``data.manual_dir``, or its ``raw/`` folder: PyG's ``<root>/raw``):

    gdb9.sdf             133,885 molecules (V2000 molfiles, hydrogens explicit, kekulised bonds)
    gdb9.sdf.csv         header + one row per molecule: mol_id, A, B, C, mu, alpha, homo, lumo, gap,
                         r2, zpve, u0, u298, h298, g298, cv, u0_atom, u298_atom, h298_atom, g298_atom
    uncharacterized.txt  (optional) the 3,054 molecules that failed the geometry consistency check;
                         9 header lines, one line per molecule starting with its 1-based index, a
                         footer line

Processing follows ``torch_geometric/datasets/qm9.py`` (``QM9.process`` with RDKit, PyG >= 2.0):

* targets: the csv's columns 1..19 reordered to mu, alpha, homo, lumo, gap, r2, zpve, U0, U, H, G, Cv,
  U0_atom, U_atom, H_atom, G_atom, A, B, C and multiplied by ``CONVERSION``: Hartree -> eV
  (``HAR2EV`` = 27.211386246) for homo, lumo, gap, zpve, U0, U, H, G; kcal/mol -> eV (``KCALMOL2EV``
  = 0.04336414) for the four atomisation energies (the csv's ``*_atom`` columns: PyG takes them from
  the csv; its ``atomrefs`` table only serves models that add per-atom reference energies).
* molecules: ``Chem.SDMolSupplier(gdb9.sdf, removeHs=False, sanitize=False)``; molecule ``i``
  (0-based) is skipped when ``i + 1`` is listed in uncharacterized.txt (PyG >= 1.6.3; 130,831 kept),
  and keeps csv row ``i``.
* node features (11): one-hot H C N O F, atomic number, aromatic, sp, sp2, sp3 (from RDKit's atom
  flags on the unsanitised molecule: for gdb9.sdf's kekulised molfiles RDKit reports no aromaticity and
  unspecified hybridisation, so these four are 0, exactly as in PyG's processed data), number of bonded
  hydrogens. Bonds: one-hot single, double, triple, aromatic. Positions: the conformer's (Angstrom).

Nash-MTL's tasks (``experiments/quantum_chemistry/utils.py``: ``target_idx = [0, 1, 2, 3, 5, 6, 12, 13,
14, 15, 11]`` of the 19 columns): mu (D), alpha (a0^3), homo, lumo (eV), r2 (a0^2), zpve, U0_atom,
U_atom, H_atom, G_atom (eV), Cv (cal / mol K); each a 1-output regression task (MSE loss) on the target
standardised with ``TargetStats`` (mean and unbiased std, as ``torch.std``). Nash-MTL reports the MAE in
the original units (MAE of the standardised target times its std; homo, lumo, zpve and the four energies
in meV in its tables): :func:`target_stats` returns the mean / std to convert with.

Split (Nash-MTL ``trainer.py``): after a random permutation of the kept molecules, test = the first
``num_test`` (the common ``data.num_test``, default 10,000), validation = the next ``num_validation`` (10,000), train = the rest (110,831).
Nash-MTL permutes with ``QM9(...).shuffle()`` (``torch.randperm`` under its seed, drawn after the
model's initialisation consumed the generator), which numpy cannot reproduce: here the permutation
is ``np.random.default_rng(split_seed).permutation``, the same sizes. Statistics: ``target_stats='train'``
(the train split's); 'all' = over every kept molecule, what LibMTL's ``examples/qm9/main.py`` does and
what Nash-MTL's code computes in effect (``train_dataset.data.y`` is the whole collated dataset).

Records: ``graph`` float32 [29, 131] (``mtl_jax.data.graphs.pack_graph``: nodes, positions, mask, bond
one-hots) and one float32 [1] target per task.
"""

from __future__ import annotations

import json
import os
from typing import NamedTuple

import numpy as np

from mtl_jax import tasks as T
from mtl_jax.config import Rule
from mtl_jax.data import graphs
from mtl_jax.data.manual_dir import (
    ManualDirBuilder, data_dir_of, listing_digest, manual_dir, prepared_sources, read_options, require_file)
from mtl_jax.data.sources import Dataset

HAR2EV = 27.211386246
KCALMOL2EV = 0.04336414
# PyG's 19 columns (csv columns 4..19 then 1..3) and their unit conversion.
COLUMNS = ("mu", "alpha", "homo", "lumo", "gap", "r2", "zpve", "U0", "U", "H", "G", "Cv", "U0_atom", "U_atom",
           "H_atom", "G_atom", "A", "B", "C")
CONVERSION = np.array([1., 1., HAR2EV, HAR2EV, HAR2EV, 1., HAR2EV, HAR2EV, HAR2EV, HAR2EV, HAR2EV, 1.,
                       KCALMOL2EV, KCALMOL2EV, KCALMOL2EV, KCALMOL2EV, 1., 1., 1.])
# Nash-MTL / FAMO / LibMTL's 11 targets (indices into COLUMNS).
TARGET_IDX = (0, 1, 2, 3, 5, 6, 12, 13, 14, 15, 11)
TASK_NAMES = tuple(COLUMNS[i] for i in TARGET_IDX)
ATOM_TYPES = {"H": 0, "C": 1, "N": 2, "O": 3, "F": 4}
UNCHARACTERIZED_HEADER_LINES = 9

OPTIONS = dict(manual_dir="", split_seed=0, num_validation=10_000, target_stats="train")
RULES = {"split_seed": Rule("int", 0, 2**32 - 1), "num_validation": Rule("int", 1),
         "target_stats": Rule("choice", choices=("train", "all"), what="target statistics")}


class TargetStats(NamedTuple):
    """Per task (``TASK_NAMES`` order): mean and std [11] in the original units."""

    mean: np.ndarray
    std: np.ndarray


def _rdkit():
    try:
        from rdkit import Chem, RDLogger
    except ImportError:
        raise ImportError("QM9 is parsed with RDKit: pip install rdkit") from None
    RDLogger.DisableLog("rdApp.*")
    return Chem


def qm9_files(root: str) -> tuple[str, str, str | None]:
    """(gdb9.sdf, gdb9.sdf.csv, uncharacterized.txt or None) in ``root`` or ``root/raw``."""
    folder = root if os.path.isfile(os.path.join(root, "gdb9.sdf")) or not os.path.isdir(
        os.path.join(root, "raw")) else os.path.join(root, "raw")
    sdf = require_file(os.path.join(folder, "gdb9.sdf"), "QM9")
    csv = require_file(os.path.join(folder, "gdb9.sdf.csv"), "QM9")
    skip = os.path.join(folder, "uncharacterized.txt")
    return sdf, csv, skip if os.path.isfile(skip) else None


def read_targets(path: str) -> np.ndarray:
    """float64 [N, 19] in PyG's column order and units (module docstring) from ``gdb9.sdf.csv``;
    ValueError naming the file and line of a malformed row."""
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")[1:]
    rows = []
    for number, line in enumerate(lines, start=2):
        if not line.strip():
            continue
        fields = line.split(",")
        try:
            rows.append([float(x) for x in fields[1:20]])
        except ValueError:
            rows.append([])
        if len(rows[-1]) != 19:
            raise ValueError(f"{path}: line {number} must be mol_id and 19 numbers (A, B, C, mu, ..., "
                             f"g298_atom); got {line[:80]!r}")
    y = np.asarray(rows, np.float64).reshape(len(rows), 19)
    return np.concatenate([y[:, 3:], y[:, :3]], axis=1) * CONVERSION


def read_skip(path: str | None) -> set:
    """0-based indices of uncharacterized.txt's molecules (PyG: lines[9:-2], first field minus 1)."""
    if path is None:
        return set()
    with open(path, encoding="utf-8") as f:
        lines = f.read().split("\n")
    skip = set()
    for number, line in enumerate(lines[UNCHARACTERIZED_HEADER_LINES:-2], start=UNCHARACTERIZED_HEADER_LINES + 1):
        first = line.split()[:1]
        if not first or not first[0].isdigit():
            raise ValueError(f"{path}: line {number} must start with a molecule's 1-based index; got {line[:80]!r}")
        skip.add(int(first[0]) - 1)
    return skip


def molecule_arrays(mol, path: str, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """PyG's (node features [n, 11], positions [n, 3], bond one-hots [n, n, 4]) of an RDKit molecule read
    with ``sanitize=False``; ValueError naming the file and molecule for an atom other than H C N O F."""
    from rdkit.Chem.rdchem import BondType, HybridizationType

    bond_types = {BondType.SINGLE: 0, BondType.DOUBLE: 1, BondType.TRIPLE: 2, BondType.AROMATIC: 3}
    n = mol.GetNumAtoms()
    nodes = np.zeros((n, graphs.NUM_NODE_FEATURES), np.float32)
    for atom in mol.GetAtoms():
        k, symbol = atom.GetIdx(), atom.GetSymbol()
        if symbol not in ATOM_TYPES:
            raise ValueError(f"{path}: molecule {index} has a {symbol} atom; QM9's atoms are {sorted(ATOM_TYPES)}")
        hybridization = atom.GetHybridization()
        nodes[k, ATOM_TYPES[symbol]] = 1.0
        nodes[k, 5:10] = (atom.GetAtomicNum(), atom.GetIsAromatic(), hybridization == HybridizationType.SP,
                          hybridization == HybridizationType.SP2, hybridization == HybridizationType.SP3)
    bonds = np.zeros((n, n, graphs.NUM_BOND_TYPES), np.float32)
    for bond in mol.GetBonds():
        a, b = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
        if bond.GetBondType() not in bond_types:
            raise ValueError(f"{path}: molecule {index} has a {bond.GetBondType()} bond; expected "
                             f"single, double, triple or aromatic")
        bonds[a, b, bond_types[bond.GetBondType()]] = bonds[b, a, bond_types[bond.GetBondType()]] = 1.0
    is_h = nodes[:, 0]
    nodes[:, 10] = (bonds.sum(-1) > 0).astype(np.float32) @ is_h  # bonded hydrogens per atom
    positions = np.asarray(mol.GetConformer().GetPositions(), np.float32).reshape(n, 3)
    return nodes, positions, bonds


def qm9_split(kept: np.ndarray, seed: int, num_test: int, num_validation: int) -> dict:
    """{split: molecule indices}: a permutation of ``kept`` cut into test, validation, train (in that
    order, Nash-MTL's); ValueError when a split would be empty."""
    if num_test < 1 or num_validation < 1:
        raise ValueError(f"QM9: data.num_test ({num_test}) and data.num_validation ({num_validation}) must be >= 1")
    if num_test + num_validation >= len(kept):
        raise ValueError(f"QM9: {len(kept)} molecules cannot hold num_test={num_test} + num_validation="
                         f"{num_validation} and a train split")
    order = kept[np.random.default_rng(seed).permutation(len(kept))]
    return {"test": order[:num_test], "validation": order[num_test:num_test + num_validation],
            "train": order[num_test + num_validation:]}


def _prepare(cfg):
    """(options, files, splits, targets [N, 19], stats) shared by :func:`load_qm9` and :func:`target_stats`."""
    o = read_options(cfg, OPTIONS, RULES)
    o["num_test"] = int(cfg.get("num_test", 10_000))  # the common data.num_test key
    sdf, csv, skip_path = qm9_files(manual_dir(cfg, "qm9"))
    y = read_targets(csv)
    skip = read_skip(skip_path)
    count = len(_rdkit().SDMolSupplier(sdf, removeHs=False, sanitize=False))
    if len(y) < count:
        raise ValueError(f"{csv}: {len(y)} rows for the {count} molecules of {sdf}")
    kept = np.array([i for i in range(count) if i not in skip], np.int64)
    splits = qm9_split(kept, o["split_seed"], o["num_test"], o["num_validation"])
    targets = y[:, TARGET_IDX]
    basis = targets[splits["train"] if o["target_stats"] == "train" else kept]
    stats = TargetStats(basis.mean(axis=0), basis.std(axis=0, ddof=1))
    if np.any(~(stats.std > 0)):
        raise ValueError(f"QM9: targets {[TASK_NAMES[k] for k in np.flatnonzero(~(stats.std > 0))]} are constant "
                         f"over the {len(basis)} molecules of the statistics; nothing to standardise by")
    return o, (sdf, csv, skip_path), splits, targets, stats


def target_stats(cfg) -> TargetStats:
    """Mean / std (original units, ``TASK_NAMES`` order) the targets of ``load_qm9(cfg)`` are
    standardised with: MAE in original units = MAE of the standardised target * std."""
    return _prepare(cfg)[4]


def load_qm9(cfg) -> Dataset:
    """QM9 (module docstring) from ``cfg.manual_dir``, prepared once under ``cfg.data_dir``."""
    o, (sdf, csv, skip_path), splits, targets, stats = _prepare(cfg)
    z = ((targets - stats.mean) / stats.std).astype(np.float32)

    def examples(split):
        def generate():
            suppl = _rdkit().SDMolSupplier(sdf, removeHs=False, sanitize=False)
            for i in splits[split]:
                mol = suppl[int(i)]
                if mol is None:
                    raise ValueError(f"{sdf}: molecule {int(i)} (0-based) could not be parsed by RDKit")
                graph = graphs.pack_graph(*molecule_arrays(mol, sdf, int(i)))
                yield {"graph": graph, **{name: z[i, k:k + 1] for k, name in enumerate(TASK_NAMES)}}
        return generate

    features = {"graph": ((graphs.MAX_NODES, graphs.graph_width()), np.float32),
                **{name: ((1,), np.float32) for name in TASK_NAMES}}
    files = [sdf, csv] + ([skip_path] if skip_path else [])
    name = (f"seed{o['split_seed']}_test{o['num_test']}_val{o['num_validation']}_{o['target_stats']}_"
            f"{listing_digest(files)}")
    builder = ManualDirBuilder(
        dataset_name="qm9", config_name=name, features=features,
        examples={split: examples(split) for split in ("train", "validation", "test")},
        description=__doc__ + "\nTarget mean / std: " + json.dumps(
            {n: [float(m), float(s)] for n, m, s in zip(TASK_NAMES, stats.mean, stats.std)}),
        data_dir=data_dir_of(cfg))
    tasks = tuple(T.regression(name, 1) for name in TASK_NAMES)
    return Dataset(name="qm9", tasks=tasks, splits=prepared_sources(builder), input_key="graph")
