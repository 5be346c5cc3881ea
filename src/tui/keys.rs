//! Every key binding, as one table: [`crate::tui::input`] looks keys up in it, the help overlay
//! and the status bar render from it, and the key table in `docs/tui.md` is generated from it
//! ([`markdown_table`], checked by a test).
//!
//! Mouse handling is not keyed and stays in `input.rs`; its help line is a row here without keys.

use crossterm::event::{KeyCode, KeyEvent, KeyModifiers};

/// What a key asks for, before the UI state gives it a meaning (the arrows move a threshold or
/// the expert cursor depending on the panel).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    /// Leave the UI.
    Quit,
    /// Close the help overlay, or quit when none is open.
    Escape,
    /// Open or close the help overlay.
    ToggleHelp,
    /// Switch between the sliders and the heatmap.
    NextPanel,
    /// Previous slider / layer.
    Up,
    /// Next slider / layer.
    Down,
    /// Threshold down or cursor left: a small step, a big one with Shift.
    Left,
    /// Threshold up or cursor right: a small step, a big one with Shift.
    Right,
    /// Threshold down or cursor left by a big step.
    LeftBig,
    /// Threshold up or cursor right by a big step.
    RightBig,
    /// Threshold up by a big step, in either panel.
    ThresholdUpBig,
    /// Threshold down by a big step, in either panel.
    ThresholdDownBig,
    /// Apply the focused layer's policy to every layer.
    ApplyToAll,
    /// Threshold → top-k → dense → threshold.
    CyclePolicy,
    /// k of top-k up by one.
    IncreaseK,
    /// k of top-k down by one.
    DecreaseK,
    /// Capacity factor on / off.
    ToggleCapacity,
    /// Capacity factor down by a step (on, if it was off).
    CapacityDown,
    /// Capacity factor up by a step (on, if it was off).
    CapacityUp,
    /// Renormalised combine weights on / off (threshold and top-k).
    ToggleRenormalize,
    /// Heatmap: fit every expert / one expert per cell around the cursor.
    ToggleZoom,
    /// Freeze / unfreeze the display.
    ToggleFreeze,
    /// Pause / resume the model.
    TogglePause,
    /// Reset the statistics.
    Reset,
    /// Export a report.
    Export,
    /// Hand the terminal back to the shell and stop (`fg` resumes).
    Suspend,
    /// Open / close the per-expert table of the selected layer.
    ToggleTable,
    /// Cycle the per-expert table's sort column.
    CycleSort,
    /// Lower the redraw cap.
    FpsDown,
    /// Raise the redraw cap.
    FpsUp,
    /// Run a quick tune (per-layer thresholds within the tune budget).
    QuickTune,
    /// Apply what the open dialog offers (the quick tune's thresholds).
    Confirm,
    /// Open / close the token view (follow one token's route).
    FollowToken,
    /// Token view: take the latest pass's tokens.
    UpdateTokens,
    /// A/B: start comparing with policy B and show the view / stop.
    ToggleCompare,
    /// A/B: next kind of policy B.
    CycleCompareB,
    /// A/B: B's k or t one step down.
    CompareBDown,
    /// A/B: B's k or t one step up.
    CompareBUp,
}

/// A key that triggers a command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Key {
    /// The key, whatever the modifiers other than Ctrl (Shift is part of the character, and
    /// the arrows read it themselves).
    Plain(KeyCode),
    /// The character with Ctrl held.
    Ctrl(char),
}

/// A hint in the status bar: the keys as shown there and a one-word meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hint {
    /// Position in the status bar, from the left.
    pub rank: u8,
    /// The keys, shortest form.
    pub keys: &'static str,
    /// What they do, one word.
    pub label: &'static str,
}

/// One line of the help overlay (or more, see [`Binding::help`]) and one row of the docs table.
#[derive(Clone, Copy, Debug)]
pub struct Binding {
    /// The keys and the command each one triggers; empty for the mouse row.
    pub keys: &'static [(Key, Command)],
    /// The keys as the help overlay and the docs name them.
    pub label: &'static str,
    /// What the keys do, as the help overlay says it: one line each, fitting 80 columns.
    pub help: &'static [&'static str],
    /// What the help says instead when no report exporter is plugged in (the export key).
    pub help_without_exporter: Option<&'static str>,
    /// What the keys do, as `docs/tui.md` says it (it has room for more).
    pub doc: &'static str,
    /// The status bar's hint for these keys, if they have one.
    pub hint: Option<Hint>,
    /// The keys still work while the help overlay is open.
    pub in_help: bool,
}

