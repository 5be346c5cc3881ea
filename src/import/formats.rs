//! The engine formats, each read exactly as the engine writes it (`docs/import-formats.md`).

use super::torch_file::{Tensor, Value};
use super::{Dump, Format, Hints, Physical};

/// Largest layer or expert count accepted: far above any model (DeepSeek-V3 has 61 layers and
/// 256 experts), and small enough that a hostile count cannot ask for gigabytes of tables.
const MAX_DIM: usize = 1 << 16;

/// Tells the recorder modes and vLLM's window apart by the keys their dump code writes.
pub(super) fn detect_torch(value: &Value) -> Result<Format, String> {
    if value.get("logical_count").is_some() {
        return Ok(Format::SglangStat);
    }
    if value.get("expert_load_window").is_some() {
        return Ok(Format::VllmEplb);
    }
    if let Some(Value::List(records)) = value.get("records") {
        let per_token = records
            .first()
            .is_some_and(|r| r.get("topk_ids_of_layer").is_some());
        return Ok(if per_token {
            Format::SglangPerToken
        } else {
            Format::SglangPerPass
        });
    }
    Err(format!(
        "a torch.save archive holding {}{}, which is none of the engine dumps read here (keys logical_count, records, expert_load_window)",
        value.kind(),
        keys_note(value)
    ))
}

fn keys_note(value: &Value) -> String {
    let keys = value.keys();
    if keys.is_empty() {
        String::new()
    } else {
        format!(" with keys {}", keys.join(", "))
    }
}

pub(super) fn from_torch(format: Format, value: &Value) -> Result<Dump, String> {
    match format {
        Format::SglangStat => sglang_stat(value),
        Format::SglangPerPass | Format::SglangPerToken => sglang_detail(format, value),
        Format::VllmEplb => vllm_eplb(value),
        Format::SglangRouted => unreachable!("JSON, not a torch.save archive"),
    }
}

fn field<'v>(value: &'v Value, key: &str, format: Format) -> Result<&'v Value, String> {
    value.get(key).ok_or_else(|| {
        format!(
            "no `{key}` in the dump: a {format} dump holds it ({} here{})",
            value.kind(),
            keys_note(value)
        )
    })
}

fn tensor<'v>(value: &'v Value, name: &str, dims: usize) -> Result<&'v Tensor, String> {
    match value {
        Value::Tensor(t) if t.shape.len() == dims => Ok(t),
        Value::Tensor(t) => Err(format!(
            "`{name}` has shape {:?}, expected {dims} dimensions",
            t.shape
        )),
        other => Err(format!("`{name}` is {}, expected a tensor", other.kind())),
    }
}

fn ints<'t>(t: &'t Tensor, name: &str) -> Result<&'t [i64], String> {
    t.ints().map_err(|e| format!("`{name}` {e}"))
}

fn dim(n: usize, what: &str, name: &str) -> Result<usize, String> {
    if n == 0 || n > MAX_DIM {
        Err(format!("`{name}` has {n} {what}, expected 1..={MAX_DIM}"))
    } else {
        Ok(n)
    }
}

fn count(v: i64, name: &str) -> Result<u64, String> {
    u64::try_from(v).map_err(|_| format!("`{name}` holds the negative count {v}"))
}

/// `_StatAccumulator.dump`: `dict(rank, logical_count [steps, layers, experts] int32,
/// average_utilization_rate_over_window)`; rows of the circular buffer never written are zero.
fn sglang_stat(value: &Value) -> Result<Dump, String> {
    let f = Format::SglangStat;
    let t = tensor(field(value, "logical_count", f)?, "logical_count", 3)?;
    let data = ints(t, "logical_count")?;
    let (steps, layers, experts) = (t.shape[0], t.shape[1], t.shape[2]);
    dim(layers, "layers", "logical_count")?;
    dim(experts, "experts", "logical_count")?;
    let mut load = vec![vec![0u64; experts]; layers];
    let mut nonzero_steps = 0;
    for s in 0..steps {
        let mut any = false;
        for (l, row) in load.iter_mut().enumerate() {
            for (e, cell) in row.iter_mut().enumerate() {
                let v = count(data[(s * layers + l) * experts + e], "logical_count")?;
                any |= v > 0;
                *cell = cell.saturating_add(v);
            }
        }
        nonzero_steps += usize::from(any);
    }
    let mut notes = vec![format!(
        "{steps} buffered steps, {nonzero_steps} with any load (the recorder's circular buffer keeps zero rows it never wrote)"
    )];
    if let Some(Value::Int(rank)) = value.get("rank") {
        notes.push(format!(
            "written by rank {rank}; counts are all-reduced over ranks"
        ));
    }
    if let Some(Value::Float(u)) = value.get("average_utilization_rate_over_window") {
        notes.push(format!(
            "SGLang's own average utilisation rate over its window: {u:.3}"
        ));
    }
    Ok(Dump {
        format: f,
        n_layers: layers,
        n_experts: experts,
        load,
        records: (steps, "steps"),
        tokens: None,
        top_k: None,
        physical: None,
        notes,
    })
}

