//! The bug report (the task's `problem_statement`): title, intro, a reproduction (a
//! script or a REPL session) calling the public API, expected vs actual behaviour, one
//! extra paragraph per further GT location, and an environment section. Each explicit
//! pointer to a location (a module import path, traceback frames, a remark naming the
//! file) appears with probability `SynthConfig::mention_prob`.

use super::names::{pick, snake, Domain};
use super::recipes::{Outcome, Symptom};
use rand::rngs::StdRng;
use rand::RngExt;

/// What the report needs to know about one GT location.
pub(super) struct GtView {
    /// The location key (`path.py::Class.method` or `path.py::function`).
    pub(super) key: String,
    pub(super) path: String,
    /// 1-based line (base file) the gold patch changes; the GT is ordered by path, then
    /// by this line.
    pub(super) changed_line: usize,
    pub(super) module: String,
    pub(super) class: Option<String>,
    pub(super) name: String,
    pub(super) symptom: Symptom,
    /// 1-based line (base file) and text of the raising statement, for exception
    /// outcomes.
    pub(super) raise_line: Option<(usize, String)>,
    pub(super) wrapper: Option<WrapperView>,
}

/// The wrapper the report calls instead of the GT definition.
pub(super) struct WrapperView {
    pub(super) path: String,
    pub(super) module: String,
    pub(super) name: String,
    /// 1-based line (base file) and text of the call to the GT definition.
    pub(super) call_line: usize,
    pub(super) call_text: String,
}

impl GtView {
    /// The public callable the report uses: the wrapper, `Class.method` or `function`.
    pub(super) fn entry_point(&self) -> String {
        match (&self.wrapper, &self.class) {
            (Some(w), _) => w.name.clone(),
            (None, Some(c)) => format!("{c}.{}", self.name),
            (None, None) => self.name.clone(),
        }
    }
}

/// The called API for a GT.
struct Call {
    imports: Vec<String>,
    setup: Vec<String>,
    /// The call expression.
    expr: String,
    /// Display name (`Class.method()`, `function()`).
    api: String,
}

/// The call of `g`'s entry point; with `mention`, imported from its module, otherwise
/// from the package (either style with probability 0.5).
fn call_for_gt(rng: &mut StdRng, pkg: &str, g: &GtView, mention: bool) -> Call {
    let (module, class, name) = match &g.wrapper {
        Some(w) => (w.module.as_str(), None, w.name.as_str()),
        None => (g.module.as_str(), g.class.as_deref(), g.name.as_str()),
    };
    let top = class.unwrap_or(name);
    let (import, qual) = if mention {
        (format!("from {pkg}.{module} import {top}"), top.to_string())
    } else if rng.random_bool(0.5) {
        (format!("from {pkg} import {top}"), top.to_string())
    } else {
        (format!("import {pkg}"), format!("{pkg}.{top}"))
    };
    let args = &g.symptom.args;
    match class {
        Some(cls) => {
            let var = snake(cls);
            Call {
                imports: vec![import],
                setup: vec![format!("{var} = {qual}()")],
                expr: format!("{var}.{name}({args})"),
                api: format!("{cls}.{name}()"),
            }
        }
        None => Call {
            imports: vec![import],
            setup: vec![],
            expr: format!("{qual}({args})"),
            api: format!("{name}()"),
        },
    }
}

fn site_packages(rng: &mut StdRng, minor: u32) -> String {
    match rng.random_range(0..3) {
        0 => format!("/home/dev/.venv/lib/python3.{minor}/site-packages"),
        1 => format!("/usr/local/lib/python3.{minor}/site-packages"),
        _ => format!("/opt/conda/lib/python3.{minor}/site-packages"),
    }
}

/// The last line of a traceback (`qualified`: the exception with its module), or the
/// returned value.
fn exc_line(outcome: &Outcome, qualified: bool) -> String {
    match outcome {
        Outcome::Raises {
            exc, module, msg, ..
        } => match (module, qualified) {
            (Some(m), true) => format!("{m}.{exc}: {msg}"),
            _ => format!("{exc}: {msg}"),
        },
        Outcome::Value(v) => v.clone(),
    }
}

