//! The x86-64 machine-code layer.
