"""Layout of a directive's step graph for the dashboard.

A pure function from nodes and dependency edges to coordinates, drawn left
to right: a step's layer (column) is one more than the deepest of its
dependencies, steps without dependencies sit in layer 0. The SVG itself is
rendered by a template so that every piece of text goes through escaping.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Mapping, Sequence
from dataclasses import dataclass

# Above this many steps the graph is drawn compact: small nodes without
# names (name and status stay in each node's tooltip and accessible label),
# and the page points to the run grid for the names.
COMPACT_THRESHOLD = 120

# The same icons as templates/includes/status.html, for text inside the SVG.
STATUS_ICONS: Mapping[str, str] = {
    "passed": "✓",
    "failed": "✗",
    "running": "▶",
    "evaluating": "▶",
    "awaiting_approval": "‖",
    "blocked": "⊘",
    "skipped": "↷",
}
DEFAULT_ICON = "○"


def status_icon(status: str) -> str:
    return STATUS_ICONS.get(status, DEFAULT_ICON)


@dataclass(frozen=True)
class Geometry:
    node_width: int
    node_height: int
    gap_x: int
    gap_y: int
    padding: int
    max_rows: int | None  # a layer taller than this wraps into extra columns


FULL = Geometry(node_width=190, node_height=46, gap_x=64, gap_y=14, padding=16, max_rows=None)
COMPACT = Geometry(node_width=20, node_height=20, gap_x=26, gap_y=6, padding=12, max_rows=40)


@dataclass(frozen=True)
class NodeBox:
    key: Hashable
    layer: int
    row: int  # position within its layer, from the top
    x: float
    y: float
    width: int
    height: int

    @property
    def cx(self) -> float:
        return self.x + self.width / 2

    @property
    def cy(self) -> float:
        return self.y + self.height / 2


@dataclass(frozen=True)
class EdgePath:
    source: Hashable  # the dependency
    target: Hashable  # the step that depends on it
    d: str  # SVG path data


@dataclass(frozen=True)
class Layout:
    nodes: list[NodeBox]
    edges: list[EdgePath]
    width: int
    height: int
    compact: bool
    layer_count: int

    def box(self, key: Hashable) -> NodeBox:
        return next(n for n in self.nodes if n.key == key)


def assign_layers(keys: Sequence[Hashable], deps: Mapping[Hashable, Sequence[Hashable]]) -> dict[Hashable, int]:
    """Layer of each key: 0 without dependencies, else 1 + the deepest dependency.

    Dependencies on unknown keys are ignored. Plans are acyclic, but a cycle
    must not hang the page: nodes left over after the topological pass are
    placed after their already-placed dependencies, in input order.
    """
    known = set(keys)
    clean = {k: [d for d in dict.fromkeys(deps.get(k, ())) if d in known and d != k] for k in keys}
    dependents: dict[Hashable, list[Hashable]] = {k: [] for k in keys}
    waiting = {k: len(clean[k]) for k in keys}
    for k in keys:
        for d in clean[k]:
            dependents[d].append(k)
    layer: dict[Hashable, int] = {}
    queue = [k for k in keys if waiting[k] == 0]
    while queue:
        ready: list[Hashable] = []
        for k in queue:
            layer[k] = 1 + max((layer[d] for d in clean[k]), default=-1)
            for child in dependents[k]:
                waiting[child] -= 1
                if waiting[child] == 0:
                    ready.append(child)
        queue = ready
    for k in keys:
        if k not in layer:
            layer[k] = 1 + max((layer[d] for d in clean[k] if d in layer), default=-1)
    return layer


def _fmt(value: float) -> str:
    return f"{value:.1f}".rstrip("0").rstrip(".")


def edge_path(source: NodeBox, target: NodeBox) -> str:
    """A cubic curve from the right side of ``source`` to the left side of ``target``."""
    sx, sy = source.x + source.width, source.cy
    tx, ty = target.x, target.cy
    dx = max(abs(tx - sx) / 2, 12.0)
    return f"M{_fmt(sx)} {_fmt(sy)} C{_fmt(sx + dx)} {_fmt(sy)} {_fmt(tx - dx)} {_fmt(ty)} {_fmt(tx)} {_fmt(ty)}"


def layout(
    nodes: Sequence[tuple[Hashable, int]],
    edges: Iterable[tuple[Hashable, Hashable]],
    *,
    compact: bool | None = None,
) -> Layout:
    """Place ``nodes`` (``(key, order_index)`` in a stable order) joined by
    ``edges`` (``(dependency, dependent)``).

    Within a layer nodes are ordered by ``order_index``, then by the mean row
    of their dependencies (fewer crossings), then by input order. ``compact``
    defaults to more than :data:`COMPACT_THRESHOLD` nodes.
    """
    keys = [key for key, _ in nodes]
    order_index = dict(nodes)
    position = {key: i for i, key in enumerate(keys)}
    if compact is None:
        compact = len(keys) > COMPACT_THRESHOLD
    geometry = COMPACT if compact else FULL

    deps: dict[Hashable, list[Hashable]] = {key: [] for key in keys}
    pairs: list[tuple[Hashable, Hashable]] = []
    for source, target in edges:
        if source in deps and target in deps and source != target and source not in deps[target]:
            deps[target].append(source)
            pairs.append((source, target))
    layers = assign_layers(keys, deps)
    layer_count = max(layers.values(), default=-1) + 1

    by_layer: list[list[Hashable]] = [[] for _ in range(layer_count)]
    for key in keys:
        by_layer[layers[key]].append(key)
    row: dict[Hashable, int] = {}
    for members in by_layer:
        sort_key: dict[Hashable, tuple[int, float, int]] = {}
        for key in members:
            placed = [row[d] for d in deps[key] if d in row]
            barycentre = sum(placed) / len(placed) if placed else float(position[key])
            sort_key[key] = (order_index[key], barycentre, position[key])
        members.sort(key=sort_key.__getitem__)
        for i, key in enumerate(members):
            row[key] = i

    step_x = geometry.node_width + geometry.gap_x
    step_y = geometry.node_height + geometry.gap_y
    boxes: dict[Hashable, NodeBox] = {}
    column = 0
    tallest = 0
    for layer, members in enumerate(by_layer):
        per_column = geometry.max_rows or max(len(members), 1)
        for i, key in enumerate(members):
            sub, r = divmod(i, per_column)
            boxes[key] = NodeBox(
                key=key,
                layer=layer,
                row=i,
                x=geometry.padding + (column + sub) * step_x,
                y=geometry.padding + r * step_y,
                width=geometry.node_width,
                height=geometry.node_height,
            )
        tallest = max(tallest, min(len(members), per_column))
        column += max(1, -(-len(members) // per_column))

    width = 2 * geometry.padding + column * step_x - geometry.gap_x if keys else 0
    height = 2 * geometry.padding + tallest * step_y - geometry.gap_y if keys else 0
    placed_nodes = [boxes[key] for members in by_layer for key in members]
    paths = [EdgePath(source=s, target=t, d=edge_path(boxes[s], boxes[t])) for s, t in pairs]
    return Layout(
        nodes=placed_nodes,
        edges=paths,
        width=max(width, 0),
        height=max(height, 0),
        compact=compact,
        layer_count=layer_count,
    )
