//! Decoys: definitions that look like a ground-truth location. Each one is, by a uniform
//! pick among the kinds possible for its GT:
//! - the GT's method name in another class ([`Kind::SameNameOtherClass`]);
//! - the GT's class, with the GT's method, in another module
//!   ([`Kind::SameClassOtherModule`]);
//! - the GT's function name in another module ([`Kind::SameFunctionOtherModule`]);
//! - a similar name (`parse_zone_options_strict`, `_parse_zone_options`,
//!   `parse_parcel_options`) in the GT's own scope or another module ([`Kind::Similar`]).
//!
//! A decoy uses the GT's recipe with probability 0.7 (so the same error message shape)
//! and always the GT's noun and measure.

use super::builder::Builder;
use super::model::{Class, Def, Item, Role, Site};
use super::names::{pick, DECOY_SUFFIXES};
use super::recipes::{build_body, RECIPES};
use rand::RngExt;
use std::collections::BTreeSet;

#[derive(Clone, Copy)]
enum Kind {
    SameNameOtherClass,
    Similar,
    SameClassOtherModule,
    SameFunctionOtherModule,
}

/// Where the decoys of one GT definition can go.
struct Targets {
    /// Modules other than the GT's.
    other_mods: Vec<usize>,
    /// Classes (module, name) other than the GT's that lack a method of the GT's name.
    other_classes: Vec<(usize, String)>,
    /// The kinds possible, in the order the pick draws from.
    kinds: Vec<Kind>,
}

