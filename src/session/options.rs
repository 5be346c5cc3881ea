//! Routing options as the command line gives them (`--policy`, `--k`, `--threshold`,
//! `--capacity-factor`), checked against the model with messages a user can act on.

use crate::model::RoutingConfig;
use crate::routing::RoutingPolicy;

/// Which policy `--policy` names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PolicyKind {
    /// Threshold routing (`--threshold`).
    Threshold,
    /// Top-k routing (`--k`).
    TopK,
    /// All experts.
    Dense,
}

impl std::str::FromStr for PolicyKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "threshold" => Ok(PolicyKind::Threshold),
            "topk" | "top-k" => Ok(PolicyKind::TopK),
            "dense" => Ok(PolicyKind::Dense),
            _ => Err(format!(
                "unknown policy `{s}`: expected threshold, topk or dense"
            )),
        }
    }
}

fn check_t(t: f32, what: &str) -> Result<f32, String> {
    if t.is_finite() && t > 0.0 && t <= 1.0 {
        Ok(t)
    } else {
        Err(format!("threshold {t} {what}is outside (0, 1]"))
    }
}

/// Parses `--threshold`: either one value for every MoE layer (`0.8`) or `LAYER:T` pairs
/// (`0:0.8,3:0.95`), optionally after a value for all (`0.9,3:0.5`: 0.9 everywhere, 0.5 on
/// layer 3). Layers are block indices and must be MoE layers. Returns one threshold per MoE
/// layer, in MoE order; layers not named keep `default`.
pub fn parse_thresholds(
    spec: &str,
    moe_layers: &[usize],
    default: f32,
) -> Result<Vec<f32>, String> {
    let mut out = vec![default; moe_layers.len()];
    let parts: Vec<&str> = spec.split(',').map(str::trim).collect();
    if parts.iter().any(|p| p.is_empty()) {
        return Err(format!("--threshold `{spec}`: empty item"));
    }
    for (i, part) in parts.iter().enumerate() {
        match part.split_once(':') {
            None => {
                if i != 0 {
                    return Err(format!(
                        "--threshold `{spec}`: a value for all layers must come first, found `{part}`"
                    ));
                }
                let t: f32 = part
                    .parse()
                    .map_err(|_| format!("--threshold: `{part}` is not a number"))?;
                let t = check_t(t, "")?;
                out.iter_mut().for_each(|x| *x = t);
            }
            Some((l, t)) => {
                let layer: usize = l
                    .trim()
                    .parse()
                    .map_err(|_| format!("--threshold: `{l}` is not a layer number"))?;
                let slot = moe_layers.iter().position(|&m| m == layer).ok_or_else(|| {
                    format!("--threshold: layer {layer} is not an MoE layer (MoE layers: {moe_layers:?})")
                })?;
                let t: f32 = t
                    .trim()
                    .parse()
                    .map_err(|_| format!("--threshold: `{t}` is not a number"))?;
                out[slot] = check_t(t, &format!("for layer {layer} "))?;
            }
        }
    }
    Ok(out)
}

