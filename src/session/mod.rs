//! A session: the model running on its own thread, taking orders, publishing snapshots.
//!
//! [`Session::start`] moves a [`Model`] and a [`Workload`] onto a thread that runs forward passes
//! until a budget (tokens or seconds) is reached or it is stopped. Control messages
//! ([`Control`], sent through a [`SessionController`]) take effect before the next pass; every
//! change of settings starts a new statistics epoch (pause and resume do not: they change
//! nothing about how tokens are routed, and paused time is left out of every rate).
//!
//! Snapshots are published at most every [`SessionConfig::snapshot_interval`] (~10 per second),
//! plus one immediately after every control message, into a small bounded channel with
//! `try_send`: a slow reader only skips snapshots and can never slow the model thread. The latest
//! snapshot is also kept in a slot ([`Session::latest`]).

pub mod compare;
pub mod control;
pub mod describe;
pub mod sweep;
pub mod tune;

mod follow;
mod quick_tune;

use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};

use crate::gpu::DeviceSampler;
use crate::model::trace::ForwardTrace;
use crate::model::{Model, RoutingConfig};
use crate::profiling::snapshot::{
    DeviceSnapshot, GeneratedText, GeneratedToken, LayerPolicy, ModelInfo, PolicyState, Snapshot,
    TuneStatus,
};
use crate::profiling::stats::{RunStats, SnapshotInputs, experts_per_layer};
use crate::routing::RoutingPolicy;
use crate::routing::{CapacityFactor, CheckedPolicy, RoutingError};
use crate::workload::Workload;

pub use control::{Control, Layers};

/// Why a control message was refused.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// The model has no MoE layer with this slot number.
    #[error("MoE layer {slot} does not exist: the model has {n_moe} MoE layers (0..{n_moe})")]
    NoSuchMoeLayer {
        /// Slot given.
        slot: usize,
        /// MoE layers in the model.
        n_moe: usize,
    },
    /// A policy parameter or the capacity factor is out of range.
    #[error(transparent)]
    Routing(#[from] RoutingError),
    /// The session thread has ended.
    #[error("the session has ended")]
    Ended,
}

/// Options of a session.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Routing at the start.
    pub routing: RoutingConfig,
    /// Policy of the reference passes (quality comparison), on every MoE layer.
    pub reference_policy: RoutingPolicy,
    /// Run every n-th eval batch again under the reference policy; 0 = never.
    pub reference_every: u32,
    /// Tokens in the sliding window.
    pub window_tokens: u64,
    /// k of the top-k baseline (default: the model's).
    pub top_k_baseline: Option<usize>,
    /// Shortest interval between two periodic snapshots.
    pub snapshot_interval: Duration,
    /// Stop after this many tokens (all passes, reference passes excluded).
    pub token_budget: Option<u64>,
    /// Stop after this much wall time.
    pub time_budget: Option<Duration>,
    /// The device in words, for the snapshot (e.g. "CPU (8 threads)").
    pub device_description: String,
    /// Sample device counters at this period (`None`: no sampler thread).
    pub device_sample_period: Option<Duration>,
    /// Start paused.
    pub start_paused: bool,
    /// Tokens of the generate stream kept for the snapshot.
    pub generated_capacity: usize,
    /// Called after every measured pass (not reference passes) with its input ids and trace,
    /// e.g. to stream a routing trace to a file; an error stops the session.
    pub pass_observer: Option<PassObserver>,
    /// Called with every snapshot the session publishes (on the model thread, so it must not
    /// block), e.g. to record the session (`--record`).
    pub snapshot_observer: Option<SnapshotObserver>,
    /// A/B: run every eval batch again under this routing (policy B) and compare it with the
    /// session's own (`--compare`); eval workload only.
    pub compare: Option<RoutingConfig>,
    /// Called with every device sample, on the sampler thread (so it must not block), as well
    /// as the sample going into the next snapshot: the UI shows the counters while a long pass
    /// (a model that pages its experts in) keeps the model thread from publishing.
    pub device_observer: Option<DeviceObserver>,
}

/// A callback shared with the device sampler thread; see [`SessionConfig::device_observer`].
#[derive(Clone)]
pub struct DeviceObserver(pub std::sync::Arc<dyn Fn(&DeviceSnapshot) + Send + Sync>);