const fn ch(c: char) -> Key {
    Key::Plain(KeyCode::Char(c))
}

const fn hint(rank: u8, keys: &'static str, label: &'static str) -> Option<Hint> {
    Some(Hint { rank, keys, label })
}

/// Every binding, in the order of the help overlay.
pub const BINDINGS: &[Binding] = &[
    Binding {
        keys: &[
            (Key::Plain(KeyCode::Up), Command::Up),
            (Key::Plain(KeyCode::Down), Command::Down),
            (ch('k'), Command::Up),
            (ch('j'), Command::Down),
        ],
        label: "↑ ↓  k j",
        help: &["move between sliders / layers"],
        help_without_exporter: None,
        doc: "move between sliders (global first) / layers",
        hint: hint(3, "↑↓", "layer"),
        in_help: false,
    },
    Binding {
        keys: &[
            (Key::Plain(KeyCode::Left), Command::Left),
            (Key::Plain(KeyCode::Right), Command::Right),
            (ch('h'), Command::Left),
            (ch('l'), Command::Right),
        ],
        label: "← →  h l",
        help: &["threshold -/+0.01 (heatmap panel: expert cursor)"],
        help_without_exporter: None,
        doc: "sliders panel: threshold −/+0.01; heatmap panel: move the expert cursor",
        hint: hint(4, "←→", "t"),
        in_help: false,
    },
    Binding {
        keys: &[
            (ch('H'), Command::LeftBig),
            (ch('L'), Command::RightBig),
            (Key::Plain(KeyCode::PageDown), Command::ThresholdDownBig),
            (Key::Plain(KeyCode::PageUp), Command::ThresholdUpBig),
        ],
        label: "Shift+←→ H L PgDn PgUp",
        help: &["threshold -/+0.05 (heatmap: Shift/H L cursor by 8)"],
        help_without_exporter: None,
        doc: "threshold −/+0.05; in the heatmap panel Shift+← → and H L move the cursor by 8 experts instead, PgDn PgUp still change the threshold",
        hint: None,
        in_help: false,
    },
    Binding {
        keys: &[
            (Key::Plain(KeyCode::Tab), Command::NextPanel),
            (Key::Plain(KeyCode::BackTab), Command::NextPanel),
        ],
        label: "Tab",
        help: &["switch panel: sliders / heatmap"],
        help_without_exporter: None,
        doc: "switch panel (sliders / heatmap)",
        hint: hint(2, "Tab", "panel"),
        in_help: false,
    },
    Binding {
        keys: &[(ch('g'), Command::ApplyToAll)],
        label: "g",
        help: &["apply the focused layer's policy to all layers"],
        help_without_exporter: None,
        doc: "apply the focused layer's policy to every layer",
        hint: hint(5, "g", "all"),
        in_help: false,
    },
    Binding {
        keys: &[(ch('p'), Command::CyclePolicy)],
        label: "p",
        help: &["cycle the policy: threshold, top-k, dense"],
        help_without_exporter: None,
        doc: "cycle the focused slider's policy: threshold → top-k (last k, else the baseline k) → dense → threshold (last t)",
        hint: hint(6, "p", "policy"),
        in_help: false,
    },
    Binding {
        keys: &[
            (ch('+'), Command::IncreaseK),
            (ch('='), Command::IncreaseK),
            (ch('-'), Command::DecreaseK),
            (ch('_'), Command::DecreaseK),
        ],
        label: "+ -",
        help: &["k of top-k, within 1..=E"],
        help_without_exporter: None,
        doc: "k of top-k, within 1..=E (`=` and `_` work too)",
        hint: None,
        in_help: false,
    },
    Binding {
        keys: &[(ch('n'), Command::ToggleRenormalize)],
        label: "n",
        help: &["renormalise the selected experts' weights on / off"],
        help_without_exporter: None,
        doc: "threshold and top-k: combine weights renormalised over the selected experts on / off (raw probabilities otherwise); the slider shows `+n` when on",
        hint: None,
        in_help: false,
    },
    Binding {
        keys: &[(ch('z'), Command::ToggleZoom)],
        label: "z",
        help: &["heatmap: zoom to one expert and layer per cell / fit all"],
        help_without_exporter: None,
        doc: "heatmap: one expert per cell and one layer per row around the cursor (arrows and the wheels scroll) / every expert and layer, binned to fit",
        hint: None,
        in_help: false,
    },
    Binding {
        keys: &[
            (ch('c'), Command::ToggleCapacity),
            (ch('['), Command::CapacityDown),
            (ch(']'), Command::CapacityUp),
        ],
        label: "c  [ ]",
        help: &["capacity factor on / off; [ ] lower / raise it (x1.25)"],
        help_without_exporter: None,
        doc: "capacity factor on (the last one in force, else the model's, else 8) / off; `[` and `]` divide or multiply it by 1.25 (switching it on if off); the header shows the share of (token, expert) pairs the limit drops",
        hint: None,
        in_help: false,
    },
    Binding {
        keys: &[
            (ch('x'), Command::ToggleTable),
            (ch('s'), Command::CycleSort),
        ],
        label: "x  s",
        help: &["per-expert table of the selected layer; s: sort column"],
        help_without_exporter: None,
        doc: "open / close the per-expert table of the selected layer (share of the window's tokens, gate mass, load against the mean load); `s` cycles the sort column (expert, share, gate mass, load); ↑ ↓ change the layer while it is open",
        hint: hint(8, "x", "experts"),
        in_help: false,
    },
    Binding {
        keys: &[
            (ch('a'), Command::ToggleCompare),
            (ch('b'), Command::CycleCompareB),
            (ch('{'), Command::CompareBDown),
            (ch('}'), Command::CompareBUp),
        ],
        label: "a  b  { }",
        help: &["compare with policy B (A/B); b: its kind, { }: its k or t"],
        help_without_exporter: None,
        doc: "A/B (eval workload): `a` runs every batch again under a second policy B (first the compute-matched top-k) and opens the comparison view (difference heatmap, Δ experts/token, FLOPs, pass time, bits/byte, KL, Jaccard); `a` again stops it, Esc hides the view; `b` cycles B (top-k → threshold → dense), `{` `}` step B's k by 1 or t by 0.05; figures start again whenever A or B changes",
        hint: hint(9, "a", "A/B"),
        in_help: false,
    },
    Binding {
        keys: &[(ch('<'), Command::FpsDown), (ch('>'), Command::FpsUp)],
        label: "< >",
        help: &["redraw rate down / up (1 to 60 frames/s; status bar)"],
        help_without_exporter: None,
        doc: "lower / raise the redraw cap along 1, 2, 5, 10, 15, 20, 30, 60 frames per second (the status bar shows it; the screen still redraws only when something changed)",
        hint: None,
        in_help: false,
    },
    Binding {
        keys: &[
            (ch(' '), Command::ToggleFreeze),
            (ch('f'), Command::ToggleFreeze),
        ],
        label: "Space  f",
        help: &["freeze the display (collection continues)"],
        help_without_exporter: None,
        doc: "freeze the display (collection continues; FROZEN mark)",
        hint: hint(7, "f", "freeze"),
        in_help: false,
    },
    Binding {
        keys: &[(ch('P'), Command::TogglePause)],
        label: "P",
        help: &["pause / resume the model"],
        help_without_exporter: None,
        doc: "pause / resume the model (PAUSED mark)",
        hint: None,
        in_help: false,
    },
    Binding {
        keys: &[(ch('r'), Command::Reset)],
        label: "r",
        help: &["reset statistics (starts a new epoch)"],
        help_without_exporter: None,
        doc: "reset statistics (new epoch)",
        hint: None,
        in_help: false,
    },
    Binding {
        keys: &[
            (ch('o'), Command::FollowToken),
            (ch('u'), Command::UpdateTokens),
        ],
        label: "o  u",
        help: &["follow one token: ←→ token, ↑↓ layer; u: latest pass"],
        help_without_exporter: None,
        doc: "open / close the token view: the tokens of the latest pass (eval: the batch's first sequence, with each token's loss; generate: the last 256 tokens of the stream) and the selected token's route through every MoE layer: the router probabilities sorted with their cumulative sum against t, the experts chosen, and how many experts other thresholds would choose. ← → (h l; Shift or H L by 8) pick the token, ↑ ↓ the layer shown in detail, `u` takes the latest pass (the view holds still otherwise), Esc closes",
        hint: hint(10, "o", "token"),
        in_help: false,
    },
    Binding {
        keys: &[
            (ch('T'), Command::QuickTune),
            (Key::Plain(KeyCode::Enter), Command::Confirm),
        ],
        label: "T  Enter",
        help: &["quick tune: per-layer t within the budget; Enter applies"],
        help_without_exporter: None,
        doc: "quick tune: search per-layer thresholds that spend the fewest MoE FLOPs within the tune budget (`--tune-budget`, default 1% bits/byte) on the eval text, as `xmoe-top tune` does (4,096 search and 4,096 verification tokens, fewer on a short text); live passes wait meanwhile. The dialog shows the verified result beside the best single threshold; Enter applies it (one new epoch), Esc cancels or dismisses",
        hint: hint(9, "T", "tune"),
        in_help: false,
    },
    Binding {
        keys: &[(ch('e'), Command::Export)],
        label: "e",
        help: &["export a report of the displayed snapshot"],
        help_without_exporter: Some("export: disabled, no report exporter plugged in"),
        doc: "export (see above)",
        hint: None,
        in_help: false,
    },
    Binding {
        keys: &[
            (ch('?'), Command::ToggleHelp),
            (Key::Plain(KeyCode::Esc), Command::Escape),
        ],
        label: "?  Esc",
        help: &["help; Esc closes help, table, A/B, tune, token view"],
        help_without_exporter: None,
        doc: "`?` opens / closes the help overlay; Esc closes the help, the per-expert table, the A/B view, the quick tune (cancelling a running one) or the token view (it never quits: q and Ctrl-C do)",
        hint: hint(0, "?", "help"),
        in_help: true,
    },
    Binding {
        keys: &[
            (ch('q'), Command::Quit),
            (Key::Ctrl('c'), Command::Quit),
            (Key::Ctrl('C'), Command::Quit),
            (Key::Ctrl('z'), Command::Suspend),
        ],
        label: "q  Ctrl-C  Ctrl-Z",
        help: &["quit (Ctrl-Z: suspend to the shell; fg resumes)"],
        help_without_exporter: None,
        doc: "quit (SIGTERM, SIGINT, SIGHUP and SIGQUIT quit the same way, exit status 128+N); Ctrl-Z suspends: the terminal goes back to the shell and the model stops with the process, `fg` resumes and redraws (SIGTSTP does the same)",
        hint: hint(1, "q", "quit"),
        in_help: true,
    },
    Binding {
        keys: &[],
        label: "mouse",
        help: &["click: focus, set t, pick a cell; wheels: layer, expert"],
        help_without_exporter: None,
        doc: "click a slider: focus; click or drag on its bar: set t; click a heatmap cell: select it; wheel over heatmap or sliders: previous / next layer; horizontal wheel over the heatmap: move the expert cursor (scrolls when zoomed)",
        hint: None,
        in_help: false,
    },
];

