//! Aggregation over trials with polars: group by the swept keys that are not replicates (seed, split)
//! and report n, mean, sample standard deviation and a 95% confidence interval of each final metric.

use polars::prelude::*;

/// Two-sided 95% critical values of Student's t for 1–30 degrees of freedom.
/// Reference: `scipy.stats.t.ppf(0.975, df)` for df = 1..30, rounded to 3 decimals.
const T975: [f64; 30] = [
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
    2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
    2.052, 2.048, 2.045, 2.042,
];
/// (df, t) beyond the table, interpolated linearly in 1/df; 1.960 is the normal limit.
const T975_TAIL: [(f64, f64); 4] = [(30.0, 2.042), (40.0, 2.021), (60.0, 2.000), (120.0, 1.980)];

/// The 0.975 quantile of Student's t with `df` degrees of freedom.
pub fn t975(df: usize) -> f64 {
    if df == 0 {
        return f64::NAN;
    }
    if df <= 30 {
        return T975[df - 1];
    }
    let x = 1.0 / df as f64;
    let mut points: Vec<(f64, f64)> = T975_TAIL.iter().map(|&(d, t)| (1.0 / d, t)).collect();
    points.push((0.0, 1.960));
    for w in points.windows(2) {
        let ((x0, t0), (x1, t1)) = (w[0], w[1]);
        if x <= x0 && x >= x1 {
            return t1 + (t0 - t1) * (x - x1) / (x0 - x1);
        }
    }
    1.960
}

/// Half-width of the 95% confidence interval of a mean of `n` values with sample std `std`.
pub fn ci95(n: usize, std: f64) -> f64 {
    if n < 2 {
        return f64::NAN;
    }
    t975(n - 1) * std / (n as f64).sqrt()
}

/// `results` has one row per (trial, split, metric[, class]) with a `status` column and one string
/// column per config key in `by`. Returns, per group of `by` × split × metric, over trials that
/// finished: `n`, `mean`, `std` (ddof 1), `median`, `min`, `max` and `ci95`.
pub fn summarize(results: &DataFrame, by: &[String]) -> PolarsResult<DataFrame> {
    let mut keys: Vec<Expr> = by.iter().map(|k| col(k.as_str())).collect();
    keys.push(col("split"));
    keys.push(col("metric"));
    let v = || col("value");
    let mut df = results
        .clone()
        .lazy()
        .filter(col("class").is_null().and(col("status").eq(lit("done"))))
        .group_by_stable(keys)
        .agg([
            v().count().cast(DataType::UInt64).alias("n"),
            v().mean().alias("mean"),
            v().std(1).alias("std"),
            v().median().alias("median"),
            v().min().alias("min"),
            v().max().alias("max"),
        ])
        .collect()?;
    let n: Vec<u64> = df.column("n")?.u64()?.into_no_null_iter().collect();
    let std = floats(&df, "std")?;
    let ci: Vec<Option<f64>> = n
        .iter()
        .zip(&std)
        .map(|(&n, s)| s.map(|s| ci95(n as usize, s)).filter(|c| c.is_finite()))
        .collect();
    df.with_column(Column::new("ci95".into(), ci))?;
    Ok(df)
}

pub fn strings(df: &DataFrame, name: &str) -> PolarsResult<Vec<String>> {
    let column = df.column(name)?.cast(&DataType::String)?;
    let c = column.str()?;
    Ok((0..c.len())
        .map(|i| c.get(i).unwrap_or_default().to_string())
        .collect())
}

pub fn floats(df: &DataFrame, name: &str) -> PolarsResult<Vec<Option<f64>>> {
    let column = df.column(name)?.cast(&DataType::Float64)?;
    let c = column.f64()?;
    Ok((0..c.len()).map(|i| c.get(i)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn t_quantiles_match_scipy() {
        // scipy.stats.t.ppf(0.975, [1, 4, 30, 40, 1000]) → 12.706, 2.776, 2.042, 2.021, 1.962
        assert_eq!(t975(1), 12.706);
        assert_eq!(t975(4), 2.776);
        assert_eq!(t975(30), 2.042);
        assert!((t975(40) - 2.021).abs() < 1e-9);
        assert!((t975(1000) - 1.962).abs() < 0.002);
    }

    #[test]
    fn groups_average_over_replicates() {
        let df = df!(
            "trial" => ["a0", "a1", "b0", "b1", "b2"],
            "pretrain.objective" => ["mlm", "mlm", "none", "none", "none"],
            "status" => ["done", "done", "done", "done", "diverged"],
            "split" => ["test"; 5],
            "metric" => ["accuracy"; 5],
            "class" => [None::<&str>; 5],
            "value" => [0.5, 0.7, 0.2, 0.4, 0.9],
        )
        .expect("frame");
        let s = summarize(&df, &["pretrain.objective".to_string()]).expect("summary");
        assert_eq!(strings(&s, "pretrain.objective").unwrap(), ["mlm", "none"]);
        let mean = floats(&s, "mean").unwrap();
        assert!((mean[0].unwrap() - 0.6).abs() < 1e-12);
        // The diverged trial is left out: (0.2 + 0.4) / 2.
        assert!((mean[1].unwrap() - 0.3).abs() < 1e-12);
        // numpy: np.std([0.5, 0.7], ddof=1) = 0.14142; CI = 12.706 * 0.14142 / sqrt(2) = 1.2706
        let std = floats(&s, "std").unwrap();
        assert!((std[0].unwrap() - 0.141_421_356).abs() < 1e-6);
        let ci = floats(&s, "ci95").unwrap();
        assert!((ci[0].unwrap() - 1.2706).abs() < 1e-4);
    }
}
