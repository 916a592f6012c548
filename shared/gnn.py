"""The molecule GNN, readable two ways with the same parameters: sparse (PyG) and dense.

Sparse: PyG's ``GraphConv`` or ``GINConv`` over a batch of graphs glued into one
(fast training and evaluation). Dense: the same layers written as matrix
products over graphs padded to a common size, ``adjacency @ h``; one padded
graph is then one row of a tensor, which is what per-molecule DP-SGD needs
(``torch.func.vmap`` over graphs; Opacus would take atoms for the batch).
Both read identical parameters, so a model trained one way is the model
evaluated the other; a test checks they agree.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch_geometric.data import Data
from torch_geometric.nn import GINConv, GraphConv, global_add_pool, global_mean_pool

from shared.molecules import ATOM_FEATURES, atom_one_hot

SparseBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]  # x, edge_index, batch, number of graphs
DenseBatch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # x [B,N,F], adjacency [B,N,N], atom mask [B,N]


class MoleculeGNN(nn.Module):
    """Atom embedding, message-passing layers with ReLU, graph pooling, one output per task."""

    def __init__(self, n_features: int, n_outputs: int, widths: Sequence[int], conv: str = "graphconv", pooling: str = "mean") -> None:
        super().__init__()
        self.embed = nn.Linear(n_features, widths[0])
        self.convs = nn.ModuleList()
        width = widths[0]
        for w in widths:
            if conv == "graphconv":
                self.convs.append(GraphConv(width, w, aggr="add"))
            elif conv == "gin":
                self.convs.append(GINConv(nn.Sequential(nn.Linear(width, w), nn.ReLU(), nn.Linear(w, w)), train_eps=False))
            else:
                raise ValueError(f"unknown conv {conv!r}")
            width = w
        self.out = nn.Linear(width, n_outputs)
        self.conv, self.pooling, self.n_outputs = conv, pooling, n_outputs

    def _shape(self, y: torch.Tensor) -> torch.Tensor:
        return y.squeeze(-1) if self.n_outputs == 1 else y

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor, batch: torch.Tensor, num_graphs: int) -> torch.Tensor:
        h = self.embed(x)
        for conv in self.convs:
            h = torch.relu(conv(h, edge_index))
        pool = global_mean_pool if self.pooling == "mean" else global_add_pool
        return self._shape(self.out(pool(h, batch, size=num_graphs)))

    def forward_dense(self, x: torch.Tensor, adj: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The same function on padded graphs; ``adj[b, i, j] = 1`` for a bond message j -> i."""
        h = self.embed(x)
        for conv in self.convs:
            if self.conv == "graphconv":  # GraphConv: lin_rel(sum of neighbours) + lin_root(self)
                h = conv.lin_rel(adj @ h) + conv.lin_root(h)
            else:  # GIN with eps = 0: mlp(self + sum of neighbours)
                h = conv.nn(h + adj @ h)
            h = torch.relu(h)
        m = mask.unsqueeze(-1).to(h.dtype)
        pooled = (h * m).sum(-2)
        if self.pooling == "mean":
            pooled = pooled / m.sum(-2).clamp_min(1.0)
        return self._shape(self.out(pooled))


class DenseView(nn.Module):
    """The GNN's dense reading as a module of its own (shares, not copies, the parameters)."""

    def __init__(self, gnn: MoleculeGNN) -> None:
        super().__init__()
        self.gnn = gnn

    def forward(self, x: torch.Tensor, adj: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.gnn.forward_dense(x, adj, mask)


def sparse_batch(graphs: Sequence[Data]) -> SparseBatch:
    """Glue graphs into one disconnected graph (PyG's mini-batching), atoms one-hot encoded."""
    if not graphs:
        return atom_one_hot(torch.zeros(0, 9, dtype=torch.uint8)), torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, dtype=torch.long), 0
    sizes = torch.tensor([g.num_nodes for g in graphs])
    offsets = torch.cumsum(sizes, 0) - sizes
    x = atom_one_hot(torch.cat([g.x for g in graphs]))
    edge_index = torch.cat([g.edge_index + o for g, o in zip(graphs, offsets.tolist())], dim=1)
    batch = torch.repeat_interleave(torch.arange(len(graphs)), sizes)
    return x, edge_index, batch, len(graphs)


def dense_batch(graphs: Sequence[Data], max_atoms: int | None = None) -> DenseBatch:
    """Pad graphs to the largest in the batch (at most ``max_atoms``): features, adjacency, mask.

    Built with two scatters (what ``to_dense_batch``/``to_dense_adj`` do, at a third of the cost here).
    """
    n = len(graphs)
    sizes = torch.tensor([g.num_nodes for g in graphs], dtype=torch.long)
    size = int(sizes.max()) if n else 1
    if max_atoms is not None and size > max_atoms:
        raise ValueError(f"a molecule has {size} atoms, more than max_atoms = {max_atoms}")
    graph_of_atom = torch.repeat_interleave(torch.arange(n), sizes)
    local = torch.arange(int(sizes.sum())) - torch.repeat_interleave(torch.cumsum(sizes, 0) - sizes, sizes)
    x = torch.zeros(n, size, len(ATOM_FEATURES))
    x[graph_of_atom, local] = atom_one_hot(torch.cat([g.x for g in graphs])) if n else x[:0, 0]
    mask = torch.zeros(n, size, dtype=torch.bool)
    mask[graph_of_atom, local] = True
    edges = torch.cat([g.edge_index for g in graphs], dim=1) if n else torch.zeros(2, 0, dtype=torch.long)
    graph_of_edge = torch.repeat_interleave(torch.arange(n), torch.tensor([g.edge_index.shape[1] for g in graphs], dtype=torch.long))
    adj = torch.zeros(n, size, size)
    adj.index_put_((graph_of_edge, edges[1], edges[0]), torch.ones(edges.shape[1]), accumulate=True)  # [b, target, source]
    return x, adj, mask
