//! Evaluation metrics (`docs/reposearcher.md` §7), per instance and averaged over ALL ground-truth
//! instances (a missing or empty prediction scores 0), reported in percent.
//!
//! Per ranked list (de-duplicated in order, cut to 5) against a GT set:
//! - Acc@k: 1 if any of the top k is in GT;
//! - Recall@k: hits in the top k / |GT|;
//! - AllAcc@k (LocAgent-style Acc@k): 1 if every GT item is in the top k;
//! - MAP: average precision over the top 5, normalised by min(|GT|, 5):
//!   `sum_{i <= 5, pred_i in GT} precision@i / min(|GT|, 5)`;
//! - MRR: 1 / rank of the first hit in the top 5 (0 without a hit);
//! - nDCG@5: as the reward ([`crate::reward::ndcg_at_k`]).
//!
//! Levels: **file** (predicted files vs GT files, file-only GT entries included);
//! **function** (the paper's: bare names `Class.method` without the file, both sides);
//! **function_strict** (`file::name`). Function-level GT leaves out file-only entries; an
//! instance whose function-level GT is empty scores 0 there (it stays in the denominator).

use crate::gt::{GroundTruth, Location};
use crate::reward::{dedup, ndcg_at_k};
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};

/// The cut-offs of Acc/Recall/AllAcc.
pub const KS: [usize; 3] = [1, 3, 5];
/// Predictions are cut to this many after de-duplication.
pub const TOP: usize = 5;

/// A system's prediction for one instance.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Prediction {
    /// Ranked files (file-level stage). When empty, the files of `found_locations` are
    /// used, in order.
    pub found_files: Vec<String>,
    /// Ranked `file::name` locations (function-level stage).
    pub found_locations: Vec<String>,
}

/// Scores of one ranked list (fractions in 0..=1), or their average (in percent) in a
/// [`Report`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct Scores {
    /// Acc@1, Acc@3, Acc@5.
    pub acc: [f64; 3],
    /// Recall@1, Recall@3, Recall@5.
    pub recall: [f64; 3],
    /// LocAgent-style Acc@1/3/5 (all GT in top k).
    pub all_acc: [f64; 3],
    pub map: f64,
    pub mrr: f64,
    pub ndcg5: f64,
}

impl Scores {
    /// Score a ranked prediction list against a GT set.
    pub fn of<S: AsRef<str>, T: AsRef<str>>(predicted: &[S], gt: &[T]) -> Scores {
        let gt: HashSet<&str> = gt.iter().map(AsRef::as_ref).collect();
        if gt.is_empty() {
            return Scores::default();
        }
        let top: Vec<&str> = dedup(predicted).into_iter().take(TOP).collect();
        let rel: Vec<bool> = top.iter().map(|p| gt.contains(p)).collect();
        let hits = |k: usize| rel.iter().take(k).filter(|r| **r).count();
        let mut s = Scores::default();
        for (j, &k) in KS.iter().enumerate() {
            let h = hits(k);
            s.acc[j] = (h > 0) as u8 as f64;
            s.recall[j] = h as f64 / gt.len() as f64;
            s.all_acc[j] = (h == gt.len()) as u8 as f64;
        }
        let mut found = 0;
        let mut ap = 0.0;
        for (i, r) in rel.iter().enumerate() {
            if *r {
                found += 1;
                ap += found as f64 / (i + 1) as f64;
                if s.mrr == 0.0 {
                    s.mrr = 1.0 / (i + 1) as f64;
                }
            }
        }
        s.map = ap / gt.len().min(TOP) as f64;
        s.ndcg5 = ndcg_at_k(&top, &gt.iter().collect::<Vec<_>>(), TOP);
        s
    }

    fn add(&mut self, o: &Scores) {
        for j in 0..3 {
            self.acc[j] += o.acc[j];
            self.recall[j] += o.recall[j];
            self.all_acc[j] += o.all_acc[j];
        }
        self.map += o.map;
        self.mrr += o.mrr;
        self.ndcg5 += o.ndcg5;
    }

    fn scaled(mut self, f: f64) -> Scores {
        for j in 0..3 {
            self.acc[j] *= f;
            self.recall[j] *= f;
            self.all_acc[j] *= f;
        }
        self.map *= f;
        self.mrr *= f;
        self.ndcg5 *= f;
        self
    }
}