impl std::fmt::Debug for DeviceObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DeviceObserver")
    }
}

/// A callback shared with the session thread; see [`SessionConfig::pass_observer`].
#[derive(Clone)]
pub struct PassObserver(
    #[allow(clippy::type_complexity)]
    pub  std::sync::Arc<
        std::sync::Mutex<dyn FnMut(&[u32], &ForwardTrace) -> anyhow::Result<()> + Send>,
    >,
);

/// A callback shared with the session thread; see [`SessionConfig::snapshot_observer`].
#[derive(Clone)]
pub struct SnapshotObserver(
    #[allow(clippy::type_complexity)]
    pub  std::sync::Arc<std::sync::Mutex<dyn FnMut(&Snapshot) + Send>>,
);

impl std::fmt::Debug for SnapshotObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("SnapshotObserver")
    }
}

impl std::fmt::Debug for PassObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("PassObserver")
    }
}

/// The quality reference a model gets by default: the top-k it was trained with, or all experts.
pub fn native_reference(default_policy: RoutingPolicy) -> RoutingPolicy {
    match default_policy {
        RoutingPolicy::TopK { .. } => default_policy,
        _ => RoutingPolicy::Dense,
    }
}

impl SessionConfig {
    /// Defaults for `model`: its default routing, a reference every 8 batches (its native top-k
    /// for a model that has one, such as a Hugging Face checkpoint, which was trained with it;
    /// Dense otherwise), a 4096-token
    /// window, snapshots every 100 ms, no budget, device counters every second.
    pub fn new(model: &Model, device_description: impl Into<String>) -> Self {
        Self {
            routing: model.default_routing(),
            reference_policy: native_reference(model.config().default_policy),
            reference_every: 8,
            window_tokens: 4096,
            top_k_baseline: None,
            snapshot_interval: Duration::from_millis(100),
            token_budget: None,
            time_budget: None,
            device_description: device_description.into(),
            device_sample_period: Some(Duration::from_secs(1)),
            start_paused: false,
            generated_capacity: 2048,
            pass_observer: None,
            snapshot_observer: None,
            device_observer: None,
            compare: None,
        }
    }
}

/// A control message checked against the model: what the session thread receives, so that it
/// applies orders without checking them again.
#[derive(Clone, Debug, PartialEq)]
enum Order {
    SetPolicy {
        layers: Layers,
        policy: CheckedPolicy,
    },
    SetCapacityFactor(Option<CapacityFactor>),
    SetCompare(Option<CheckedPolicy>),
    SetPaused(bool),
    ResetStats,
    QuickTune(tune::Budget),
    ApplyTune,
    DismissTune,
    FollowTokens(bool),
    Stop,
}

/// Checks a control message against the model (number of MoE layers and of experts): the one
/// place a [`Control`] is checked.
fn check_control(control: Control, n_moe: usize, n_experts: usize) -> Result<Order, ControlError> {
    Ok(match control {
        Control::SetPolicy { layers, policy } => {
            if let Layers::Slot(slot) = layers
                && slot >= n_moe
            {
                return Err(ControlError::NoSuchMoeLayer { slot, n_moe });
            }
            Order::SetPolicy {
                layers,
                policy: policy.check(n_experts)?,
            }
        }
        Control::SetCapacityFactor(c) => Order::SetCapacityFactor(CapacityFactor::optional(c)?),
        Control::SetCompare(p) => Order::SetCompare(p.map(|p| p.check(n_experts)).transpose()?),
        Control::SetPaused(p) => Order::SetPaused(p),
        Control::ResetStats => Order::ResetStats,
        Control::QuickTune(b) => Order::QuickTune(b),
        Control::ApplyTune => Order::ApplyTune,
        Control::DismissTune => Order::DismissTune,
        Control::FollowTokens(on) => Order::FollowTokens(on),
        Control::Stop => Order::Stop,
    })
}

/// Sends validated control messages to a session; cheap to clone (one per UI component).
#[derive(Clone, Debug)]
pub struct SessionController {
    tx: Sender<Order>,
    n_moe: usize,
    n_experts: usize,
}

