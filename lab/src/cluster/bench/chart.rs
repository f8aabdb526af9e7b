//! The bench's bar chart: ratios to kernel VXLAN, one group per workload that has one.

use super::Workload;
use std::fmt::Write as _;

const COLOURS: [&str; 10] = [
    "#4c78a8", "#f58518", "#54a24b", "#b279a2", "#e45756", "#72b7b2", "#eeca3b", "#9d755d",
    "#ff9da6", "#bab0ac",
];
/// Legend entries per row: a row is the chart's width, so every mode gets its entry.
const LEGEND_PER_ROW: usize = 3;

/// Every bar reads "higher is better": a cost (CPU per Gbit) is drawn inverted.
fn ratio(w: Workload, v: f64, base: f64) -> f64 {
    match (w.higher_is_better(), base > 0.0, v > 0.0) {
        (true, true, _) => v / base,
        (false, _, true) => base / v,
        _ => 0.0,
    }
}

/// A grouped bar chart of the medians' ratios to `reference` (kernel VXLAN's medians);
/// `medians[m]` holds mode `m`'s, in `Workload::ALL` order.
pub fn svg(modes: &[&str], medians: &[Vec<f64>], reference: &[f64]) -> String {
    let charted: Vec<(usize, Workload)> = Workload::ALL
        .iter()
        .enumerate()
        .filter(|(_, w)| w.has_ratio())
        .map(|(i, w)| (i, *w))
        .collect();
    let legend_rows = modes.len().div_ceil(LEGEND_PER_ROW);
    let (w, left, top) = (900.0, 60.0, 40.0);
    let bottom = 50.0 + 20.0 * legend_rows as f64;
    let h = 340.0 + bottom;
    let plot_h = h - top - bottom;
    let ratios: Vec<Vec<f64>> = medians
        .iter()
        .map(|m| {
            charted
                .iter()
                .map(|(wi, wl)| ratio(*wl, m[*wi], reference[*wi]))
                .collect()
        })
        .collect();
    let max = ratios
        .iter()
        .flatten()
        .copied()
        .fold(1.0f64, f64::max)
        .ceil();
    let group_w = (w - left - 20.0) / charted.len() as f64;
    let bar_w = group_w * 0.8 / modes.len().max(1) as f64;
    let y = |r: f64| top + plot_h * (1.0 - r / max);
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(
        s,
        r#"<text x="{left}" y="20" font-size="14">podwire end-to-end bench: ratio to kernel VXLAN, higher is better (median of rounds; CPU per Gbit drawn inverted)</text>"#
    );
    let mut r = 0.0;
    while r <= max + 1e-9 {
        let _ = writeln!(
            s,
            r##"<line x1="{left}" x2="{}" y1="{y0:.1}" y2="{y0:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{r:.1}x</text>"##,
            w - 20.0,
            left - 6.0,
            y(r) + 4.0,
            y0 = y(r)
        );
        r += if max > 4.0 { 1.0 } else { 0.5 };
    }
    let _ = writeln!(
        s,
        r#"<line x1="{left}" x2="{}" y1="{y1:.1}" y2="{y1:.1}" stroke="black" stroke-dasharray="4 3"/>"#,
        w - 20.0,
        y1 = y(1.0)
    );
    for (g, (_, wl)) in charted.iter().enumerate() {
        let gx = left + g as f64 * group_w + group_w * 0.1;
        for (m, mode_ratios) in ratios.iter().enumerate() {
            let v = mode_ratios[g];
            let x = gx + m as f64 * bar_w;
            let _ = writeln!(
                s,
                r#"<rect x="{x:.1}" y="{:.1}" width="{:.1}" height="{:.1}" fill="{}"><title>{}: {v:.2}x</title></rect><text x="{:.1}" y="{:.1}" text-anchor="middle" font-size="9">{v:.2}</text>"#,
                y(v),
                (bar_w - 2.0).max(1.0),
                (top + plot_h - y(v)).max(0.0),
                COLOURS[m % COLOURS.len()],
                modes[m],
                x + bar_w / 2.0 - 1.0,
                y(v) - 3.0
            );
        }
        let _ = writeln!(
            s,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{}</text>"#,
            gx + group_w * 0.4,
            top + plot_h + 18.0,
            if wl.higher_is_better() {
                wl.name().to_string()
            } else {
                format!("1 / {}", wl.name())
            }
        );
    }
    write_legend(&mut s, modes, left, w, top + plot_h + 40.0);
    s.push_str("</svg>\n");
    s
}