/// Commands by the names the settings file uses (`[keys]`, docs/config.md).
pub const COMMAND_NAMES: &[(Command, &str)] = &[
    (Command::Quit, "quit"),
    (Command::Escape, "escape"),
    (Command::ToggleHelp, "help"),
    (Command::NextPanel, "next_panel"),
    (Command::Up, "up"),
    (Command::Down, "down"),
    (Command::Left, "left"),
    (Command::Right, "right"),
    (Command::LeftBig, "left_big"),
    (Command::RightBig, "right_big"),
    (Command::ThresholdUpBig, "threshold_up_big"),
    (Command::ThresholdDownBig, "threshold_down_big"),
    (Command::ApplyToAll, "apply_to_all"),
    (Command::CyclePolicy, "cycle_policy"),
    (Command::IncreaseK, "k_up"),
    (Command::DecreaseK, "k_down"),
    (Command::ToggleCapacity, "capacity"),
    (Command::CapacityDown, "capacity_down"),
    (Command::CapacityUp, "capacity_up"),
    (Command::ToggleRenormalize, "renormalize"),
    (Command::ToggleZoom, "zoom"),
    (Command::ToggleFreeze, "freeze"),
    (Command::TogglePause, "pause"),
    (Command::Reset, "reset"),
    (Command::Export, "export"),
    (Command::Suspend, "suspend"),
    (Command::ToggleTable, "expert_table"),
    (Command::CycleSort, "sort"),
    (Command::FpsDown, "fps_down"),
    (Command::FpsUp, "fps_up"),
    (Command::QuickTune, "quick_tune"),
    (Command::Confirm, "confirm"),
    (Command::FollowToken, "follow_token"),
    (Command::UpdateTokens, "update_tokens"),
    (Command::ToggleCompare, "compare"),
    (Command::CycleCompareB, "compare_b"),
    (Command::CompareBDown, "compare_b_down"),
    (Command::CompareBUp, "compare_b_up"),
];

