//! From one checked experiment to its trials: the `[sweep]` axes expanded (grid, zip groups, random
//! draws, splits, seeds), each trial's config checked again, and each trial named by what it assigns,
//! so adding a value to an axis never renames the trials that were already there.

pub mod keys;

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::config::sweep::{flatten, is_distribution, is_list, Distribution};
use crate::config::{self, ConfigErrors, Diagnostic, Experiment, Origin};

/// One point of the sweep: the values it assigns and the experiment they give.
#[derive(Debug, Clone)]
pub struct Trial {
    pub id: String,
    /// `(dotted key, value)` in canonical order: grid keys sorted, zip groups, random draws, split, seed.
    pub assignments: Vec<(String, toml::Value)>,
    pub exp: Experiment,
}

/// Keys that replicate a measurement rather than change the method; aggregation averages over them.
pub const REPLICATE_KEYS: [&str; 2] = ["data.split", "experiment.seed"];

/// Keys a sweep may not vary: they name where outputs go, not what is measured.
const FIXED_KEYS: [&str; 8] = [
    "experiment.name",
    "experiment.output_dir",
    "experiment.cache_dir",
    "experiment.checkpoint_every",
    "data.root",
    "experiment.backend",
    "experiment.precision",
    "experiment.autotune",
];

/// One axis of the product: each alternative assigns one or more keys at once.
struct Block {
    /// Where the axis is written in the file, found once: every trial that fails on this axis
    /// points there.
    origin: Origin,
    alternatives: Vec<Vec<(String, toml::Value)>>,
}

impl Block {
    /// `at` is the axis's dotted path in the file, e.g. `sweep.grid.model.layers`.
    fn new(exp: &Experiment, at: String, alternatives: Vec<Vec<(String, toml::Value)>>) -> Self {
        Self {
            origin: exp.origin_of(&at),
            alternatives,
        }
    }
}

/// Expands the sweep; an experiment without one is a single trial named `base`.
pub fn expand(exp: &Experiment) -> Result<Vec<Trial>, ConfigErrors> {
    let mut diags = Vec::new();
    let blocks = blocks(exp, &mut diags);
    check_blocks(&blocks, &mut diags);
    if !diags.is_empty() {
        return Err(errors(exp, diags));
    }
    let mut trials = Vec::new();
    let mut ids = std::collections::HashSet::new();
    for combo in product(&blocks) {
        let mut raw = exp.raw.clone();
        let mut assigned = Vec::new();
        let mut failed = false;
        for (block, (path, value)) in combo.iter() {
            assigned.push((path.clone(), block.origin.clone()));
            match config::assign(&raw, path, value.clone()) {
                Ok(next) => raw = next,
                Err(mut d) => {
                    d.origin = block.origin.clone();
                    push_once(&mut diags, d);
                    failed = true;
                }
            }
        }
        if failed {
            continue;
        }
        let assignments: Vec<(String, toml::Value)> = combo.into_iter().map(|(_, kv)| kv).collect();
        match config::check_trial(exp, raw, assigned) {
            Ok(trial_exp) => {
                let mut id = trial_id(&assignments);
                let base = id.clone();
                let mut n = 2;
                while !ids.insert(id.clone()) {
                    id = format!("{base}~{n}");
                    n += 1;
                }
                trials.push(Trial {
                    id,
                    assignments,
                    exp: trial_exp,
                });
            }
            Err(e) => {
                for d in e.diagnostics {
                    push_once(&mut diags, d);
                }
            }
        }
    }
    if diags.is_empty() {
        Ok(trials)
    } else {
        Err(errors(exp, diags))
    }
}

fn errors(exp: &Experiment, diagnostics: Vec<Diagnostic>) -> ConfigErrors {
    ConfigErrors {
        file: exp.file.clone(),
        source: exp.source.clone(),
        diagnostics,
    }
}

/// Many trials break the same rule; say it once.
fn push_once(diags: &mut Vec<Diagnostic>, d: Diagnostic) {
    if !diags
        .iter()
        .any(|x| x.message == d.message && x.origin == d.origin)
    {
        diags.push(d);
    }
}

