mod audit;
mod common;
mod configs;
mod input;
mod isolation;
mod lifecycle;
