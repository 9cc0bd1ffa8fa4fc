//! xrun: a declarative experiment runner for language-model research. One TOML file describes the
//! corpus, tokenizer, model, pretraining objective, fine-tuning task and report; `exec::run` carries
//! it out stage by stage on a burn backend and renders an HTML report.

pub mod bench;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod data;
pub mod exec;
pub mod hf;
pub mod metrics;
pub mod model;
pub mod plan;
pub mod report;
pub mod tokenizer;
pub mod train;
