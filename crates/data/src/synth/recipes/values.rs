//! The recipes whose bug returns a wrong value: the report shows the value returned
//! and the one expected.

use super::{quote, Bug, Ctx, Outcome, Parts, Symptom};
use crate::synth::names::{article, pick, py_float, upper};
use rand::seq::IndexedRandom;
use rand::RngExt;

/// `<verb>_<measure>(<nouns>)`: the sum of one field over a list of dicts.
/// Bug: the loop skips the first entry.
pub(super) fn total(cx: &mut Ctx) -> Parts {
    let rng = &mut *cx.rng;
    let noun = cx.noun;
    let m = cx.m;
    let nouns = &cx.nouns;
    let var = pick(rng, &["entry", "row", "rec", "each"]);
    let vals: Vec<i64> = (0..3).map(|_| rng.random_range(1..=20i64)).collect();
    let sum: i64 = vals.iter().sum();
    let verb = pick(rng, &["total", "sum", "accumulate"]);
    let lines = vec![
        "total = 0".to_string(),
        format!("for {var} in {nouns}:"),
        format!("    total += {var}[\"{m}\"]"),
        "return total".to_string(),
    ];
    let args: Vec<String> = vals.iter().map(|v| format!("{{\"{m}\": {v}}}")).collect();
    let symptom = Symptom {
        titles: vec![
            format!("%API% ignores the first {noun}"),
            format!("Wrong {m} total from %API%"),
            "%API% is off by the first entry".to_string(),
        ],
        explain: format!(
            "It should add up the `{m}` of every {noun}: {} + {} + {} = {sum}.",
            vals[0], vals[1], vals[2]
        ),
        args: format!("[{}]", args.join(", ")),
        expected: sum.to_string(),
        outcome: Outcome::Value((sum - vals[0]).to_string()),
    };
    Parts {
        name: format!("{verb}_{m}"),
        params: vec![nouns.clone()],
        doc: format!("Return the sum of the ``{m}`` of every entry of ``{nouns}``."),
        lines,
        bug: Bug {
            line: 1,
            buggy: format!("for {var} in {nouns}[1:]:"),
            symptom,
        },
    }
}

/// `<verb>_<measure>(<measure>, <pct>)`: a value increased by a percentage.
/// Bug: the sign of the factor is flipped.
pub(super) fn rate(cx: &mut Ctx) -> Parts {
    let rng = &mut *cx.rng;
    let m = cx.m;
    let pct = pick(rng, &["percent", "rate", "markup", "pct"]).to_string();
    let amount = rng.random_range(1..=9i64) * 100;
    let p = rng.random_range(1..=8i64) * 5;
    let verb = pick(rng, &["adjust", "increase", "markup", "inflate", "uplift"]);
    let lines = vec![
        format!("if not 0 <= {pct} <= 100:"),
        format!("    raise ValueError(\"{pct} must be between 0 and 100\")"),
        format!("factor = 1 + {pct} / 100"),
        format!("return round({m} * factor, 2)"),
    ];
    let expected = amount * (100 + p) / 100;
    let symptom = Symptom {
        titles: vec![
            format!("%API% lowers the {m} instead of raising it"),
            "Wrong sign in %API%".to_string(),
            format!(
                "%API%({amount}, {p}) returns {}",
                py_float(amount * (100 - p) / 100)
            ),
        ],
        explain: format!(
            "Adding {p}% to {amount} should give {}.",
            py_float(expected)
        ),
        args: format!("{amount}, {p}"),
        expected: py_float(expected),
        outcome: Outcome::Value(py_float(amount * (100 - p) / 100)),
    };
    Parts {
        name: format!("{verb}_{m}"),
        params: vec![m.to_string(), pct.clone()],
        doc: format!("Return ``{m}`` increased by ``{pct}`` percent, rounded to cents."),
        lines,
        bug: Bug {
            line: 2,
            buggy: format!("factor = 1 - {pct} / 100"),
            symptom,
        },
    }
}