/// Named keys of the settings file, beside single characters and `ctrl-<char>`.
const KEY_NAMES: &[(&str, KeyCode, &str)] = &[
    ("up", KeyCode::Up, "↑"),
    ("down", KeyCode::Down, "↓"),
    ("left", KeyCode::Left, "←"),
    ("right", KeyCode::Right, "→"),
    ("pageup", KeyCode::PageUp, "PgUp"),
    ("pagedown", KeyCode::PageDown, "PgDn"),
    ("home", KeyCode::Home, "Home"),
    ("end", KeyCode::End, "End"),
    ("tab", KeyCode::Tab, "Tab"),
    ("backtab", KeyCode::BackTab, "Shift-Tab"),
    ("esc", KeyCode::Esc, "Esc"),
    ("enter", KeyCode::Enter, "Enter"),
    ("space", KeyCode::Char(' '), "Space"),
];

/// Parses a key as the settings file writes it: one character (`q`, `Q`, `?`), `ctrl-<char>`,
/// `f1`..`f12`, or a name (`up`, `pageup`, `tab`, `esc`, `space`, ...).
pub fn parse_key(spec: &str) -> Result<Key, String> {
    let lower = spec.to_ascii_lowercase();
    let mut chars = spec.chars();
    if let (Some(c), None) = (chars.next(), chars.next()) {
        return Ok(ch(c));
    }
    if let Some(rest) = lower
        .strip_prefix("ctrl-")
        .or_else(|| lower.strip_prefix("ctrl+"))
    {
        let mut r = rest.chars();
        if let (Some(c), None) = (r.next(), r.next()) {
            return Ok(Key::Ctrl(c));
        }
    }
    if let Some(n) = lower.strip_prefix('f').and_then(|n| n.parse::<u8>().ok())
        && (1..=12).contains(&n)
    {
        return Ok(Key::Plain(KeyCode::F(n)));
    }
    KEY_NAMES
        .iter()
        .find(|(name, _, _)| *name == lower)
        .map(|&(_, code, _)| Key::Plain(code))
        .ok_or_else(|| {
            format!(
                "`{spec}` is not a key: use one character, ctrl-<char>, f1..f12 or one of {}",
                KEY_NAMES.iter().map(|k| k.0).collect::<Vec<_>>().join(", ")
            )
        })
}

