mod audit;
mod common;
mod input;
mod isolation;
mod lifecycle;
