//! The UI's quick tune: `xmoe-top tune` on the session's own eval text, run by the model thread
//! between passes, with its progress and result published in the snapshots.

use std::sync::Arc;
use std::sync::mpsc::TryRecvError;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use super::sweep::parse_thresholds;
use super::tune::{
    Budget, DEFAULT_GRID, DEFAULT_TOKENS, Evaluation, SearchMode, TokenSet, TuneProgress,
    TuneResult, TuneSpec, search_and_verify, tune,
};
use super::{Order, Runner};
use crate::profiling::snapshot::{QuickTune, TunePoint, TuneStatus};
use crate::profiling::sweep::policy_label;

/// How often a running tune republishes its progress.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(250);

/// The search ended because the user cancelled it or the session is stopping.
#[derive(Debug, thiserror::Error)]
#[error("quick tune cancelled")]
struct Cancelled;

/// As `xmoe-top tune` splits its text ([`DEFAULT_TOKENS`] each), with fewer verification and
/// search batches on a short text.
fn token_sets(
    encoded: &crate::workload::tokenizer::Encoded,
    batch: usize,
    seq_len: usize,
) -> Result<(TokenSet, TokenSet)> {
    let per_batch = batch * seq_len;
    let available = encoded.ids.len().saturating_sub(1) / per_batch.max(1);
    if available < 2 {
        bail!(
            "a quick tune needs at least two batches of {batch} x {seq_len} tokens of eval text; the text has {} tokens",
            encoded.ids.len()
        );
    }
    let wanted = DEFAULT_TOKENS.div_ceil(per_batch).max(1);
    let n_verify = wanted.min(available / 2);
    let n_search = wanted.min(available - n_verify);
    search_and_verify(encoded, batch, seq_len, n_search, n_verify)
}

fn point(e: &Evaluation, reference_bpb: f64, within_budget: bool) -> TunePoint {
    TunePoint {
        label: e.label.clone(),
        moe_flops_fraction: e.moe_flops_fraction,
        delta_bits_per_byte: e.delta_bits_per_byte,
        delta_bits_per_byte_stderr: e.delta_bits_per_byte_stderr,
        delta_relative: e.delta_bits_per_byte / reference_bpb,
        mean_kl_bits: e.mean_kl_bits,
        mean_experts_per_token: e.mean_experts_per_token,
        within_budget,
    }
}

/// What the UI shows of a finished search: the verification figures, never the search's own.
fn summary(r: &TuneResult, passes: usize) -> QuickTune {
    let vref = r.reference_bits_per_byte_verify;
    QuickTune {
        budget: r.budget.describe(),
        reference: policy_label(&r.reference_policy),
        policies: r.tuned.policies.clone(),
        tuned: point(&r.tuned_verify, vref, r.tuned_within_budget_on_verify),
        best_uniform: r
            .best_uniform_verify
            .as_ref()
            .map(|e| point(e, vref, r.best_uniform_within_budget_on_verify)),
        search_tokens: r.search_tokens,
        verify_tokens: r.verify_tokens,
        passes,
        elapsed_s: r.elapsed_s,
    }
}

impl Runner {
    /// Runs a quick tune now; orders that arrive meanwhile wait, except a stop or a cancel.
    pub(super) fn quick_tune(&mut self, budget: Budget) {
        let mut waiting = Vec::new();
        self.tune = match self.run_quick_tune(budget, &mut waiting) {
            Ok(q) => Some(TuneStatus::Done(Box::new(q))),
            Err(e) if e.is::<Cancelled>() => None,
            Err(e) => Some(TuneStatus::Failed(format!("{e:#}"))),
        };
        self.publish(None);
        for order in waiting {
            self.apply(order);
        }
    }

