//! Architectures: each file builds a model's [blocks](super::blocks) from the tensor names of one
//! family of model files. A new family is one more file here.

pub mod deepseek;
pub mod hf;
pub mod xmoe;
