"""Molecules as graphs: RDKit parses each SMILES, PyG's ``from_smiles`` builds the graph.

Atoms are nodes, bonds are edges in both directions. Each atom carries nine
categorical features from PyG's ``x_map`` (atomic number, chirality, degree,
formal charge, number of hydrogens, radical electrons, hybridisation,
aromaticity, ring membership), one-hot encoded into :data:`ATOM_FEATURES`
floats when a batch is built. Each bond carries three (bond type, stereo,
conjugation) in ``edge_attr``; the GraphConv and GIN layers use connectivity
only (bond order shows in the atoms' hydrogens, hybridisation and aromaticity).

``from_smiles`` returns an *empty* graph for a SMILES RDKit cannot parse, without
an error; :func:`featurise` reports those as invalid instead.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from rdkit import Chem, RDLogger
from rdkit.Chem.Scaffolds import MurckoScaffold
from torch_geometric.data import Data
from torch_geometric.utils import from_smiles
from torch_geometric.utils.smiles import x_map

# One name per one-hot column, in order: the agreed "features" of every molecule study.
ATOM_FEATURES: tuple[str, ...] = tuple(f"{key}={value}" for key, values in x_map.items() for value in values)
_SIZES = torch.tensor([len(values) for values in x_map.values()])
_OFFSETS = torch.cumsum(torch.cat([torch.zeros(1, dtype=torch.long), _SIZES[:-1]]), 0)


@contextlib.contextmanager
def _quiet_rdkit() -> Iterator[None]:
    """RDKit prints a parse error per bad SMILES to stderr; we report them ourselves, once."""
    RDLogger.DisableLog("rdApp.*")
    try:
        yield
    finally:
        RDLogger.EnableLog("rdApp.*")


def featurise(smiles: Sequence[object]) -> tuple[list[Data | None], list[int]]:
    """One graph per SMILES, ``None`` where the SMILES is missing, unparsable or has no atoms.

    Returns the graphs (aligned with the input) and the positions of the invalid ones.
    """
    graphs: list[Data | None] = []
    invalid: list[int] = []
    with _quiet_rdkit():
        for i, text in enumerate(smiles):
            graph = None
            if isinstance(text, str) and text.strip():
                graph = from_smiles(text.strip())  # an empty graph when RDKit cannot parse it
                graph.x = graph.x.to(torch.uint8)  # category indices; one-hot per batch (memory)
                if graph.num_nodes == 0:
                    graph = None
            if graph is None:
                invalid.append(i)
            graphs.append(graph)
    return graphs, invalid


def atom_one_hot(x: torch.Tensor) -> torch.Tensor:
    """Category indices ``[atoms, 9]`` to float one-hot features ``[atoms, len(ATOM_FEATURES)]``."""
    out = torch.zeros(x.shape[0], len(ATOM_FEATURES))
    if x.shape[0]:
        out.scatter_(1, x.long() + _OFFSETS, 1.0)
    return out


def scaffold(smiles: str) -> str | None:
    """Bemis-Murcko scaffold SMILES (ring systems and linkers); ``""`` for acyclic, ``None`` if invalid."""
    with _quiet_rdkit():
        mol = Chem.MolFromSmiles(smiles) if isinstance(smiles, str) and smiles.strip() else None
        if mol is None or mol.GetNumAtoms() == 0:
            return None
        return MurckoScaffold.MurckoScaffoldSmiles(mol=mol, includeChirality=False)