/// `<verb>_<noun>_<suffix>(<text>)`: `key=value` pairs into a dict.
/// Bug: keys keep the whitespace around them.
pub(super) fn kv_parse(cx: &mut Ctx) -> Parts {
    let rng = &mut *cx.rng;
    let dom = cx.dom;
    let noun = cx.noun;
    let text = pick(rng, &["text", "spec", "raw", "line"]).to_string();
    let sep = *pick(rng, &[";", ","]);
    let ks: Vec<&str> = dom.keys.sample(rng, 2).copied().collect();
    let (v1, v2) = (rng.random_range(1..=9i64), rng.random_range(1..=9i64));
    let verb = pick(rng, &["parse", "read", "decode", "load"]);
    let suffix = pick(rng, &["options", "settings", "attrs", "params", "tags"]);
    let lines = vec![
        "result = {}".to_string(),
        format!("for chunk in {text}.split(\"{sep}\"):"),
        "    if not chunk.strip():".to_string(),
        "        continue".to_string(),
        "    key, _, value = chunk.partition(\"=\")".to_string(),
        "    result[key.strip()] = value.strip()".to_string(),
        "return result".to_string(),
    ];
    let symptom = Symptom {
        titles: vec![
            "%API% keeps the leading space of keys".to_string(),
            "%API% does not strip whitespace around keys".to_string(),
            format!("KeyError after parsing {noun} {suffix} with %API%"),
        ],
        explain: "Whitespace around keys should be ignored, as it is for values.".to_string(),
        args: format!("\"{}={v1}{sep} {}={v2}\"", ks[0], ks[1]),
        expected: format!("{{'{}': '{v1}', '{}': '{v2}'}}", ks[0], ks[1]),
        outcome: Outcome::Value(format!("{{'{}': '{v1}', ' {}': '{v2}'}}", ks[0], ks[1])),
    };
    Parts {
        name: format!("{verb}_{noun}_{suffix}"),
        params: vec![text.clone()],
        doc: format!("Parse ``key=value`` pairs separated by ``{sep}`` into a dict."),
        lines,
        bug: Bug {
            line: 5,
            buggy: "    result[key] = value.strip()".to_string(),
            symptom,
        },
    }
}

/// `<verb>_<nouns>(<nouns>, page, <size>)`: 1-based pagination.
/// Bug: the start ignores the 1-based numbering, so page 1 is the second page.
pub(super) fn page(cx: &mut Ctx) -> Parts {
    let rng = &mut *cx.rng;
    let noun = cx.noun;
    let nouns = &cx.nouns;
    let size = pick(rng, &["size", "per_page", "limit"]).to_string();
    let s = rng.random_range(2..=4i64);
    let n = 2 * s + rng.random_range(1..=s);
    let verb = pick(rng, &["paginate", "page", "batch", "chunk"]);
    let lines = vec![
        "if page < 1:".to_string(),
        "    raise ValueError(\"page numbers start at 1\")".to_string(),
        format!("start = (page - 1) * {size}"),
        format!("return list({nouns})[start:start + {size}]"),
    ];
    let list = |a: i64, b: i64| {
        let v: Vec<String> = (a..=b).map(|x| x.to_string()).collect();
        format!("[{}]", v.join(", "))
    };
    let symptom = Symptom {
        titles: vec![
            "%API% skips the first page".to_string(),
            "Page 1 of %API% returns the second page".to_string(),
            "Off-by-one in %API%".to_string(),
        ],
        explain: format!(
            "Pages are numbered from 1, so page 1 should start with the first {noun}."
        ),
        args: format!("list(range(1, {})), 1, {s}", n + 1),
        expected: list(1, s),
        outcome: Outcome::Value(list(s + 1, 2 * s)),
    };
    Parts {
        name: format!("{verb}_{nouns}"),
        params: vec![nouns.clone(), "page".into(), size.clone()],
        doc: format!("Return page ``page`` (1-based) of ``{nouns}``, ``{size}`` entries per page."),
        lines,
        bug: Bug {
            line: 2,
            buggy: format!("start = page * {size}"),
            symptom,
        },
    }
}

