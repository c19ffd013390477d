//! [`Builder`]: makes a task's package (modules, classes, recipe bodies) and looks
//! definitions up and inserts new ones. Decoys ([`super::decoys`]) and wrappers
//! ([`super::wrappers`]) are added by further `impl Builder` blocks.

use super::model::{Class, Def, Item, Module, Role, Site};
use super::names::{article, capitalise, pick, snake, Domain, CLASS_SUFFIXES, DOMAINS};
use super::recipes::{build_body, Body, Consts, Recipe, RECIPES};
use super::SynthConfig;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{RngExt, SeedableRng};
use std::collections::BTreeSet;
use tooltrain_util::Rng as SplitMix64;

/// A task's package under construction, with the task's RNG: every random choice of a
/// task is drawn from `rng`, in program order.
pub(super) struct Builder<'a> {
    pub(super) rng: StdRng,
    pub(super) dom: &'a Domain,
    pub(super) pkg: String,
    pub(super) modules: Vec<Module>,
    next_id: usize,
    /// Every class and def name created so far (base names stay unique repo-wide).
    pub(super) used: BTreeSet<String>,
}

/// The RNG of task `i` under master seed `seed`: seeded with
/// `splitmix64(splitmix64(seed) ^ i)`, where `splitmix64(x)` is the first output of a
/// SplitMix64 generator in state `x`.
fn task_rng(seed: u64, i: usize) -> StdRng {
    let splitmix64 = |x: u64| SplitMix64::new(x).next_u64();
    StdRng::seed_from_u64(splitmix64(splitmix64(seed) ^ (i as u64)))
}

impl Builder<'static> {
    /// Task `i`'s builder: its RNG, then a domain and a package name drawn from it.
    pub(super) fn for_task(seed: u64, i: usize) -> Self {
        let mut rng = task_rng(seed, i);
        let dom = pick(&mut rng, DOMAINS);
        let pkg = pick(&mut rng, dom.packages).to_string();
        Builder {
            rng,
            dom,
            pkg,
            modules: Vec::new(),
            next_id: 0,
            used: BTreeSet::from([dom.error.to_string()]),
        }
    }
}

