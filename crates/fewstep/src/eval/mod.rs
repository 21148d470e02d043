//! Measuring generators on the toy world: a classifier of its pictures ([`classifier`]) and the Fréchet
//! distance of feature distributions ([`frechet`]), and the scores of a generator built on them ([`score`]).

pub mod classifier;
pub mod frechet;
pub mod score;
