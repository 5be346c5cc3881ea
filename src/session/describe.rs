//! The model description a session (or a sweep) puts into its snapshots.

use crate::model::config::ModelConfig;
use crate::model::forward::param_counts;
use crate::profiling::snapshot::ModelInfo;

/// Describes a model with configuration `cfg` running on `device`, with the top-k baseline's
/// `k` (clamped to 1..=E); the parameter count comes from the configuration.
pub fn model_info(
    cfg: &ModelConfig,
    device: impl Into<String>,
    top_k_baseline: usize,
) -> ModelInfo {
    ModelInfo {
        name: cfg.name.clone(),
        parameters: param_counts(cfg).total as u64,
        device: device.into(),
        n_layers: cfg.n_layers,
        moe_layers: cfg.moe_layer_indices(),
        n_experts: cfg.n_experts,
        expert_hidden: cfg.expert_hidden,
        d_model: cfg.d_model,
        vocab_size: cfg.vocab_size,
        max_seq_len: cfg.max_seq_len,
        top_k_baseline: top_k_baseline.clamp(1, cfg.n_experts),
        shared_experts: usize::from(cfg.shared_expert_hidden.is_some()),
        native_top_k: match cfg.default_policy {
            crate::routing::RoutingPolicy::TopK { k, .. } => Some(k),
            _ => None,
        },
        shared_expert_flops: (cfg.moe_layer_indices().len() as u64
            * crate::profiling::flops::FlopModel::new(cfg).shared_expert())
            as f64,
    }
}
