//! Statistics over rounds: medians.

use super::ceilings::Ceiling;

/// Each ceiling's median round (latencies of that same round).
pub(super) fn median_ceilings(rounds: &[Vec<Ceiling>]) -> Vec<Ceiling> {
    let mut names: Vec<&str> = Vec::new();
    for c in rounds.iter().flatten() {
        if !names.contains(&c.name.as_str()) {
            names.push(&c.name);
        }
    }
    names
        .into_iter()
        .map(|name| {
            let mut these: Vec<&Ceiling> =
                rounds.iter().flatten().filter(|c| c.name == name).collect();
            let rounds_gbps = these.iter().map(|c| c.gbps).collect();
            these.sort_by(|a, b| a.gbps.total_cmp(&b.gbps));
            Ceiling {
                rounds_gbps,
                ..these[these.len() / 2].clone()
            }
        })
        .collect()
}

pub(super) fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}