/// A traceback starting with frame `first`, through the wrapper and the raising line
/// (files under site-packages `sp`).
fn traceback(g: &GtView, sp: &str, first: &str) -> String {
    let mut t = format!("Traceback (most recent call last):\n{first}");
    if let Some(w) = &g.wrapper {
        t.push_str(&format!(
            "  File \"{sp}/{}\", line {}, in {}\n    {}\n",
            w.path, w.call_line, w.name, w.call_text
        ));
    }
    if let Some((line, text)) = &g.raise_line {
        t.push_str(&format!(
            "  File \"{sp}/{}\", line {line}, in {}\n    {text}\n",
            g.path, g.name
        ));
    }
    t.push_str(&exc_line(&g.symptom.outcome, true));
    t
}

/// A REPL session of `call`: (block, actual prose). `tb`: the site-packages path of a
/// traceback to show, or `None` for the exception line only.
fn repl_block(g: &GtView, call: &Call, tb: Option<&str>) -> (String, String) {
    let mut b = String::from("```pycon\n");
    for l in call.imports.iter().chain(&call.setup) {
        b.push_str(&format!(">>> {l}\n"));
    }
    b.push_str(&format!(">>> {}\n", call.expr));
    let actual = match (&g.symptom.outcome, tb) {
        (Outcome::Value(v), _) => {
            b.push_str(v);
            format!("It returns `{v}`.")
        }
        (Outcome::Raises { .. }, Some(sp)) => {
            b.push_str(&traceback(
                g,
                sp,
                "  File \"<stdin>\", line 1, in <module>\n",
            ));
            "It raises the exception above.".to_string()
        }
        (Outcome::Raises { .. }, None) => {
            b.push_str(&exc_line(&g.symptom.outcome, false));
            format!("It raises `{}`.", exc_line(&g.symptom.outcome, false))
        }
    };
    b.push_str("\n```");
    (b, actual)
}

/// A script `repro.py` printing `call`: (block, actual prose); `tb` as in
/// [`repl_block`].
fn script_block(g: &GtView, call: &Call, tb: Option<&str>) -> (String, String) {
    let mut lines: Vec<String> = call.imports.clone();
    lines.push(String::new());
    lines.extend(call.setup.iter().cloned());
    let print = format!("print({})", call.expr);
    lines.push(print.clone());
    let call_no = lines.len();
    let block = format!("```python\n{}\n```", lines.join("\n"));
    let actual = match (&g.symptom.outcome, tb) {
        (Outcome::Value(v), _) => format!("It prints `{v}`."),
        (Outcome::Raises { .. }, Some(sp)) => {
            let first = format!("  File \"repro.py\", line {call_no}, in <module>\n    {print}\n");
            format!(
                "Running it fails with:\n\n```\n{}\n```",
                traceback(g, sp, &first)
            )
        }
        (Outcome::Raises { .. }, None) => {
            format!("It fails with `{}`.", exc_line(&g.symptom.outcome, false))
        }
    };
    (block, actual)
}

/// One symptom: (script or REPL block, expected prose, actual prose, display API).
fn describe(
    rng: &mut StdRng,
    pkg: &str,
    g: &GtView,
    mention_prob: f64,
    repl: bool,
    py_minor: u32,
) -> (String, String, String, String) {
    let mention = rng.random_bool(mention_prob);
    let call = call_for_gt(rng, pkg, g, mention);
    let with_traceback =
        matches!(g.symptom.outcome, Outcome::Raises { .. }) && rng.random_bool(mention_prob);
    let sp = site_packages(rng, py_minor);
    let tb = with_traceback.then_some(sp.as_str());
    let (block, actual) = if repl {
        repl_block(g, &call, tb)
    } else {
        script_block(g, &call, tb)
    };
    let call_disp = if call.expr.len() <= 60 {
        format!("`{}`", call.expr)
    } else {
        format!("`{}`", call.api)
    };
    let mut expected = format!(
        "{call_disp} should return `{}`. {}",
        g.symptom.expected, g.symptom.explain
    );
    if matches!(g.symptom.outcome, Outcome::Value(_)) && rng.random_bool(mention_prob) {
        let def = match &g.class {
            Some(c) => format!("{c}.{}", g.name),
            None => g.name.clone(),
        };
        expected.push_str(&match rng.random_range(0..2) {
            0 => format!(" I think the problem is in `{def}` in `{}`.", g.path),
            _ => format!(
                " Looking at `{}`, `{def}` seems to be where it goes wrong.",
                g.path
            ),
        });
    }
    (block, expected, actual, call.api)
}