fn blocks(exp: &Experiment, diags: &mut Vec<Diagnostic>) -> Vec<Block> {
    let s = &exp.raw.sweep;
    let mut out = Vec::new();
    let mut grid = Vec::new();
    flatten(&s.grid, "", &is_list, &mut grid);
    grid.sort_by(|a, b| a.0.cmp(&b.0));
    for (path, value) in grid {
        let at = format!("sweep.grid.{path}");
        let values = list(exp, &at, &value, diags);
        let alternatives = values
            .into_iter()
            .map(|v| vec![(path.clone(), v)])
            .collect();
        out.push(Block::new(exp, at, alternatives));
    }
    for (i, group) in s.zip.iter().enumerate() {
        let mut leaves = Vec::new();
        flatten(group, "", &is_list, &mut leaves);
        leaves.sort_by(|a, b| a.0.cmp(&b.0));
        let at = format!("sweep.zip.{i}");
        let lists: Vec<(String, Vec<toml::Value>)> = leaves
            .into_iter()
            .map(|(p, v)| {
                let values = list(exp, &format!("{at}.{p}"), &v, diags);
                (p, values)
            })
            .collect();
        let len = lists.first().map_or(0, |l| l.1.len());
        if lists.iter().any(|l| l.1.len() != len) {
            let lens: Vec<String> = lists
                .iter()
                .map(|l| format!("{} has {}", l.0, l.1.len()))
                .collect();
            diags.push(Diagnostic::new(
                format!(
                    "the lists of a zip group must have the same length: {}",
                    lens.join(", ")
                ),
                exp.origin_of(&at),
            ));
            continue;
        }
        let alternatives = (0..len)
            .map(|j| {
                lists
                    .iter()
                    .map(|(p, v)| (p.clone(), v[j].clone()))
                    .collect()
            })
            .collect();
        out.push(Block::new(exp, at, alternatives));
    }
    if let Some(r) = &s.random {
        out.extend(random_block(exp, r, diags));
    }
    if !s.split.is_empty() {
        let alternatives = s
            .split
            .iter()
            .map(|v| vec![("data.split".to_string(), v.clone())])
            .collect();
        out.push(Block::new(exp, "sweep.split".into(), alternatives));
    }
    if !s.seeds.is_empty() {
        let alternatives = s
            .seeds
            .iter()
            .map(|&v| {
                vec![(
                    "experiment.seed".to_string(),
                    toml::Value::Integer(v as i64),
                )]
            })
            .collect();
        out.push(Block::new(exp, "sweep.seeds".into(), alternatives));
    }
    out
}

fn list(
    exp: &Experiment,
    at: &str,
    value: &toml::Value,
    diags: &mut Vec<Diagnostic>,
) -> Vec<toml::Value> {
    match value.as_array() {
        Some(a) if !a.is_empty() => a.clone(),
        _ => {
            diags.push(Diagnostic::new(
                format!("`{at}` must be a non-empty list of values, got {value}"),
                exp.origin_of(at),
            ));
            Vec::new()
        }
    }
}

fn random_block(
    exp: &Experiment,
    r: &crate::config::sweep::RandomSection,
    diags: &mut Vec<Diagnostic>,
) -> Option<Block> {
    let at = "sweep.random";
    if r.trials == 0 {
        diags.push(Diagnostic::new(
            "`sweep.random.trials` must be at least 1",
            exp.origin_of("sweep.random.trials"),
        ));
    }
    let mut leaves = Vec::new();
    flatten(&r.params, "", &is_distribution, &mut leaves);
    leaves.sort_by(|a, b| a.0.cmp(&b.0));
    let mut params = Vec::new();
    let leaves_empty = leaves.is_empty();
    for (path, v) in leaves {
        let place = format!("{at}.params.{path}");
        match v.clone().try_into::<Distribution>() {
            Ok(d) => match check_distribution(&d) {
                Ok(()) => params.push((path, d)),
                Err(m) => diags.push(Diagnostic::new(
                    format!("`{place}`: {m}"),
                    exp.origin_of(&place),
                )),
            },
            Err(_) => diags.push(
                Diagnostic::new(
                    format!(
                        "`{place}` = {v} is not a distribution (known: {})",
                        Distribution::NAMES.join(", ")
                    ),
                    exp.origin_of(&place),
                )
                .with_help(Some(
                    "write { uniform = [lo, hi] }, { log_uniform = [lo, hi] }, \
                     { int_uniform = [lo, hi] } or { choice = [a, b] }"
                        .into(),
                )),
            ),
        }
    }
    if leaves_empty {
        diags.push(Diagnostic::new(
            "`sweep.random.params` names no parameter to draw",
            exp.origin_of(at),
        ));
    }
    if params.is_empty() {
        return None;
    }
    let mut rng = ChaCha8Rng::seed_from_u64(r.seed);
    let alternatives = (0..r.trials)
        .map(|_| {
            params
                .iter()
                .map(|(p, d)| (p.clone(), draw(d, &mut rng)))
                .collect()
        })
        .collect();
    Some(Block::new(exp, at.into(), alternatives))
}

