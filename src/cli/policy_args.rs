//! Routing options shared by `run`, the TUI and `sweep`: `--policy`, `--threshold`, `--k`,
//! `--capacity-factor`, turned into a checked [`RoutingConfig`].

use anyhow::{Result, bail};
use clap::{Args, ValueEnum};

use crate::model::RoutingConfig;
use crate::model::config::ModelConfig;
use crate::routing::RoutingPolicy;

/// Policy family on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PolicyKind {
    /// The model's own rule (a Hugging Face model's top-k with its renormalisation; the
    /// configured default for the project's own models).
    Native,
    /// Threshold routing (`--threshold`).
    Threshold,
    /// Top-k routing (`--k`).
    Topk,
    /// Every expert, weighted by p.
    Dense,
}

/// Routing flags.
#[derive(Args, Debug, Clone, Default)]
pub struct PolicyArgs {
    /// Routing policy (default: the model's own, usually threshold 0.9).
    #[arg(long, value_enum)]
    pub policy: Option<PolicyKind>,
    /// Threshold for every MoE layer (`0.9`), or per layer by block index (`0:0.8,3:0.95`); layers
    /// not named keep the model's default.
    #[arg(long)]
    pub threshold: Option<String>,
    /// k for `--policy topk` (default: the model's compute-matched k).
    #[arg(long)]
    pub k: Option<usize>,
    /// Renormalise the selected experts' weights to sum to 1 (threshold and top-k); `--renormalize
    /// false` keeps the raw probabilities. Default: what the model's native rule does.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    pub renormalize: Option<bool>,
    /// Capacity factor, in (0, 10^6]: at most max(4, ceil(C * tokens / E)) tokens per expert per
    /// pass.
    #[arg(long, value_parser = super::values::capacity_factor)]
    pub capacity_factor: Option<f32>,
}

fn check_t(t: f32, what: &str) -> Result<f32> {
    if !(t.is_finite() && t > 0.0 && t <= 1.0) {
        bail!("{what}: a threshold must be in (0, 1], found {t}");
    }
    Ok(t)
}

impl PolicyArgs {
    /// The routing these flags ask for on a model with this configuration.
    pub fn routing(&self, cfg: &ModelConfig) -> Result<RoutingConfig> {
        let moe = cfg.moe_layer_indices();
        let e = cfg.n_experts;
        let default: RoutingPolicy = cfg.default_policy;
        let kind = self.policy.unwrap_or(match default {
            _ if self.threshold.is_some() => PolicyKind::Threshold,
            RoutingPolicy::Threshold { .. } => PolicyKind::Threshold,
            RoutingPolicy::TopK { .. } => PolicyKind::Topk,
            RoutingPolicy::Dense => PolicyKind::Dense,
        });
        if kind != PolicyKind::Threshold && self.threshold.is_some() {
            bail!("--threshold goes with --policy threshold");
        }
        if kind != PolicyKind::Topk && self.k.is_some() {
            bail!("--k goes with --policy topk");
        }
        let renormalize = self.renormalize.unwrap_or(default.renormalizes());
        if kind == PolicyKind::Native && self.renormalize.is_some() {
            bail!("--renormalize goes with --policy threshold or topk: the native rule fixes it");
        }
        let policies = match kind {
            PolicyKind::Native => vec![default; moe.len()],
            PolicyKind::Dense => vec![RoutingPolicy::Dense; moe.len()],
            PolicyKind::Topk => {
                let k = self.k.unwrap_or_else(|| match default {
                    RoutingPolicy::TopK { k, .. } => k,
                    _ => cfg.top_k_baseline(),
                });
                if k == 0 || k > e {
                    bail!(
                        "--k: the model has {e} experts per layer, so k must be in 1..={e}, found {k}"
                    );
                }
                vec![RoutingPolicy::TopK { k, renormalize }; moe.len()]
            }
            PolicyKind::Threshold => {
                let base = match default {
                    RoutingPolicy::Threshold { t, .. } => t,
                    _ => 0.9,
                };
                let mut ts = vec![base; moe.len()];
                if let Some(spec) = &self.threshold {
                    parse_thresholds(spec, &moe, &mut ts)?;
                }
                ts.into_iter()
                    .map(|t| RoutingPolicy::threshold(t).with_renormalize(renormalize))
                    .collect()
            }
        };
        if let Some(c) = self.capacity_factor
            && !(c.is_finite() && c > 0.0)
        {
            bail!("--capacity-factor must be positive, found {c}");
        }
        Ok(RoutingConfig::new(
            &policies,
            self.capacity_factor.or(cfg.capacity_factor),
            e,
        )?)
    }
}

