//! The recipes whose bug raises an exception: the report quotes the exception, and a
//! traceback (when the report has one) ends in the raising line of the buggy body.

use super::{quote, Bug, Ctx, Outcome, Parts, Symptom};
use crate::synth::names::{article, capitalise, pick, upper};
use rand::seq::IndexedRandom;
use rand::RngExt;

/// `<verb>_<noun>(<measure>)`: rejects negative values and values above `MAX_<MEASURE>`.
/// Bug: `>=` for `>`, so the maximum itself raises the domain's error.
pub(super) fn limit(cx: &mut Ctx) -> Parts {
    let rng = &mut *cx.rng;
    let consts = &mut *cx.consts;
    let noun = cx.noun;
    let m = cx.m;
    let err = cx.dom.error;
    let err_module = cx.err_module.clone();
    let limit = rng.random_range(2..=20i64) * 5;
    let k = rng.random_range(2..=6i64);
    let c = consts.add(
        &[
            format!("MAX_{}", upper(m)),
            format!("MAX_{}_{}", upper(noun), upper(m)),
        ],
        limit.to_string(),
    );
    consts.uses_error = true;
    let verb = pick(
        rng,
        &[
            "reserve", "allocate", "scale", "convert", "charge", "book", "request",
        ],
    );
    let lines = vec![
        format!("if {m} < 0:"),
        format!("    raise ValueError(\"{m} must not be negative\")"),
        format!("if {m} > {c}:"),
        format!("    raise {err}(\"{m} %s exceeds the maximum of %s\" % ({m}, {c}))"),
        format!("return {m} * {k}"),
    ];
    let symptom = Symptom {
        titles: vec![
            format!("%API% rejects {} equal to the maximum", article(m)),
            format!("%API% raises {err} when {m} is exactly {limit}"),
            format!("Off-by-one in the {m} limit of %API%"),
        ],
        explain: format!(
            "The docstring says that values up to and including `{c}` ({limit}) are \
             accepted, so {} of {limit} should work.",
            article(m)
        ),
        args: limit.to_string(),
        expected: (limit * k).to_string(),
        outcome: Outcome::Raises {
            exc: err.into(),
            module: err_module,
            msg: format!("{m} {limit} exceeds the maximum of {limit}"),
            line: 3,
        },
    };
    Parts {
        name: format!("{verb}_{noun}"),
        params: vec![m.to_string()],
        doc: format!(
            "Return ``{m}`` in base units; values up to and including ``{c}`` are accepted."
        ),
        lines,
        bug: Bug {
            line: 2,
            buggy: format!("if {m} >= {c}:"),
            symptom,
        },
    }
}

/// `<verb>_<noun>(<label>)`: a case-insensitive lookup in a module-level table.
/// Bug: the key is not lower-cased, so a capitalised key raises `KeyError`.
pub(super) fn lookup(cx: &mut Ctx) -> Parts {
    let rng = &mut *cx.rng;
    let consts = &mut *cx.consts;
    let dom = cx.dom;
    let noun = cx.noun;
    let p = pick(rng, dom.labels).to_string();
    let keys: Vec<&str> = dom.keys.sample(rng, 3).copied().collect();
    let base = rng.random_range(1..=9i64) * 10;
    let table: Vec<String> = keys
        .iter()
        .enumerate()
        .map(|(i, k)| format!("\"{k}\": {}", base + i as i64))
        .collect();
    let t = consts.add(
        &[
            format!("{}_{}S", upper(noun), upper(&p)),
            format!("KNOWN_{}_{}S", upper(noun), upper(&p)),
        ],
        format!("{{{}}}", table.join(", ")),
    );
    let j = rng.random_range(0..keys.len());
    let key = keys[j];
    let cap = capitalise(key);
    let verb = pick(rng, &["lookup", "resolve", "find", "get"]);
    let lines = vec![
        format!("key = {p}.strip().lower()"),
        format!("if key not in {t}:"),
        format!("    raise KeyError(\"unknown {noun} {p}: %r\" % {p})"),
        format!("return {t}[key]"),
    ];
    let symptom = Symptom {
        titles: vec![
            "%API% is case sensitive".to_string(),
            format!("KeyError for a capitalised {noun} {p} in %API%"),
            format!("%API% fails on '{cap}' but accepts '{key}'"),
        ],
        explain: format!(
            "{} {p}s are documented as case-insensitive, so `'{cap}'` should give the same result as `'{key}'`.",
            capitalise(noun)
        ),
        args: quote(&cap),
        expected: (base + j as i64).to_string(),
        outcome: Outcome::Raises {
            exc: "KeyError".into(),
            module: None,
            msg: format!("\"unknown {noun} {p}: '{cap}'\""),
            line: 2,
        },
    };
    Parts {
        name: format!("{verb}_{noun}"),
        params: vec![p.clone()],
        doc: format!(
            "Return the numeric id of {} {p} (case-insensitive).",
            article(noun)
        ),
        lines,
        bug: Bug {
            line: 0,
            buggy: format!("key = {p}.strip()"),
            symptom,
        },
    }
}