/// The modes' colours, `LEGEND_PER_ROW` to a row from `legend_top` down.
fn write_legend(s: &mut String, modes: &[&str], left: f64, w: f64, legend_top: f64) {
    let entry_w = (w - left) / LEGEND_PER_ROW as f64;
    for (m, mode) in modes.iter().enumerate() {
        let x = left + (m % LEGEND_PER_ROW) as f64 * entry_w;
        let row_y = legend_top + 20.0 * (m / LEGEND_PER_ROW) as f64;
        let _ = writeln!(
            s,
            r#"<rect x="{x:.1}" y="{:.1}" width="12" height="12" fill="{}"/><text x="{:.1}" y="{row_y:.1}">{mode}</text>"#,
            row_y - 10.0,
            COLOURS[m % COLOURS.len()],
            x + 16.0,
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn medians(tcp: f64, rate: f64, cpu: f64) -> Vec<f64> {
        // Workload::ALL order: tcp1, tcp4, offered, delivered, loss, ndr, cpu.
        vec![tcp, tcp, rate * 2.0, rate, 1.0, rate, cpu]
    }

    #[test]
    fn test_svg_bars_and_inverted_cost() {
        let s = svg(
            &["kernel-vxlan", "podwire-udp"],
            &[medians(1000.0, 300.0, 1.0), medians(500.0, 450.0, 2.0)],
            &medians(1000.0, 300.0, 1.0),
        );
        assert!(s.starts_with("<svg") && s.trim_end().ends_with("</svg>"));
        // 5 charted workloads (tcp1, tcp4, delivered, ndr, cpu) x 2 modes, and 2 legend keys.
        assert_eq!(s.matches("<rect").count(), 5 * 2 + 2, "{s}");
        // tcp1, tcp4 at 0.5; CPU cost drawn inverted: twice the CPU per Gbit is a 0.5 bar.
        assert_eq!(s.matches(">0.50<").count(), 3, "{s}");
        assert_eq!(s.matches(">1.50<").count(), 2, "{s}");
    }

    #[test]
    fn test_legend_names_every_mode() {
        // Every mode the bench knows, with their real (long) names.
        let names: Vec<String> = super::super::MODES
            .iter()
            .chain(super::super::EXTRA_MODES.iter())
            .map(ToString::to_string)
            .collect();
        let modes: Vec<&str> = names.iter().map(String::as_str).collect();
        let m = vec![medians(1.0, 1.0, 1.0); modes.len()];
        let s = svg(&modes, &m, &medians(1.0, 1.0, 1.0));
        let attr = |tag: &str, name: &str| -> f64 {
            tag.split(&format!("{name}=\""))
                .nth(1)
                .and_then(|r| r.split('"').next())
                .and_then(|v| v.parse().ok())
                .unwrap()
        };
        let (width, height) = (attr(&s, "width"), attr(&s, "height"));
        for name in &names {
            let end = s
                .find(&format!(">{name}</text>"))
                .unwrap_or_else(|| panic!("{name} missing"));
            let tag = &s[s[..end].rfind("<text").unwrap()..end];
            let (x, y) = (attr(tag, "x"), attr(tag, "y"));
            // Inside the drawing, with room for the name: not cut off past the edge.
            assert!(
                x + 8.0 * name.len() as f64 <= width && y < height,
                "{name} at ({x}, {y}) outside {width}x{height}"
            );
        }
    }
}
