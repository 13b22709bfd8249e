//! A layered ("Sugiyama") layout of a directed graph, left to right by call
//! depth, for the SVG of `weftctl graph`:
//!
//! 1. [`ranks`]: cycles are broken by reversing the back edges a
//!    depth-first search finds, then each node's rank (column) is the
//!    longest path from a node nobody calls. Terminates on any input.
//! 2. Edges spanning several columns get one virtual node per column they
//!    cross, so they run between nodes, not through them.
//! 3. The nodes of each column are ordered by the barycenter of their
//!    neighbours, sweeping right and left, keeping the order with the
//!    fewest crossings ([`crossings`]).
//! 4. Vertical positions: each node is pulled towards the mean height of
//!    its callers (then of its callees, and so on, alternating), keeping
//!    the order and a minimum gap ([`pack`]).
//! 5. Each edge is a polyline from a port on its source's right side
//!    through its virtual nodes to a port on its target's left side (a back
//!    edge is drawn the other way round; a self-loop is flagged).
//!
//! Everything is deterministic: ties break by index.

use std::collections::VecDeque;

/// Room kept above a node with a self-loop, for the loop and its label.
pub const LOOP_ROOM: f64 = 64.0;

/// Width and height of a node's box.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Size {
    /// Width.
    pub w: f64,
    /// Height.
    pub h: f64,
}

/// A node's box: top-left corner and size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Rect {
    /// Left.
    pub x: f64,
    /// Top.
    pub y: f64,
    /// Width.
    pub w: f64,
    /// Height.
    pub h: f64,
}

impl Rect {
    /// The vertical centre.
    pub fn cy(&self) -> f64 {
        self.y + self.h / 2.0
    }
}

/// Distances of the drawing.
#[derive(Clone, Copy, Debug)]
pub struct Params {
    /// Horizontal gap between columns (room for edge labels).
    pub layer_gap: f64,
    /// Vertical gap between two nodes of a column.
    pub node_gap: f64,
    /// Vertical gap next to an edge passing through a column.
    pub dummy_gap: f64,
    /// Vertical distance between edge ends on one side of a node.
    pub port_gap: f64,
    /// Blank border.
    pub margin: f64,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            layer_gap: 200.0,
            node_gap: 48.0,
            dummy_gap: 24.0,
            port_gap: 10.0,
            margin: 24.0,
        }
    }
}

/// How an edge is drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Left to right, to a deeper column.
    Forward,
    /// Right to left: the edge closes a cycle.
    Back,
    /// From a node to itself: `points` are the two ends on its top side.
    SelfLoop,
}

/// Where an edge runs.
#[derive(Clone, Debug, PartialEq)]
pub struct EdgePath {
    /// From the source's port to the target's port, in drawing order.
    pub points: Vec<(f64, f64)>,
    /// How it runs.
    pub route: Route,
}

/// The result: a box per node, a path per edge, the drawing's size.
#[derive(Clone, Debug, PartialEq)]
pub struct Layout {
    /// The column of each node.
    pub ranks: Vec<usize>,
    /// Each node's box.
    pub nodes: Vec<Rect>,
    /// Each edge's path, in the order given.
    pub edges: Vec<EdgePath>,
    /// Width of the drawing.
    pub width: f64,
    /// Height of the drawing.
    pub height: f64,
}

