//! Measuring generators on the toy world: a classifier of its pictures ([`classifier`]) and the Fréchet
//! distance of feature distributions ([`frechet`]).

pub mod classifier;
pub mod frechet;
