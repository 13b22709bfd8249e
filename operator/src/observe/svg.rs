//! The SVG drawing of a [`Graph`]: workloads as boxes in columns by call
//! depth ([`super::layout`]), calls as arrows coloured by success rate and
//! as thick as their traffic, each labelled with rps, success rate and p99;
//! a caption on top and a legend below. Self-contained (no scripts, no
//! external fonts), so any browser opens it; hovering a box or an arrow
//! shows its full name and numbers.

use std::fmt::Write as _;

use super::Reporter;
use super::graph::{Graph, Health, health};
use super::layout::{self, Params, Route, Size};

const FONT: &str = "Helvetica, Arial, sans-serif";
const NODE_H: f64 = 48.0;
const HEADER: f64 = 44.0;
const FOOTER: f64 = 40.0;
const LABEL_LINE: f64 = 13.0;
const LABEL_H: f64 = 2.0 * LABEL_LINE + 6.0;

/// Rough text widths (no font metrics at hand): average advance per
/// character of the fonts above.
fn text_w(s: &str, px: f64, bold: bool) -> f64 {
    s.chars().count() as f64 * px * if bold { 0.64 } else { 0.58 }
}

/// The width of an edge's label box.
fn label_width(e: &super::graph::Edge) -> f64 {
    (text_w(&e.rps_text(), 11.0, true).max(text_w(&e.quality_text(), 11.0, false)) + 8.0).round()
}

/// Escape text for XML content and attribute values.
pub fn xml_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            c if c.is_control() => {}
            c => out.push(c),
        }
    }
    out
}

/// The path data of a polyline drawn as smooth horizontal S-curves.
fn path_data(points: &[(f64, f64)], route: Route) -> String {
    let mut d = String::new();
    let Some(&(x0, y0)) = points.first() else {
        return d;
    };
    let _ = write!(d, "M{x0:.1},{y0:.1}");
    if route == Route::SelfLoop {
        if let Some(&(x1, y1)) = points.get(1) {
            let _ = write!(
                d,
                " C{:.1},{:.1} {:.1},{:.1} {x1:.1},{y1:.1}",
                x0 + 12.0,
                y0 - 44.0,
                x1 - 12.0,
                y1 - 44.0
            );
        }
        return d;
    }
    let mut prev = (x0, y0);
    for &(x, y) in &points[1..] {
        let dx = (x - prev.0) / 2.0;
        let _ = write!(
            d,
            " C{:.1},{:.1} {:.1},{:.1} {x:.1},{y:.1}",
            prev.0 + dx,
            prev.1,
            x - dx,
            y
        );
        prev = (x, y);
    }
    d
}

