//! CPU kernels as candle custom ops, for the paths where candle's own CPU implementation is the
//! bottleneck. Other devices keep candle's ops; each kernel is tested against the plain candle op.

pub mod group_norm;
pub mod unfold;