/// `<verb>_<measure>(<measure>)`: clamping to `MIN_<MEASURE>`..`MAX_<MEASURE>`.
/// Bug: values above the maximum return the minimum.
pub(super) fn clamp(cx: &mut Ctx) -> Parts {
    let rng = &mut *cx.rng;
    let consts = &mut *cx.consts;
    let noun = cx.noun;
    let m = cx.m;
    let lo = rng.random_range(0..=5i64);
    let hi = lo + 10 * rng.random_range(2..=9i64);
    let x = hi + rng.random_range(1..=20i64);
    let cmin = consts.add(
        &[
            format!("MIN_{}", upper(m)),
            format!("MIN_{}_{}", upper(noun), upper(m)),
        ],
        lo.to_string(),
    );
    let cmax = consts.add(
        &[
            format!("MAX_{}", upper(m)),
            format!("MAX_{}_{}", upper(noun), upper(m)),
        ],
        hi.to_string(),
    );
    let verb = pick(rng, &["clamp", "bound", "cap", "limit"]);
    let lines = vec![
        format!("low, high = {cmin}, {cmax}"),
        format!("if {m} < low:"),
        "    return low".to_string(),
        format!("if {m} > high:"),
        "    return high".to_string(),
        format!("return {m}"),
    ];
    let symptom = Symptom {
        titles: vec![
            "%API% returns the minimum for values above the maximum".to_string(),
            format!("%API%({x}) returns {lo}"),
            format!("Clamping in %API% is wrong for large {m} values"),
        ],
        explain: format!("Values above `{cmax}` ({hi}) should be clamped to {hi}."),
        args: x.to_string(),
        expected: hi.to_string(),
        outcome: Outcome::Value(lo.to_string()),
    };
    Parts {
        name: format!("{verb}_{m}"),
        params: vec![m.to_string()],
        doc: format!("Clamp ``{m}`` to the range ``{cmin}``..``{cmax}``."),
        lines,
        bug: Bug {
            line: 4,
            buggy: "    return low".to_string(),
            symptom,
        },
    }
}

/// `<verb>_<nouns>(<nouns>, <n>)`: the top n entries by one field, highest first.
/// Bug: sorted in ascending order.
pub(super) fn sort(cx: &mut Ctx) -> Parts {
    let rng = &mut *cx.rng;
    let m = cx.m;
    let nouns = &cx.nouns;
    let np = pick(rng, &["n", "count", "limit"]).to_string();
    let mut vals: Vec<i64> = Vec::new();
    while vals.len() < 3 {
        let v = rng.random_range(1..=30i64);
        if !vals.contains(&v) {
            vals.push(v);
        }
    }
    let mut sorted = vals.clone();
    sorted.sort();
    // Not already in descending order, so the buggy result differs.
    if vals[0] == sorted[2] {
        vals.swap(0, 2);
    }
    let verb = pick(rng, &["top", "rank", "best", "leading"]);
    let lines = vec![
        format!("ranked = sorted({nouns}, key=lambda entry: entry[\"{m}\"], reverse=True)"),
        format!("return ranked[:{np}]"),
    ];
    let rec = |v: i64, quote: char| format!("{{{quote}{m}{quote}: {v}}}");
    let args: Vec<String> = vals.iter().map(|v| rec(*v, '"')).collect();
    let symptom = Symptom {
        titles: vec![
            format!("%API% returns the lowest {m} first"),
            "%API% sorts in the wrong order".to_string(),
            format!("%API% ignores the {nouns} with the highest {m}"),
        ],
        explain: format!("It should return the 2 {nouns} with the highest `{m}`, highest first."),
        args: format!("[{}], 2", args.join(", ")),
        expected: format!("[{}, {}]", rec(sorted[2], '\''), rec(sorted[1], '\'')),
        outcome: Outcome::Value(format!(
            "[{}, {}]",
            rec(sorted[0], '\''),
            rec(sorted[1], '\'')
        )),
    };
    Parts {
        name: format!("{verb}_{nouns}"),
        params: vec![nouns.clone(), np.clone()],
        doc: format!("Return the ``{np}`` {nouns} with the highest ``{m}``, highest first."),
        lines,
        bug: Bug {
            line: 0,
            buggy: format!("ranked = sorted({nouns}, key=lambda entry: entry[\"{m}\"])"),
            symptom,
        },
    }
}

