//! The expert heatmap: one row per MoE layer, one column per expert (or per bin of experts),
//! intensity = share of the window's tokens routed to the expert.

use ratatui::Frame;
use ratatui::layout::Rect;
use ratatui::style::Style;
use ratatui::text::{Line, Span};
use ratatui::widgets::Paragraph;

use crate::profiling::snapshot::Snapshot;
use crate::tui::app::{App, Panel};
use crate::tui::render::{layout::first_visible, panel_block};
use crate::tui::theme::Theme;

/// How experts map onto character cells.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CellMode {
    /// Each expert gets this many characters (at least one).
    Wide(u16),
    /// Two experts per character: `▌` with the left expert as foreground, the right as background.
    Half,
    /// Each character shows the mean share of this many consecutive experts.
    Binned(usize),
}

/// Most characters per expert: wider cells stop helping the eye.
const MAX_CELL_W: u16 = 6;
/// Most lines per row.
const MAX_ROW_H: u16 = 3;

/// Where the heatmap's parts are, shared by drawing and mouse hit-testing.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HeatGeometry {
    /// Width of the row labels (`▶L13 `).
    pub label_w: u16,
    /// The cell region: one line per visible MoE layer.
    pub cells: Rect,
    /// Experts per character.
    pub mode: CellMode,
    /// First visible MoE slot.
    pub first_row: usize,
    /// MoE layers per row: 1, or more when the layers outnumber the rows and the view is not
    /// zoomed (a row then shows their mean).
    pub layers_per_row: usize,
    /// MoE layers in the model.
    pub n_layers: usize,
    /// Experts per layer.
    pub n_experts: usize,
    /// First expert drawn (zoomed in: the cells show a window of experts around the cursor).
    pub first_expert: usize,
    /// Experts drawn.
    pub visible_experts: usize,
    /// Column of the shared experts (every token uses them), right of the cells, if the model
    /// has any.
    pub shared_x: Option<u16>,
    /// Rows drawn (each `row_h` lines tall).
    pub rows: u16,
    /// Lines per row: more than one when the panel has height to spare.
    pub row_h: u16,
    /// Line of the expert axis and cursor, if there is room.
    pub axis_y: Option<u16>,
    /// Line of the detail for the cell under the cursor, if there is room.
    pub detail_y: Option<u16>,
}

impl HeatGeometry {
    /// Computes the geometry of the heatmap in panel `area`.
    pub fn new(area: Rect, app: &App, snap: &Snapshot) -> Self {
        let inner = Rect {
            y: area.y + 1,
            height: area.height.saturating_sub(1),
            ..area
        };
        let n = snap.policy.layers.len();
        let e = snap.model.n_experts.max(1);
        // Rows first, then the detail line, then the axis.
        let avail = inner.height.saturating_sub(1).max(inner.height.min(1)) as usize;
        // Fit every layer unless zoomed in: then one layer per row, scrolling with the cursor.
        let layers_per_row = if app.heat_zoom || n <= avail || avail == 0 {
            1
        } else {
            n.div_ceil(avail)
        };
        let rows = n.div_ceil(layers_per_row).min(avail) as u16;
        // Spare height makes the rows taller (up to 3 lines), once the axis and the detail
        // line have theirs, so that the heatmap grows with the panel.
        let row_h = if layers_per_row == 1 && rows > 0 && !app.heat_zoom {
            (inner.height.saturating_sub(2) / rows).clamp(1, MAX_ROW_H)
        } else {
            1
        };
        let detail = inner.height > rows * row_h;
        let axis = inner.height > rows * row_h + 1;
        // Over every row, drawn or not, so that the cells do not move while scrolling.
        let label_w = (0..n.div_ceil(layers_per_row))
            .map(|r| row_label(&snap.model.moe_layers, r * layers_per_row, layers_per_row).len())
            .max()
            .unwrap_or(1) as u16
            + 2;
        let shared = snap.model.shared_experts > 0;
        // A shared-expert column takes three characters: a space, a rule and the cell.
        let cells_w = inner
            .width
            .saturating_sub(label_w + 1 + if shared { 3 } else { 0 })
            .max(1);
        let zoomed = app.heat_zoom && e > cells_w as usize;
        let mode = if e <= cells_w as usize {
            CellMode::Wide((cells_w / e as u16).clamp(1, MAX_CELL_W))
        } else if zoomed {
            CellMode::Wide(1)
        } else if app.theme.has_color() && e <= 2 * cells_w as usize {
            CellMode::Half
        } else {
            CellMode::Binned(e.div_ceil(cells_w as usize))
        };
        let (first_expert, visible_experts) = if zoomed {
            let shown = cells_w as usize;
            let cursor = app.expert.min(e - 1);
            (cursor.saturating_sub(shown / 2).min(e - shown), shown)
        } else {
            (0, e)
        };
        let used_w = match mode {
            CellMode::Wide(w) => w * visible_experts as u16,
            CellMode::Half => e.div_ceil(2) as u16,
            CellMode::Binned(b) => e.div_ceil(b) as u16,
        };
        let cells = Rect::new(
            inner.x + label_w,
            inner.y,
            used_w.min(cells_w),
            rows * row_h,
        );
        let shared_x = shared.then_some(cells.x + cells.width + 2);
        Self {
            label_w,
            cells,
            mode,
            first_row: if layers_per_row == 1 {
                first_visible(app.layer, rows as usize, n)
            } else {
                0
            },
            layers_per_row,
            n_layers: n,
            n_experts: e,
            first_expert,
            visible_experts,
            shared_x,
            rows,
            row_h,
            axis_y: axis.then_some(inner.y + rows * row_h),
            detail_y: detail.then_some(inner.y + rows * row_h + axis as u16),
        }
    }