/// Builds the routing from command-line options on top of `base` (the model's default):
/// `policy` (default: threshold when `thresholds` is given, else the base), `k` for top-k,
/// `thresholds` as in [`parse_thresholds`], and a capacity factor.
pub fn routing_from_options(
    base: &RoutingConfig,
    policy: Option<PolicyKind>,
    k: Option<usize>,
    thresholds: Option<&str>,
    capacity_factor: Option<f32>,
    moe_layers: &[usize],
    n_experts: usize,
) -> Result<RoutingConfig, String> {
    let mut r = base.clone();
    let kind = policy.or(thresholds.map(|_| PolicyKind::Threshold));
    if k.is_some() && kind != Some(PolicyKind::TopK) {
        return Err("--k needs --policy topk".to_string());
    }
    if thresholds.is_some() && kind != Some(PolicyKind::Threshold) {
        return Err("--threshold needs --policy threshold".to_string());
    }
    match kind {
        None => {}
        Some(PolicyKind::Dense) => r
            .policies
            .iter_mut()
            .for_each(|p| *p = RoutingPolicy::Dense),
        Some(PolicyKind::TopK) => {
            let k = k.ok_or("--policy topk needs --k K")?;
            if k == 0 || k > n_experts {
                return Err(format!(
                    "--k {k} is outside 1..={n_experts} (the model has {n_experts} experts per layer)"
                ));
            }
            r.policies.iter_mut().for_each(|p| {
                *p = RoutingPolicy::TopK {
                    k,
                    renormalize: false,
                }
            });
        }
        Some(PolicyKind::Threshold) => {
            // Layers not named keep their base threshold, or 0.9 (the paper's) if the base is not threshold.
            let base_t: Vec<f32> = r
                .policies
                .iter()
                .map(|p| match p {
                    RoutingPolicy::Threshold { t } => *t,
                    _ => 0.9,
                })
                .collect();
            let ts = match thresholds {
                Some(spec) => {
                    let mut ts = parse_thresholds(spec, moe_layers, f32::NAN)?;
                    for (t, b) in ts.iter_mut().zip(&base_t) {
                        if t.is_nan() {
                            *t = *b;
                        }
                    }
                    ts
                }
                None => base_t,
            };
            for (p, t) in r.policies.iter_mut().zip(ts) {
                *p = RoutingPolicy::Threshold { t };
            }
        }
    }
    if let Some(c) = capacity_factor {
        if !(c.is_finite() && c > 0.0) {
            return Err(format!("--capacity-factor {c} must be positive"));
        }
        r.capacity_factor = Some(c);
    }
    Ok(r)
}

#[cfg(test)]
mod tests {
    use super::*;

    const LAYERS: [usize; 3] = [1, 3, 5];

    #[test]
    fn threshold_specs() {
        assert_eq!(parse_thresholds("0.8", &LAYERS, 0.9).unwrap(), vec![0.8; 3]);
        assert_eq!(
            parse_thresholds("1:0.8, 5:0.95", &LAYERS, 0.9).unwrap(),
            vec![0.8, 0.9, 0.95]
        );
        assert_eq!(
            parse_thresholds("0.7,3:0.5", &LAYERS, 0.9).unwrap(),
            vec![0.7, 0.5, 0.7]
        );
        let e = |s| parse_thresholds(s, &LAYERS, 0.9).unwrap_err();
        assert_eq!(e("1.5"), "threshold 1.5 is outside (0, 1]");
        assert_eq!(e("3:0"), "threshold 0 for layer 3 is outside (0, 1]");
        assert_eq!(
            e("2:0.5"),
            "--threshold: layer 2 is not an MoE layer (MoE layers: [1, 3, 5])"
        );
        assert!(e("3:0.5,0.7").contains("must come first"));
        assert!(e("x").contains("not a number"));
        assert!(e("1:0.5,,").contains("empty item"));
    }

    #[test]
    fn options_to_routing() {
        let base = RoutingConfig::uniform(RoutingPolicy::Threshold { t: 0.9 }, 3);
        let r = |p, k, t, c| routing_from_options(&base, p, k, t, c, &LAYERS, 8);
        assert_eq!(r(None, None, None, None).unwrap(), base);
        let t = r(None, None, Some("3:0.5"), Some(2.0)).unwrap();
        assert_eq!(t.policies[1], RoutingPolicy::Threshold { t: 0.5 });
        assert_eq!(t.policies[0], RoutingPolicy::Threshold { t: 0.9 });
        assert_eq!(t.capacity_factor, Some(2.0));
        let k = r(Some(PolicyKind::TopK), Some(2), None, None).unwrap();
        assert!(
            k.policies
                .iter()
                .all(|p| matches!(p, RoutingPolicy::TopK { k: 2, .. }))
        );
        assert_eq!(
            r(Some(PolicyKind::TopK), Some(9), None, None).unwrap_err(),
            "--k 9 is outside 1..=8 (the model has 8 experts per layer)"
        );
        assert!(r(Some(PolicyKind::TopK), None, None, None).is_err());
        assert!(r(Some(PolicyKind::Dense), Some(2), None, None).is_err());
        assert!(r(Some(PolicyKind::Dense), None, Some("0.5"), None).is_err());
        assert!(r(None, None, None, Some(0.0)).is_err());
        let d = r(Some(PolicyKind::Dense), None, None, None).unwrap();
        assert!(d.policies.iter().all(|p| *p == RoutingPolicy::Dense));
        assert_eq!("topk".parse(), Ok(PolicyKind::TopK));
        assert!("best".parse::<PolicyKind>().is_err());
    }
}
