//! The control socket and what it answers: the agent's `/sys/kernel/livepatch`.
//!
//! - [`server`]: the socket, its one thread, and the connections it serves.
//! - [`requests`]: each request of the protocol carried out on the agent.
//! - [`status`]: the state of patches and threads, as `livepatch status` shows it.

#![forbid(unsafe_code)]

pub mod requests;
pub mod server;
pub mod status;