    /// True when the cells show a window of the experts (zoomed in), not all of them.
    pub fn is_zoomed(&self) -> bool {
        self.visible_experts < self.n_experts
    }

    /// Column (absolute x) of expert `e` (a visible one).
    pub fn x_of(&self, e: usize) -> u16 {
        let off = match self.mode {
            CellMode::Wide(w) => e.saturating_sub(self.first_expert) as u16 * w,
            CellMode::Half => (e / 2) as u16,
            CellMode::Binned(b) => (e / b) as u16,
        };
        self.cells.x + off
    }

    /// The expert drawn at absolute column `x` (the first of its bin), if any.
    pub fn expert_at(&self, x: u16) -> Option<usize> {
        if x < self.cells.x || x >= self.cells.x + self.cells.width {
            return None;
        }
        let c = (x - self.cells.x) as usize;
        let e = match self.mode {
            CellMode::Wide(w) => self.first_expert + c / w as usize,
            CellMode::Half => 2 * c,
            CellMode::Binned(b) => c * b,
        };
        (e < self.n_experts).then_some(e)
    }

    /// The MoE slot drawn on absolute line `y`, if any.
    pub fn slot_at(&self, y: u16) -> Option<usize> {
        (y >= self.cells.y && y < self.cells.y + self.cells.height)
            .then(|| {
                self.first_row
                    + ((y - self.cells.y) / self.row_h.max(1)) as usize * self.layers_per_row
            })
            .filter(|&s| s < self.n_layers)
    }

    /// The first line (absolute y) of drawn row `row`.
    pub fn row_y(&self, row: u16) -> u16 {
        self.cells.y + row * self.row_h.max(1)
    }
}

/// `L5`, or `L4-7` for a row holding several layers; `first` is a MoE slot.
fn row_label(moe_layers: &[usize], first: usize, per_row: usize) -> String {
    let last = (first + per_row).min(moe_layers.len()).saturating_sub(1);
    match (moe_layers.get(first), moe_layers.get(last)) {
        (Some(a), Some(b)) if a != b => format!("L{a}-{b}"),
        (Some(a), _) => format!("L{a}"),
        _ => String::new(),
    }
}

impl HeatGeometry {
    /// The MoE slots drawn on row `row` (counted from the top of the cells).
    pub fn row_slots(&self, row: u16) -> std::ops::Range<usize> {
        let start = (self.first_row + row as usize * self.layers_per_row).min(self.n_layers);
        start..(start + self.layers_per_row).min(self.n_layers)
    }
}

/// The mean share of each expert over the layers `slots` of the window.
fn row_shares(snap: &Snapshot, slots: std::ops::Range<usize>) -> Vec<f64> {
    let layers = &snap.epoch.window.layers[slots];
    let e = layers.first().map_or(0, |l| l.expert_token_share.len());
    (0..e)
        .map(|x| layers.iter().map(|l| l.expert_token_share[x]).sum::<f64>() / layers.len() as f64)
        .collect()
}

/// The value drawn for each column of one layer's row (share, or mean share of a bin).
fn column_values(shares: &[f64], mode: CellMode) -> Vec<f64> {
    match mode {
        CellMode::Wide(_) | CellMode::Half => shares.to_vec(),
        CellMode::Binned(b) => shares
            .chunks(b)
            .map(|c| c.iter().sum::<f64>() / c.len() as f64)
            .collect(),
    }
}

