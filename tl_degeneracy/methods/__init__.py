"""Methods that interleave model passes and analyses: each step's pass needs the previous step's analysis.

The local interaction basis is built backwards from the last site, and each site's Jacobian pass needs the
next site's basis; the interaction graph needs the bases of both ends of every edge. These compositions use
:mod:`~tl_degeneracy.collection` (the passes) and :mod:`~tl_degeneracy.analysis` (the bases), which never
import each other; the run layer and the public face use them.
"""

from tl_degeneracy.methods.edge_ablation import EdgeAblationCurve, EdgesNeeded, edge_ablation_curve, edges_needed
from tl_degeneracy.methods.graph import interaction_graph, local_interaction_bases

__all__ = ["EdgeAblationCurve", "EdgesNeeded", "edge_ablation_curve", "edges_needed", "interaction_graph",
           "local_interaction_bases"]
