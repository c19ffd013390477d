//! Recipes: small Python bodies with one plantable one-line bug and the symptom that bug
//! causes (what the report shows). [`build_body`] draws the noun and measure and hands
//! over to one function per recipe: [`raising`] holds the four whose bug raises an
//! exception, [`values`] the eight whose bug returns a wrong value.

mod raising;
mod values;

use super::names::{pick, Domain};
use rand::rngs::StdRng;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Recipe {
    Limit,
    Lookup,
    Require,
    Index,
    Total,
    Rate,
    KvParse,
    Page,
    Clamp,
    Sort,
    Count,
    Avg,
}

/// Every recipe, in the order a uniform pick draws from.
pub(super) const RECIPES: [Recipe; 12] = [
    Recipe::Limit,
    Recipe::Lookup,
    Recipe::Require,
    Recipe::Index,
    Recipe::Total,
    Recipe::Rate,
    Recipe::KvParse,
    Recipe::Page,
    Recipe::Clamp,
    Recipe::Sort,
    Recipe::Count,
    Recipe::Avg,
];

/// How a buggy call fails.
#[derive(Debug, Clone)]
pub(super) enum Outcome {
    /// Returns this Python repr instead of the expected one.
    Value(String),
    /// Raises: exception name, its module for the traceback's last line (None for
    /// builtins), the message as Python prints it, the body line (0-based) that raises.
    Raises {
        exc: String,
        module: Option<String>,
        msg: String,
        line: usize,
    },
}

#[derive(Debug, Clone)]
pub(super) struct Symptom {
    /// Title templates; `%API%` stands for the called API.
    pub(super) titles: Vec<String>,
    /// Why the expected value is right (from the documented behaviour).
    pub(super) explain: String,
    /// Arguments of the reproducing call (Python source).
    pub(super) args: String,
    /// Python repr of the correct result.
    pub(super) expected: String,
    pub(super) outcome: Outcome,
}

#[derive(Debug, Clone)]
pub(super) struct Bug {
    /// Body line (0-based) the bug replaces.
    pub(super) line: usize,
    pub(super) buggy: String,
    pub(super) symptom: Symptom,
}

/// Module-level constants of a module under construction.
#[derive(Debug, Clone, Default)]
pub(super) struct Consts {
    pub(super) items: Vec<(String, String)>,
    /// Some body raises the domain's error (the module imports it from `errors`).
    pub(super) uses_error: bool,
}

impl Consts {
    /// Adds `name = value` under the first free name of `names` (or `names[0]_N`) and
    /// returns the name used; an existing constant with the same value is shared.
    pub(super) fn add(&mut self, names: &[String], value: String) -> String {
        for n in names {
            match self.items.iter().find(|(k, _)| k == n) {
                Some((_, v)) if *v == value => return n.clone(),
                Some(_) => continue,
                None => {
                    self.items.push((n.clone(), value));
                    return n.clone();
                }
            }
        }
        let mut k = 2;
        loop {
            let n = format!("{}_{k}", names[0]);
            if !self.items.iter().any(|(x, _)| *x == n) {
                self.items.push((n.clone(), value));
                return n;
            }
            k += 1;
        }
    }
}

/// A recipe body: a definition's name, parameters (without `self`), docstring and
/// correct lines, the bug it can carry, and the noun and measure it is about.
#[derive(Debug, Clone)]
pub(super) struct Body {
    pub(super) name: String,
    pub(super) params: Vec<String>,
    pub(super) doc: String,
    pub(super) lines: Vec<String>,
    pub(super) bug: Bug,
    pub(super) noun: String,
    pub(super) measure: String,
}

/// What a recipe draws on: the RNG, the domain, the module's constants, and the noun
/// (`item`, plural `items`) and measure (`weight`) the body is about.
struct Ctx<'a> {
    rng: &'a mut StdRng,
    dom: &'a Domain,
    consts: &'a mut Consts,
    noun: &'a str,
    nouns: String,
    m: &'a str,
    /// `<pkg>.errors`, the module of the domain's error class (for tracebacks).
    err_module: Option<String>,
}

/// What one recipe function makes: a [`Body`] without its noun and measure.
struct Parts {
    name: String,
    params: Vec<String>,
    doc: String,
    lines: Vec<String>,
    bug: Bug,
}

/// A Python string literal.
fn quote(s: &str) -> String {
    format!("\"{s}\"")
}

/// A fresh body of `recipe`; `hint` fixes the noun and measure (decoys of a GT),
/// otherwise both are drawn (noun first).
pub(super) fn build_body(
    rng: &mut StdRng,
    dom: &Domain,
    pkg: &str,
    recipe: Recipe,
    consts: &mut Consts,
    hint: Option<(&str, &str)>,
) -> Body {
    let noun = hint.map_or_else(|| pick(rng, dom.nouns).to_string(), |h| h.0.to_string());
    let measure = hint.map_or_else(|| pick(rng, dom.measures).to_string(), |h| h.1.to_string());
    let mut cx = Ctx {
        rng,
        dom,
        consts,
        noun: &noun,
        nouns: format!("{noun}s"),
        m: &measure,
        err_module: Some(format!("{pkg}.errors")),
    };
    let make = match recipe {
        Recipe::Limit => raising::limit,
        Recipe::Lookup => raising::lookup,
        Recipe::Require => raising::require,
        Recipe::Index => raising::index,
        Recipe::Total => values::total,
        Recipe::Rate => values::rate,
        Recipe::KvParse => values::kv_parse,
        Recipe::Page => values::page,
        Recipe::Clamp => values::clamp,
        Recipe::Sort => values::sort,
        Recipe::Count => values::count,
        Recipe::Avg => values::avg,
    };
    let p = make(&mut cx);
    Body {
        name: p.name,
        params: p.params,
        doc: p.doc,
        lines: p.lines,
        bug: p.bug,
        noun,
        measure,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::names::DOMAINS;
    use rand::SeedableRng;

    #[test]
    fn constants_are_shared_or_renamed() {
        let mut c = Consts::default();
        let names = ["MAX_WEIGHT".to_string(), "MAX_ITEM_WEIGHT".to_string()];
        assert_eq!(c.add(&names, "10".into()), "MAX_WEIGHT");
        assert_eq!(c.add(&names, "10".into()), "MAX_WEIGHT");
        assert_eq!(c.add(&names, "20".into()), "MAX_ITEM_WEIGHT");
        assert_eq!(c.add(&names, "30".into()), "MAX_WEIGHT_2");
        assert_eq!(c.items.len(), 3);
    }

    #[test]
    fn every_recipe_plants_a_one_line_change() {
        let mut rng = StdRng::seed_from_u64(3);
        for dom in DOMAINS {
            for r in RECIPES {
                let mut consts = Consts::default();
                let b = build_body(
                    &mut rng,
                    dom,
                    "pkg",
                    r,
                    &mut consts,
                    Some(("item", "weight")),
                );
                assert_eq!((b.noun.as_str(), b.measure.as_str()), ("item", "weight"));
                assert!(b.bug.line < b.lines.len(), "{r:?}");
                assert_ne!(b.lines[b.bug.line], b.bug.buggy, "{r:?}");
                assert_eq!(b.bug.symptom.titles.len(), 3, "{r:?}");
                if let Outcome::Raises { line, .. } = b.bug.symptom.outcome {
                    assert!(line < b.lines.len(), "{r:?}");
                }
            }
        }
    }
}
