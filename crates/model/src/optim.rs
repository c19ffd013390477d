//! Optimisation primitives shared by SFT and RL: AdamW with a fused CPU step, global-norm
//! gradient clipping, learning-rate schedules, and optimizer state save/load.

use crate::error::{Error, Result};
use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, DType, Device, InplaceOp2, Layout, Tensor, Var};
use rayon::prelude::*;
use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Mutex;

/// AdamW hyper-parameters (defaults: the paper's SFT settings).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        AdamWConfig {
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// Learning-rate schedule.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
pub enum LrSchedule {
    /// The same rate at every step.
    Constant { lr: f64 },
    /// Linear warm-up from 0 over `warmup_steps`, then cosine decay to `min_lr` at
    /// `total_steps`.
    WarmupCosine {
        lr: f64,
        warmup_steps: u64,
        total_steps: u64,
        min_lr: f64,
    },
}

impl LrSchedule {
    /// The learning rate of optimizer step `step` (0-based).
    pub fn lr_at(&self, step: u64) -> f64 {
        match *self {
            LrSchedule::Constant { lr } => lr,
            LrSchedule::WarmupCosine {
                lr,
                warmup_steps,
                total_steps,
                min_lr,
            } => {
                if step < warmup_steps {
                    return lr * (step + 1) as f64 / warmup_steps as f64;
                }
                let span = total_steps.saturating_sub(warmup_steps).max(1);
                let prog = ((step - warmup_steps) as f64 / span as f64).min(1.0);
                min_lr + 0.5 * (lr - min_lr) * (1.0 + (std::f64::consts::PI * prog).cos())
            }
        }
    }
}

/// Global L2 norm of the gradients of `params`, and the factor `min(1, max_norm / norm)`
/// that clips it to `max_norm` (pass it to [`AdamW::step`]).
pub fn clip_grad_norm(grads: &GradStore, params: &[Var], max_norm: f64) -> Result<(f64, f64)> {
    let mut sq = 0f64;
    for p in params {
        if let Some(g) = grads.get(p.as_tensor()) {
            sq += match crate::kernels::sum_squares_f32(g) {
                Some(s) => s,
                // f64 exactly; f32 and half-precision gradients summed in f32 (no f64
                // copy of a large gradient).
                None if g.dtype() == DType::F64 => g.sqr()?.sum_all()?.to_scalar::<f64>()?,
                None => g
                    .to_dtype(DType::F32)?
                    .sqr()?
                    .sum_all()?
                    .to_dtype(DType::F64)?
                    .to_scalar::<f64>()?,
            };
        }
    }
    let norm = sq.sqrt();
    let scale = if norm > max_norm && norm > 0.0 {
        max_norm / (norm + 1e-6)
    } else {
        1.0
    };
    Ok((norm, scale))
}

enum Moments {
    /// f32 parameters on the CPU: moments in plain memory, updated by the fused kernel.
    Cpu(Vec<f32>, Vec<f32>),
    /// Any other device or dtype: moment tensors (f32, or f64 for f64 parameters),
    /// updated with tensor ops.
    Tensor(Tensor, Tensor),
}

struct Slot {
    name: String,
    var: Var,
    decay: bool,
    moments: Moments,
}

/// AdamW with decoupled weight decay, applied to matrices only (no decay on norms and
/// biases, i.e. parameters of rank < 2).
pub struct AdamW {
    cfg: AdamWConfig,
    step: u64,
    slots: Vec<Slot>,
}

/// One fused AdamW update of an f32 CPU parameter: reads p, g, m, v once, writes p, m, v.
struct FusedAdamW<'a> {
    m: Mutex<&'a mut [f32]>,
    v: Mutex<&'a mut [f32]>,
    lr: f32,
    b1: f32,
    b2: f32,
    eps: f32,
    wd: f32,
    bc1: f32,
    bc2: f32,
    gscale: f32,
}

impl InplaceOp2 for FusedAdamW<'_> {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }
    fn cpu_fwd(
        &self,
        dst: &mut CpuStorage,
        dst_l: &Layout,
        gs: &CpuStorage,
        gl: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(p), CpuStorage::F32(g)) = (dst, gs) else {
            candle_core::bail!("fused adamw expects f32 parameter and gradient")
        };
        let (Some((p0, p1)), Some((g0, g1))) =
            (dst_l.contiguous_offsets(), gl.contiguous_offsets())
        else {
            candle_core::bail!("fused adamw expects contiguous tensors")
        };
        let (p, g) = (&mut p[p0..p1], &g[g0..g1]);
        let mut m = self.m.lock().expect("lock");
        let mut v = self.v.lock().expect("lock");
        let s = self;
        const CH: usize = 1 << 14;
        p.par_chunks_mut(CH)
            .zip(g.par_chunks(CH))
            .zip(m.par_chunks_mut(CH))
            .zip(v.par_chunks_mut(CH))
            .for_each(|(((p, g), m), v)| {
                crate::kernels::fast!({
                    let it = p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut());
                    for (((p, g), m), v) in it {
                        let gi = g * s.gscale;
                        *m = s.b1 * *m + (1.0 - s.b1) * gi;
                        *v = s.b2 * *v + (1.0 - s.b2) * gi * gi;
                        let upd = (*m / s.bc1) / ((*v / s.bc2).sqrt() + s.eps);
                        *p -= s.lr * (upd + s.wd * *p);
                    }
                })
            });
        Ok(())
    }
}

