//! `[cluster.slurm]`: how `xrun submit` asks Slurm for resources. Every key is optional; the
//! command line's `--partition`, `--gres`, … override them.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterSection {
    #[serde(default)]
    pub slurm: SlurmSection,
}

impl ClusterSection {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SlurmSection {
    /// `--partition`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// `--gres`, e.g. `gpu:1`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gres: Option<String>,
    /// `--time`, e.g. `02:00:00`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time: Option<String>,
    /// `--cpus-per-task`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus_per_task: Option<u32>,
    /// `--mem`, e.g. `16G`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem: Option<String>,
    /// `--account`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub account: Option<String>,
    /// `--qos`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub qos: Option<String>,
    /// Any other sbatch options, each as one argument: `["--constraint=a100", "--exclusive"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub options: Vec<String>,
    /// Shell lines run in every job before xrun: `["module load cuda/12.4"]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub setup: Vec<String>,
}

impl SlurmSection {
    /// The `#SBATCH` options, in a fixed order; each error names the key (as a dotted path) whose
    /// value cannot be one, and why.
    pub fn sbatch_options(&self) -> Result<Vec<String>, Vec<(String, String)>> {
        let mut out = Vec::new();
        let mut errors = Vec::new();
        let named = [
            ("partition", self.partition.clone()),
            ("gres", self.gres.clone()),
            ("time", self.time.clone()),
            ("cpus-per-task", self.cpus_per_task.map(|c| c.to_string())),
            ("mem", self.mem.clone()),
            ("account", self.account.clone()),
            ("qos", self.qos.clone()),
        ];
        for (flag, value) in named {
            let Some(v) = value else { continue };
            if v.trim().is_empty() || v.contains(['\n', '\r']) || v.contains(char::is_whitespace) {
                let key = format!("cluster.slurm.{}", flag.replace('-', "_"));
                errors.push((
                    key.clone(),
                    format!("`{key}` = `{v}` is not a single sbatch value (no spaces)"),
                ));
                continue;
            }
            out.push(format!("--{flag}={v}"));
        }
        for (i, o) in self.options.iter().enumerate() {
            if !o.starts_with('-') || o.contains(['\n', '\r']) {
                errors.push((
                    "cluster.slurm.options".into(),
                    format!(
                        "`cluster.slurm.options[{i}]` = `{o}` is not one sbatch option (each \
                         starts with `-`, e.g. \"--constraint=a100\")"
                    ),
                ));
                continue;
            }
            out.push(o.clone());
        }
        for (i, line) in self.setup.iter().enumerate() {
            if line.contains(['\n', '\r']) {
                errors.push((
                    "cluster.slurm.setup".into(),
                    format!(
                        "`cluster.slurm.setup[{i}]`: one shell line per entry, without line breaks"
                    ),
                ));
            }
        }
        if errors.is_empty() {
            Ok(out)
        } else {
            Err(errors)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_come_out_in_order_and_bad_values_are_named() {
        let s = SlurmSection {
            partition: Some("gpu".into()),
            gres: Some("gpu:1".into()),
            cpus_per_task: Some(4),
            options: vec!["--constraint=a100".into()],
            ..Default::default()
        };
        assert_eq!(
            s.sbatch_options().unwrap(),
            [
                "--partition=gpu",
                "--gres=gpu:1",
                "--cpus-per-task=4",
                "--constraint=a100"
            ]
        );
        let bad = SlurmSection {
            time: Some("2 hours".into()),
            options: vec!["exclusive".into()],
            setup: vec!["module load a\nrm -rf /".into()],
            ..Default::default()
        };
        let keys: Vec<String> = bad
            .sbatch_options()
            .unwrap_err()
            .into_iter()
            .map(|e| e.0)
            .collect();
        assert_eq!(
            keys,
            [
                "cluster.slurm.time",
                "cluster.slurm.options",
                "cluster.slurm.setup"
            ]
        );
    }
}