/// A key as the help overlay shows it.
pub fn key_label(k: Key) -> String {
    match k {
        Key::Ctrl(c) => format!("Ctrl-{}", c.to_ascii_uppercase()),
        Key::Plain(KeyCode::Char(' ')) => "Space".into(),
        Key::Plain(KeyCode::Char(c)) => c.to_string(),
        Key::Plain(KeyCode::F(n)) => format!("F{n}"),
        Key::Plain(code) => KEY_NAMES
            .iter()
            .find(|k| k.1 == code)
            .map_or_else(|| format!("{code:?}"), |k| k.2.to_string()),
    }
}

/// The bindings in force: [`BINDINGS`] with the user's replacements from the settings file. A
/// command the user rebinds loses its default keys; a key the user gives to a command is taken
/// from whatever command had it by default.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KeyMap {
    overrides: Vec<(Command, Vec<Key>)>,
}

impl KeyMap {
    /// Builds the map from `(command name, key specs)` pairs, checking every name and key; two
    /// commands may not share a key and `quit` must keep one.
    pub fn from_names(pairs: &[(String, Vec<String>)]) -> Result<Self, String> {
        let mut overrides: Vec<(Command, Vec<Key>)> = Vec::new();
        for (name, specs) in pairs {
            let command = COMMAND_NAMES
                .iter()
                .find(|(_, n)| n == name)
                .map(|&(c, _)| c)
                .ok_or_else(|| {
                    format!(
                        "[keys] `{name}` is not a command: use one of {}",
                        COMMAND_NAMES
                            .iter()
                            .map(|c| c.1)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })?;
            let mut keys = Vec::new();
            for spec in specs {
                let k = parse_key(spec).map_err(|e| format!("[keys] {name}: {e}"))?;
                if let Some((other, _)) = overrides.iter().find(|(_, ks)| ks.contains(&k)) {
                    let other = COMMAND_NAMES
                        .iter()
                        .find(|c| c.0 == *other)
                        .map_or("?", |c| c.1);
                    return Err(format!(
                        "[keys] `{spec}` is given to both `{other}` and `{name}`"
                    ));
                }
                keys.push(k);
            }
            overrides.push((command, keys));
        }
        let map = Self { overrides };
        if !map.entries().iter().any(|e| e.1 == Command::Quit) {
            return Err("[keys] `quit` would have no key left".to_string());
        }
        Ok(map)
    }

    fn overridden(&self, c: Command) -> bool {
        self.overrides.iter().any(|(o, _)| *o == c)
    }

    fn user_key(&self, k: Key) -> bool {
        self.overrides.iter().any(|(_, ks)| ks.contains(&k))
    }

    /// Every (key, command, works in help) in force, defaults first in table order.
    fn entries(&self) -> Vec<(Key, Command, bool)> {
        let mut out: Vec<(Key, Command, bool)> = BINDINGS
            .iter()
            .flat_map(|b| b.keys.iter().map(move |&(k, c)| (k, c, b.in_help)))
            .filter(|&(k, c, _)| !self.overridden(c) && !self.user_key(k))
            .collect();
        for (c, keys) in &self.overrides {
            let in_help = BINDINGS
                .iter()
                .any(|b| b.in_help && b.keys.iter().any(|(_, bc)| bc == c));
            out.extend(keys.iter().map(|&k| (k, *c, in_help)));
        }
        out
    }

    /// The command a key press triggers, or `None`. With Ctrl held only the Ctrl bindings
    /// count; while the help overlay is open only the bindings marked [`Binding::in_help`] do.
    pub fn command_for(&self, key: &KeyEvent, help_open: bool) -> Option<Command> {
        let pressed = pressed_key(key)?;
        self.entries()
            .into_iter()
            .filter(|e| e.2 || !help_open)
            .find(|e| e.0 == pressed)
            .map(|e| e.1)
    }

    /// The keys of `b` as the help shows them: its own label unless the user changed one of
    /// its keys, else the keys now in force for its commands.
    pub fn label(&self, b: &Binding) -> String {
        let touched = b
            .keys
            .iter()
            .any(|&(k, c)| self.overridden(c) || self.user_key(k));
        if !touched {
            return b.label.to_string();
        }
        let mut names: Vec<String> = Vec::new();
        for (k, c, _) in self.entries() {
            if b.keys.iter().any(|(_, bc)| *bc == c) {
                let n = key_label(k);
                if !names.contains(&n) {
                    names.push(n);
                }
            }
        }
        if names.is_empty() {
            "(unbound)".to_string()
        } else {
            names.join("  ")
        }
    }
}

fn pressed_key(key: &KeyEvent) -> Option<Key> {
    Some(if key.modifiers.contains(KeyModifiers::CONTROL) {
        match key.code {
            KeyCode::Char(c) => Key::Ctrl(c),
            _ => return None,
        }
    } else {
        Key::Plain(key.code)
    })
}

/// The command a key press triggers, or `None`. With Ctrl held only the Ctrl bindings count;
/// while the help overlay is open only the bindings marked [`Binding::in_help`] do.
pub fn command_for(key: &KeyEvent, help_open: bool) -> Option<Command> {
    KeyMap::default().command_for(key, help_open)
}

/// The help overlay's lines as (keys, what they do); a binding with several help lines names
/// its keys on the first only.
pub fn help_lines(map: &KeyMap, can_export: bool) -> Vec<(String, &'static str)> {
    let mut lines = Vec::new();
    for b in BINDINGS {
        for (i, &text) in b.help.iter().enumerate() {
            let text = match b.help_without_exporter {
                Some(disabled) if !can_export => disabled,
                _ => text,
            };
            lines.push((if i == 0 { map.label(b) } else { String::new() }, text));
        }
    }
    lines
}

/// The status bar's key hints under `map`, in rank order, each as "keys label".
fn hints(map: &KeyMap) -> Vec<String> {
    let mut hints: Vec<(u8, String)> = BINDINGS
        .iter()
        .filter_map(|b| {
            let h = b.hint?;
            let label = map.label(b);
            // A rebound binding shows the first key in force for its main command.
            let keys = if label == b.label {
                h.keys.to_string()
            } else {
                let main = b.keys.first()?.1;
                key_label(map.entries().into_iter().find(|e| e.1 == main)?.0)
            };
            Some((h.rank, format!("{keys} {}", h.label)))
        })
        .collect();
    hints.sort_by_key(|h| h.0);
    hints.into_iter().map(|h| h.1).collect()
}

/// The status bar's key hints, one line (default bindings).
pub fn status_hints() -> String {
    format!(" {}", hints(&KeyMap::default()).join("  "))
}

/// The status bar's key hints under `map` that fit in `width` columns: whole hints only, in
/// rank order, so that a narrow terminal drops the last ones instead of cutting one in half.
pub fn status_hints_within(map: &KeyMap, width: usize) -> String {
    let mut out = String::new();
    for h in hints(map) {
        let part = format!(" {h}");
        let sep = if out.is_empty() { "" } else { " " };
        if out.chars().count() + sep.len() + part.chars().count() > width {
            break;
        }
        out.push_str(sep);
        out.push_str(&part);
    }
    out
}

/// The key table of `docs/tui.md`, as markdown (header included, ending in a newline).
pub fn markdown_table() -> String {
    let mut s = String::from("| Key | Action |\n| --- | --- |\n");
    for b in BINDINGS {
        s.push_str(&format!("| {} | {} |\n", b.label, b.doc));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn docs_key_table_is_generated_from_the_bindings() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/tui.md");
        let docs = std::fs::read_to_string(path).unwrap();
        let expected = markdown_table();
        assert!(
            docs.contains(&expected),
            "docs/tui.md's key table differs from the bindings; replace it with:\n\n{expected}"
        );
    }

    #[test]
    fn no_key_is_bound_twice() {
        let all: Vec<Key> = BINDINGS
            .iter()
            .flat_map(|b| b.keys.iter().map(|(k, _)| *k))
            .collect();
        for (i, k) in all.iter().enumerate() {
            assert!(!all[i + 1..].contains(k), "{k:?} is bound twice");
        }
    }

    #[test]
    fn status_hints_are_cut_between_hints() {
        let all = status_hints();
        let map = KeyMap::default();
        assert_eq!(status_hints_within(&map, 1000), all);
        for w in 0..all.chars().count() {
            let s = status_hints_within(&map, w);
            assert!(s.chars().count() <= w, "{s:?} over {w}");
            assert!(all.starts_with(&s));
            // Ends with a whole hint: the next character of the full line is a separator.
            assert!(
                s.is_empty() || all[s.len()..].is_empty() || all[s.len()..].starts_with("  "),
                "{s:?} cut mid-hint"
            );
        }
    }

    fn press(c: KeyCode, m: KeyModifiers) -> KeyEvent {
        KeyEvent::new(c, m)
    }

    #[test]
    fn user_bindings_replace_defaults_and_show_in_help_and_hints() {
        let pairs = |v: &[(&str, &[&str])]| -> Vec<(String, Vec<String>)> {
            v.iter()
                .map(|(n, ks)| (n.to_string(), ks.iter().map(|k| k.to_string()).collect()))
                .collect()
        };
        let map = KeyMap::from_names(&pairs(&[
            ("quit", &["x", "ctrl-q"]),
            ("freeze", &["F5"]),
            ("up", &["w"]),
        ]))
        .unwrap();
        let none = KeyModifiers::NONE;
        // `x` leaves the expert table for quit; `q` no longer quits.
        assert_eq!(
            map.command_for(&press(KeyCode::Char('x'), none), false),
            Some(Command::Quit)
        );
        assert_eq!(
            map.command_for(&press(KeyCode::Char('q'), none), false),
            None
        );
        assert_eq!(
            map.command_for(&press(KeyCode::Char('q'), KeyModifiers::CONTROL), true),
            Some(Command::Quit),
            "quit works in the help overlay, rebound or not"
        );
        assert_eq!(
            map.command_for(&press(KeyCode::F(5), none), false),
            Some(Command::ToggleFreeze)
        );
        assert_eq!(
            map.command_for(&press(KeyCode::Char('f'), none), false),
            None
        );
        // The other keys of a binding keep working: `s` still sorts, ↑ is gone, ↓ stays.
        assert_eq!(
            map.command_for(&press(KeyCode::Char('s'), none), false),
            Some(Command::CycleSort)
        );
        assert_eq!(map.command_for(&press(KeyCode::Up, none), false), None);
        assert_eq!(
            map.command_for(&press(KeyCode::Char('w'), none), false),
            Some(Command::Up)
        );
        assert_eq!(
            map.command_for(&press(KeyCode::Down, none), false),
            Some(Command::Down)
        );
        let help = help_lines(&map, true);
        assert!(
            help.iter().any(|(k, _)| k == "Ctrl-Z  x  Ctrl-Q"),
            "{help:?}"
        );
        assert!(help.iter().any(|(k, _)| k == "F5"), "{help:?}");
        assert!(
            help.iter().any(|(k, _)| k == "s"),
            "the table loses x: {help:?}"
        );
        let hints = status_hints_within(&map, 1000);
        assert!(
            hints.contains(" Ctrl-Z quit") || hints.contains(" x quit"),
            "{hints}"
        );
        assert!(hints.contains("F5 freeze"), "{hints}");
        // Defaults are untouched.
        assert_eq!(help_lines(&KeyMap::default(), true)[0].0, BINDINGS[0].label);
    }

    #[test]
    fn bad_user_bindings_are_explained() {
        for (pairs, needle) in [
            (vec![("qiut", vec!["x"])], "`qiut` is not a command"),
            (vec![("quit", vec!["ctrl-"])], "is not a key"),
            (
                vec![("quit", vec!["x"]), ("reset", vec!["x"])],
                "given to both `quit` and `reset`",
            ),
            (vec![("quit", vec![])], "`quit` would have no key left"),
            (vec![("freeze", vec!["f13"])], "f1..f12"),
        ] {
            let pairs: Vec<(String, Vec<String>)> = pairs
                .into_iter()
                .map(|(n, ks)| (n.to_string(), ks.into_iter().map(String::from).collect()))
                .collect();
            let e = KeyMap::from_names(&pairs).unwrap_err();
            assert!(e.contains(needle), "{e}");
        }
        for (spec, key) in [
            ("q", ch('q')),
            ("ctrl-x", Key::Ctrl('x')),
            ("Ctrl+X", Key::Ctrl('x')),
            ("PageUp", Key::Plain(KeyCode::PageUp)),
            ("space", ch(' ')),
            ("F12", Key::Plain(KeyCode::F(12))),
        ] {
            assert_eq!(parse_key(spec).unwrap(), key, "{spec}");
        }
    }

    #[test]
    fn every_command_has_a_settings_name() {
        for b in BINDINGS {
            for (_, c) in b.keys {
                assert!(COMMAND_NAMES.iter().any(|(n, _)| n == c), "{c:?}");
            }
        }
    }

    #[test]
    fn status_hints_keep_their_order() {
        assert_eq!(
            status_hints(),
            " ? help  q quit  Tab panel  ↑↓ layer  ←→ t  g all  p policy  f freeze  x experts  a A/B  T tune  o token"
        );
    }
}
