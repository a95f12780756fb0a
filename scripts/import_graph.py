"""Print fdistill's import cycles, layer order, layer-rule violations and largest modules; exit 1 on a cycle or a
violation.

    python scripts/import_graph.py
"""
import sys

from fdistill.devtools.import_graph import cycles, import_graph, largest_modules, layer_order, layer_violations

graph = import_graph()
found_cycles, violations = cycles(graph), layer_violations(graph)
print("cycles:", *([" <-> ".join(c) for c in found_cycles] or ["none"]), sep="\n  ")
print("layer order (lowest first):", *(" + ".join(group) for group in layer_order(graph)), sep="\n  ")
print("layer violations:", *([f"{a} -> {b}" for a, b in violations] or ["none"]), sep="\n  ")
print("largest modules:", *(f"{lines:5d} {module}" for lines, module in largest_modules()), sep="\n  ")
sys.exit(1 if found_cycles or violations else 0)
