//! [`make_task`]: one task from `(config, seed, index)`, in named steps. Every random
//! choice comes from the task's RNG (held by the [`Builder`]) in the order of the steps,
//! so a step may not be reordered without changing every task.

use super::builder::Builder;
use super::model::Role;
use super::patch::{blob_id, sha1_hex, unified_diff};
use super::recipes::Outcome;
use super::render::{package_files, render_module, test_file};
use super::report::{problem_statement, GtView, WrapperView};
use super::wrappers::Wrapper;
use super::{SourceFile, SynthConfig, Task};
use rand::seq::SliceRandom;
use rand::RngExt;
use std::collections::BTreeMap;
use tooltrain_rollout::dataset::Instance;

/// Task `i` of `cfg` (pure: depends on `cfg.seed`, `i` and the knobs, not on `cfg.n`).
/// `cfg` must be valid ([`SynthConfig::validate`]).
pub fn make_task(cfg: &SynthConfig, i: usize) -> Task {
    let mut b = Builder::for_task(cfg.seed, i);
    b.build_modules(cfg);
    let gt_ids = plant_gt(&mut b, cfg);
    let wrappers = add_wrappers(&mut b, &gt_ids, cfg.indirect_prob);
    let decoys: Vec<String> = (0..cfg.decoys)
        .map(|k| b.add_decoy(gt_ids[k % gt_ids.len()]))
        .collect();
    let tree = render_tree(&b);
    // The report follows the random GT order (the first is the headline symptom).
    let views = gt_views(&b, &gt_ids, &wrappers, &tree);
    let problem = problem_statement(&mut b.rng, b.dom, &b.pkg, &views, cfg.mention_prob);
    // GT keys in patch order: files by path, then by line.
    let mut sorted: Vec<&GtView> = views.iter().collect();
    sorted
        .sort_by(|x, y| (&x.path, x.changed_line, &x.key).cmp(&(&y.path, y.changed_line, &y.key)));
    let gt: Vec<String> = sorted.iter().map(|v| v.key.clone()).collect();
    let entry_points: Vec<String> = sorted.iter().map(|v| v.entry_point()).collect();

    let called = called_names(&b, &views);
    let mut files = tree.files;
    files.extend(package_files(&mut b, &tree.order, called));
    files.extend(test_files(&mut b));
    files.sort_by(|x, y| x.path.cmp(&y.path));
    let instance_id = format!("{}__{}-{i:05}", cfg.prefix, b.pkg);
    Task {
        instance: Instance {
            base_commit: base_commit(&files, &instance_id),
            instance_id,
            repo: format!("{}/{}", cfg.prefix, b.pkg),
            problem_statement: problem,
            patch: tree.patch,
        },
        gt,
        files,
        decoys,
        entry_points,
    }
}

/// Picks `gt_min..=gt_max` distinct recipe definitions (as many as there are, at most)
/// and plants their bugs; returns their ids in the order drawn.
fn plant_gt(b: &mut Builder, cfg: &SynthConfig) -> Vec<usize> {
    let mut cands: Vec<usize> = b
        .all_defs()
        .iter()
        .filter(|(_, d)| d.recipe.is_some())
        .map(|(_, d)| d.id)
        .collect();
    cands.shuffle(&mut b.rng);
    let g = b.rng.random_range(cfg.gt_min..=cfg.gt_max).min(cands.len());
    let gt_ids: Vec<usize> = cands[..g].to_vec();
    for &id in &gt_ids {
        let d = b.def_mut(id);
        d.planted = true;
        d.role = Role::Gt;
    }
    gt_ids
}

/// A wrapper for each GT definition with probability `indirect_prob`, by GT id.
fn add_wrappers(b: &mut Builder, gt_ids: &[usize], indirect_prob: f64) -> BTreeMap<usize, Wrapper> {
    let mut wrappers = BTreeMap::new();
    for &id in gt_ids {
        if b.rng.random_bool(indirect_prob) {
            wrappers.insert(id, b.add_wrapper(id));
        }
    }
    wrappers
}

/// The package modules at the base commit and the gold patch.
struct Tree {
    /// The modules' files (base text), by module name.
    files: Vec<SourceFile>,
    /// Module indices by module name (the patch's file order).
    order: Vec<usize>,
    /// Base text by module index.
    texts: Vec<String>,
    /// 1-based line (base file) of each definition's first body line, by id.
    starts: BTreeMap<usize, usize>,
    patch: String,
}