/// Render the graph.
pub fn render(g: &Graph) -> String {
    let sizes: Vec<Size> = g
        .nodes
        .iter()
        .map(|n| Size {
            w: (text_w(n.title(), 14.0, true).max(text_w(&n.subtitle(), 11.0, false)) + 32.0)
                .max(110.0)
                .round(),
            h: NODE_H,
        })
        .collect();
    let widest_label = g.edges.iter().map(label_width).fold(0.0, f64::max);
    let params = Params {
        layer_gap: (widest_label + 50.0).max(160.0).round(),
        ..Params::default()
    };
    let pairs: Vec<(usize, usize)> = g.edges.iter().map(|e| (e.from, e.to)).collect();
    let lay = layout::layout(&sizes, &pairs, &params);

    let caption = g.caption();
    let legend_w = legend_width();
    let width = lay
        .width
        .max(text_w(&caption, 15.0, true) + 2.0 * params.margin)
        .max(legend_w + 2.0 * params.margin)
        .ceil();
    let body_h = if g.nodes.is_empty() { 60.0 } else { lay.height };
    let height = (HEADER + body_h + FOOTER).ceil();

    let mut s = String::new();
    s.push_str("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        s,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{width}\" height=\"{height}\" viewBox=\"0 0 {width} {height}\" font-family=\"{FONT}\">"
    );
    let _ = writeln!(s, "<title>{}</title>", xml_escape(&caption));
    s.push_str("<defs>\n");
    for h in Health::ALL {
        let _ = writeln!(
            s,
            "<marker id=\"arrow-{}\" viewBox=\"0 0 10 10\" refX=\"10\" refY=\"5\" markerWidth=\"10\" markerHeight=\"10\" markerUnits=\"userSpaceOnUse\" orient=\"auto\"><path d=\"M0,0 L10,5 L0,10 z\" fill=\"{}\"/></marker>",
            h.name(),
            h.color()
        );
    }
    s.push_str("</defs>\n");
    let _ = writeln!(
        s,
        "<rect x=\"0\" y=\"0\" width=\"{width}\" height=\"{height}\" fill=\"#ffffff\"/>"
    );
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"28\" font-size=\"15\" font-weight=\"bold\" fill=\"#263238\">{}</text>",
        params.margin,
        xml_escape(&caption)
    );
    let _ = writeln!(s, "<g transform=\"translate(0,{HEADER})\">");

    if g.nodes.is_empty() {
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"30\" font-size=\"13\" fill=\"#607d8b\">no requests between workloads in this window</text>",
            params.margin
        );
    }

    // Edges first, so boxes and labels sit on top of them.
    s.push_str("<g class=\"edges\" fill=\"none\">\n");
    for (i, (e, path)) in g.edges.iter().zip(&lay.edges).enumerate() {
        let h = health(e);
        let (from, to) = g.ends(e);
        let counted = match e.seen_by {
            Reporter::Source => "counted by the caller's proxy",
            Reporter::Destination => "seen only by the callee's proxy",
        };
        let tip = format!(
            "{from} → {to}: {}, {} ({counted})",
            e.rps_text(),
            e.quality_text()
        );
        let width = (1.5 + 1.5 * (1.0 + e.rps).log10()).min(5.0);
        let dash = if e.seen_by == Reporter::Destination {
            " stroke-dasharray=\"7 4\""
        } else {
            ""
        };
        let _ = writeln!(
            s,
            "<g class=\"edge\" id=\"edge-{i}\"><title>{}</title><path d=\"{}\" stroke=\"{}\" stroke-width=\"{width:.1}\"{dash} marker-end=\"url(#arrow-{})\"/></g>",
            xml_escape(&tip),
            path_data(&path.points, path.route),
            h.color(),
            h.name()
        );
    }
    s.push_str("</g>\n");

    s.push_str("<g class=\"nodes\">\n");
    for (i, (n, r)) in g.nodes.iter().zip(&lay.nodes).enumerate() {
        let (fill, dash) = if n.meshed() {
            ("#eef3f8", "")
        } else {
            ("#ffffff", " stroke-dasharray=\"5 3\"")
        };
        let cx = r.x + r.w / 2.0;
        let _ = writeln!(
            s,
            "<g class=\"node\" id=\"node-{i}\"><title>{}</title><rect x=\"{:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" rx=\"8\" fill=\"{fill}\" stroke=\"#455a64\" stroke-width=\"1.5\"{dash}/><text x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"14\" font-weight=\"bold\" fill=\"#263238\">{}</text><text x=\"{cx:.1}\" y=\"{:.1}\" text-anchor=\"middle\" font-size=\"11\" fill=\"#607d8b\">{}</text></g>",
            xml_escape(&n.id()),
            r.x,
            r.y,
            r.w,
            r.h,
            r.y + 21.0,
            xml_escape(n.title()),
            r.y + 37.0,
            xml_escape(&n.subtitle()),
        );
    }
    s.push_str("</g>\n");

    // Labels: at the middle of each edge's first stretch, spread apart
    // where several share a gap between columns.
    let mut anchors: Vec<(f64, f64)> = Vec::with_capacity(g.edges.len());
    let mut gap_of: Vec<Option<usize>> = Vec::with_capacity(g.edges.len());
    for (e, path) in g.edges.iter().zip(&lay.edges) {
        let p = &path.points;
        let (a, b) = (p[0], p.get(1).copied().unwrap_or(p[0]));
        match path.route {
            Route::SelfLoop => {
                anchors.push(((a.0 + b.0) / 2.0, a.1 - 58.0));
                gap_of.push(None);
            }
            Route::Forward => {
                anchors.push(((a.0 + b.0) / 2.0, (a.1 + b.1) / 2.0 - LABEL_LINE / 2.0));
                gap_of.push(Some(lay.ranks[e.from]));
            }
            Route::Back => {
                // The first stretch runs left, into the gap before `from`.
                anchors.push(((a.0 + b.0) / 2.0, (a.1 + b.1) / 2.0 - LABEL_LINE / 2.0));
                gap_of.push(Some(lay.ranks[e.from].saturating_sub(1)));
            }
        }
    }
    let mut groups: std::collections::BTreeMap<usize, Vec<usize>> = Default::default();
    for (i, gap) in gap_of.iter().enumerate() {
        if let Some(gap) = gap {
            groups.entry(*gap).or_default().push(i);
        }
    }
    for members in groups.values_mut() {
        members.sort_by(|&a, &b| anchors[a].1.total_cmp(&anchors[b].1).then(a.cmp(&b)));
        let desired: Vec<f64> = members.iter().map(|&i| anchors[i].1).collect();
        let spread = layout::pack(&desired, &vec![LABEL_H; members.len().saturating_sub(1)]);
        for (&i, y) in members.iter().zip(spread) {
            anchors[i].1 = y;
        }
    }
    s.push_str("<g class=\"labels\" font-size=\"11\" text-anchor=\"middle\">\n");
    for (i, (e, &(x, y))) in g.edges.iter().zip(&anchors).enumerate() {
        let color = health(e).color();
        let w = label_width(e);
        let _ = writeln!(
            s,
            "<rect class=\"label-bg\" x=\"{:.1}\" y=\"{:.1}\" width=\"{w:.1}\" height=\"{:.1}\" rx=\"3\" fill=\"#ffffff\" fill-opacity=\"0.9\" stroke=\"none\"/><text class=\"edge-label\" id=\"label-{i}\" x=\"{x:.1}\" y=\"{y:.1}\" fill=\"{color}\"><tspan x=\"{x:.1}\" font-weight=\"bold\">{}</tspan><tspan x=\"{x:.1}\" dy=\"{LABEL_LINE}\">{}</tspan></text>",
            x - w / 2.0,
            y - LABEL_LINE + 1.0,
            LABEL_H - 4.0,
            xml_escape(&e.rps_text()),
            xml_escape(&e.quality_text()),
        );
    }
    s.push_str("</g>\n</g>\n");

    // Legend.
    let ly = HEADER + body_h + 22.0;
    let mut x = params.margin;
    s.push_str("<g class=\"legend\" font-size=\"11\" fill=\"#455a64\">\n");
    for h in Health::ALL {
        let _ = writeln!(
            s,
            "<line x1=\"{x:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"{}\" stroke-width=\"3\"/><text x=\"{:.1}\" y=\"{ly:.1}\">{}</text>",
            ly - 4.0,
            x + 22.0,
            ly - 4.0,
            h.color(),
            x + 28.0,
            xml_escape(h.meaning())
        );
        x += 28.0 + text_w(h.meaning(), 11.0, false) + 18.0;
    }
    let _ = writeln!(
        s,
        "<line x1=\"{x:.1}\" y1=\"{:.1}\" x2=\"{:.1}\" y2=\"{:.1}\" stroke=\"#455a64\" stroke-width=\"2\" stroke-dasharray=\"7 4\"/><text x=\"{:.1}\" y=\"{ly:.1}\">{}</text>",
        ly - 4.0,
        x + 22.0,
        ly - 4.0,
        x + 28.0,
        DASHED_MEANING
    );
    s.push_str("</g>\n</svg>\n");
    s
}

