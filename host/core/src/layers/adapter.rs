//! Bottleneck adapter (Houlsby et al. 2019; Pfeiffer et al. 2020):
//! `h ← h + up(relu(down(h)))` with `down: [hidden/reduction, hidden]` and `up` starting at
//! zero, so a fresh adapter is the identity and the adapted model starts as the base model.
//! Parameters: `<place>.adapter.down.{weight,bias}`, `<place>.adapter.up.{weight,bias}`.

use candle_core::Tensor;

use crate::layers::{ForwardCtx, Linear};
use crate::{Init, ParamBuilder, Result};

#[derive(Debug, Clone)]
pub struct Adapter {
    down: Linear,
    up: Linear,
}

impl Adapter {
    pub fn new(hidden: usize, reduction_factor: usize, pb: &ParamBuilder) -> Result<Self> {
        let bottleneck = (hidden / reduction_factor.max(1)).max(1);
        let d = pb.pp("down");
        let u = pb.pp("up");
        let down = Linear::new(
            d.get_new(&[bottleneck, hidden], "weight", Init::Normal(0.02))?,
            Some(d.get_new(&[bottleneck], "bias", Init::Zeros)?),
        );
        let up = Linear::new(
            u.get_new(&[hidden, bottleneck], "weight", Init::Zeros)?,
            Some(u.get_new(&[hidden], "bias", Init::Zeros)?),
        );
        Ok(Self { down, up })
    }

    pub fn forward(&self, h: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let z = self.down.forward_t(h, ctx)?.relu()?;
        Ok((ctx.cast(h)? + self.up.forward_t(&z, ctx)?)?)
    }
}