/// The report for `gts` (the first is the headline symptom, the others follow as
/// possibly related issues, each in a REPL block).
pub(super) fn problem_statement(
    rng: &mut StdRng,
    dom: &Domain,
    pkg: &str,
    gts: &[GtView],
    mention_prob: f64,
) -> String {
    let style = rng.random_range(0..3);
    let repl = style == 2 || rng.random_bool(0.25);
    let py_minor = rng.random_range(8..=12u32);
    let (block, expected, actual, api) = describe(rng, pkg, &gts[0], mention_prob, repl, py_minor);
    let api_disp = if rng.random_bool(0.6) {
        format!("`{api}`")
    } else {
        api.trim_end_matches("()").to_string()
    };
    let mut title = pick(rng, &gts[0].symptom.titles).replace("%API%", &api_disp);
    title = match rng.random_range(0..6) {
        0 => format!("[BUG] {title}"),
        1 => format!("Bug: {title}"),
        _ => title,
    };
    let intro = match rng.random_range(0..5) {
        0 => format!("I'm using {pkg} to {} and ran into the following.", dom.activity),
        1 => format!("Hi! We use {pkg} to {}. After upgrading, one of our jobs started giving wrong results.", dom.activity),
        2 => format!("While trying to {} with {pkg} I hit what looks like a bug in `{}`.", dom.activity, api.trim_end_matches("()")),
        3 => format!("Thanks for {pkg}! I found a problem with `{api}`."),
        _ => format!("`{api}` does not behave as documented."),
    };
    let env = environment(rng, pkg, py_minor);
    let mut extra = String::new();
    for g in &gts[1..] {
        let (b, e, a, api2) = describe(rng, pkg, g, mention_prob, true, py_minor);
        let lead = match rng.random_range(0..3) {
            0 => format!("While looking into this I also noticed that `{api2}` is wrong:"),
            1 => format!("Possibly related: `{api2}` has a similar problem."),
            _ => format!("There is a second issue with `{api2}`:"),
        };
        extra.push_str(&format!("{lead}\n\n{b}\n\n{a} {e}\n\n"));
    }
    let mut s = match style {
        0 => format!(
            "{title}\n\n{intro}\n\n### Steps to reproduce\n\n{block}\n\n### Expected behaviour\n\n{expected}\n\n### Actual behaviour\n\n{actual}\n\n{extra}### Environment\n\n{env}\n"
        ),
        1 => format!(
            "{title}\n\n**Describe the bug**\n{intro}\n\n**To Reproduce**\n{block}\n\n**Expected behavior**\n{expected}\n\n**Actual behavior**\n{actual}\n\n{extra}**Versions**\n{env}\n"
        ),
        _ => format!("{title}\n\n{intro}\n\n{block}\n\n{actual} {expected}\n\n{extra}{env}\n"),
    };
    while s.contains("\n\n\n") {
        s = s.replace("\n\n\n", "\n\n");
    }
    s
}

/// The environment section: package version, Python version, operating system.
fn environment(rng: &mut StdRng, pkg: &str, py_minor: u32) -> String {
    format!(
        "- {pkg} {}.{}.{}\n- Python 3.{}.{}\n- {}",
        rng.random_range(0..3),
        rng.random_range(1..20),
        rng.random_range(0..10),
        py_minor,
        rng.random_range(0..15),
        pick(
            rng,
            &[
                "Ubuntu 22.04",
                "macOS 14.4",
                "Windows 11",
                "Debian 12",
                "Fedora 39"
            ]
        )
    )
}