/// `<verb>_<noun>(<record>)`: checks that the required fields are present.
/// Bug: a falsy value (an `id` of 0) counts as missing and raises the domain's error.
pub(super) fn require(cx: &mut Ctx) -> Parts {
    let rng = &mut *cx.rng;
    let consts = &mut *cx.consts;
    let dom = cx.dom;
    let noun = cx.noun;
    let m = cx.m;
    let err = cx.dom.error;
    let err_module = cx.err_module.clone();
    let rec = pick(rng, &["record", "data", "payload", "fields"]).to_string();
    let r = consts.add(
        &[
            format!("REQUIRED_{}_FIELDS", upper(noun)),
            format!("{}_REQUIRED_KEYS", upper(noun)),
        ],
        format!("(\"id\", \"name\", \"{m}\")"),
    );
    consts.uses_error = true;
    let word = pick(rng, dom.keys);
    let v = rng.random_range(1..=50i64);
    let verb = pick(rng, &["validate", "check", "clean", "prepare", "normalize"]);
    let lines = vec![
        format!("missing = [key for key in {r} if key not in {rec}]"),
        "if missing:".to_string(),
        format!(
            "    raise {err}(\"{noun} is missing required fields: %s\" % \", \".join(missing))"
        ),
        format!("return dict({rec})"),
    ];
    let symptom = Symptom {
        titles: vec![
            format!("%API% rejects {} whose id is 0", article(noun)),
            "%API% treats falsy values as missing fields".to_string(),
            format!("{err}: {noun} is missing required fields: id, although the id is set"),
        ],
        explain: "The `id` field is present (it is `0`), so the record should be accepted and returned as is.".to_string(),
        args: format!("{{\"id\": 0, \"name\": \"{word}\", \"{m}\": {v}}}"),
        expected: format!("{{'id': 0, 'name': '{word}', '{m}': {v}}}"),
        outcome: Outcome::Raises {
            exc: err.into(),
            module: err_module,
            msg: format!("{noun} is missing required fields: id"),
            line: 2,
        },
    };
    Parts {
        name: format!("{verb}_{noun}"),
        params: vec![rec.clone()],
        doc: format!(
            "Check that {} has every field of ``{r}`` and return a copy.",
            article(noun)
        ),
        lines,
        bug: Bug {
            line: 0,
            buggy: format!("missing = [key for key in {r} if not {rec}.get(key)]"),
            symptom,
        },
    }
}

/// `<verb>_<noun>(<nouns>, <index>)`: indexing that wraps around past the end.
/// Bug: no modulo, so an index past the end raises `IndexError`.
pub(super) fn index(cx: &mut Ctx) -> Parts {
    let rng = &mut *cx.rng;
    let dom = cx.dom;
    let noun = cx.noun;
    let nouns = &cx.nouns;
    let idx = pick(rng, &["index", "offset", "turn", "step"]).to_string();
    let words: Vec<&str> = dom.keys.sample(rng, 3).copied().collect();
    let i = rng.random_range(3..=8usize);
    let verb = pick(rng, &["pick", "select", "rotate", "cycle", "choose"]);
    let lines = vec![
        format!("if not {nouns}:"),
        format!("    raise IndexError(\"no {nouns} to choose from\")"),
        format!("slot = {idx} % len({nouns})"),
        format!("return {nouns}[slot]"),
    ];
    let list: Vec<String> = words.iter().map(|w| quote(w)).collect();
    let symptom = Symptom {
        titles: vec![
            format!("IndexError in %API% when the {idx} is past the end"),
            "%API% does not wrap around".to_string(),
            "%API% raises IndexError: list index out of range".to_string(),
        ],
        explain: format!(
            "The docstring says the {idx} wraps around past the end, so `{i}` should select `'{}'`.",
            words[i % 3]
        ),
        args: format!("[{}], {i}", list.join(", ")),
        expected: format!("'{}'", words[i % 3]),
        outcome: Outcome::Raises {
            exc: "IndexError".into(),
            module: None,
            msg: "list index out of range".into(),
            line: 3,
        },
    };
    Parts {
        name: format!("{verb}_{noun}"),
        params: vec![nouns.clone(), idx.clone()],
        doc: format!(
            "Return the {noun} at ``{idx}``, wrapping around past the end of ``{nouns}``."
        ),
        lines,
        bug: Bug {
            line: 2,
            buggy: format!("slot = {idx}"),
            symptom,
        },
    }
}
