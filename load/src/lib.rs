//! geomatch-load's library: the standard, seeded benchmark population, shared by the load
//! generator (the `geomatch-load` binary) and geomatch's criterion benches.

pub mod population;