fn check_distribution(d: &Distribution) -> Result<(), String> {
    match d {
        Distribution::Uniform([lo, hi]) if lo.partial_cmp(hi) != Some(std::cmp::Ordering::Less) => {
            Err(format!("needs lo < hi, got [{lo}, {hi}]"))
        }
        Distribution::LogUniform([lo, hi]) if !(*lo > 0.0 && lo < hi) => {
            Err(format!("needs 0 < lo < hi, got [{lo}, {hi}]"))
        }
        Distribution::IntUniform([lo, hi]) if lo > hi => {
            Err(format!("needs lo <= hi, got [{lo}, {hi}]"))
        }
        Distribution::Choice(v) if v.is_empty() => Err("`choice` is empty".into()),
        _ => Ok(()),
    }
}

/// Draws one value; floats keep 4 significant digits so the trial id shows the value exactly.
fn draw(d: &Distribution, rng: &mut ChaCha8Rng) -> toml::Value {
    let round = |x: f64| -> f64 {
        if x == 0.0 {
            return 0.0;
        }
        format!("{x:.3e}").parse().unwrap_or(x)
    };
    match d {
        Distribution::Uniform([lo, hi]) => toml::Value::Float(round(rng.random_range(*lo..*hi))),
        Distribution::LogUniform([lo, hi]) => {
            let e = rng.random_range(lo.ln()..hi.ln());
            toml::Value::Float(round(e.exp()))
        }
        Distribution::IntUniform([lo, hi]) => toml::Value::Integer(rng.random_range(*lo..=*hi)),
        Distribution::Choice(v) => v[rng.random_range(0..v.len())].clone(),
    }
}

fn check_blocks(blocks: &[Block], diags: &mut Vec<Diagnostic>) {
    let mut seen: Vec<&str> = Vec::new();
    for b in blocks {
        let Some(first) = b.alternatives.first() else {
            continue;
        };
        for (path, _) in first {
            if FIXED_KEYS.contains(&path.as_str())
                || path.starts_with("sweep.")
                || path.starts_with("report.")
                || path.starts_with("cluster.")
            {
                let why = if path.starts_with("experiment.backend")
                    || path.starts_with("experiment.precision")
                    || path.starts_with("experiment.autotune")
                {
                    "one run sets up one backend, in one precision and autotune effort; run the \
                     file once per value (--set with another experiment.name)"
                } else {
                    "it says where outputs go, not what is measured"
                };
                diags.push(Diagnostic::new(
                    format!("`{path}` cannot be swept: {why}"),
                    b.origin.clone(),
                ));
            } else if seen.contains(&path.as_str()) {
                diags.push(Diagnostic::new(
                    format!("`{path}` is swept twice"),
                    b.origin.clone(),
                ));
            }
            seen.push(path);
        }
    }
}

/// Every combination, the first block varying slowest.
fn product(blocks: &[Block]) -> Vec<Vec<(&Block, (String, toml::Value))>> {
    let mut combos: Vec<Vec<(&Block, (String, toml::Value))>> = vec![Vec::new()];
    for b in blocks {
        let mut next = Vec::new();
        for c in &combos {
            for alt in &b.alternatives {
                let mut c2 = c.clone();
                c2.extend(alt.iter().map(|kv| (b, kv.clone())));
                next.push(c2);
            }
        }
        combos = next;
    }
    combos
}

/// `objective=mlm_split=0_seed=1`: the last part of each key (the full key where two axes share it)
/// and its value, in canonical order.
pub fn trial_id(assignments: &[(String, toml::Value)]) -> String {
    if assignments.is_empty() {
        return "base".into();
    }
    let last = |p: &str| p.rsplit('.').next().unwrap_or(p).to_string();
    let parts: Vec<String> = assignments
        .iter()
        .map(|(path, value)| {
            let short = last(path);
            let shared = assignments.iter().filter(|(p, _)| last(p) == short).count() > 1;
            let name = if shared { path.clone() } else { short };
            format!("{name}={}", value_label(value))
        })
        .collect();
    let id: String = parts
        .join("_")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '=' | '-' | '_' | '+') {
                c
            } else {
                '-'
            }
        })
        .collect();
    if id.len() <= 120 {
        return id;
    }
    let hash = blake3::hash(id.as_bytes()).to_hex();
    format!("{}~{}", &id[..100], &hash[..8])
}