impl SessionController {
    /// Validates and sends any control message.
    pub fn send(&self, control: Control) -> Result<(), ControlError> {
        let order = check_control(control, self.n_moe, self.n_experts)?;
        self.tx.send(order).map_err(|_| ControlError::Ended)
    }

    /// Threshold `t` on one MoE layer (by slot) or on all.
    pub fn set_threshold(&self, layers: Layers, t: f32) -> Result<(), ControlError> {
        self.set_policy(layers, RoutingPolicy::threshold(t))
    }

    /// Any policy on one MoE layer (by slot) or on all.
    pub fn set_policy(&self, layers: Layers, policy: RoutingPolicy) -> Result<(), ControlError> {
        self.send(Control::SetPolicy { layers, policy })
    }

    /// Stops (`true`) or resumes (`false`) forward passes.
    pub fn set_paused(&self, paused: bool) -> Result<(), ControlError> {
        self.send(Control::SetPaused(paused))
    }

    /// Resets the statistics (new epoch, previous epoch forgotten).
    pub fn reset_stats(&self) -> Result<(), ControlError> {
        self.send(Control::ResetStats)
    }

    /// Asks the session to end.
    pub fn stop(&self) -> Result<(), ControlError> {
        self.send(Control::Stop)
    }
}

/// What a finished session hands back.
pub struct SessionOutcome {
    /// The model, for reuse.
    pub model: Model,
    /// The last snapshot (its `ended` says why the session ended).
    pub final_snapshot: Snapshot,
}

/// Where snapshots go.
enum Publisher {
    Channel(SyncSender<Snapshot>),
    Sink(Box<dyn FnMut(Snapshot) + Send>),
}

/// A running session.
pub struct Session {
    controller: SessionController,
    snapshots: Receiver<Snapshot>,
    latest: Arc<Mutex<Option<Snapshot>>>,
    handle: Option<JoinHandle<Result<SessionOutcome>>>,
}

/// Snapshots buffered for a slow reader before newer ones are skipped.
const CHANNEL_CAPACITY: usize = 4;

impl Session {
    /// Starts a session; read snapshots from [`Session::snapshots`] or [`Session::latest`].
    pub fn start(model: Model, workload: Workload, config: SessionConfig) -> Result<Self> {
        let (tx, rx) = mpsc::sync_channel(CHANNEL_CAPACITY);
        Self::start_inner(model, workload, config, Publisher::Channel(tx), rx)
    }

    /// Starts a session that hands every snapshot to `sink` (called on the model thread: it must
    /// not block, e.g. a `try_send` into the UI's own event channel). [`Session::snapshots`]
    /// then stays empty; [`Session::latest`] still works.
    pub fn start_with_sink(
        model: Model,
        workload: Workload,
        config: SessionConfig,
        sink: impl FnMut(Snapshot) + Send + 'static,
    ) -> Result<Self> {
        let (_tx, rx) = mpsc::sync_channel(1);
        Self::start_inner(model, workload, config, Publisher::Sink(Box::new(sink)), rx)
    }

    fn start_inner(
        model: Model,
        workload: Workload,
        config: SessionConfig,
        publisher: Publisher,
        snapshots: Receiver<Snapshot>,
    ) -> Result<Self> {
        let n_experts = model.config().n_experts;
        let moe_layers = model.moe_layers().to_vec();
        anyhow::ensure!(
            config.routing.len() == moe_layers.len(),
            "routing has {} policies but the model has {} MoE layers",
            config.routing.len(),
            moe_layers.len()
        );
        // The routing was checked when built; the reference is checked here, once.
        let reference =
            RoutingConfig::uniform(config.reference_policy, moe_layers.len(), n_experts)
                .context("reference policy")?;
        if let Some(b) = &config.compare {
            anyhow::ensure!(
                workload.is_eval(),
                "A/B (--compare) needs the eval workload: under generate the two policies would \
                 choose different tokens, so there would be no same tokens to compare on"
            );
            anyhow::ensure!(
                b.len() == moe_layers.len(),
                "policy B has {} policies but the model has {} MoE layers",
                b.len(),
                moe_layers.len()
            );
        }
        let (tx, rx) = mpsc::channel();
        let latest = Arc::new(Mutex::new(None));
        let runner = Runner::new(
            model,
            workload,
            config,
            reference,
            rx,
            publisher,
            Arc::clone(&latest),
        );
        let handle = std::thread::Builder::new()
            .name("xmoe-session".into())
            .spawn(move || crate::model::on_pool(move || runner.run()))
            .context("cannot start the session thread")?;
        Ok(Self {
            controller: SessionController {
                tx,
                n_moe: moe_layers.len(),
                n_experts,
            },
            snapshots,
            latest,
            handle: Some(handle),
        })
    }

