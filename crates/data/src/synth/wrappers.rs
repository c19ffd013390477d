//! Wrappers: a public function, in another module when there is one, that calls a
//! ground-truth definition. A report that calls the wrapper puts the location one hop
//! away from what it names (`SynthConfig::indirect_prob`).

use super::builder::Builder;
use super::model::{Def, Role};
use super::names::{article, capitalise, pick, snake, DECOY_SUFFIXES, WRAPPER_VERBS};
use rand::RngExt;
use std::collections::BTreeSet;

/// A wrapper added by [`Builder::add_wrapper`].
#[derive(Debug, Clone, Copy)]
pub(super) struct Wrapper {
    /// The module it is in.
    pub(super) module: usize,
    /// Its definition id.
    pub(super) id: usize,
    /// The body line (0-based) of the call to the GT definition.
    pub(super) call_line: usize,
}

impl Builder<'_> {
    /// Adds a public wrapper that calls GT `gt_id`.
    pub(super) fn add_wrapper(&mut self, gt_id: usize) -> Wrapper {
        let (site, gt) = self.find(gt_id).expect("GT exists");
        let gt = gt.clone();
        let others: Vec<usize> = (0..self.modules.len())
            .filter(|&m| m != site.module)
            .collect();
        let mi = if others.is_empty() {
            site.module
        } else {
            *pick(&mut self.rng, &others)
        };
        let taken = self.modules[mi].top_names();
        let name = self.wrapper_name(&gt.noun, &taken);
        let args = gt.params.join(", ");
        let mut lines = Vec::new();
        if self.rng.random_bool(0.4) {
            let p = &gt.params[0];
            lines.push(format!("if {p} is None:"));
            lines.push(format!("    raise ValueError(\"{p} is required\")"));
        }
        let target = site.class.clone().unwrap_or_else(|| gt.name.clone());
        if mi != site.module {
            lines.push(format!(
                "from .{} import {target}",
                self.modules[site.module].name
            ));
            lines.push(String::new());
        }
        let call = match &site.class {
            Some(cls) => {
                let var = snake(cls);
                lines.push(format!("{var} = {cls}()"));
                format!("return {var}.{}({args})", gt.name)
            }
            None => format!("return {}({args})", gt.name),
        };
        let call_line = lines.len();
        lines.push(call);
        let doc = match self.rng.random_range(0..3) {
            0 => format!("Public entry point for {} handling.", gt.noun),
            1 => "Convenience wrapper used by the command line interface.".to_string(),
            _ => format!(
                "{} {} with the default settings.",
                capitalise(name.split('_').next().unwrap_or("handle")),
                article(&gt.noun)
            ),
        };
        let id = self.id();
        let d = Def {
            id,
            name,
            params: gt.params.clone(),
            doc,
            lines,
            recipe: None,
            bug: None,
            planted: false,
            role: Role::Wrapper,
            noun: gt.noun.clone(),
            measure: gt.measure.clone(),
        };
        self.insert_func(mi, d);
        Wrapper {
            module: mi,
            id,
            call_line,
        }
    }

    /// `<verb>_<noun>` or `<verb>_<noun>_<suffix>`, not in `taken` nor used in the
    /// repository; marked used.
    fn wrapper_name(&mut self, noun: &str, taken: &BTreeSet<String>) -> String {
        let name = loop {
            let n = format!("{}_{noun}", pick(&mut self.rng, WRAPPER_VERBS));
            if !taken.contains(&n) && !self.used.contains(&n) {
                break n;
            }
            let n = format!("{n}_{}", pick(&mut self.rng, DECOY_SUFFIXES));
            if !taken.contains(&n) && !self.used.contains(&n) {
                break n;
            }
        };
        self.used.insert(name.clone());
        name
    }
}