/// `_DetailAccumulator.dump`: `dict(records=[dict(forward_pass_id, rank, gatherer_key,
/// global_physical_count [layers, physical], ...)], last_physical_to_logical_map [layers,
/// physical])`; in `per_token` mode each record also holds `input_ids`, `positions`,
/// `extend_seq_lens`, `forward_mode`, `topk_ids_of_layer` [layers, tokens, 8] (physical ids, -1
/// unused) and `misc_objects`.
fn sglang_detail(format: Format, value: &Value) -> Result<Dump, String> {
    let map = tensor(
        field(value, "last_physical_to_logical_map", format)?,
        "last_physical_to_logical_map",
        2,
    )?;
    let (layers, physical) = (map.shape[0], map.shape[1]);
    dim(layers, "layers", "last_physical_to_logical_map")?;
    dim(physical, "physical experts", "last_physical_to_logical_map")?;
    let to_logical = logical_map(map, "last_physical_to_logical_map")?;
    let experts = logical_count(&to_logical);
    let Value::List(records) = field(value, "records", format)? else {
        return Err("`records` is not a list".into());
    };
    if records.is_empty() {
        return Err("`records` is empty: nothing was recorded between start and dump".into());
    }
    let mut phys = vec![vec![0u64; physical]; layers];
    let mut tokens: u64 = 0;
    let mut ranks = std::collections::BTreeSet::new();
    for (i, rec) in records.iter().enumerate() {
        let name = format!("records[{i}].global_physical_count");
        let t = tensor(
            rec.get("global_physical_count")
                .ok_or_else(|| format!("records[{i}] has no global_physical_count"))?,
            &name,
            2,
        )?;
        if t.shape != [layers, physical] {
            return Err(format!(
                "`{name}` has shape {:?}, but the physical-to-logical map is [{layers}, {physical}]",
                t.shape
            ));
        }
        let data = ints(t, &name)?;
        let mut from_ids =
            (format == Format::SglangPerToken).then(|| vec![0u64; layers * physical]);
        if let Some(from_ids) = &mut from_ids {
            let tname = format!("records[{i}].topk_ids_of_layer");
            let ids = tensor(
                rec.get("topk_ids_of_layer")
                    .ok_or_else(|| format!("records[{i}] has no topk_ids_of_layer"))?,
                &tname,
                3,
            )?;
            if ids.shape[0] != layers {
                return Err(format!(
                    "`{tname}` has {} layers, the map {layers}",
                    ids.shape[0]
                ));
            }
            tokens += ids.shape[1] as u64;
            let per_layer = ids.shape[1] * ids.shape[2];
            for (j, &id) in ints(ids, &tname)?.iter().enumerate() {
                match id {
                    -1 => {}
                    id if (0..physical as i64).contains(&id) => {
                        from_ids[(j / per_layer) * physical + id as usize] += 1
                    }
                    id => {
                        return Err(format!(
                            "`{tname}` holds the expert id {id}, outside 0..{physical} (physical experts)"
                        ));
                    }
                }
            }
        }
        for (j, &v) in data.iter().enumerate() {
            let v = count(v, &name)?;
            if let Some(from_ids) = &from_ids
                && from_ids[j] != v
            {
                return Err(format!(
                    "`{name}` says layer {} physical expert {} took {v} tokens, but topk_ids_of_layer gives {}",
                    j / physical,
                    j % physical,
                    from_ids[j]
                ));
            }
            phys[j / physical][j % physical] = phys[j / physical][j % physical].saturating_add(v);
        }
        if let Some(Value::Int(r)) = rec.get("rank") {
            ranks.insert(*r);
        }
    }
    let load = to_logical_load(&phys, &to_logical, experts);
    let mut notes = vec![format!(
        "{physical} physical experts for {experts} logical ones (the map is the last one in force: SGLang notes it may change while recording)"
    )];
    if !ranks.is_empty() {
        let ranks: Vec<String> = ranks.iter().map(|r| r.to_string()).collect();
        notes.push(format!(
            "passes of rank {} only (each rank writes its own file)",
            ranks.join(", ")
        ));
    }
    Ok(Dump {
        format,
        n_layers: layers,
        n_experts: experts,
        load,
        records: (records.len(), "passes"),
        tokens: (format == Format::SglangPerToken).then_some(tokens),
        top_k: None,
        physical: Some(Physical {
            load: phys,
            to_logical,
        }),
        notes,
    })
}