/// Renders every module with and without the planted bugs; the diffs of the modules
/// that differ, in path order, are the gold patch.
fn render_tree(b: &Builder) -> Tree {
    let mut tree = Tree {
        files: Vec::new(),
        order: (0..b.modules.len()).collect(),
        texts: vec![String::new(); b.modules.len()],
        starts: BTreeMap::new(),
        patch: String::new(),
    };
    tree.order
        .sort_by(|&x, &y| b.modules[x].name.cmp(&b.modules[y].name));
    for &mi in &tree.order {
        let m = &b.modules[mi];
        let base = render_module(b.dom, m, true, &mut tree.starts);
        let fixed = render_module(b.dom, m, false, &mut BTreeMap::new());
        if base != fixed {
            tree.patch
                .push_str(&unified_diff(&m.path(&b.pkg), &base, &fixed));
        }
        tree.texts[mi] = base.clone();
        tree.files.push(SourceFile {
            path: m.path(&b.pkg),
            text: base,
        });
    }
    tree
}

/// Line `line` (1-based) of `text`, trimmed (as a traceback shows it).
fn line_at(text: &str, line: usize) -> String {
    text.split('\n')
        .nth(line - 1)
        .unwrap_or("")
        .trim()
        .to_string()
}

/// What the report and the GT need of each GT definition, in `gt_ids` order.
fn gt_views(
    b: &Builder,
    gt_ids: &[usize],
    wrappers: &BTreeMap<usize, Wrapper>,
    tree: &Tree,
) -> Vec<GtView> {
    gt_ids
        .iter()
        .map(|&id| {
            let (site, d) = b.find(id).expect("GT exists");
            let m = &b.modules[site.module];
            let path = m.path(&b.pkg);
            let bug = d.bug.as_ref().expect("GT has a bug");
            let start = tree.starts[&id];
            let raise_line = match &bug.symptom.outcome {
                Outcome::Raises { line, .. } => {
                    let text = line_at(&tree.texts[site.module], start + line);
                    Some((start + line, text))
                }
                Outcome::Value(_) => None,
            };
            let wrapper = wrappers.get(&id).map(|w| {
                let wm = &b.modules[w.module];
                let line = tree.starts[&w.id] + w.call_line;
                WrapperView {
                    path: wm.path(&b.pkg),
                    module: wm.name.clone(),
                    name: b.find(w.id).expect("wrapper exists").1.name.clone(),
                    call_line: line,
                    call_text: line_at(&tree.texts[w.module], line),
                }
            });
            GtView {
                key: match &site.class {
                    Some(c) => format!("{path}::{c}.{}", d.name),
                    None => format!("{path}::{}", d.name),
                },
                changed_line: start + bug.line,
                module: m.name.clone(),
                class: site.class.clone(),
                name: d.name.clone(),
                symptom: bug.symptom.clone(),
                raise_line,
                wrapper,
                path,
            }
        })
        .collect()
}

/// The top-level names the report calls (module index, name), in report order: the
/// package exports them first.
fn called_names(b: &Builder, views: &[GtView]) -> Vec<(usize, String)> {
    views
        .iter()
        .map(|v| match &v.wrapper {
            Some(w) => (b.module_index(&w.module), w.name.clone()),
            None => (
                b.module_index(&v.module),
                v.class.clone().unwrap_or_else(|| v.name.clone()),
            ),
        })
        .collect()
}

/// `tests/test_<module>.py` for up to 2 random modules (those with something to test).
fn test_files(b: &mut Builder) -> Vec<SourceFile> {
    let mut test_mods: Vec<usize> = (0..b.modules.len()).collect();
    test_mods.shuffle(&mut b.rng);
    test_mods
        .into_iter()
        .take(2)
        .filter_map(|mi| {
            let m = &b.modules[mi];
            test_file(&b.pkg, m).map(|text| SourceFile {
                path: format!("tests/test_{}.py", m.name),
                text,
            })
        })
        .collect()
}

