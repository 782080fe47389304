mod audit;
mod common;
mod configs;
mod image;
mod input;
mod isolation;
mod lifecycle;
mod network;