/// The column of each of `n` nodes and, per edge, whether it was reversed
/// to break a cycle. Self-loops are ignored (never reversed). Roots are the
/// nodes nobody else calls, taken in index order, then any node left over
/// (all of a cycle without a way in).
pub fn ranks(n: usize, edges: &[(usize, usize)]) -> (Vec<usize>, Vec<bool>) {
    let mut out: Vec<Vec<(usize, usize)>> = vec![Vec::new(); n];
    let mut indegree = vec![0usize; n];
    for (i, &(a, b)) in edges.iter().enumerate() {
        if a != b {
            out[a].push((b, i));
            indegree[b] += 1;
        }
    }
    // Iterative DFS; an edge to a node still on the stack closes a cycle.
    #[derive(Clone, Copy, PartialEq)]
    enum Mark {
        New,
        Open,
        Done,
    }
    let mut mark = vec![Mark::New; n];
    let mut reversed = vec![false; edges.len()];
    let starts = (0..n)
        .filter(|&v| indegree[v] == 0)
        .chain(0..n)
        .collect::<Vec<_>>();
    for s in starts {
        if mark[s] != Mark::New {
            continue;
        }
        mark[s] = Mark::Open;
        let mut stack = vec![(s, 0usize)];
        while let Some(&mut (v, ref mut next)) = stack.last_mut() {
            if let Some(&(w, i)) = out[v].get(*next) {
                *next += 1;
                match mark[w] {
                    Mark::New => {
                        mark[w] = Mark::Open;
                        stack.push((w, 0));
                    }
                    Mark::Open => reversed[i] = true,
                    Mark::Done => {}
                }
            } else {
                mark[v] = Mark::Done;
                stack.pop();
            }
        }
    }
    // Longest path over the now acyclic edges (Kahn's order).
    let mut succ: Vec<Vec<usize>> = vec![Vec::new(); n];
    let mut indeg = vec![0usize; n];
    for (i, &(a, b)) in edges.iter().enumerate() {
        if a == b {
            continue;
        }
        let (a, b) = if reversed[i] { (b, a) } else { (a, b) };
        succ[a].push(b);
        indeg[b] += 1;
    }
    let mut rank = vec![0usize; n];
    let mut queue: VecDeque<usize> = (0..n).filter(|&v| indeg[v] == 0).collect();
    while let Some(v) = queue.pop_front() {
        for &w in &succ[v] {
            rank[w] = rank[w].max(rank[v] + 1);
            indeg[w] -= 1;
            if indeg[w] == 0 {
                queue.push_back(w);
            }
        }
    }
    (rank, reversed)
}

/// Crossings between two adjacent columns: `edges` are pairs of positions
/// (in the left column, in the right column).
pub fn crossings(edges: &[(usize, usize)]) -> usize {
    let mut n = 0;
    for (i, &(a1, b1)) in edges.iter().enumerate() {
        for &(a2, b2) in &edges[i + 1..] {
            if (a1 < a2 && b1 > b2) || (a1 > a2 && b1 < b2) {
                n += 1;
            }
        }
    }
    n
}

/// Positions as close as possible (least squares) to `desired`, in the
/// given order, each at least `gaps[i - 1]` below the one before (`gaps`
/// has one entry fewer than `desired`). Pool-adjacent-violators on the
/// positions minus their cumulative gaps.
pub fn pack(desired: &[f64], gaps: &[f64]) -> Vec<f64> {
    let mut offset = Vec::with_capacity(desired.len());
    let mut acc = 0.0;
    for i in 0..desired.len() {
        if i > 0 {
            acc += gaps.get(i - 1).copied().unwrap_or(0.0);
        }
        offset.push(acc);
    }
    // Blocks of (sum, count) whose means must not decrease.
    let mut blocks: Vec<(f64, usize)> = Vec::new();
    for (d, o) in desired.iter().zip(&offset) {
        blocks.push((d - o, 1));
        while blocks.len() > 1 {
            let (s2, c2) = blocks[blocks.len() - 1];
            let (s1, c1) = blocks[blocks.len() - 2];
            if s1 / c1 as f64 > s2 / c2 as f64 {
                blocks.pop();
                let last = blocks.len() - 1;
                blocks[last] = (s1 + s2, c1 + c2);
            } else {
                break;
            }
        }
    }
    let mut out = Vec::with_capacity(desired.len());
    for (s, c) in blocks {
        let mean = s / c as f64;
        for _ in 0..c {
            let i = out.len();
            out.push(mean + offset[i]);
        }
    }
    out
}

/// One entry of a column: a real node or an edge passing through.
#[derive(Clone, Copy, Debug)]
struct Item {
    /// Real node index, or `None` for a virtual node.
    node: Option<usize>,
    rank: usize,
    half: f64,
}