/// The scale of the heatmap: the largest value it would draw with geometry `g`, over all layers
/// (binned as `g` bins them), so that colours do not change while scrolling.
pub fn scale_max(snap: &Snapshot, g: &HeatGeometry) -> f64 {
    max_of(&binned_rows(snap, g), g.mode)
}

/// The mean expert shares of every row `g` bins the layers into, drawn or not (row `r` holds
/// slots from `r * layers_per_row`).
fn binned_rows(snap: &Snapshot, g: &HeatGeometry) -> Vec<Vec<f64>> {
    let n = snap.epoch.window.layers.len();
    (0..n)
        .step_by(g.layers_per_row.max(1))
        .map(|s| row_shares(snap, s..(s + g.layers_per_row).min(n)))
        .collect()
}

fn max_of(rows: &[Vec<f64>], mode: CellMode) -> f64 {
    rows.iter()
        .flat_map(|r| column_values(r, mode))
        .fold(0.0, f64::max)
}

/// Draws the heatmap panel.
pub fn render(frame: &mut Frame, area: Rect, app: &App) {
    let Some(snap) = app.displayed() else {
        return;
    };
    let theme = &app.theme;
    let g = HeatGeometry::new(area, app, snap);
    // Computed once a frame: the scale needs every row, the cells only the drawn ones.
    let rows = binned_rows(snap, &g);
    let max = max_of(&rows, g.mode);
    let window = &snap.epoch.window;
    let mode_note = match g.mode {
        CellMode::Wide(_) if g.is_zoomed() => format!(
            "zoom: experts {}-{} of {} (z: fit) ",
            g.first_expert,
            g.first_expert + g.visible_experts - 1,
            g.n_experts
        ),
        CellMode::Wide(_) => String::new(),
        CellMode::Half => "1 cell = 2 experts (z: zoom) ".to_string(),
        CellMode::Binned(b) => format!("1 cell = {b} experts (z: zoom) "),
    };
    let mut title = vec![
        Span::raw(" Experts: share of window tokens "),
        Span::styled(mode_note, theme.dim()),
    ];
    // Legend: the ramp (or shades) from 0 to the scale's maximum.
    title.push(Span::styled("0 ", theme.dim()));
    if theme.has_color() {
        for v in [0.01, 0.25, 0.5, 0.75, 1.0] {
            title.push(Span::styled("█", Style::new().fg(theme.heat(v))));
        }
    } else {
        for v in [0.25, 0.5, 0.75, 1.0] {
            title.push(Span::raw(Theme::shade(v)));
        }
    }
    title.push(Span::styled(format!(" {:.1}% ", 100.0 * max), theme.dim()));
    title.push(Span::styled(format!("{} tok ", window.tokens), theme.dim()));
    if snap.model.shared_experts > 0 {
        title.push(Span::styled("S: shared, every token ", theme.dim()));
    }
    let n = window.layers.len();
    if g.layers_per_row > 1 {
        title.push(Span::styled(
            format!("1 row = {} layers ", g.layers_per_row),
            theme.dim(),
        ));
    } else if (g.rows as usize) < n {
        title.push(Span::styled(
            format!(
                "rows {}-{} of {n} ",
                g.first_row + 1,
                g.first_row + g.rows as usize
            ),
            theme.dim(),
        ));
    }
    frame.render_widget(
        panel_block(app, Line::from(title), app.panel == Panel::Heatmap),
        area,
    );
    let norm = |v: f64| if max > 0.0 { v / max } else { 0.0 };
    let buf = frame.buffer_mut();
    for row in 0..g.rows {
        let slots = g.row_slots(row);
        if slots.is_empty() {
            break;
        }
        let y = g.row_y(row);
        let selected = slots.contains(&app.layer);
        let label = format!(
            "{}{:<w$}",
            if selected { "▶" } else { " " },
            row_label(&snap.model.moe_layers, slots.start, slots.len()),
            w = (g.label_w - 2) as usize
        );
        let style = if selected {
            theme.selected()
        } else {
            theme.dim()
        };
        buf.set_stringn(area.x, y, &label, g.label_w as usize - 1, style);
        let shares = &rows[slots.start / g.layers_per_row.max(1)];
        let shown = &shares[g.first_expert.min(shares.len())
            ..(g.first_expert + g.visible_experts).min(shares.len())];
        let values = column_values(shown, g.mode);
        match g.mode {
            CellMode::Half => {
                for (c, pair) in values.chunks(2).enumerate() {
                    let x = g.cells.x + c as u16;
                    let fg = theme.heat(norm(pair[0]));
                    // An odd expert count leaves the last right half empty.
                    let bg = pair
                        .get(1)
                        .map_or(ratatui::style::Color::Reset, |&v| theme.heat(norm(v)));
                    for dy in 0..g.row_h {
                        buf[(x, y + dy)]
                            .set_symbol("▌")
                            .set_style(Style::new().fg(fg).bg(bg));
                    }
                }
            }
            CellMode::Wide(_) | CellMode::Binned(_) => {
                let w = match g.mode {
                    CellMode::Wide(w) => w,
                    _ => 1,
                };
                for (c, &v) in values.iter().enumerate() {
                    // A one-column gap between wide cells keeps neighbouring experts apart.
                    let fill = if w >= 3 { w - 1 } else { w };
                    for dx in 0..fill {
                        let x = g.cells.x + c as u16 * w + dx;
                        for dy in 0..g.row_h {
                            let cell = &mut buf[(x, y + dy)];
                            if theme.has_color() {
                                cell.set_symbol("█")
                                    .set_style(Style::new().fg(theme.heat(norm(v))));
                            } else {
                                cell.set_symbol(Theme::shade(norm(v)));
                            }
                        }
                    }
                }
            }
        }
        if let Some(sx) = g.shared_x {
            for y in y..y + g.row_h {
                buf[(sx - 1, y)].set_symbol("│").set_style(theme.dim());
                // Every token uses the shared experts: full share, beyond the routed scale.
                if theme.has_color() {
                    buf[(sx, y)]
                        .set_symbol("█")
                        .set_style(Style::new().fg(theme.heat(1.0)));
                } else {
                    buf[(sx, y)].set_symbol(Theme::shade(1.0));
                }
            }
        }
        if selected {
            let end = g.shared_x.map_or(g.cells.x + g.cells.width, |sx| sx + 1);
            if end < area.x + area.width {
                buf.set_string(end, y, "◀", theme.selected());
            }
        }
    }
    if let Some(y) = g.axis_y {
        // Expert numbers every 8 or more columns, then the cursor on top.
        let e = g.n_experts;
        let step = match g.mode {
            CellMode::Wide(w) => (8usize).div_ceil(w as usize),
            CellMode::Half => 16,
            CellMode::Binned(b) => 8 * b,
        };
        let mut next_free = g.cells.x;
        let step = step.max(1);
        let first_label = g.first_expert.div_ceil(step) * step;
        for ex in (first_label..g.first_expert + g.visible_experts).step_by(step) {
            let x = g.x_of(ex);
            let s = ex.to_string();
            if x >= next_free && x + (s.len() as u16) <= g.cells.x + g.cells.width {
                buf.set_string(x, y, &s, theme.dim());
                next_free = x + s.len() as u16 + 1;
            }
        }
        if let Some(sx) = g.shared_x {
            buf.set_string(sx, y, "S", theme.dim());
        }
        let cx = g.x_of(app.expert.min(e.saturating_sub(1)));
        buf.set_string(cx, y, "▲", theme.marker());
    }
    if let Some(y) = g.detail_y {
        let line = detail_line(app, snap, area.width);
        frame.render_widget(Paragraph::new(line), Rect::new(area.x, y, area.width, 1));
    }
}

