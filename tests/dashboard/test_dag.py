"""Layout of the step graph: layers by dependency depth, order within a layer, no overlaps."""

from __future__ import annotations

import itertools
import random

from directives.dag import COMPACT, COMPACT_THRESHOLD, FULL, assign_layers, layout, status_icon


def overlapping(a, b) -> bool:
    return a.x < b.x + b.width and b.x < a.x + a.width and a.y < b.y + b.height and b.y < a.y + a.height


def random_dag(count: int, seed: int = 7) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    rng = random.Random(seed)
    nodes = [(f"s{i}", rng.randrange(3)) for i in range(count)]
    edges = [(f"s{j}", f"s{i}") for i in range(1, count) for j in rng.sample(range(i), k=min(i, rng.randrange(3)))]
    return nodes, edges


def test_steps_without_dependencies_sit_in_layer_zero():
    assert assign_layers(["a", "b"], {}) == {"a": 0, "b": 0}


def test_a_step_sits_one_layer_after_its_deepest_dependency():
    layers = assign_layers(["a", "b", "c", "d"], {"b": ["a"], "c": ["b"], "d": ["a", "c"]})
    assert layers == {"a": 0, "b": 1, "c": 2, "d": 3}


def test_the_layer_does_not_depend_on_input_order():
    deps = {"b": ["a"], "c": ["b"], "d": ["a", "c"]}
    assert assign_layers(["d", "c", "b", "a"], deps) == assign_layers(["a", "b", "c", "d"], deps)


def test_dependencies_on_unknown_steps_and_on_itself_are_ignored():
    assert assign_layers(["a", "b"], {"a": ["a"], "b": ["ghost", "a"]}) == {"a": 0, "b": 1}


def test_a_cycle_does_not_hang_and_every_node_is_placed():
    layers = assign_layers(["a", "b", "c", "d"], {"a": ["c"], "b": ["a"], "c": ["b"], "d": []})
    assert set(layers) == {"a", "b", "c", "d"}
    assert layers["d"] == 0
    placed = layout([("a", 0), ("b", 0), ("c", 0)], [("c", "a"), ("a", "b"), ("b", "c")])
    assert len(placed.nodes) == 3
    assert len(placed.edges) == 3


def test_nodes_are_drawn_left_to_right_by_layer():
    placed = layout([("a", 0), ("b", 0), ("c", 0)], [("a", "b"), ("b", "c")])
    xs = [placed.box(k).x for k in "abc"]
    assert xs == sorted(xs) and len(set(xs)) == 3
    assert placed.layer_count == 3


def test_order_index_orders_steps_within_a_layer():
    placed = layout([("late", 2), ("early", 0), ("middle", 1)], [])
    assert [n.key for n in placed.nodes] == ["early", "middle", "late"]
    assert placed.box("early").y < placed.box("middle").y < placed.box("late").y


def test_ties_keep_the_input_order():
    placed = layout([("first", 0), ("second", 0), ("third", 0)], [])
    assert [n.key for n in placed.nodes] == ["first", "second", "third"]


def test_within_a_layer_a_step_follows_the_position_of_its_dependencies():
    # x's dependency is below y's: x is drawn below y to avoid a crossing.
    placed = layout([("top", 0), ("bottom", 0), ("x", 0), ("y", 0)], [("bottom", "x"), ("top", "y")])
    assert placed.box("y").y < placed.box("x").y


def test_no_two_nodes_overlap_at_fifty_steps():
    nodes, edges = random_dag(50)
    placed = layout(nodes, edges)
    assert not placed.compact
    assert len(placed.nodes) == 50
    for a, b in itertools.combinations(placed.nodes, 2):
        assert not overlapping(a, b), (a, b)
    for node in placed.nodes:
        assert node.x >= 0 and node.x + node.width <= placed.width
        assert node.y >= 0 and node.y + node.height <= placed.height


def test_every_dependency_points_to_a_later_layer():
    nodes, edges = random_dag(80, seed=3)
    placed = layout(nodes, edges)
    layer = {n.key: n.layer for n in placed.nodes}
    assert all(layer[source] < layer[target] for source, target in edges)


def test_an_edge_runs_from_the_right_side_of_the_dependency_to_the_left_side_of_the_step():
    placed = layout([("a", 0), ("b", 0)], [("a", "b")])
    (edge,) = placed.edges
    a, b = placed.box("a"), placed.box("b")
    assert (edge.source, edge.target) == ("a", "b")
    assert edge.d.startswith(f"M{a.x + a.width:g} {a.cy:g} C")
    assert edge.d.endswith(f" {b.x:g} {b.cy:g}")


def test_duplicate_and_dangling_edges_are_dropped():
    placed = layout([("a", 0), ("b", 0)], [("a", "b"), ("a", "b"), ("ghost", "b"), ("b", "b")])
    assert [(e.source, e.target) for e in placed.edges] == [("a", "b")]


def test_an_empty_graph_has_no_size():
    placed = layout([], [])
    assert (placed.width, placed.height, placed.nodes, placed.edges) == (0, 0, [], [])


def test_a_graph_above_the_threshold_is_compact():
    nodes, edges = random_dag(COMPACT_THRESHOLD)
    assert not layout(nodes, edges).compact
    nodes, edges = random_dag(COMPACT_THRESHOLD + 1)
    placed = layout(nodes, edges)
    assert placed.compact
    assert placed.nodes[0].width == COMPACT.node_width < FULL.node_width


def test_a_compact_layer_wraps_into_columns_and_nodes_still_do_not_overlap():
    nodes = [(f"s{i}", 0) for i in range(500)]  # one wide layer
    placed = layout(nodes, [])
    rows = COMPACT.max_rows
    assert placed.height <= 2 * COMPACT.padding + rows * (COMPACT.node_height + COMPACT.gap_y)
    assert len({n.x for n in placed.nodes}) == -(-500 // rows)
    for a, b in itertools.combinations(placed.nodes[:120], 2):
        assert not overlapping(a, b)
    nodes, edges = random_dag(500, seed=11)
    placed = layout(nodes, edges)
    positions = {(n.x, n.y) for n in placed.nodes}
    assert len(positions) == 500


def test_status_icons_match_the_status_include():
    assert status_icon("passed") == "✓"
    assert status_icon("failed") == "✗"
    assert status_icon("awaiting_approval") == "‖"
    assert status_icon("pending") == "○"