/// Scores of one instance at the three levels.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize)]
pub struct InstanceScores {
    pub file: Scores,
    pub function: Scores,
    pub function_strict: Scores,
}

/// Score one instance (`pred` = `None` when the system produced nothing).
pub fn score_instance(pred: Option<&Prediction>, gt: &[Location]) -> InstanceScores {
    let Some(pred) = pred else {
        return InstanceScores::default();
    };
    let mut gt_files: Vec<&str> = Vec::new();
    for l in gt {
        if !gt_files.contains(&l.file.as_str()) {
            gt_files.push(&l.file);
        }
    }
    let pred_locs: Vec<Location> = pred
        .found_locations
        .iter()
        .map(|s| Location::parse(s))
        .collect();
    let pred_files: Vec<&str> = if pred.found_files.is_empty() {
        pred_locs.iter().map(|l| l.file.as_str()).collect()
    } else {
        pred.found_files.iter().map(String::as_str).collect()
    };
    let gt_bare: Vec<&str> = gt.iter().filter_map(|l| l.name.as_deref()).collect();
    let pred_bare: Vec<&str> = pred_locs.iter().filter_map(|l| l.name.as_deref()).collect();
    let gt_strict: Vec<String> = gt
        .iter()
        .filter(|l| l.name.is_some())
        .map(Location::key)
        .collect();
    let pred_strict: Vec<String> = pred_locs
        .iter()
        .filter(|l| l.name.is_some())
        .map(Location::key)
        .collect();
    InstanceScores {
        file: Scores::of(&pred_files, &gt_files),
        function: Scores::of(&pred_bare, &gt_bare),
        function_strict: Scores::of(&pred_strict, &gt_strict),
    }
}

/// The averaged table, in percent.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Report {
    /// Number of GT instances (the denominator).
    pub instances: usize,
    /// GT instances with a prediction.
    pub predicted: usize,
    /// Prediction ids not in the GT (ignored in the averages).
    pub unknown_predictions: Vec<String>,
    pub file: Scores,
    pub function: Scores,
    pub function_strict: Scores,
    pub per_instance: BTreeMap<String, InstanceScores>,
}

/// Average over ALL instances of `gt` (missing predictions count 0), in percent.
pub fn evaluate(preds: &BTreeMap<String, Prediction>, gt: &GroundTruth) -> Report {
    let mut r = Report {
        instances: gt.instances.len(),
        ..Report::default()
    };
    for (id, locs) in &gt.instances {
        let p = preds.get(id);
        r.predicted += p.is_some() as usize;
        let s = score_instance(p, locs);
        r.file.add(&s.file);
        r.function.add(&s.function);
        r.function_strict.add(&s.function_strict);
        r.per_instance.insert(id.clone(), s);
    }
    r.unknown_predictions = preds
        .keys()
        .filter(|k| !gt.instances.contains_key(*k))
        .cloned()
        .collect();
    let f = if r.instances == 0 {
        0.0
    } else {
        100.0 / r.instances as f64
    };
    r.file = r.file.scaled(f);
    r.function = r.function.scaled(f);
    r.function_strict = r.function_strict.scaled(f);
    r
}

