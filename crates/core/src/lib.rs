//! The livepatch core.
