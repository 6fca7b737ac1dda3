//! The control socket and what it answers: the agent's `/sys/kernel/livepatch`.
//!
//! - [`socket`]: the socket's directories and the socket, made so no other user can fake them.
//! - [`server`]: the socket's one thread, and the connections it serves.
//! - [`requests`]: each request of the protocol carried out on the agent.
//! - [`status`]: the state of patches and threads, as `livepatch status` shows it.

#![forbid(unsafe_code)]

pub mod requests;
pub mod server;
pub mod socket;
pub mod status;
