"""Analyses: pure tensors in, results out; they never touch the model.

- :mod:`~tl_degeneracy.analysis.basis`: interaction and PCA bases (paper §3.1, §4; SPEC §3);
- :mod:`~tl_degeneracy.analysis.sync`: head and neuron synchronisation (paper §3.2; SPEC §4);
- :mod:`~tl_degeneracy.analysis.ablation`: projectors, the quadratic prediction of an ablation (SPEC §5c);
- :mod:`~tl_degeneracy.analysis.linkage`: single-linkage blocks and block ranks.
"""

from tl_degeneracy.analysis.ablation import directions_needed, keep_schedule, predicted_kl, projector
from tl_degeneracy.analysis.basis import (
    DimCurve,
    InteractionBasis,
    identity_basis,
    interaction_bases,
    interaction_basis,
    pca_basis,
)
from tl_degeneracy.analysis.sync import HeadSync, NeuronSync, head_sync, load_sync, neuron_sync

__all__ = [
    "DimCurve",
    "HeadSync",
    "InteractionBasis",
    "directions_needed",
    "keep_schedule",
    "predicted_kl",
    "projector",
    "NeuronSync",
    "head_sync",
    "identity_basis",
    "interaction_bases",
    "interaction_basis",
    "load_sync",
    "neuron_sync",
    "pca_basis",
]