/// `<verb>_<nouns>(<nouns>)`: how often each value occurs.
/// Bug: every count is set to 1.
pub(super) fn count(cx: &mut Ctx) -> Parts {
    let rng = &mut *cx.rng;
    let dom = cx.dom;
    let noun = cx.noun;
    let nouns = &cx.nouns;
    let var = pick(rng, &["name", "key", "tag", "kind"]).to_string();
    let ws: Vec<&str> = dom.keys.sample(rng, 2).copied().collect();
    let verb = pick(rng, &["count", "tally", "histogram"]);
    let lines = vec![
        "counts = {}".to_string(),
        format!("for {var} in {nouns}:"),
        format!("    counts[{var}] = counts.get({var}, 0) + 1"),
        "return counts".to_string(),
    ];
    let symptom = Symptom {
        titles: vec![
            format!("%API% counts every {noun} once"),
            format!("%API% returns 1 for repeated {nouns}"),
            "Wrong counts from %API%".to_string(),
        ],
        explain: format!("`'{}'` appears twice, so its count should be 2.", ws[0]),
        args: format!("[{}, {}, {}]", quote(ws[0]), quote(ws[1]), quote(ws[0])),
        expected: format!("{{'{}': 2, '{}': 1}}", ws[0], ws[1]),
        outcome: Outcome::Value(format!("{{'{}': 1, '{}': 1}}", ws[0], ws[1])),
    };
    Parts {
        name: format!("{verb}_{nouns}"),
        params: vec![nouns.clone()],
        doc: format!("Count how many times each {noun} appears in ``{nouns}``."),
        lines,
        bug: Bug {
            line: 2,
            buggy: format!("    counts[{var}] = 1"),
            symptom,
        },
    }
}

/// `<verb>_<measure>(<values>)`: the mean, ignoring `None` values.
/// Bug: divides by the length including the `None` values.
pub(super) fn avg(cx: &mut Ctx) -> Parts {
    let rng = &mut *cx.rng;
    let m = cx.m;
    let items = pick(rng, &["values", "samples", "readings", "series"]).to_string();
    let k = rng.random_range(1..=5i64);
    let a = rng.random_range(1..6 * k);
    let b = 6 * k - a;
    let verb = pick(rng, &["average", "mean", "typical"]);
    let lines = vec![
        format!("known = [v for v in {items} if v is not None]"),
        "if not known:".to_string(),
        "    return 0.0".to_string(),
        "return sum(known) / len(known)".to_string(),
    ];
    let symptom = Symptom {
        titles: vec![
            "%API% counts missing values".to_string(),
            format!("%API% is too low when {} is None", article(m)),
            "None entries drag down %API%".to_string(),
        ],
        explain: format!(
            "Missing (`None`) values should be skipped, so the average of {a} and {b} is {}.",
            py_float(3 * k)
        ),
        args: format!("[{a}, None, {b}]"),
        expected: py_float(3 * k),
        outcome: Outcome::Value(py_float(2 * k)),
    };
    Parts {
        name: format!("{verb}_{m}"),
        params: vec![items.clone()],
        doc: format!("Return the mean ``{m}`` of ``{items}``, ignoring missing (``None``) values."),
        lines,
        bug: Bug {
            line: 3,
            buggy: format!("return sum(known) / len({items})"),
            symptom,
        },
    }
}