    fn run_quick_tune(&mut self, budget: Budget, waiting: &mut Vec<Order>) -> Result<QuickTune> {
        let started = Instant::now();
        let Some(encoded) = self.workload.eval_text() else {
            bail!(
                "a quick tune measures quality on eval text; this session generates text (start it without --generate)"
            );
        };
        let info = self.workload.info();
        let (search, verify) = token_sets(encoded, info.batch, info.seq_len)?;
        let source = info.source.clone();
        let spec = TuneSpec {
            grid: parse_thresholds(DEFAULT_GRID)?,
            budget,
            reference: Some(self.config.reference_policy),
            top_k: Vec::new(),
            renormalize: None,
            search: SearchMode::Lazy,
        };
        let described = budget.describe();
        let (mut line, mut passes) = (String::from("reference pass"), 0usize);
        let mut last_publish = Instant::now() - PROGRESS_INTERVAL;
        // The model is shared for the search so that the progress callback can publish through
        // `self`; the clone is dropped before this returns.
        let model = Arc::clone(&self.model);
        let batch = info.batch;
        let mut progress = |p: TuneProgress<'_>| -> Result<()> {
            let fresh_line = match p {
                TuneProgress::Line(l) => {
                    line = l.to_string();
                    true
                }
                TuneProgress::Pass(n) => {
                    passes = n;
                    false
                }
            };
            loop {
                match self.rx.try_recv() {
                    Ok(Order::Stop) => {
                        self.stop = true;
                        return Err(Cancelled.into());
                    }
                    Ok(Order::DismissTune) => return Err(Cancelled.into()),
                    // One search at a time: a second request while one runs means nothing new.
                    Ok(Order::QuickTune(_)) => {}
                    Ok(other) => waiting.push(other),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        self.stop = true;
                        return Err(Cancelled.into());
                    }
                }
            }
            if fresh_line || last_publish.elapsed() >= PROGRESS_INTERVAL {
                self.tune = Some(TuneStatus::Running {
                    budget: described.clone(),
                    line: line.clone(),
                    passes,
                    elapsed_s: started.elapsed().as_secs_f64(),
                });
                self.publish(None);
                last_publish = Instant::now();
            }
            Ok(())
        };
        let result = tune(
            &model,
            batch,
            &search,
            &verify,
            &source,
            &spec,
            &mut progress,
        );
        drop(model);
        let result = result?;
        Ok(summary(&result, passes))
    }

    /// Routes with the finished quick tune's thresholds, as one new epoch.
    pub(super) fn apply_tune(&mut self) {
        let Some(TuneStatus::Done(q)) = self.tune.take() else {
            return;
        };
        let n_experts = self.model.config().n_experts;
        for (slot, policy) in q.policies.iter().enumerate() {
            match policy.check(n_experts) {
                Ok(checked) => self.routing.set_policy(Some(slot), checked),
                Err(e) => {
                    self.tune = Some(TuneStatus::Failed(format!(
                        "the tuned policy of MoE slot {slot} is invalid: {e}"
                    )));
                    return;
                }
            }
        }
        self.new_epoch(format!("thresholds from the quick tune: {}", q.tuned.label));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::workload::tokenizer::Encoded;

    fn encoded(n: usize) -> Encoded {
        Encoded {
            ids: (0..n as u32).collect(),
            bytes: vec![1; n],
        }
    }

    #[test]
    fn search_and_verification_tokens_are_disjoint_and_sized() {
        // 10 batches of 2 x 100 tokens fit in 2001 tokens: 5 verify (half), 5 search.
        let (s, v) = token_sets(&encoded(2001), 2, 100).unwrap();
        assert_eq!((s.batches.len(), v.batches.len()), (5, 5));
        // Windows overlap by one token (a window's last target is the next one's first input),
        // so the verification's first input may be the search's last target, and no more.
        let first_verify = v.batches[0][0];
        assert!(s.batches.iter().flatten().all(|&id| id <= first_verify));
        assert!(v.batches.iter().flatten().all(|&id| id >= first_verify));
        // Plenty of text: 4096 tokens each, rounded up to whole batches of 4 x 128.
        let (s, v) = token_sets(&encoded(100_000), 4, 128).unwrap();
        assert_eq!((s.batches.len(), v.batches.len()), (8, 8));
    }

    #[test]
    fn too_short_a_text_is_refused_with_the_sizes() {
        let e = token_sets(&encoded(300), 2, 100).unwrap_err().to_string();
        assert!(
            e.contains("two batches of 2 x 100") && e.contains("300 tokens"),
            "{e}"
        );
    }
}