/// The words and numbers for the cell under the cursor.
fn detail_line(app: &App, snap: &Snapshot, width: u16) -> Line<'static> {
    let theme = &app.theme;
    let Some(l) = snap.epoch.window.layers.get(app.layer) else {
        return Line::raw("no MoE layers");
    };
    let e = app.expert.min(l.expert_token_share.len().saturating_sub(1));
    if snap.epoch.window.tokens == 0 {
        return Line::from(vec![
            Span::styled(format!(" L{} expert {e}: ", l.layer), theme.value()),
            Span::styled("no tokens yet in this epoch", theme.dim()),
        ]);
    }
    let share = l.expert_token_share.get(e).copied().unwrap_or(0.0);
    let mass = l.expert_gate_mass.get(e).copied().unwrap_or(0.0);
    // Left out whole when the panel is narrow (never cut mid-word); x opens the full table.
    crate::tui::render::header::fit(
        vec![
            (
                0,
                vec![
                    Span::styled(format!(" L{} expert {e}: ", l.layer), theme.value()),
                    Span::styled(format!("{:.1}%", 100.0 * share), theme.value()),
                    Span::raw(" of tokens, gate mass "),
                    Span::styled(format!("{mass:.3}"), theme.value()),
                ],
            ),
            (
                2,
                vec![Span::styled(
                    format!("{} unused", l.unused_experts.len()),
                    theme.dim(),
                )],
            ),
            (
                1,
                vec![Span::styled(
                    format!("load max/mean {:.2}", l.load_balance.max_over_mean),
                    theme.dim(),
                )],
            ),
        ],
        width,
    )
}