/// vLLM's `EplbState` fields `expert_load_window` [window, num_moe_layers, num_physical_experts]
/// and `physical_to_logical_map` [num_moe_layers, num_physical_experts], as a hook saves them
/// (`docs/import-formats.md`).
fn vllm_eplb(value: &Value) -> Result<Dump, String> {
    let f = Format::VllmEplb;
    let w = tensor(
        field(value, "expert_load_window", f)?,
        "expert_load_window",
        3,
    )?;
    let map = tensor(
        field(value, "physical_to_logical_map", f)?,
        "physical_to_logical_map",
        2,
    )?;
    let (windows, layers, physical) = (w.shape[0], w.shape[1], w.shape[2]);
    dim(layers, "layers", "expert_load_window")?;
    dim(physical, "physical experts", "expert_load_window")?;
    if map.shape != [layers, physical] {
        return Err(format!(
            "`physical_to_logical_map` has shape {:?}, but expert_load_window is [{windows}, {layers}, {physical}]",
            map.shape
        ));
    }
    let to_logical = logical_map(map, "physical_to_logical_map")?;
    let experts = logical_count(&to_logical);
    let data = ints(w, "expert_load_window")?;
    let mut phys = vec![vec![0u64; physical]; layers];
    for (j, &v) in data.iter().enumerate() {
        let cell = &mut phys[(j / physical) % layers][j % physical];
        *cell = cell.saturating_add(count(v, "expert_load_window")?);
    }
    let load = to_logical_load(&phys, &to_logical, experts);
    Ok(Dump {
        format: f,
        n_layers: layers,
        n_experts: experts,
        load,
        records: (windows, "window steps"),
        tokens: None,
        top_k: None,
        physical: Some(Physical {
            load: phys,
            to_logical,
        }),
        notes: vec![format!(
            "{physical} physical experts for {experts} logical ones"
        )],
    })
}

fn logical_map(map: &Tensor, name: &str) -> Result<Vec<Vec<usize>>, String> {
    let physical = map.shape[1];
    let data = ints(map, name)?;
    let mut out = Vec::with_capacity(map.shape[0]);
    for row in data.chunks(physical.max(1)) {
        out.push(
            row.iter()
                .map(|&v| {
                    usize::try_from(v)
                        .ok()
                        .filter(|&v| v < MAX_DIM)
                        .ok_or_else(|| format!("`{name}` maps a physical expert to {v}"))
                })
                .collect::<Result<Vec<_>, _>>()?,
        );
    }
    Ok(out)
}

/// Logical experts: one more than the largest id the map names (a map names every logical
/// expert at least once). An expected count (`--experts`, `--model`) is checked by the caller, so
/// that a mismatch names both sides.
fn logical_count(map: &[Vec<usize>]) -> usize {
    map.iter().flatten().max().map_or(0, |m| m + 1)
}

fn to_logical_load(phys: &[Vec<u64>], map: &[Vec<usize>], experts: usize) -> Vec<Vec<u64>> {
    phys.iter()
        .zip(map)
        .map(|(row, m)| {
            let mut out = vec![0u64; experts];
            for (&v, &e) in row.iter().zip(m) {
                out[e] = out[e].saturating_add(v);
            }
            out
        })
        .collect()
}

