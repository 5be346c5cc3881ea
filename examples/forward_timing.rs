//! Quick look at where a forward pass spends its time on a model file.
//! `cargo run --release --example forward_timing -- MODEL [batch] [seq]`
use candle_core::Device;
use xmoe_top::model::{Model, RoutingConfig};
use xmoe_top::profiling::trace::ForwardTrace;
use xmoe_top::routing::RoutingPolicy;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let model = Model::load(std::path::Path::new(&args[1]), &Device::Cpu)?;
    let batch: usize = args.get(2).map_or(8, |s| s.parse().unwrap());
    let seq: usize = args.get(3).map_or(128, |s| s.parse().unwrap());
    let toks: Vec<u32> = (0..batch * seq).map(|i| (i * 7919 % 251) as u32).collect();
    let n = model.moe_layers().len();
    for p in [
        RoutingPolicy::Dense,
        RoutingPolicy::Threshold { t: 0.9 },
        RoutingPolicy::Threshold { t: 0.5 },
    ] {
        let r = RoutingConfig::uniform(p, n);
        let mut tr = ForwardTrace::default();
        model.forward(&toks, batch, &r, None, &mut tr)?;
        let t0 = std::time::Instant::now();
        let reps = 5;
        let (mut a, mut ro, mut f) = (0u64, 0u64, 0u64);
        for _ in 0..reps {
            model.forward(&toks, batch, &r, None, &mut tr)?;
            for b in &tr.blocks {
                a += b.attention_ns;
                ro += b.router_ns;
                f += b.ffn_ns;
            }
        }
        let el = t0.elapsed().as_secs_f64() / reps as f64;
        let pairs: usize = tr.moe.iter().map(|m| m.groups.pairs()).sum();
        println!(
            "{p}: {:.1} ms/pass, {:.0} tok/s; attn {:.1} ms router {:.1} ms ffn {:.1} ms head {:.1} ms; experts/token {:.2}",
            el * 1e3,
            (batch * seq) as f64 / el,
            a as f64 / reps as f64 / 1e6,
            ro as f64 / reps as f64 / 1e6,
            f as f64 / reps as f64 / 1e6,
            tr.head_ns as f64 / 1e6,
            pairs as f64 / (batch * seq * n) as f64
        );
    }
    Ok(())
}
