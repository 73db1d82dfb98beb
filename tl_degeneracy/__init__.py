"""tl_degeneracy: degeneracy in the loss landscape for mechanistic interpretability on TransformerLens models.

See ``SPEC.md`` conventions: statistics are collected by :func:`collect`, analysed by
:func:`interaction_basis`, :func:`head_sync`, :func:`neuron_sync`, and :func:`estimate_llc`.
"""

__version__ = "0.1.0"