/// Parses one policy of `--compare` into one policy per MoE layer: `t=0.9` (or `0.9`),
/// per-layer thresholds `t=0:0.8,3:0.95` (or `0:0.8,3:0.95`; layers not named keep the model's
/// default threshold, as with `--threshold`), `top-2`, `dense`, `native`, and the `--reference`
/// forms `topk:K` and `threshold:T`. Threshold and top-k weights are renormalised as the model's
/// native rule does, or as `renormalize` says when given.
pub fn parse_policy_spec(
    spec: &str,
    cfg: &ModelConfig,
    renormalize: Option<bool>,
) -> Result<Vec<RoutingPolicy>> {
    let moe = cfg.moe_layer_indices();
    let e = cfg.n_experts;
    let renorm = renormalize.unwrap_or(cfg.default_policy.renormalizes());
    let s = spec.trim();
    let lower = s.to_ascii_lowercase();
    let policies = if let Some(k) = lower.strip_prefix("top-") {
        let k: usize = k.trim().parse().map_err(|_| {
            anyhow::anyhow!("--compare `{s}`: `{k}` is not a whole number of experts")
        })?;
        vec![
            RoutingPolicy::TopK {
                k,
                renormalize: renorm
            };
            moe.len()
        ]
    } else if lower.starts_with("t=") || lower.starts_with(|c: char| c.is_ascii_digit() || c == '.')
    {
        let base = match cfg.default_policy {
            RoutingPolicy::Threshold { t, .. } => t,
            _ => 0.9,
        };
        let mut ts = vec![base; moe.len()];
        parse_thresholds(lower.strip_prefix("t=").unwrap_or(&lower), &moe, &mut ts)
            .map_err(|err| anyhow::anyhow!("--compare `{s}`: {err}"))?;
        ts.into_iter()
            .map(|t| RoutingPolicy::threshold(t).with_renormalize(renorm))
            .collect()
    } else {
        let p = super::run::parse_reference(s, cfg).map_err(|_| {
            anyhow::anyhow!(
                "--compare: expected t=T, t=LAYER:T,..., top-K, dense or native, found `{s}`"
            )
        })?;
        vec![p.with_renormalize(renormalize.unwrap_or(p.renormalizes())); moe.len()]
    };
    for p in &policies {
        p.validate(e)
            .map_err(|err| anyhow::anyhow!("--compare `{s}`: {err}"))?;
    }
    Ok(policies)
}