const DASHED_MEANING: &str = "seen only by the callee's proxy · arrow width: rps";

fn legend_width() -> f64 {
    Health::ALL
        .iter()
        .map(|h| 28.0 + text_w(h.meaning(), 11.0, false) + 18.0)
        .sum::<f64>()
        + 28.0
        + text_w(DASHED_MEANING, 11.0, false)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::observe::graph::tests::demo;
    use crate::observe::graph::{Edge, Node};

    /// A small XML well-formedness check: tags nest and close, attributes
    /// are quoted and unique, entities are the predefined ones or numeric,
    /// there is one root. Returns the start tags as (name, attributes).
    pub(crate) fn check_xml(doc: &str) -> Vec<(String, Vec<(String, String)>)> {
        let mut tags = Vec::new();
        let mut stack: Vec<String> = Vec::new();
        let mut roots = 0;
        let mut rest = doc;
        let check_text = |t: &str| {
            let mut parts = t.split('&');
            parts.next();
            for p in parts {
                let (ent, _) = p
                    .split_once(';')
                    .unwrap_or_else(|| panic!("bare & in {t:?}"));
                assert!(
                    ["amp", "lt", "gt", "quot", "apos"].contains(&ent)
                        || (ent.starts_with('#') && ent.len() > 1),
                    "entity {ent:?}"
                );
            }
            assert!(!t.contains('<'), "< in text {t:?}");
        };
        while let Some(start) = rest.find('<') {
            let text = &rest[..start];
            check_text(text);
            if stack.is_empty() {
                assert!(text.trim().is_empty(), "text outside the root: {text:?}");
            }
            rest = &rest[start..];
            if let Some(r) = rest.strip_prefix("<?") {
                let end = r.find("?>").expect("closed declaration");
                rest = &r[end + 2..];
                continue;
            }
            let end = rest.find('>').expect("tag closed");
            let tag = &rest[1..end];
            rest = &rest[end + 1..];
            if let Some(name) = tag.strip_prefix('/') {
                assert_eq!(stack.pop().as_deref(), Some(name.trim()), "closing tag");
                continue;
            }
            let self_closing = tag.ends_with('/');
            let tag = tag.trim_end_matches('/');
            let name_end = tag.find(char::is_whitespace).unwrap_or(tag.len());
            let name = &tag[..name_end];
            assert!(
                !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == ':'),
                "tag name {name:?}"
            );
            let mut attrs: Vec<(String, String)> = Vec::new();
            let mut a = tag[name_end..].trim_start();
            while !a.is_empty() {
                let eq = a
                    .find('=')
                    .unwrap_or_else(|| panic!("attribute without value in <{tag}>"));
                let key = a[..eq].trim();
                assert!(
                    !attrs.iter().any(|(k, _)| k == key),
                    "duplicate {key} in <{tag}>"
                );
                let after = &a[eq + 1..];
                assert!(after.starts_with('"'), "unquoted {key} in <{tag}>");
                let close = after[1..].find('"').expect("attribute closed");
                let value = &after[1..1 + close];
                check_text(value);
                attrs.push((key.to_owned(), value.to_owned()));
                a = after[close + 2..].trim_start();
            }
            if stack.is_empty() {
                roots += 1;
            }
            tags.push((name.to_owned(), attrs));
            if !self_closing {
                stack.push(name.to_owned());
            }
        }
        check_text(rest);
        assert!(rest.trim().is_empty(), "trailing text");
        assert!(stack.is_empty(), "unclosed {stack:?}");
        assert_eq!(roots, 1, "one root element");
        tags
    }

    fn attr<'a>(attrs: &'a [(String, String)], key: &str) -> Option<&'a str> {
        attrs
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn svg_is_well_formed_with_every_node_edge_and_label() {
        let g = demo();
        let svg = g.to_svg();
        let tags = check_xml(&svg);
        assert_eq!(tags[0].0, "svg");
        assert_eq!(
            attr(&tags[0].1, "xmlns"),
            Some("http://www.w3.org/2000/svg")
        );
        let class_count = |class: &str| {
            tags.iter()
                .filter(|(_, a)| attr(a, "class") == Some(class))
                .count()
        };
        assert_eq!(class_count("node"), 5);
        assert_eq!(class_count("edge"), 4);
        assert_eq!(class_count("edge-label"), 4);
        for n in &g.nodes {
            assert!(
                svg.contains(&format!("<title>{}</title>", xml_escape(&n.id()))),
                "{}",
                n.id()
            );
            assert!(svg.contains(&format!(">{}</text>", xml_escape(n.title()))));
        }
        assert!(svg.contains(">10.00 rps</tspan>"));
        assert!(svg.contains(">90.00% · p99 -</tspan>"));
        assert!(svg.contains(">75.00% · p99 90.0ms</tspan>"));
        assert!(svg.contains(">outside the mesh</text>"));
        // Every marker an edge refers to is defined.
        let markers: Vec<&str> = tags
            .iter()
            .filter(|(n, _)| n == "marker")
            .filter_map(|(_, a)| attr(a, "id"))
            .collect();
        for (_, a) in tags.iter().filter(|(n, _)| n == "path") {
            if let Some(m) = attr(a, "marker-end") {
                let id = m.trim_start_matches("url(#").trim_end_matches(')');
                assert!(markers.contains(&id), "{m}");
            }
        }
        // The only edge seen by the destination alone is dashed.
        assert_eq!(
            svg.matches("stroke-dasharray=\"7 4\" marker-end").count(),
            1
        );
    }

    #[test]
    fn svg_places_callers_left_of_callees() {
        let g = demo();
        let svg = g.to_svg();
        let tags = check_xml(&svg);
        let rects: Vec<f64> = tags
            .iter()
            .filter(|(n, a)| n == "rect" && attr(a, "rx") == Some("8"))
            .map(|(_, a)| attr(a, "x").and_then(|x| x.parse().ok()).expect("x"))
            .collect();
        assert_eq!(rects.len(), g.nodes.len());
        for e in &g.edges {
            assert!(rects[e.from] < rects[e.to], "{:?}", g.ends(e));
        }
        // unknown -> frontend -> backend-v1 -> db: four columns.
        let mut xs = rects.clone();
        xs.sort_by(f64::total_cmp);
        xs.dedup();
        assert_eq!(xs.len(), 4, "{rects:?}");
    }

    #[test]
    fn svg_of_an_empty_graph_and_of_cycles() {
        let empty = Graph {
            window: "5m".into(),
            ..Graph::default()
        };
        let svg = empty.to_svg();
        check_xml(&svg);
        assert!(svg.contains("no requests between workloads"));

        let node = |w: &str| Node {
            namespace: "ns".into(),
            workload: w.into(),
        };
        let edge = |from, to| Edge {
            from,
            to,
            rps: 1.0,
            success_rate: Some(1.0),
            p99_ms: Some(5.0),
            seen_by: Reporter::Source,
            tcp: None,
        };
        let cyclic = Graph {
            nodes: vec![node("a&b"), node("<c>"), node("d")],
            edges: vec![edge(0, 1), edge(1, 2), edge(2, 0), edge(1, 1)],
            window: "1m".into(),
            namespace: None,
        };
        let svg = cyclic.to_svg();
        let tags = check_xml(&svg);
        assert_eq!(
            tags.iter()
                .filter(|(_, a)| attr(a, "class") == Some("edge"))
                .count(),
            4
        );
        assert!(svg.contains(">a&amp;b</text>") && svg.contains(">&lt;c&gt;</text>"));
    }

    type Area = (f64, f64, f64, f64);

    /// A bigger mesh with a fan-out, a fan-in, an edge skipping a column, a
    /// cycle and a self-loop: boxes and labels never overlap. Set
    /// `WEFT_SVG_OUT=FILE` to look at it.
    #[test]
    fn a_bigger_mesh_is_drawn_without_overlaps() {
        let node = |ns: &str, w: &str| Node {
            namespace: ns.into(),
            workload: w.into(),
        };
        let nodes = vec![
            node("unknown", "unknown"),
            node("ingress", "gateway"),
            node("shop", "frontend"),
            node("shop", "cart"),
            node("shop", "catalog"),
            node("shop", "user-profile-service"),
            node("shop", "search"),
            node("data", "postgres"),
        ];
        let edge = |from, to, rps: f64, ok: f64| Edge {
            from,
            to,
            rps,
            success_rate: (rps > 0.0).then_some(ok),
            p99_ms: (rps > 0.0).then_some(12.5 * (from + to + 1) as f64),
            seen_by: if from == 0 {
                Reporter::Destination
            } else {
                Reporter::Source
            },
            tcp: None,
        };
        let g = Graph {
            nodes,
            edges: vec![
                edge(0, 1, 3.0, 1.0),
                edge(1, 2, 120.0, 0.999),
                edge(2, 3, 40.0, 0.97),
                edge(2, 4, 60.0, 1.0),
                edge(2, 5, 20.0, 0.5),
                edge(3, 7, 40.0, 1.0),
                edge(4, 7, 55.0, 1.0),
                edge(5, 7, 20.0, 1.0),
                edge(4, 6, 12.0, 1.0),
                edge(6, 4, 2.0, 1.0),
                edge(2, 7, 0.0, 1.0),
                edge(7, 7, 1.5, 1.0),
            ],
            window: "5m".into(),
            namespace: Some("shop".into()),
        };
        let svg = g.to_svg();
        if let Ok(path) = std::env::var("WEFT_SVG_OUT") {
            std::fs::write(path, &svg).expect("write");
        }
        let tags = check_xml(&svg);
        let rect = |a: &[(String, String)]| {
            let f = |k: &str| attr(a, k).and_then(|v| v.parse::<f64>().ok()).expect(k);
            (f("x"), f("y"), f("width"), f("height"))
        };
        let boxes: Vec<Area> = tags
            .iter()
            .filter(|(n, a)| n == "rect" && attr(a, "rx") == Some("8"))
            .map(|(_, a)| rect(a))
            .collect();
        let labels: Vec<Area> = tags
            .iter()
            .filter(|(_, a)| attr(a, "class") == Some("label-bg"))
            .map(|(_, a)| rect(a))
            .collect();
        assert_eq!(boxes.len(), 8);
        assert_eq!(labels.len(), 12);
        let overlap = |a: Area, b: Area| {
            a.0 < b.0 + b.2 && b.0 < a.0 + a.2 && a.1 < b.1 + b.3 && b.1 < a.1 + a.3
        };
        let all: Vec<(&str, Area)> = boxes
            .iter()
            .map(|b| ("box", *b))
            .chain(labels.iter().map(|l| ("label", *l)))
            .collect();
        for (i, a) in all.iter().enumerate() {
            for b in &all[i + 1..] {
                assert!(!overlap(a.1, b.1), "{a:?} overlaps {b:?}");
            }
        }
        // Columns by depth: the caller outside the mesh, gateway, frontend.
        let xs: Vec<f64> = boxes.iter().map(|b| b.0 + b.2 / 2.0).collect();
        assert!(xs[0] < xs[1] && xs[1] < xs[2] && xs[2] < xs[3]);
        assert!(xs[3] == xs[4] && xs[4] == xs[5], "{xs:?}");
        assert!(xs[6] > xs[4] && xs[7] > xs[5], "{xs:?}");
    }

    #[test]
    fn xml_checker_rejects_broken_documents() {
        for bad in [
            "<svg><g></svg>",
            "<svg a=b/>",
            "<svg>&nbsp;</svg>",
            "<svg/><svg/>",
            "<svg a=\"1\" a=\"2\"/>",
            "<svg>x < y</svg>",
        ] {
            let result = std::panic::catch_unwind(|| check_xml(bad));
            assert!(result.is_err(), "accepted {bad}");
        }
        check_xml("<?xml version=\"1.0\"?>\n<svg a=\"&amp;\"><g/>t</svg>\n");
    }

    #[test]
    fn paths_are_smooth_curves() {
        assert_eq!(
            path_data(&[(0.0, 0.0), (100.0, 50.0)], Route::Forward),
            "M0.0,0.0 C50.0,0.0 50.0,50.0 100.0,50.0"
        );
        assert!(
            path_data(&[(10.0, 5.0), (0.0, 5.0)], Route::SelfLoop)
                .starts_with("M10.0,5.0 C22.0,-39.0")
        );
        assert_eq!(path_data(&[], Route::Forward), "");
    }
}