impl Builder<'_> {
    /// Adds one decoy of GT definition `gt_id`; returns its location key.
    pub(super) fn add_decoy(&mut self, gt_id: usize) -> String {
        let (site, gt) = self.find(gt_id).expect("GT exists");
        let gt = gt.clone();
        let t = self.decoy_targets(&site, &gt);
        match *pick(&mut self.rng, &t.kinds) {
            Kind::SameNameOtherClass => self.same_name_other_class(&gt, &t),
            Kind::SameClassOtherModule => self.same_class_other_module(&site, &gt, &t),
            Kind::SameFunctionOtherModule => self.same_function_other_module(&gt, &t),
            Kind::Similar => self.similar_decoy(&site, &gt, &t),
        }
    }

    fn decoy_targets(&self, site: &Site, gt: &Def) -> Targets {
        let other_mods: Vec<usize> = (0..self.modules.len())
            .filter(|&m| m != site.module)
            .collect();
        let mut other_classes: Vec<(usize, String)> = Vec::new();
        for (mi, m) in self.modules.iter().enumerate() {
            for it in &m.items {
                if let Item::Class(c) = it {
                    let same = Some(&c.name) == site.class.as_ref() && mi == site.module;
                    if !same && !c.methods.iter().any(|d| d.name == gt.name) {
                        other_classes.push((mi, c.name.clone()));
                    }
                }
            }
        }
        let mut kinds = vec![Kind::Similar];
        if !other_classes.is_empty() {
            kinds.push(Kind::SameNameOtherClass);
        }
        if let Some(cls) = &site.class {
            if !self.modules_without_class(&other_mods, cls).is_empty() {
                kinds.push(Kind::SameClassOtherModule);
            }
        } else if !self.modules_without_name(&other_mods, &gt.name).is_empty() {
            kinds.push(Kind::SameFunctionOtherModule);
        }
        Targets {
            other_mods,
            other_classes,
            kinds,
        }
    }

    /// The modules of `mods` with no class and no top-level name `cls`.
    fn modules_without_class(&self, mods: &[usize], cls: &str) -> Vec<usize> {
        mods.iter()
            .copied()
            .filter(|&m| {
                self.modules[m].class(cls).is_none() && !self.modules[m].top_names().contains(cls)
            })
            .collect()
    }

    /// The modules of `mods` with no top-level name `name`.
    fn modules_without_name(&self, mods: &[usize], name: &str) -> Vec<usize> {
        mods.iter()
            .copied()
            .filter(|&m| !self.modules[m].top_names().contains(name))
            .collect()
    }

    fn same_name_other_class(&mut self, gt: &Def, t: &Targets) -> String {
        let (mi, cname) = pick(&mut self.rng, &t.other_classes).clone();
        let d = self.decoy_def(mi, gt, gt.name.clone());
        self.insert_method(mi, &cname, d);
        format!("{}::{cname}.{}", self.modules[mi].path(&self.pkg), gt.name)
    }

    /// A new class of the GT's name (special methods and the decoy method) at a random
    /// position of another module.
    fn same_class_other_module(&mut self, site: &Site, gt: &Def, t: &Targets) -> String {
        let cls = site.class.clone().expect("method GT");
        let cands = self.modules_without_class(&t.other_mods, &cls);
        let mi = *pick(&mut self.rng, &cands);
        let mut methods = self.special_methods(&cls);
        let d = self.decoy_def(mi, gt, gt.name.clone());
        methods.push(d);
        let doc = self.class_doc(&cls);
        let n = self.modules[mi].items.len();
        let at = self.rng.random_range(0..=n);
        self.modules[mi].items.insert(
            at,
            Item::Class(Class {
                name: cls.clone(),
                doc,
                methods,
            }),
        );
        format!("{}::{cls}.{}", self.modules[mi].path(&self.pkg), gt.name)
    }

    fn same_function_other_module(&mut self, gt: &Def, t: &Targets) -> String {
        let cands = self.modules_without_name(&t.other_mods, &gt.name);
        let mi = *pick(&mut self.rng, &cands);
        let d = self.decoy_def(mi, gt, gt.name.clone());
        self.insert_func(mi, d);
        format!("{}::{}", self.modules[mi].path(&self.pkg), gt.name)
    }

    /// A similar name in the GT's own scope (class or module; probability 0.6) or in a
    /// random other module.
    fn similar_decoy(&mut self, site: &Site, gt: &Def, t: &Targets) -> String {
        let mi = if self.rng.random_bool(0.6) || t.other_mods.is_empty() {
            site.module
        } else {
            *pick(&mut self.rng, &t.other_mods)
        };
        match (&site.class, mi == site.module) {
            (Some(cls), true) => {
                let taken: BTreeSet<String> = self.modules[mi]
                    .class(cls)
                    .map(|c| c.methods.iter().map(|d| d.name.clone()).collect())
                    .unwrap_or_default();
                let name = self.similar_name(&gt.name, &taken);
                let d = self.decoy_def(mi, gt, name.clone());
                self.insert_method(mi, cls, d);
                format!("{}::{cls}.{name}", self.modules[mi].path(&self.pkg))
            }
            _ => {
                let taken = self.modules[mi].top_names();
                let name = self.similar_name(&gt.name, &taken);
                let d = self.decoy_def(mi, gt, name.clone());
                self.insert_func(mi, d);
                format!("{}::{name}", self.modules[mi].path(&self.pkg))
            }
        }
    }

    /// A decoy def like `gt` (same recipe with probability 0.7, same noun and measure),
    /// named `name`, with constants registered in module `mi`.
    fn decoy_def(&mut self, mi: usize, gt: &Def, name: String) -> Def {
        let recipe = if self.rng.random_bool(0.7) {
            gt.recipe.expect("GT has a recipe")
        } else {
            *pick(&mut self.rng, &RECIPES)
        };
        let b = build_body(
            &mut self.rng,
            self.dom,
            &self.pkg,
            recipe,
            &mut self.modules[mi].consts,
            Some((&gt.noun, &gt.measure)),
        );
        let id = self.id();
        let mut d = Def::from_body(id, b, recipe, Role::Decoy);
        d.name = name;
        d
    }

    /// A name like `name` that is neither in `taken` nor used in the repository: up to
    /// 30 draws of a suffixed, underscored or noun-swapped variant, then `name_N`.
    fn similar_name(&mut self, name: &str, taken: &BTreeSet<String>) -> String {
        for _ in 0..30 {
            let cand = match self.rng.random_range(0..3) {
                0 => format!("{name}_{}", pick(&mut self.rng, DECOY_SUFFIXES)),
                1 => format!("_{name}"),
                _ => {
                    // Swap one word for another noun of the domain.
                    let parts: Vec<&str> = name.split('_').collect();
                    let k = self.rng.random_range(0..parts.len());
                    let w = pick(&mut self.rng, self.dom.nouns);
                    let mut p: Vec<String> = parts.iter().map(|s| s.to_string()).collect();
                    p[k] = if parts[k].ends_with('s') {
                        format!("{w}s")
                    } else {
                        w.to_string()
                    };
                    p.join("_")
                }
            };
            if cand != name && !taken.contains(&cand) && !self.used.contains(&cand) {
                self.used.insert(cand.clone());
                return cand;
            }
        }
        let mut k = 2;
        loop {
            let cand = format!("{name}_{k}");
            if !taken.contains(&cand) && !self.used.contains(&cand) {
                self.used.insert(cand.clone());
                return cand;
            }
            k += 1;
        }
    }
}