/// Lay out nodes of the given sizes and the given edges.
pub fn layout(sizes: &[Size], edges: &[(usize, usize)], params: &Params) -> Layout {
    let n = sizes.len();
    let (rank, reversed) = ranks(n, edges);
    let columns = rank.iter().copied().max().map_or(0, |r| r + 1);

    // Items: real nodes, then one virtual node per column crossed.
    let mut items: Vec<Item> = (0..n)
        .map(|v| Item {
            node: Some(v),
            rank: rank[v],
            half: sizes[v].h / 2.0,
        })
        .collect();
    // Per edge: the chain of items in DAG direction (empty for self-loops).
    let mut chains: Vec<Vec<usize>> = Vec::with_capacity(edges.len());
    for (i, &(a, b)) in edges.iter().enumerate() {
        if a == b {
            chains.push(Vec::new());
            continue;
        }
        let (a, b) = if reversed[i] { (b, a) } else { (a, b) };
        let mut chain = vec![a];
        for r in rank[a] + 1..rank[b] {
            items.push(Item {
                node: None,
                rank: r,
                half: 0.0,
            });
            chain.push(items.len() - 1);
        }
        chain.push(b);
        chains.push(chain);
    }
    let mut preds: Vec<Vec<usize>> = vec![Vec::new(); items.len()];
    let mut succs: Vec<Vec<usize>> = vec![Vec::new(); items.len()];
    for chain in &chains {
        for pair in chain.windows(2) {
            succs[pair[0]].push(pair[1]);
            preds[pair[1]].push(pair[0]);
        }
    }

    // Order within columns.
    let mut layers: Vec<Vec<usize>> = vec![Vec::new(); columns];
    for (id, it) in items.iter().enumerate() {
        layers[it.rank].push(id);
    }
    let mut pos = vec![0usize; items.len()];
    let index = |layers: &[Vec<usize>], pos: &mut [usize]| {
        for layer in layers {
            for (p, &id) in layer.iter().enumerate() {
                pos[id] = p;
            }
        }
    };
    index(&layers, &mut pos);
    let total_crossings = |pos: &[usize]| -> usize {
        (0..columns.saturating_sub(1))
            .map(|r| {
                let pairs: Vec<(usize, usize)> = layers_edges(&items, &succs, r)
                    .into_iter()
                    .map(|(a, b)| (pos[a], pos[b]))
                    .collect();
                crossings(&pairs)
            })
            .sum()
    };
    let mut best = (total_crossings(&pos), layers.clone());
    for sweep in 0..12 {
        let down = sweep % 2 == 0;
        let order: Vec<usize> = if down {
            (1..columns).collect()
        } else {
            (0..columns.saturating_sub(1)).rev().collect()
        };
        for r in order {
            let neighbours = if down { &preds } else { &succs };
            let mut keyed: Vec<(f64, usize, usize)> = layers[r]
                .iter()
                .map(|&id| {
                    let ns = &neighbours[id];
                    let bary = if ns.is_empty() {
                        pos[id] as f64
                    } else {
                        ns.iter().map(|&w| pos[w] as f64).sum::<f64>() / ns.len() as f64
                    };
                    (bary, pos[id], id)
                })
                .collect();
            keyed.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
            layers[r] = keyed.into_iter().map(|(_, _, id)| id).collect();
            index(&layers, &mut pos);
        }
        let c = total_crossings(&pos);
        if c < best.0 {
            best = (c, layers.clone());
        }
    }
    let layers = best.1;
    index(&layers, &mut pos);

    // Columns: as wide as their widest node.
    let col_w: Vec<f64> = (0..columns)
        .map(|r| {
            layers[r]
                .iter()
                .filter_map(|&id| items[id].node.map(|v| sizes[v].w))
                .fold(0.0, f64::max)
        })
        .collect();
    let mut col_x = Vec::with_capacity(columns);
    let mut x = params.margin;
    for w in &col_w {
        col_x.push(x);
        x += w + params.layer_gap;
    }

    // Vertical centres: first stacked, then pulled towards neighbours.
    let gap = |a: usize, b: usize| {
        let g = if items[a].node.is_some() && items[b].node.is_some() {
            params.node_gap
        } else {
            params.dummy_gap
        };
        items[a].half + items[b].half + g
    };
    let gaps: Vec<Vec<f64>> = layers
        .iter()
        .map(|l| l.windows(2).map(|p| gap(p[0], p[1])).collect())
        .collect();
    let mut y = vec![0.0f64; items.len()];
    let heights: Vec<f64> = gaps.iter().map(|g| g.iter().sum()).collect();
    let tallest = heights.iter().copied().fold(0.0, f64::max);
    for (r, layer) in layers.iter().enumerate() {
        let stacked = pack(&vec![(tallest - heights[r]) / 2.0; layer.len()], &gaps[r]);
        for (&id, v) in layer.iter().zip(stacked) {
            y[id] = v;
        }
    }
    // Alternating, ending with a sweep to the right: a callee with one
    // caller ends up level with it.
    for sweep in 0..7 {
        let down = sweep % 2 == 0;
        let order: Vec<usize> = if down {
            (0..columns).collect()
        } else {
            (0..columns).rev().collect()
        };
        for r in order {
            let desired: Vec<f64> = layers[r]
                .iter()
                .map(|&id| {
                    let ns = if down { &preds[id] } else { &succs[id] };
                    if ns.is_empty() {
                        y[id]
                    } else {
                        ns.iter().map(|&w| y[w]).sum::<f64>() / ns.len() as f64
                    }
                })
                .collect();
            for (&id, v) in layers[r].iter().zip(pack(&desired, &gaps[r])) {
                y[id] = v;
            }
        }
    }
    // Move everything so the top sits on the margin; a self-loop and its
    // label need room above their node.
    let mut has_loop = vec![false; n];
    for &(a, b) in edges {
        if a == b {
            has_loop[a] = true;
        }
    }
    let top = items
        .iter()
        .enumerate()
        .map(|(id, it)| {
            let room = if it.node.is_some_and(|v| has_loop[v]) {
                LOOP_ROOM
            } else {
                0.0
            };
            y[id] - it.half - room
        })
        .fold(f64::INFINITY, f64::min);
    let shift = if top.is_finite() {
        params.margin - top
    } else {
        0.0
    };
    for v in &mut y {
        *v += shift;
    }

    let nodes: Vec<Rect> = (0..n)
        .map(|v| {
            let r = rank[v];
            Rect {
                x: col_x[r] + (col_w[r] - sizes[v].w) / 2.0,
                y: y[v] - sizes[v].h / 2.0,
                w: sizes[v].w,
                h: sizes[v].h,
            }
        })
        .collect();

    // Ports: the edge ends on each side of a node, spread in the order of
    // where the edges go next.
    let mut right: Vec<Vec<(f64, usize)>> = vec![Vec::new(); n];
    let mut left: Vec<Vec<(f64, usize)>> = vec![Vec::new(); n];
    for (i, chain) in chains.iter().enumerate() {
        if chain.len() < 2 {
            continue;
        }
        let (first, last) = (chain[0], chain[chain.len() - 1]);
        right[first].push((y[chain[1]], i));
        left[last].push((y[chain[chain.len() - 2]], i));
    }
    let port = |side: &mut Vec<(f64, usize)>, v: usize| -> Vec<(usize, f64)> {
        side.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
        let m = side.len();
        let step = params.port_gap.min(sizes[v].h * 0.8 / m.max(1) as f64);
        side.iter()
            .enumerate()
            .map(|(k, &(_, i))| (i, y[v] + (k as f64 - (m as f64 - 1.0) / 2.0) * step))
            .collect()
    };
    let mut start_y = vec![0.0; edges.len()];
    let mut end_y = vec![0.0; edges.len()];
    for v in 0..n {
        for (i, py) in port(&mut right[v], v) {
            start_y[i] = py;
        }
        for (i, py) in port(&mut left[v], v) {
            end_y[i] = py;
        }
    }

    let paths: Vec<EdgePath> = edges
        .iter()
        .enumerate()
        .map(|(i, &(a, _))| {
            let chain = &chains[i];
            if chain.is_empty() {
                let r = nodes[a];
                return EdgePath {
                    points: vec![(r.x + r.w * 0.65, r.y), (r.x + r.w * 0.35, r.y)],
                    route: Route::SelfLoop,
                };
            }
            let first = nodes[chain[0]];
            let last = nodes[chain[chain.len() - 1]];
            let mut points = vec![(first.x + first.w, start_y[i])];
            for &d in &chain[1..chain.len() - 1] {
                let r = items[d].rank;
                points.push((col_x[r], y[d]));
                points.push((col_x[r] + col_w[r], y[d]));
            }
            points.push((last.x, end_y[i]));
            if reversed[i] {
                points.reverse();
            }
            EdgePath {
                points,
                route: if reversed[i] {
                    Route::Back
                } else {
                    Route::Forward
                },
            }
        })
        .collect();

    let width = col_x
        .last()
        .zip(col_w.last())
        .map_or(2.0 * params.margin, |(x, w)| x + w + params.margin);
    let height = items
        .iter()
        .enumerate()
        .map(|(id, it)| y[id] + it.half)
        .fold(0.0, f64::max)
        + params.margin;
    Layout {
        ranks: rank,
        nodes,
        edges: paths,
        width,
        height: height.max(2.0 * params.margin),
    }
}