/// The synthetic base commit: SHA-1 of the blob ids and paths of `files` and the
/// instance id.
fn base_commit(files: &[SourceFile], instance_id: &str) -> String {
    let mut listing = String::new();
    for f in files {
        listing.push_str(&format!("{} {}\n", blob_id(&f.text), f.path));
    }
    listing.push_str(instance_id);
    sha1_hex(listing.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::synth::check::index_of;
    use std::collections::BTreeSet;
    use tooltrain_rollout::gt::Location;
    use tooltrain_rollout::index::{FileIndex, RepoIndex};

    fn cfg() -> SynthConfig {
        SynthConfig::default()
    }

    /// The package modules of a task (not `__init__`, `errors`, tests, `setup.py`).
    fn modules(t: &Task, idx: &RepoIndex) -> Vec<FileIndex> {
        let pkg = t.instance.repo.split('/').nth(1).unwrap().to_string();
        idx.files
            .iter()
            .filter(|f| {
                f.path.starts_with(&format!("{pkg}/"))
                    && !f.path.ends_with("/__init__.py")
                    && !f.path.ends_with("/errors.py")
            })
            .cloned()
            .collect()
    }

    /// Names of all module functions and non-dunder methods.
    fn def_names(files: &[FileIndex]) -> Vec<String> {
        let mut out = Vec::new();
        for f in files {
            out.extend(f.functions.iter().map(|x| x.name.clone()));
            for c in &f.classes {
                out.extend(
                    c.methods
                        .iter()
                        .filter(|m| !m.name.starts_with("__"))
                        .map(|m| m.name.clone()),
                );
            }
        }
        out
    }

    #[test]
    fn structure_knobs_set_the_counts() {
        let c = SynthConfig {
            files: 3,
            classes_per_file: 2,
            methods_per_class: 4,
            functions_per_file: 1,
            decoys: 0,
            indirect_prob: 0.0,
            ..cfg()
        };
        for i in 0..15 {
            let t = make_task(&c, i);
            let idx = index_of(&t);
            let ms = modules(&t, &idx);
            assert_eq!(ms.len(), 3);
            for f in &ms {
                assert_eq!(f.classes.len(), 2, "{}", f.path);
                for k in &f.classes {
                    assert_eq!(
                        k.methods
                            .iter()
                            .filter(|m| !m.name.starts_with("__"))
                            .count(),
                        4
                    );
                }
                assert_eq!(f.functions.len(), 1);
            }
            // Without decoys every definition name is unique in the package.
            let names = def_names(&ms);
            let set: BTreeSet<&String> = names.iter().collect();
            assert_eq!(set.len(), names.len(), "{names:?}");
            assert!(t.decoys.is_empty());
        }
        // Wrappers add one module function per GT location.
        let w = SynthConfig {
            indirect_prob: 1.0,
            ..c.clone()
        };
        for i in 0..10 {
            let t = make_task(&w, i);
            let idx = index_of(&t);
            let n: usize = modules(&t, &idx).iter().map(|f| f.functions.len()).sum();
            assert_eq!(n, 3 + t.gt.len());
        }
    }

    #[test]
    fn decoys_reuse_or_resemble_gt_names() {
        let c = SynthConfig { decoys: 4, ..cfg() };
        let (mut same_name, mut same_class) = (0, 0);
        for i in 0..30 {
            let t = make_task(&c, i);
            assert_eq!(t.decoys.len(), 4);
            let idx = index_of(&t);
            let ms = modules(&t, &idx);
            let names = def_names(&ms);
            for g in &t.gt {
                let name = Location::parse(g).name.unwrap();
                let bare = name.rsplit('.').next().unwrap();
                same_name += names.iter().filter(|n| *n == bare).count() - 1;
                if let Some((cls, _)) = name.split_once('.') {
                    let n = ms
                        .iter()
                        .filter(|f| f.classes.iter().any(|k| k.name == cls))
                        .count();
                    same_class += n - 1;
                }
            }
            for d in &t.decoys {
                assert!(!t.gt.contains(d), "decoy {d} is a GT location");
            }
        }
        assert!(same_name >= 20, "{same_name} same-name decoys");
        assert!(same_class >= 5, "{same_class} same-class decoys");
    }

    #[test]
    fn mention_and_indirect_knobs_change_the_report() {
        let never = SynthConfig {
            mention_prob: 0.0,
            indirect_prob: 0.0,
            ..cfg()
        };
        let always = SynthConfig {
            mention_prob: 1.0,
            indirect_prob: 0.0,
            ..cfg()
        };
        let hidden = SynthConfig {
            mention_prob: 0.0,
            indirect_prob: 1.0,
            ..cfg()
        };
        for i in 0..40 {
            let t = make_task(&never, i);
            let ps = &t.instance.problem_statement;
            for g in &t.gt {
                let loc = Location::parse(g);
                let dotted = loc.file.trim_end_matches(".py").replace('/', ".");
                assert!(!ps.contains(&loc.file), "{ps}");
                assert!(!ps.contains(&format!("{dotted} import")), "{ps}");
                assert!(!ps.contains("Traceback"));
            }
            let t = make_task(&always, i);
            let ps = &t.instance.problem_statement;
            for (g, e) in t.gt.iter().zip(&t.entry_points) {
                let loc = Location::parse(g);
                let dotted = loc.file.trim_end_matches(".py").replace('/', ".");
                assert!(ps.contains(&format!("from {dotted} import")), "{ps}");
                // Direct calls: the entry point is the GT definition itself.
                assert_eq!(Some(e), loc.name.as_ref());
            }
            let t = make_task(&hidden, i);
            let ps = &t.instance.problem_statement;
            for (g, e) in t.gt.iter().zip(&t.entry_points) {
                let name = Location::parse(g).name.unwrap();
                let bare = name.rsplit('.').next().unwrap();
                assert!(ps.contains(e.as_str()), "{e} not in {ps}");
                assert!(!ps.contains(bare), "{bare} in {ps}");
            }
        }
    }

    #[test]
    fn prompts_stay_small() {
        // The structure listing of the 5 largest files plus the report, as in the
        // function-level prompt, in characters (~3.5 characters a token).
        let c = cfg();
        let mut worst = 0;
        for i in 0..50 {
            let t = make_task(&c, i);
            let idx = index_of(&t);
            let mut blocks: Vec<usize> = idx
                .files
                .iter()
                .map(|f| {
                    let mut n = f.path.len() + 5;
                    for k in &f.classes {
                        n += k.name.len()
                            + 20
                            + k.methods.iter().map(|m| m.name.len() + 2).sum::<usize>();
                    }
                    n + 20 + f.functions.iter().map(|x| x.name.len() + 2).sum::<usize>()
                })
                .collect();
            blocks.sort_unstable_by(|a, b| b.cmp(a));
            let total = blocks.iter().take(5).sum::<usize>() + t.instance.problem_statement.len();
            worst = worst.max(total);
        }
        assert!(worst < 3500, "{worst} characters");
    }

    #[test]
    fn teacher_tool_calls_read_the_buggy_code() {
        // The oracle's call for each GT location returns the code with the buggy line
        // that the patch removes.
        use tooltrain_rollout::policy::call_for;
        use tooltrain_rollout::tools::{execute, ToolLimits};
        let c = SynthConfig { gt_max: 3, ..cfg() };
        for i in 0..20 {
            let t = make_task(&c, i);
            let idx = index_of(&t);
            let removed: Vec<&str> = t
                .instance
                .patch
                .lines()
                .filter(|l| l.starts_with('-') && !l.starts_with("---"))
                .map(|l| l[1..].trim())
                .collect();
            for g in &t.gt {
                let call = call_for(&Location::parse(g), &idx).unwrap();
                let out = execute(&idx, &call, ToolLimits::default());
                assert!(out.found, "{g}: {}", out.observation);
                assert!(removed.iter().any(|r| out.observation.contains(r)), "{g}");
            }
        }
    }

    #[test]
    fn same_seed_same_task_different_seed_different_task() {
        let c = cfg();
        assert_eq!(make_task(&c, 7), make_task(&c, 7));
        assert_ne!(make_task(&c, 7), make_task(&c, 8));
        let other = SynthConfig { seed: 1, ..cfg() };
        assert_ne!(make_task(&c, 7), make_task(&other, 7));
        // A task does not depend on how many are generated.
        let big = SynthConfig { n: 1000, ..cfg() };
        assert_eq!(make_task(&c, 3), make_task(&big, 3));
    }
}