impl Builder<'_> {
    /// A new definition id.
    pub(super) fn id(&mut self) -> usize {
        self.next_id += 1;
        self.next_id
    }

    /// Definition `id` and where it lives.
    pub(super) fn find(&self, id: usize) -> Option<(Site, &Def)> {
        self.all_defs().into_iter().find(|(_, d)| d.id == id)
    }

    /// Every method and function, in module and file order.
    pub(super) fn all_defs(&self) -> Vec<(Site, &Def)> {
        let mut out = Vec::new();
        for (mi, m) in self.modules.iter().enumerate() {
            for it in &m.items {
                match it {
                    Item::Func(f) => out.push((
                        Site {
                            module: mi,
                            class: None,
                        },
                        f,
                    )),
                    Item::Class(c) => {
                        for d in &c.methods {
                            out.push((
                                Site {
                                    module: mi,
                                    class: Some(c.name.clone()),
                                },
                                d,
                            ));
                        }
                    }
                }
            }
        }
        out
    }

    /// Definition `id`, to change it; panics when there is none.
    pub(super) fn def_mut(&mut self, id: usize) -> &mut Def {
        for m in &mut self.modules {
            for it in &mut m.items {
                match it {
                    Item::Func(f) if f.id == id => return f,
                    Item::Class(c) => {
                        if let Some(d) = c.methods.iter_mut().find(|d| d.id == id) {
                            return d;
                        }
                    }
                    _ => {}
                }
            }
        }
        panic!("definition {id} not found")
    }

    /// The index of the module called `name`; panics when there is none.
    pub(super) fn module_index(&self, name: &str) -> usize {
        self.modules
            .iter()
            .position(|m| m.name == name)
            .expect("module exists")
    }

    /// A body of `recipe` (noun and measure drawn) whose constants go to `consts`.
    fn body(&mut self, recipe: Recipe, consts: &mut Consts) -> Body {
        build_body(&mut self.rng, self.dom, &self.pkg, recipe, consts, None)
    }

    /// A recipe body whose name is not used yet in the repository: up to 20
    /// draws, then a 21st with a `_N` suffix.
    pub(super) fn fresh_body(&mut self, mi: usize, recipe: Recipe) -> Body {
        for _ in 0..20 {
            let mut consts = self.modules[mi].consts.clone();
            let b = self.body(recipe, &mut consts);
            if !self.used.contains(&b.name) {
                self.used.insert(b.name.clone());
                self.modules[mi].consts = consts;
                return b;
            }
        }
        let mut consts = std::mem::take(&mut self.modules[mi].consts);
        let b = self.body(recipe, &mut consts);
        self.modules[mi].consts = consts;
        let mut k = 2;
        let mut name = format!("{}_{k}", b.name);
        while self.used.contains(&name) {
            k += 1;
            name = format!("{}_{k}", b.name);
        }
        self.used.insert(name.clone());
        Body { name, ..b }
    }

    /// An unused class name of the domain, else a domain class with a suffix
    /// (`WarehouseManager`).
    pub(super) fn fresh_class_name(&mut self) -> String {
        let mut avail: Vec<&str> = self
            .dom
            .classes
            .iter()
            .copied()
            .filter(|c| !self.used.contains(*c))
            .collect();
        avail.shuffle(&mut self.rng);
        let name = match avail.first() {
            Some(c) => c.to_string(),
            None => loop {
                let c = format!(
                    "{}{}",
                    pick(&mut self.rng, self.dom.classes),
                    pick(&mut self.rng, CLASS_SUFFIXES)
                );
                if !self.used.contains(&c) {
                    break c;
                }
            },
        };
        self.used.insert(name.clone());
        name
    }

    /// `__init__` and, with probability 0.4, `__repr__` of class `class`.
    pub(super) fn special_methods(&mut self, class: &str) -> Vec<Def> {
        let mut init_lines = vec![
            "self.name = name".to_string(),
            "self.options = dict(options)".to_string(),
        ];
        if self.rng.random_bool(0.5) {
            init_lines.push(format!(
                "self._{} = {{}}",
                pick(&mut self.rng, &["cache", "index", "seen", "pending"])
            ));
        }
        let id = self.id();
        let mut out = vec![Def::special(
            id,
            "__init__",
            vec![format!("name=\"{}\"", snake(class)), "**options".into()],
            format!(
                "Create {} called ``name``.",
                article(&snake(class).replace('_', " "))
            ),
            init_lines,
        )];
        if self.rng.random_bool(0.4) {
            let id = self.id();
            out.push(Def::special(
                id,
                "__repr__",
                vec![],
                String::new(),
                vec!["return \"%s(%r)\" % (type(self).__name__, self.name)".into()],
            ));
        }
        out
    }

    /// A one-line class docstring.
    pub(super) fn class_doc(&mut self, name: &str) -> String {
        let noun = pick(&mut self.rng, self.dom.nouns);
        let t = self.rng.random_range(0..4);
        let words = snake(name).replace('_', " ");
        match t {
            0 => format!("Keep track of {noun}s for {}.", article(&words)),
            1 => format!(
                "{} and the operations on its {noun}s.",
                capitalise(&article(&words))
            ),
            2 => format!("Helpers around a single {words}."),
            _ => format!("High-level access to {noun} data of {}.", article(&words)),
        }
    }

    /// The package's `cfg.files` modules with their classes and functions (recipe
    /// bodies, none planted), items shuffled within each module.
    pub(super) fn build_modules(&mut self, cfg: &SynthConfig) {
        let mut names: Vec<&str> = self.dom.modules.to_vec();
        names.shuffle(&mut self.rng);
        for name in names.into_iter().take(cfg.files) {
            let doc = match self.rng.random_range(0..3) {
                0 => format!("{} handling for {}.", capitalise(name), self.pkg),
                1 => format!("Functions and classes that deal with {name}."),
                _ => format!("The ``{name}`` part of {}.", self.pkg),
            };
            self.modules.push(Module {
                name: name.to_string(),
                doc,
                consts: Consts::default(),
                items: Vec::new(),
            });
        }
        for mi in 0..self.modules.len() {
            let mut items = Vec::new();
            for _ in 0..cfg.classes_per_file {
                items.push(Item::Class(self.plain_class(mi, cfg.methods_per_class)));
            }
            for _ in 0..cfg.functions_per_file {
                items.push(Item::Func(self.plain_def(mi)));
            }
            items.shuffle(&mut self.rng);
            self.modules[mi].items = items;
        }
    }

    /// A class for module `mi`: special methods, then `methods` recipe methods.
    fn plain_class(&mut self, mi: usize, methods: usize) -> Class {
        let name = self.fresh_class_name();
        let mut defs = self.special_methods(&name);
        for _ in 0..methods {
            defs.push(self.plain_def(mi));
        }
        let doc = self.class_doc(&name);
        Class {
            name,
            doc,
            methods: defs,
        }
    }

    /// A recipe definition of a random recipe for module `mi`.
    fn plain_def(&mut self, mi: usize) -> Def {
        let r = *pick(&mut self.rng, &RECIPES);
        let b = self.fresh_body(mi, r);
        let id = self.id();
        Def::from_body(id, b, r, Role::Plain)
    }

    /// Inserts a function into module `mi` at a random position.
    pub(super) fn insert_func(&mut self, mi: usize, d: Def) {
        let n = self.modules[mi].items.len();
        let at = self.rng.random_range(0..=n);
        self.modules[mi].items.insert(at, Item::Func(d));
    }

    /// Inserts a method into class `class` of module `mi` after the special methods.
    pub(super) fn insert_method(&mut self, mi: usize, class: &str, d: Def) {
        let lo_hi = {
            let c = self.modules[mi].class(class).expect("class exists");
            let lo = c
                .methods
                .iter()
                .take_while(|m| m.role == Role::Special)
                .count();
            (lo, c.methods.len())
        };
        let at = self.rng.random_range(lo_hi.0..=lo_hi.1);
        for it in &mut self.modules[mi].items {
            if let Item::Class(c) = it {
                if c.name == class {
                    c.methods.insert(at, d);
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The task seed is `splitmix64(splitmix64(seed) ^ i)` with the reference
    /// SplitMix64 (Steele, Lea and Flood, 2014): increment by the golden gamma, then mix.
    #[test]
    fn task_seeds_follow_splitmix64() {
        fn reference(mut x: u64) -> u64 {
            x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
            x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            x ^ (x >> 31)
        }
        for (seed, i) in [(0u64, 0usize), (1, 7), (u64::MAX, 3), (12345, 99)] {
            let mut want = StdRng::seed_from_u64(reference(reference(seed) ^ i as u64));
            let mut got = task_rng(seed, i);
            for _ in 0..4 {
                assert_eq!(got.random::<u64>(), want.random::<u64>());
            }
        }
        // The first output of SplitMix64 from state 0 (the published test vector).
        assert_eq!(SplitMix64::new(0).next_u64(), 0xE220_A839_7B1D_CDAF);
    }
}