/// The virtual edges from column `r` to column `r + 1`.
fn layers_edges(items: &[Item], succs: &[Vec<usize>], r: usize) -> Vec<(usize, usize)> {
    items
        .iter()
        .enumerate()
        .filter(|(_, it)| it.rank == r)
        .flat_map(|(id, _)| succs[id].iter().map(move |&w| (id, w)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn boxes(n: usize) -> Vec<Size> {
        vec![Size { w: 120.0, h: 40.0 }; n]
    }

    #[test]
    fn ranks_follow_call_depth() {
        // 0 -> 1 -> 3, 0 -> 2, 2 -> 3, 1 -> 4: 3 sits after its deepest caller.
        let (r, rev) = ranks(5, &[(0, 1), (1, 3), (0, 2), (2, 3), (1, 4), (3, 4)]);
        assert_eq!(r, vec![0, 1, 1, 2, 3]);
        assert!(rev.iter().all(|r| !r));
    }

    #[test]
    fn cycles_are_broken_once() {
        // 0 -> 1 -> 2 -> 1 (cycle), 2 -> 0 (back to the root).
        let edges = [(0, 1), (1, 2), (2, 1), (2, 0)];
        let (r, rev) = ranks(3, &edges);
        assert_eq!(r, vec![0, 1, 2]);
        assert_eq!(rev, vec![false, false, true, true]);
        // A cycle with no way in: its first node becomes the root.
        let (r, rev) = ranks(3, &[(2, 1), (1, 0), (0, 2)]);
        assert_eq!(r, vec![0, 2, 1]);
        assert_eq!(rev.iter().filter(|r| **r).count(), 1);
        // Self-loops are left alone.
        let (r, rev) = ranks(2, &[(0, 0), (0, 1), (1, 1)]);
        assert_eq!((r, rev), (vec![0, 1], vec![false, false, false]));
    }

    #[test]
    fn counting_crossings() {
        assert_eq!(crossings(&[(0, 0), (1, 1)]), 0);
        assert_eq!(crossings(&[(0, 1), (1, 0)]), 1);
        assert_eq!(crossings(&[(0, 2), (1, 1), (2, 0)]), 3);
        assert_eq!(crossings(&[(0, 0), (0, 1)]), 0, "shared end, no crossing");
    }

    #[test]
    fn packing_keeps_order_and_gaps() {
        assert_eq!(
            pack(&[0.0, 0.0, 0.0], &[10.0, 10.0]),
            vec![-10.0, 0.0, 10.0]
        );
        assert_eq!(pack(&[0.0, 50.0], &[10.0]), vec![0.0, 50.0]);
        assert_eq!(pack(&[20.0, 0.0], &[10.0]), vec![5.0, 15.0]);
        assert_eq!(pack(&[], &[]), Vec::<f64>::new());
    }

    #[test]
    fn edges_are_ordered_to_avoid_crossings() {
        // 0 -> 3, 1 -> 2 in the given order would cross; the sweep uncrosses.
        let l = layout(&boxes(4), &[(0, 3), (1, 2)], &Params::default());
        let (a, b) = (
            l.nodes[0].cy() < l.nodes[1].cy(),
            l.nodes[3].cy() < l.nodes[2].cy(),
        );
        assert_eq!(a, b, "{:?}", l.nodes);
    }

    #[test]
    fn a_chain_is_one_straight_line() {
        let l = layout(&boxes(3), &[(0, 1), (1, 2)], &Params::default());
        assert_eq!(l.ranks, vec![0, 1, 2]);
        assert!(l.nodes[0].x < l.nodes[1].x && l.nodes[1].x < l.nodes[2].x);
        assert_eq!(l.nodes[0].cy(), l.nodes[1].cy());
        assert_eq!(l.nodes[1].cy(), l.nodes[2].cy());
        let e = &l.edges[0];
        assert_eq!(e.route, Route::Forward);
        assert_eq!(
            e.points.first(),
            Some(&(l.nodes[0].x + 120.0, l.nodes[0].cy()))
        );
        assert_eq!(e.points.last(), Some(&(l.nodes[1].x, l.nodes[1].cy())));
    }

    #[test]
    fn long_edges_pass_between_nodes() {
        // 0 -> 1 -> 2 and 0 -> 2: the long edge crosses column 1 beside 1.
        let l = layout(&boxes(3), &[(0, 1), (1, 2), (0, 2)], &Params::default());
        let long = &l.edges[2];
        assert_eq!(long.points.len(), 4);
        let (x1, y1) = long.points[1];
        let (x2, y2) = long.points[2];
        assert_eq!(y1, y2, "straight through the column");
        let n1 = l.nodes[1];
        assert_eq!((x1, x2), (n1.x, n1.x + n1.w));
        assert!(
            y1 < n1.y || y1 > n1.y + n1.h,
            "not through node 1: {y1} {n1:?}"
        );
    }

    #[test]
    fn back_edges_point_back_and_ports_do_not_overlap() {
        let l = layout(&boxes(2), &[(0, 1), (1, 0)], &Params::default());
        assert_eq!(l.edges[0].route, Route::Forward);
        assert_eq!(l.edges[1].route, Route::Back);
        let fwd = &l.edges[0].points;
        let back = &l.edges[1].points;
        // The back edge starts at node 1's left side and ends at node 0's right.
        assert_eq!(back[0].0, l.nodes[1].x);
        assert_eq!(back[back.len() - 1].0, l.nodes[0].x + l.nodes[0].w);
        assert_ne!(fwd[0].1, back[back.len() - 1].1, "two ports");
    }

    #[test]
    fn self_loops_sit_on_top() {
        let l = layout(&boxes(1), &[(0, 0)], &Params::default());
        assert_eq!(l.edges[0].route, Route::SelfLoop);
        assert_eq!(
            l.nodes[0].y,
            Params::default().margin + LOOP_ROOM,
            "room for the loop and its label"
        );
        assert!(l.edges[0].points.iter().all(|p| p.1 == l.nodes[0].y));
    }

    #[test]
    fn empty_graph() {
        let l = layout(&[], &[], &Params::default());
        assert!(l.nodes.is_empty() && l.edges.is_empty());
        assert!(l.width > 0.0 && l.height > 0.0);
    }

    proptest! {
        /// Any graph, cycles included: every non-loop edge that is not
        /// reversed goes to a deeper column, reversed ones to a shallower
        /// one; boxes of one column never overlap; all is inside the drawing.
        #[test]
        fn any_graph_lays_out(
            n in 1usize..9,
            raw in proptest::collection::vec((0usize..9, 0usize..9), 0..20),
        ) {
            let edges: Vec<(usize, usize)> = raw.into_iter().map(|(a, b)| (a % n, b % n)).collect();
            let (rank, rev) = ranks(n, &edges);
            for (i, &(a, b)) in edges.iter().enumerate() {
                if a == b { continue; }
                if rev[i] { prop_assert!(rank[a] > rank[b]); } else { prop_assert!(rank[a] < rank[b]); }
            }
            let l = layout(&boxes(n), &edges, &Params::default());
            for a in 0..n {
                for b in a + 1..n {
                    if l.ranks[a] == l.ranks[b] {
                        let (ra, rb) = (l.nodes[a], l.nodes[b]);
                        prop_assert!(ra.y + ra.h <= rb.y + 1e-6 || rb.y + rb.h <= ra.y + 1e-6, "{ra:?} {rb:?}");
                    }
                }
                let r = l.nodes[a];
                prop_assert!(r.x >= 0.0 && r.y >= 0.0 && r.x + r.w <= l.width && r.y + r.h <= l.height);
            }
            for e in &l.edges {
                prop_assert!(e.points.len() >= 2);
                for p in &e.points {
                    prop_assert!(p.0.is_finite() && p.1.is_finite());
                }
            }
        }
    }
}
