//! The REST API over real HTTP on a random port with a fresh database per test.

mod generate;
mod helpers;
mod models;
mod openai;
mod runs;
