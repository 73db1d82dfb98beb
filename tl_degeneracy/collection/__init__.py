"""Collection: hooks on the model stream per-batch sums into float64 totals (data → collection → stats).

- :mod:`~tl_degeneracy.collection.engine`: the component protocol, one batch, one checkpointed pass;
- :mod:`~tl_degeneracy.collection.kernels`: pure per-batch products (Grams, synchronisation sums);
- :mod:`~tl_degeneracy.collection.components`, :mod:`~tl_degeneracy.collection.jacobian`: what each
  statistic reads from which hook (routing), and the output-Jacobian probes;
- :mod:`~tl_degeneracy.collection.memory`: the memory plan; :mod:`~tl_degeneracy.collection.collect`:
  :func:`collect`, the public entry point.
"""

from tl_degeneracy.collection.collect import collect
from tl_degeneracy.collection.memory import MemoryPlan, plan_memory

__all__ = ["MemoryPlan", "collect", "plan_memory"]