/// SGLang's `/generate` responses: `meta_info.routed_experts` is
/// `pybase64.b64encode(tensor.numpy().tobytes())` of an int32 [tokens, num_hidden_layers,
/// num_experts_per_tok] tensor (tokens: the prompt and all but the last generated token).
pub(super) fn sglang_routed(bytes: &[u8], hints: Hints) -> Result<Dump, String> {
    use base64::Engine as _;
    let text = std::str::from_utf8(bytes).map_err(|e| format!("not UTF-8 JSON: {e}"))?;
    let responses: Vec<serde_json::Value> = match serde_json::from_str(text) {
        Ok(serde_json::Value::Array(items)) => items,
        Ok(v) => vec![v],
        Err(whole) => {
            // JSON Lines: one response per line.
            let mut items = Vec::new();
            for (n, line) in text.lines().enumerate() {
                if line.trim().is_empty() {
                    continue;
                }
                items.push(serde_json::from_str(line).map_err(|e| {
                    if n == 0 {
                        format!("not JSON: {whole}")
                    } else {
                        format!("line {}: not JSON: {e}", n + 1)
                    }
                })?);
            }
            items
        }
    };
    let (layers, top_k) = match (hints.layers, hints.top_k) {
        (Some(l), Some(k)) => (l, k),
        _ => {
            return Err(
                "SGLang's routed_experts is a flat int32 array: its layers and top-k are needed to read it (--model MODEL, or --layers N --top-k K)".into(),
            );
        }
    };
    if layers == 0 || layers > MAX_DIM || top_k == 0 || top_k > MAX_DIM {
        return Err(format!(
            "layers {layers} and top-k {top_k} must be in 1..={MAX_DIM}"
        ));
    }
    let mut ids: Vec<i32> = Vec::new();
    let mut found = 0;
    for (i, r) in responses.iter().enumerate() {
        let Some(field) = r.get("meta_info").and_then(|m| m.get("routed_experts")) else {
            continue;
        };
        let s = field.as_str().ok_or_else(|| {
            format!("response {i}: meta_info.routed_experts is not a base64 string")
        })?;
        let raw = base64::engine::general_purpose::STANDARD
            .decode(s)
            .map_err(|e| format!("response {i}: meta_info.routed_experts is not base64: {e}"))?;
        let per_token = layers * top_k;
        if raw.len() % 4 != 0 || (raw.len() / 4) % per_token != 0 {
            return Err(format!(
                "response {i}: routed_experts holds {} bytes, not a whole number of tokens of {layers} layers × top-{top_k} int32 ids ({} bytes each)",
                raw.len(),
                per_token * 4
            ));
        }
        ids.extend(
            raw.chunks_exact(4)
                .map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        );
        found += 1;
    }
    if found == 0 {
        return Err(format!(
            "none of the {} JSON object(s) has meta_info.routed_experts (send the request with \"return_routed_experts\": true to a server started with --enable-return-routed-experts)",
            responses.len()
        ));
    }
    let max = ids.iter().copied().max().unwrap_or(-1);
    if let Some(&bad) = ids.iter().find(|&&v| v < -1) {
        return Err(format!("routed_experts holds the expert id {bad}"));
    }
    let experts = match hints.experts {
        Some(e) if (max as i64) >= e as i64 => {
            return Err(format!(
                "routed_experts holds the expert id {max}, but the model has {e} experts (ids 0..{e})"
            ));
        }
        Some(e) => e,
        None => dim((max + 1).max(1) as usize, "experts", "routed_experts")?,
    };
    let mut load = vec![vec![0u64; experts]; layers];
    for (j, &id) in ids.iter().enumerate() {
        if id >= 0 {
            load[(j / top_k) % layers][id as usize] += 1;
        }
    }
    let tokens = (ids.len() / (layers * top_k)) as u64;
    let mut notes = Vec::new();
    if hints.experts.is_none() {
        notes.push(format!(
            "expert count {experts} inferred from the largest id seen (pass --model or --experts for the real count)"
        ));
    }
    Ok(Dump {
        format: Format::SglangRouted,
        n_layers: layers,
        n_experts: experts,
        load,
        records: (found, "responses"),
        tokens: Some(tokens),
        top_k: Some(top_k),
        physical: None,
        notes,
    })
}