impl AdamW {
    /// An optimizer over `params` (name -> variable).
    pub fn new(params: &BTreeMap<String, Var>, cfg: AdamWConfig) -> Result<Self> {
        let slots = params
            .iter()
            .map(|(name, var)| {
                let n = var.elem_count();
                let moments = if var.device().is_cpu() && var.dtype() == DType::F32 {
                    Moments::Cpu(vec![0.0; n], vec![0.0; n])
                } else {
                    let dt = if var.dtype() == DType::F64 {
                        DType::F64
                    } else {
                        DType::F32
                    };
                    let z = Tensor::zeros(var.shape(), dt, var.device())?;
                    Moments::Tensor(z.clone(), z)
                };
                Ok(Slot {
                    name: name.clone(),
                    var: var.clone(),
                    decay: var.rank() >= 2,
                    moments,
                })
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(AdamW {
            cfg,
            step: 0,
            slots,
        })
    }

    /// Number of steps taken.
    pub fn steps(&self) -> u64 {
        self.step
    }

    /// The variables this optimizer updates.
    pub fn vars(&self) -> Vec<Var> {
        self.slots.iter().map(|s| s.var.clone()).collect()
    }

    /// One update with learning rate `lr`; every gradient is multiplied by `grad_scale`
    /// first (the clipping factor of [`clip_grad_norm`], or 1). Parameters without a
    /// gradient are left alone.
    pub fn step(&mut self, grads: &GradStore, lr: f64, grad_scale: f64) -> Result<()> {
        self.step += 1;
        let c = self.cfg;
        let t = self.step as i32;
        let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
        for slot in &mut self.slots {
            let Some(g) = grads.get(slot.var.as_tensor()) else {
                continue;
            };
            let wd = if slot.decay { c.weight_decay } else { 0.0 };
            match &mut slot.moments {
                Moments::Cpu(m, v) => {
                    let op = FusedAdamW {
                        m: Mutex::new(m.as_mut_slice()),
                        v: Mutex::new(v.as_mut_slice()),
                        lr: lr as f32,
                        b1: c.beta1 as f32,
                        b2: c.beta2 as f32,
                        eps: c.eps as f32,
                        wd: wd as f32,
                        bc1: bc1 as f32,
                        bc2: bc2 as f32,
                        gscale: grad_scale as f32,
                    };
                    slot.var.as_tensor().inplace_op2(&g.contiguous()?, &op)?;
                }
                Moments::Tensor(m, v) => {
                    let g = (g.to_dtype(m.dtype())? * grad_scale)?;
                    *m = ((&*m * c.beta1)? + (&g * (1.0 - c.beta1))?)?;
                    *v = ((&*v * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
                    let upd = ((&*m / bc1)? / ((&*v / bc2)?.sqrt()? + c.eps)?)?;
                    let p = slot.var.as_tensor().to_dtype(m.dtype())?;
                    let newp = (&p - ((upd + (&p * wd)?)? * lr)?)?;
                    slot.var.set(&newp.to_dtype(slot.var.dtype())?)?;
                }
            }
        }
        Ok(())
    }

    /// Saves the moments and step count (safetensors, written atomically).
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut ts: HashMap<String, Tensor> = HashMap::new();
        for s in &self.slots {
            let (m, v) = match &s.moments {
                Moments::Cpu(m, v) => (
                    Tensor::from_slice(m, s.var.shape(), &Device::Cpu)?,
                    Tensor::from_slice(v, s.var.shape(), &Device::Cpu)?,
                ),
                Moments::Tensor(m, v) => (m.clone(), v.clone()),
            };
            ts.insert(format!("m.{}", s.name), m);
            ts.insert(format!("v.{}", s.name), v);
        }
        ts.insert(
            "step".into(),
            Tensor::new(&[self.step as f64], &Device::Cpu)?,
        );
        let tmp = path.with_extension("tmp");
        candle_core::safetensors::save(&ts, &tmp).map_err(|e| Error::bad_file(&tmp, e))?;
        std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
    }

    /// Restores the state written by [`AdamW::save`] for the same parameters.
    pub fn load(&mut self, path: &Path) -> Result<()> {
        let mut ts = candle_core::safetensors::load(path, &Device::Cpu)
            .map_err(|e| Error::bad_file(path, e))?;
        let step = ts
            .remove("step")
            .ok_or_else(|| Error::bad_file(path, "missing `step`"))?
            .to_vec1::<f64>()?;
        for s in &mut self.slots {
            let mut take = |k: String| -> Result<Tensor> {
                let t = ts
                    .remove(&k)
                    .ok_or_else(|| Error::bad_file(path, format!("missing `{k}`")))?;
                if t.dims() != s.var.dims() {
                    return Err(Error::bad_file(
                        path,
                        format!(
                            "`{k}` has shape {:?}, parameter has {:?}",
                            t.dims(),
                            s.var.dims()
                        ),
                    ));
                }
                Ok(t)
            };
            let (m, v) = (
                take(format!("m.{}", s.name))?,
                take(format!("v.{}", s.name))?,
            );
            s.moments = match s.moments {
                Moments::Cpu(..) => {
                    Moments::Cpu(m.flatten_all()?.to_vec1()?, v.flatten_all()?.to_vec1()?)
                }
                Moments::Tensor(..) => {
                    Moments::Tensor(m.to_device(s.var.device())?, v.to_device(s.var.device())?)
                }
            };
        }
        self.step = step.first().copied().unwrap_or(0.0) as u64;
        Ok(())
    }
}
