//! The JSON report: every figure of [`ReportData`], pretty-printed. Its layout is described by
//! `docs/report.schema.json` (JSON Schema 2020-12), versioned by
//! [`super::REPORT_SCHEMA_VERSION`].

use super::ReportData;

/// The report as pretty JSON.
pub fn render(data: &ReportData) -> String {
    let mut s = serde_json::to_string_pretty(data).expect("a report always serialises");
    s.push('\n');
    s
}

/// Reads a JSON report back.
pub fn parse(text: &str) -> serde_json::Result<ReportData> {
    serde_json::from_str(text)
}

/// Reads a JSON report back and checks it ([`super::validate::validate`]) before it is rendered.
pub fn read(text: &str) -> anyhow::Result<ReportData> {
    let data = parse(text)?;
    super::validate::validate(&data).map_err(|e| anyhow::anyhow!("inconsistent report: {e}"))?;
    Ok(data)
}
