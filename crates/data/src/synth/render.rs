//! Source text of a task's files: the package modules (base or fixed), the test files,
//! `<pkg>/__init__.py`, `<pkg>/errors.py` and `setup.py`.

use super::builder::Builder;
use super::model::{Def, Item, Module};
use super::names::{snake, Domain};
use super::SourceFile;
use rand::RngExt;
use std::collections::{BTreeMap, BTreeSet};

/// Source of one module; `planted` chooses the base (buggy) or fixed text. `starts`
/// receives the 1-based line of each definition's first body line.
pub(super) fn render_module(
    dom: &Domain,
    m: &Module,
    planted: bool,
    starts: &mut BTreeMap<usize, usize>,
) -> String {
    let mut out: Vec<String> = vec![format!("\"\"\"{}\"\"\"", m.doc), String::new()];
    if m.consts.uses_error {
        out.push(format!("from .errors import {}", dom.error));
        out.push(String::new());
    }
    for (k, v) in &m.consts.items {
        out.push(format!("{k} = {v}"));
    }
    for it in &m.items {
        out.push(String::new());
        out.push(String::new());
        match it {
            Item::Func(d) => render_def(&mut out, d, "", false, planted, starts),
            Item::Class(c) => {
                out.push(format!("class {}:", c.name));
                out.push(format!("    \"\"\"{}\"\"\"", c.doc));
                for d in &c.methods {
                    out.push(String::new());
                    render_def(&mut out, d, "    ", true, planted, starts);
                }
            }
        }
    }
    let mut s = out.join("\n");
    s.push('\n');
    s
}

/// Appends definition `d` indented by `ind` (a method takes `self`); with `planted`, a
/// planted bug replaces its line.
fn render_def(
    out: &mut Vec<String>,
    d: &Def,
    ind: &str,
    method: bool,
    planted: bool,
    starts: &mut BTreeMap<usize, usize>,
) {
    let mut params: Vec<String> = Vec::new();
    if method {
        params.push("self".into());
    }
    params.extend(d.params.iter().cloned());
    out.push(format!("{ind}def {}({}):", d.name, params.join(", ")));
    if !d.doc.is_empty() {
        out.push(format!("{ind}    \"\"\"{}\"\"\"", d.doc));
    }
    starts.insert(d.id, out.len() + 1);
    for (i, l) in d.lines.iter().enumerate() {
        let l = match &d.bug {
            Some(b) if planted && d.planted && b.line == i => &b.buggy,
            _ => l,
        };
        out.push(if l.is_empty() {
            String::new()
        } else {
            format!("{ind}    {l}")
        });
    }
}

/// `tests/test_<module>.py`: up to 3 passing tests of public recipe definitions that
/// are not planted (their documented behaviour); `None` when the module has none.
pub(super) fn test_file(pkg: &str, m: &Module) -> Option<String> {
    let mut imports: BTreeSet<String> = BTreeSet::new();
    let mut tests: Vec<String> = Vec::new();
    let mut names: BTreeSet<String> = BTreeSet::new();
    for it in &m.items {
        let (class, defs): (Option<&str>, Vec<&Def>) = match it {
            Item::Func(d) => (None, vec![d]),
            Item::Class(c) => (Some(c.name.as_str()), c.methods.iter().collect()),
        };
        for d in defs {
            let Some(bug) = &d.bug else { continue };
            if d.planted || tests.len() >= 3 || d.name.starts_with('_') {
                continue;
            }
            let s = &bug.symptom;
            let base = format!("test_{}", d.name);
            let mut tn = base.clone();
            let mut k = 2;
            while names.contains(&tn) {
                tn = format!("{base}_{k}");
                k += 1;
            }
            names.insert(tn.clone());
            let t = match class {
                Some(c) => {
                    imports.insert(c.to_string());
                    let var = snake(c);
                    format!(
                        "def {tn}():\n    {var} = {c}()\n    assert {var}.{}({}) == {}\n",
                        d.name, s.args, s.expected
                    )
                }
                None => {
                    imports.insert(d.name.clone());
                    format!(
                        "def {tn}():\n    assert {}({}) == {}\n",
                        d.name, s.args, s.expected
                    )
                }
            };
            tests.push(t);
        }
    }
    if tests.is_empty() {
        return None;
    }
    let imports: Vec<String> = imports.into_iter().collect();
    Some(format!(
        "\"\"\"Tests for {}.{}.\"\"\"\n\nfrom {}.{} import {}\n\n\n{}",
        pkg,
        m.name,
        pkg,
        m.name,
        imports.join(", "),
        tests.join("\n\n")
    ))
}

/// `<pkg>/__init__.py`, `<pkg>/errors.py` and `setup.py` (draws the version). The
/// package re-exports the public names `called` first (module index, name: what the
/// report calls), then every public top-level name of the modules in `order`; a name
/// is exported once, from the first module that offers it.
pub(super) fn package_files(
    b: &mut Builder,
    order: &[usize],
    called: Vec<(usize, String)>,
) -> Vec<SourceFile> {
    let (pkg, dom) = (b.pkg.clone(), b.dom);
    let mut priority = called;
    for &mi in order {
        for n in b.modules[mi].top_names() {
            priority.push((mi, n));
        }
    }
    let mut exports: Vec<(String, String)> = Vec::new(); // (module, name)
    let mut seen: BTreeSet<String> = BTreeSet::new();
    for (mi, n) in priority {
        if !n.starts_with('_') && seen.insert(n.clone()) {
            exports.push((b.modules[mi].name.clone(), n));
        }
    }
    let mut init = format!("\"\"\"{pkg}: helpers to {}.\"\"\"\n\n", dom.activity);
    init.push_str(&format!("from .errors import {}\n", dom.error));
    for &mi in order {
        let mname = &b.modules[mi].name;
        let mut ns: Vec<&str> = exports
            .iter()
            .filter(|(m, _)| m == mname)
            .map(|(_, n)| n.as_str())
            .collect();
        ns.sort();
        if !ns.is_empty() {
            init.push_str(&format!("from .{mname} import {}\n", ns.join(", ")));
        }
    }
    let version = format!(
        "0.{}.{}",
        b.rng.random_range(1..20),
        b.rng.random_range(0..10)
    );
    init.push_str(&format!("\n__version__ = \"{version}\"\n"));
    vec![
        SourceFile {
            path: format!("{pkg}/__init__.py"),
            text: init,
        },
        SourceFile {
            path: format!("{pkg}/errors.py"),
            text: format!(
                "\"\"\"Exceptions raised by {pkg}.\"\"\"\n\n\nclass {err}(Exception):\n    \"\"\"Base class of the errors raised by {pkg}.\"\"\"\n",
                err = dom.error
            ),
        },
        SourceFile {
            path: "setup.py".into(),
            text: format!(
                "from setuptools import find_packages, setup\n\nsetup(\n    name=\"{pkg}\",\n    version=\"{version}\",\n    description=\"Helpers to {}\",\n    packages=find_packages(exclude=[\"tests\"]),\n    python_requires=\">=3.8\",\n)\n",
                dom.activity
            ),
        },
    ]
}
