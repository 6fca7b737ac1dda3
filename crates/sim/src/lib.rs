//! The livepatch simulator.