/// A value as trial ids and tables print it: strings bare, numbers as TOML writes them.
pub fn value_label(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => s.clone(),
        // Shortest form: 0.0002 and 5e-5 rather than 0.00005, 1e30 rather than thirty zeros.
        toml::Value::Float(x) => {
            let plain = format!("{x}");
            if plain.len() > 8 {
                format!("{x:e}")
            } else {
                plain
            }
        }
        toml::Value::Array(a) => a.iter().map(value_label).collect::<Vec<_>>().join("+"),
        other => other.to_string(),
    }
}

/// The keys that vary across these trials, in canonical order.
pub fn swept_keys(trials: &[Trial]) -> Vec<String> {
    trials
        .first()
        .map(|t| t.assignments.iter().map(|(k, _)| k.clone()).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An experiment file over the shared EPRSTMT data with `sweep` appended.
    fn load(sweep: &str) -> Result<Vec<Trial>, ConfigErrors> {
        let dir = tempfile::tempdir().expect("tempdir");
        let data = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/data");
        let text = format!(
            "[experiment]\nname = \"t\"\n[data]\nroot = \"{data}\"\n[data.corpus]\n\
             paths = [\"fewclue/eprstmt/unlabeled.json\"]\ntext = \"sentence\"\n[data.train]\n\
             paths = [\"fewclue/eprstmt/train_{{split}}.json\"]\ntext = \"sentence\"\n\
             label = \"label\"\n[sweep]\nsplit = [0]\n{sweep}"
        );
        let file = dir.path().join("t.toml");
        std::fs::write(&file, text).expect("write");
        let exp = config::load(&file, &[]).expect("the base file is valid");
        expand(&exp)
    }

    fn ids(trials: &[Trial]) -> Vec<String> {
        trials.iter().map(|t| t.id.clone()).collect()
    }

    #[test]
    fn grid_zip_and_seeds_multiply_and_name_trials_by_value() {
        let trials = load(
            "seeds = [1, 2]\n[sweep.grid]\npretrain.objective = [\"mlm\", \"ar\"]\n\
             [[sweep.zip]]\nfinetune.optim.lr = [1e-4, 3e-4]\nfinetune.batch_size = [8, 16]\n",
        )
        .expect("expands");
        assert_eq!(trials.len(), 2 * 2 * 2);
        assert_eq!(
            trials[0].id,
            "objective=mlm_batch_size=8_lr=0.0001_split=0_seed=1"
        );
        // Zipped keys vary together.
        for t in &trials {
            let lr = config::lookup(&t.exp.raw, "finetune.optim.lr").expect("lr");
            let bs = config::lookup(&t.exp.raw, "finetune.batch_size").expect("bs");
            assert_eq!(lr.as_float() == Some(1e-4), bs.as_integer() == Some(8));
        }
        assert_eq!(trials[7].exp.raw.experiment.seed, 2);
    }

    #[test]
    fn adding_a_value_keeps_the_other_ids() {
        let two = ids(&load("[sweep.grid]\nmodel.layers = [1, 2]\n").expect("expands"));
        let three = ids(&load("[sweep.grid]\nmodel.layers = [1, 3, 2]\n").expect("expands"));
        assert!(
            two.iter().all(|id| three.contains(id)),
            "{two:?} / {three:?}"
        );
    }

    #[test]
    fn random_search_is_seeded_and_in_range() {
        let file = "[sweep.random]\ntrials = 5\nseed = 3\n\
                    params.finetune.optim.lr = { log_uniform = [1e-5, 1e-3] }\n\
                    params.model.layers = { int_uniform = [1, 3] }\n\
                    params.finetune.pooling = { choice = [\"cls\", \"mean\"] }\n";
        let a = load(file).expect("expands");
        assert_eq!(
            ids(&a),
            ids(&load(file).expect("expands")),
            "same file, same trials"
        );
        assert_eq!(a.len(), 5);
        for t in &a {
            let lr = t.exp.raw.finetune.optim.lr.expect("drawn");
            assert!((1e-5..1e-3).contains(&lr), "{lr}");
            assert!((1..=3).contains(&t.exp.raw.model.layers));
        }
        let other = load(&file.replace("seed = 3", "seed = 4")).expect("expands");
        assert_ne!(ids(&a), ids(&other), "another seed draws other trials");
    }

    #[test]
    fn a_bad_value_is_reported_at_the_sweep_entry() {
        let err = load("[sweep.grid]\nmodel.dropout = [0.1, 1.5]\n").expect_err("rejected");
        let text = err.to_string();
        assert!(
            text.contains("`model.dropout` must be in [0, 1), got 1.5"),
            "{text}"
        );
        assert!(text.contains("model.dropout = [0.1, 1.5]"), "{text}");
    }
}