/// Parses `0.9` (every layer) or `0:0.8,3:0.95` (block index: threshold) into `ts`, one entry per
/// MoE layer in `moe` order.
pub fn parse_thresholds(spec: &str, moe: &[usize], ts: &mut [f32]) -> Result<()> {
    let spec = spec.trim();
    if !spec.contains(':') {
        let t: f32 = spec.parse().map_err(|_| {
            anyhow::anyhow!("--threshold: expected a number or LAYER:T,..., found `{spec}`")
        })?;
        ts.fill(check_t(t, "--threshold")?);
        return Ok(());
    }
    for part in spec.split(',') {
        let Some((l, t)) = part.split_once(':') else {
            bail!("--threshold: expected LAYER:T, found `{part}`");
        };
        let layer: usize = l
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("--threshold: `{l}` is not a layer index"))?;
        let t: f32 = t
            .trim()
            .parse()
            .map_err(|_| anyhow::anyhow!("--threshold: `{t}` is not a number"))?;
        let Some(slot) = moe.iter().position(|&m| m == layer) else {
            bail!("--threshold: layer {layer} is not a MoE layer (MoE layers: {moe:?})");
        };
        ts[slot] = check_t(t, &format!("--threshold for layer {layer}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::config::MoeLayers;

    fn cfg() -> ModelConfig {
        let mut c = crate::model::config::tests::small();
        c.n_layers = 4;
        c.moe_layers = MoeLayers::Every {
            every: 2,
            offset: 1,
        };
        c
    }

    fn policies(a: PolicyArgs) -> Result<Vec<RoutingPolicy>> {
        a.routing(&cfg()).map(|r| r.policies().collect::<Vec<_>>())
    }

    #[test]
    fn thresholds_global_and_per_layer() {
        let p = policies(PolicyArgs {
            threshold: Some("0.7".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(p, vec![RoutingPolicy::threshold(0.7); 2]);
        let p = policies(PolicyArgs {
            threshold: Some("3:0.5".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            p,
            vec![RoutingPolicy::threshold(0.9), RoutingPolicy::threshold(0.5)]
        );
    }

    #[test]
    fn out_of_range_values_are_rejected_clearly() {
        for (spec, msg) in [
            ("1.5", "must be in (0, 1], found 1.5"),
            ("0", "must be in (0, 1], found 0"),
            ("2:0.5", "layer 2 is not a MoE layer"),
            ("x", "expected a number"),
            ("1:abc", "`abc` is not a number"),
        ] {
            let e = policies(PolicyArgs {
                threshold: Some(spec.into()),
                ..Default::default()
            })
            .unwrap_err();
            assert!(e.to_string().contains(msg), "{spec}: {e}");
        }
        for k in [0, 9] {
            let e = policies(PolicyArgs {
                policy: Some(PolicyKind::Topk),
                k: Some(k),
                ..Default::default()
            })
            .unwrap_err();
            assert!(e.to_string().contains("k must be in 1..=8"), "{e}");
        }
        assert!(
            PolicyArgs {
                capacity_factor: Some(-1.0),
                ..Default::default()
            }
            .routing(&cfg())
            .is_err()
        );
    }

    #[test]
    fn compare_specs_use_the_policy_syntax() {
        let c = cfg();
        let p = |s: &str| parse_policy_spec(s, &c, None);
        assert_eq!(p("t=0.7").unwrap(), vec![RoutingPolicy::threshold(0.7); 2]);
        assert_eq!(p("0.7").unwrap(), vec![RoutingPolicy::threshold(0.7); 2]);
        assert_eq!(
            p("t=3:0.5").unwrap(),
            vec![RoutingPolicy::threshold(0.9), RoutingPolicy::threshold(0.5)]
        );
        assert_eq!(p("1:0.6,3:0.5").unwrap()[0], RoutingPolicy::threshold(0.6));
        let top2 = RoutingPolicy::TopK {
            k: 2,
            renormalize: false,
        };
        assert_eq!(p("top-2").unwrap(), vec![top2; 2]);
        assert_eq!(p("topk:2").unwrap(), vec![top2; 2]);
        assert_eq!(p(" dense ").unwrap(), vec![RoutingPolicy::Dense; 2]);
        assert_eq!(
            parse_policy_spec("top-2", &c, Some(true)).unwrap()[0],
            RoutingPolicy::TopK {
                k: 2,
                renormalize: true
            }
        );
        for (bad, msg) in [
            ("top-9", "k in 1..=8"),
            ("top-x", "not a whole number"),
            ("t=1.5", "must be in (0, 1]"),
            ("t=2:0.5", "not a MoE layer"),
            ("sparse", "expected t=T"),
        ] {
            let e = p(bad).unwrap_err().to_string();
            assert!(e.contains(msg), "{bad}: {e}");
        }
    }

    #[test]
    fn topk_defaults_to_the_split_ratio_and_dense_is_dense() {
        let p = policies(PolicyArgs {
            policy: Some(PolicyKind::Topk),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(
            p[0],
            RoutingPolicy::TopK {
                k: 4,
                renormalize: false
            }
        );
        let p = policies(PolicyArgs {
            policy: Some(PolicyKind::Dense),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(p, vec![RoutingPolicy::Dense; 2]);
    }
}