impl Report {
    /// The paper's table as text (one row per level).
    pub fn table(&self) -> String {
        let mut out = format!(
            "{:<16} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>7} {:>7} {:>7} {:>7}\n",
            "level",
            "Acc@1",
            "Acc@3",
            "Acc@5",
            "R@1",
            "R@3",
            "R@5",
            "MAP",
            "MRR",
            "nDCG@5",
            "All@1",
            "All@3",
            "All@5"
        );
        for (name, s) in [
            ("file", &self.file),
            ("function", &self.function),
            ("function_strict", &self.function_strict),
        ] {
            out.push_str(&format!(
                "{:<16} {:>6.2} {:>6.2} {:>6.2} {:>6.2} {:>6.2} {:>6.2} {:>6.2} {:>6.2} {:>7.2} {:>7.2} {:>7.2} {:>7.2}\n",
                name, s.acc[0], s.acc[1], s.acc[2], s.recall[0], s.recall[1], s.recall[2], s.map,
                s.mrr, s.ndcg5, s.all_acc[0], s.all_acc[1], s.all_acc[2]
            ));
        }
        out.push_str(&format!(
            "instances: {} (with a prediction: {})\n",
            self.instances, self.predicted
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64) {
        assert!((a - b).abs() < 1e-9, "{a} != {b}");
    }

    #[test]
    fn ranked_list_hand_computed() {
        // GT {a, b, c}; predictions x a x(dup) y b z w: deduped top-5 = x a y b z
        let s = Scores::of(&["x", "a", "x", "y", "b", "z", "c"], &["a", "b", "c"]);
        assert_eq!(s.acc, [0.0, 1.0, 1.0]);
        close(s.recall[0], 0.0);
        close(s.recall[1], 1.0 / 3.0);
        close(s.recall[2], 2.0 / 3.0);
        assert_eq!(s.all_acc, [0.0, 0.0, 0.0]); // c is at rank 6 (cut)
                                                // AP: hits at 2 (1/2) and 4 (2/4) -> (0.5 + 0.5) / min(3,5)
        close(s.map, 1.0 / 3.0);
        close(s.mrr, 0.5);
        // DCG = 1/log2 3 + 1/log2 5; IDCG = 1 + 1/log2 3 + 1/log2 4
        close(
            s.ndcg5,
            (1.0 / 3f64.log2() + 1.0 / 5f64.log2()) / (1.0 + 1.0 / 3f64.log2() + 0.5),
        );
        let p = Scores::of(&["b", "a"], &["a", "b"]);
        assert_eq!(p.all_acc, [0.0, 1.0, 1.0]);
        close(p.map, 1.0);
        close(Scores::of(&["a"], &[] as &[&str]).ndcg5, 0.0);
    }

    #[test]
    fn levels_and_averaging_over_all_instances() {
        let gt = GroundTruth::from_map(BTreeMap::from([
            (
                "i1".to_string(),
                vec!["p/a.py::A.m".to_string(), "p/b.py".to_string()],
            ),
            ("i2".to_string(), vec!["q.py::f".to_string()]),
            ("i3".to_string(), vec!["r.py::g".to_string()]),
        ]));
        let preds = BTreeMap::from([
            (
                "i1".to_string(),
                Prediction {
                    found_files: vec![],
                    // bare names match A.m at rank 1 even though the file is wrong
                    found_locations: vec!["p/z.py::A.m".into(), "p/a.py::A.m".into()],
                },
            ),
            (
                "i2".to_string(),
                Prediction {
                    found_files: vec!["x.py".into(), "q.py".into()],
                    found_locations: vec!["q.py::f".into()],
                },
            ),
            ("zz".to_string(), Prediction::default()),
        ]);
        let r = evaluate(&preds, &gt);
        assert_eq!(r.instances, 3);
        assert_eq!(r.predicted, 2);
        assert_eq!(r.unknown_predictions, ["zz"]);
        // file level: i1 files [p/z.py, p/a.py] vs {p/a.py, p/b.py}: Acc@1 0, Acc@3 1;
        // i2 [x.py, q.py] vs {q.py}: Acc@1 0, Acc@3 1; i3 missing: 0.
        close(r.file.acc[0], 0.0);
        close(r.file.acc[1], 200.0 / 3.0);
        // recall@3: i1 1/2, i2 1 -> 1.5 / 3
        close(r.file.recall[1], 50.0);
        // MRR: i1 1/2, i2 1/2 -> 1/3
        close(r.file.mrr, 100.0 / 3.0);
        // function (bare): i1 [A.m] vs {A.m} -> 1; i2 [f] vs {f} -> 1; i3 0
        close(r.function.acc[0], 200.0 / 3.0);
        close(r.function.ndcg5, 200.0 / 3.0);
        // strict: i1 hit at rank 2 -> ndcg 1/log2 3; i2 1
        close(r.function_strict.acc[0], 100.0 / 3.0);
        close(
            r.function_strict.ndcg5,
            (1.0 / 3f64.log2() + 1.0) * 100.0 / 3.0,
        );
        close(r.function_strict.all_acc[0], 100.0 / 3.0);
        close(r.function_strict.all_acc[1], 200.0 / 3.0);
        assert!(r.table().contains("function_strict"));
    }
}