    /// A controller for sending orders (clone it freely).
    pub fn controller(&self) -> SessionController {
        self.controller.clone()
    }

    /// The snapshot channel (bounded; skipped snapshots are simply not there).
    pub fn snapshots(&self) -> &Receiver<Snapshot> {
        &self.snapshots
    }

    /// The most recent snapshot, if one was published.
    pub fn latest(&self) -> Option<Snapshot> {
        self.latest
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Waits up to `timeout` for a snapshot satisfying `pred` (checking the latest one first).
    pub fn wait_for(
        &self,
        timeout: Duration,
        mut pred: impl FnMut(&Snapshot) -> bool,
    ) -> Option<Snapshot> {
        let deadline = Instant::now() + timeout;
        if let Some(s) = self.latest().filter(|s| pred(s)) {
            return Some(s);
        }
        loop {
            let left = deadline.checked_duration_since(Instant::now())?;
            match self
                .snapshots
                .recv_timeout(left.min(Duration::from_millis(50)))
            {
                Ok(s) if pred(&s) => return Some(s),
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => {
                    if let Some(s) = self.latest().filter(|s| pred(s)) {
                        return Some(s);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    // Sink mode, or the session has ended: only the latest slot can change.
                    if let Some(s) = self.latest().filter(|s| pred(s)) {
                        return Some(s);
                    }
                    if self.is_finished() {
                        return None;
                    }
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
        }
    }

    /// True once the session thread has ended (budget reached, stopped, or failed).
    pub fn is_finished(&self) -> bool {
        self.handle.as_ref().is_none_or(JoinHandle::is_finished)
    }

    /// Waits for the session to end by itself (its budget) and returns the model and last snapshot,
    /// or the error that ended it.
    pub fn join(mut self) -> Result<SessionOutcome> {
        let h = self.handle.take().expect("joined once");
        match h.join() {
            Ok(r) => r,
            Err(_) => anyhow::bail!("the session thread panicked"),
        }
    }

    /// Asks the session to stop, then waits for it.
    pub fn stop(self) -> Result<SessionOutcome> {
        let _ = self.controller.tx.send(Order::Stop);
        self.join()
    }
}

impl Drop for Session {
    fn drop(&mut self) {
        if let Some(h) = self.handle.take() {
            let _ = self.controller.tx.send(Order::Stop);
            let _ = h.join();
        }
    }
}

/// The model thread's state.
struct Runner {
    /// Shared only while a quick tune runs, so that it can publish progress from the runner.
    model: Arc<Model>,
    workload: Workload,
    config: SessionConfig,
    routing: RoutingConfig,
    reference: RoutingConfig,
    stats: RunStats,
    rx: Receiver<Order>,
    publisher: Publisher,
    latest: Arc<Mutex<Option<Snapshot>>>,
    model_info: ModelInfo,
    sampler: Option<DeviceSampler>,
    started: Instant,
    paused: bool,
    stop: bool,
    sequence: u64,
    last_publish: Option<Instant>,
    generated: GeneratedText,
    eval_batches: u64,
    /// The UI's quick tune, shown in every snapshot until applied or dismissed.
    tune: Option<TuneStatus>,
    /// The UI's token view is open: capture routes.
    follow: bool,
    /// The latest captured routes, published with every snapshot while `follow`.
    routes: Option<Arc<crate::profiling::snapshot::TokenRoutes>>,
    generated_routes: follow::GeneratedRoutes,
    compare: Option<compare::Comparison>,
}

impl Runner {
    fn new(
        model: Model,
        workload: Workload,
        config: SessionConfig,
        reference: RoutingConfig,
        rx: Receiver<Order>,
        publisher: Publisher,
        latest: Arc<Mutex<Option<Snapshot>>>,
    ) -> Self {
        let cfg = model.config();
        let top_k = config
            .top_k_baseline
            .unwrap_or_else(|| cfg.top_k_baseline());
        let model_info = describe::model_info(cfg, config.device_description.clone(), top_k);
        let routing = config.routing.clone();
        let state = policy_state(model.moe_layers(), &routing, config.reference_policy);
        let stats = RunStats::new(cfg, top_k, config.window_tokens, state, 0.0);
        let sampler =
            config
                .device_sample_period
                .map(|period| match config.device_observer.clone() {
                    Some(obs) => DeviceSampler::start_observed(period, move |d| (obs.0)(d)),
                    None => DeviceSampler::start(period),
                });
        // Checked against the model in `start_inner`, so building the statistics cannot fail.
        let compare = config
            .compare
            .clone()
            .and_then(|b| compare::Comparison::new(&model, &routing, b).ok());
        Self {
            compare,
            paused: config.start_paused,
            model: Arc::new(model),
            workload,
            routing,
            reference,
            stats,
            rx,
            publisher,
            latest,
            model_info,
            sampler,
            started: Instant::now(),
            stop: false,
            sequence: 0,
            last_publish: None,
            generated: GeneratedText::default(),
            eval_batches: 0,
            tune: None,
            follow: false,
            routes: None,
            generated_routes: Default::default(),
            config,
        }
    }

    fn now_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    fn budget_reached(&self) -> Option<String> {
        if let Some(n) = self.config.token_budget
            && self.stats.tokens_total() >= n
        {
            return Some(format!("token budget of {n} reached"));
        }
        if let Some(d) = self.config.time_budget
            && self.started.elapsed() >= d
        {
            return Some(format!("time budget of {:.1} s reached", d.as_secs_f64()));
        }
        None
    }

    fn new_epoch(&mut self, reason: String) {
        let state = policy_state(
            self.model.moe_layers(),
            &self.routing,
            self.config.reference_policy,
        );
        let now = self.now_s();
        self.stats.begin_epoch(reason, state, now);
        self.restart_compare();
    }

    /// A/B figures never mix two policies A: they start again with the epoch.
    fn restart_compare(&mut self) {
        if let Some(c) = &mut self.compare {
            // The policy counts were checked when the comparison began and cannot change.
            let _ = c.restart(&self.model, &self.routing);
        }
    }

    fn set_compare(&mut self, b: Option<CheckedPolicy>) {
        self.compare = match b {
            Some(b) if self.workload.is_eval() => {
                let n_moe = self.model.moe_layers().len();
                let n_experts = self.model.config().n_experts;
                RoutingConfig::uniform(b.policy(), n_moe, n_experts)
                    .ok()
                    .and_then(|r| compare::Comparison::new(&self.model, &self.routing, r).ok())
            }
            _ => None,
        };
    }

    fn set_policy(&mut self, layers: Layers, checked: CheckedPolicy) {
        let policy = checked.policy();
        let what = match layers {
            Layers::Slot(slot) => {
                self.routing.set_policy(Some(slot), checked);
                // The one place a slot becomes a block index: users read "layer" as the block.
                format!("layer {}", self.model.moe_layers()[slot])
            }
            Layers::All => {
                self.routing.set_policy(None, checked);
                "all MoE layers".to_string()
            }
        };
        let reason = match policy {
            RoutingPolicy::Threshold { t, renormalize } => format!(
                "threshold of {what} set to {t:.2}{}",
                if renormalize {
                    ", weights renormalised"
                } else {
                    ""
                }
            ),
            p => format!("policy of {what} set to {p}"),
        };
        self.new_epoch(reason);
    }

    /// Applies one order, checked by [`SessionController::send`] (the only sender besides the
    /// session's own `Stop`).
    fn apply(&mut self, order: Order) {
        match order {
            Order::SetPolicy { layers, policy } => self.set_policy(layers, policy),
            Order::SetCapacityFactor(c) => {
                self.routing.set_capacity_factor(c);
                self.new_epoch(match c {
                    Some(c) => format!("capacity factor set to {:.2}", c.get()),
                    None => "capacity factor cleared".to_string(),
                });
            }
            Order::SetCompare(b) => self.set_compare(b),
            Order::SetPaused(paused) => self.paused = paused,
            Order::ResetStats => {
                let now = self.now_s();
                self.stats.reset(now);
                self.restart_compare();
            }
            Order::QuickTune(budget) => self.quick_tune(budget),
            Order::ApplyTune => self.apply_tune(),
            Order::DismissTune => self.tune = None,
            Order::FollowTokens(on) => self.set_follow(on),
            Order::Stop => self.stop = true,
        }
    }

    fn device(&self) -> DeviceSnapshot {
        self.sampler
            .as_ref()
            .map_or_else(DeviceSnapshot::not_sampled, DeviceSampler::latest)
    }

    fn publish(&mut self, ended: Option<String>) -> Snapshot {
        let now = self.now_s();
        self.stats.sample_history(now);
        let mut snap = self.stats.snapshot(SnapshotInputs {
            sequence: self.sequence,
            session_elapsed_s: self.now_s(),
            model: self.model_info.clone(),
            workload: self.workload.info().clone(),
            paused: self.paused,
            ended,
            device: self.device(),
            generated: (!self.workload.is_eval()).then(|| self.generated.clone()),
        });
        snap.tune = self.tune.clone();
        snap.routes = self.routes.clone();
        snap.compare = self.compare.as_ref().map(compare::Comparison::snapshot);
        self.sequence += 1;
        self.last_publish = Some(Instant::now());
        *self.latest.lock().unwrap_or_else(|e| e.into_inner()) = Some(snap.clone());
        if let Some(obs) = &self.config.snapshot_observer {
            (obs.0.lock().unwrap_or_else(|p| p.into_inner()))(&snap);
        }
        match &mut self.publisher {
            Publisher::Channel(tx) => {
                let _ = tx.try_send(snap.clone());
            }
            Publisher::Sink(f) => f(snap.clone()),
        }
        snap
    }

    /// True when a periodic snapshot is due (the last one is at least `interval` old).
    fn publish_due(&self, interval: Duration) -> bool {
        self.last_publish.is_none_or(|t| t.elapsed() >= interval)
    }

    fn publish_if_due(&mut self, interval: Duration) {
        if self.publish_due(interval) {
            self.publish(None);
        }
    }

    /// Drains pending controls; returns true if any arrived.
    fn drain_controls(&mut self) -> bool {
        let mut any = false;
        loop {
            match self.rx.try_recv() {
                Ok(c) => {
                    self.apply(c);
                    any = true;
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    self.stop = true;
                    break;
                }
            }
        }
        any
    }

    fn push_generated(&mut self, trace: &ForwardTrace, stream: &[crate::workload::StreamToken]) {
        for s in stream {
            let experts = experts_per_layer(trace, s.row);
            let mean = experts.iter().map(|&n| n as f32).sum::<f32>() / experts.len().max(1) as f32;
            self.generated.tokens.push(GeneratedToken {
                token: s.token,
                bytes: s.bytes.clone(),
                origin: s.origin,
                sequence: s.sequence,
                experts_per_layer: experts,
                mean_experts: mean,
            });
        }
        let cap = self.config.generated_capacity.max(1);
        if self.generated.tokens.len() > cap {
            // Drop a quarter at once so that trimming is amortised.
            let drop = self.generated.tokens.len() - cap + cap / 4;
            self.generated.tokens.drain(..drop);
            self.generated.dropped_tokens += drop as u64;
        }
    }

    fn run(mut self) -> Result<SessionOutcome> {
        let mut trace = ForwardTrace::default();
        let mut ref_trace = ForwardTrace::default();
        self.publish(None);
        let mut last_mark = Instant::now();
        let ended = loop {
            if self.drain_controls() {
                self.publish(None);
                last_mark = Instant::now();
            }
            if self.stop {
                break "stopped".to_string();
            }
            if let Some(why) = self.budget_reached() {
                break why;
            }
            if self.paused {
                match self.rx.recv_timeout(Duration::from_millis(100)) {
                    Ok(c) => {
                        self.apply(c);
                        self.publish(None);
                    }
                    Err(RecvTimeoutError::Timeout) => self.publish_if_due(Duration::from_secs(1)),
                    Err(RecvTimeoutError::Disconnected) => self.stop = true,
                }
                last_mark = Instant::now();
                continue;
            }
            let outcome = match self
                .workload
                .run_pass(&self.model, &self.routing, &mut trace)
            {
                Ok(o) => o,
                Err(e) => {
                    let msg = format!("forward pass failed: {e:#}");
                    self.publish(Some(msg.clone()));
                    return Err(e.context("forward pass failed"));
                }
            };
            let now = Instant::now();
            let wall = now.duration_since(last_mark).as_nanos() as u64;
            last_mark = now;
            self.stats.record_pass(&trace, outcome.kind, wall);
            if let Some(obs) = self.config.pass_observer.clone() {
                let mut f = obs.0.lock().unwrap_or_else(|p| p.into_inner());
                if let Err(e) = f(self.workload.last_inputs(), &trace) {
                    drop(f);
                    let msg = format!("{e:#}");
                    self.publish(Some(msg));
                    return Err(e);
                }
            }
            if let Some(c) = &mut self.compare
                && outcome.quality.is_some()
            {
                if let Err(e) = c.run_b(&self.model, &mut self.workload, &trace) {
                    self.publish(Some(format!("{e:#}")));
                    return Err(e);
                }
                // B's pass is not part of A's next wall time.
                last_mark = Instant::now();
            }
            if let Some(q) = &outcome.quality {
                self.stats.record_quality(q);
                self.eval_batches += 1;
                let every = self.config.reference_every as u64;
                if every > 0 && self.eval_batches.is_multiple_of(every) {
                    let cmp = if self.routing == self.reference {
                        self.workload.self_reference()
                    } else {
                        match self.workload.run_reference(
                            &self.model,
                            &self.reference,
                            &mut ref_trace,
                        ) {
                            Ok(c) => c,
                            Err(e) => {
                                let msg = format!("reference pass failed: {e:#}");
                                self.publish(Some(msg.clone()));
                                return Err(e.context("reference pass failed"));
                            }
                        }
                    };
                    if let Some(c) = cmp {
                        self.stats.record_reference(&c);
                    }
                    // The reference pass is not part of the next pass's wall time.
                    last_mark = Instant::now();
                }
            }
            if !outcome.stream.is_empty() {
                self.push_generated(&trace, &outcome.stream);
            }
            self.capture_routes(&trace, &outcome, self.config.snapshot_interval);
            self.publish_if_due(self.config.snapshot_interval);
        };
        let final_snapshot = self.publish(Some(ended));
        if let Some(s) = self.sampler.take() {
            s.stop();
        }
        let model = Arc::try_unwrap(self.model)
            .map_err(|_| anyhow::anyhow!("the model is still shared after the session ended"))?;
        Ok(SessionOutcome {
            model,
            final_snapshot,
        })
    }
}

/// The snapshot form of a routing configuration.
pub fn policy_state(
    moe_layers: &[usize],
    routing: &RoutingConfig,
    reference: RoutingPolicy,
) -> PolicyState {
    PolicyState {
        layers: moe_layers
            .iter()
            .zip(routing.policies())
            .map(|(&layer, p)| LayerPolicy { layer, policy: p })
            .collect(),
        capacity_factor: routing.capacity_factor(),
        reference,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn controls_are_validated_against_the_model() {
        let ok = |c| check_control(c, 2, 8);
        let set = |layers, policy| Control::SetPolicy { layers, policy };
        let t = |t| RoutingPolicy::threshold(t);
        let topk = |k| RoutingPolicy::TopK {
            k,
            renormalize: false,
        };
        assert!(ok(set(Layers::Slot(1), t(0.5))).is_ok());
        assert!(ok(set(Layers::All, t(1.0))).is_ok());
        let e = ok(set(Layers::Slot(2), t(0.5))).unwrap_err();
        assert_eq!(
            e.to_string(),
            "MoE layer 2 does not exist: the model has 2 MoE layers (0..2)"
        );
        for bad in [0.0, 1.5, f32::NAN] {
            assert!(ok(set(Layers::All, t(bad))).is_err(), "t = {bad}");
        }
        assert!(ok(set(Layers::All, topk(8))).is_ok());
        assert!(ok(set(Layers::All, topk(9))).is_err());
        assert!(ok(set(Layers::All, topk(0))).is_err());
        assert!(ok(Control::SetCapacityFactor(Some(-1.0))).is_err());
        assert!(ok(Control::SetCapacityFactor(None)).is_ok());
    }
}
